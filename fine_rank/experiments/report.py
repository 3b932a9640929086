"""The parts of a fine-ranker report that every table shares: the header, the methods and
frequency-bucket tables, the plots, and the world notes at the end."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recstack.evaluation import report as R

from fine_rank.experiments.runs import Tables


def methods_table(entries: dict, kind: str) -> str:
    header = ["method", "student AUC", "Δ vs baseline [95% CI]", "teacher/aux AUC", "AUC vs truth (Δ)",
              "calibration", "data ×", "LR", "valid AUC", "train s"]
    rows = []
    for name, e in entries.items():
        t = e.get("teacher_auc") or e.get("aux_auc")
        de = e.get("data_equivalent") or {}
        mult = de.get("multiplier")
        mult_s = "–" if mult is None else (f"{mult:.2f}" + ("*" if de.get("extrapolated") else ""))
        rows.append([name, R.fmt_mean_std(e["student_auc"]), R.fmt_ci(e["delta_vs_baseline"]), R.fmt_mean_std(t),
                     f"{e['auc_vs_truth']['mean']:.4f} ({e['delta_vs_truth_auc']['mean']:+.4f})",
                     f"{e['calibration']:.3f}", mult_s, f"{e['lr']:g}",
                     "–" if e["validation_auc"] is None else f"{e['validation_auc']:.4f}", f"{e['wall_s']:.1f}"])
    return R.markdown_table(header, rows)


def buckets_table(entries: dict, n_rows: dict) -> str:
    header = ["method"] + [f"{b} Δ AUC (n={n_rows[b]})" for b in ("head", "torso", "tail")]
    rows = [[name] + [R.fmt_ci(e["buckets"][b]["delta_vs_baseline"]) for b in ("head", "torso", "tail")]
            for name, e in entries.items() if name != "baseline"]
    return R.markdown_table(header, rows)


def excludes_zero(d: dict) -> str:
    lo, hi = d["ci95"]
    if np.isnan(lo):
        return "n/a"
    return "yes (above 0)" if lo > 0 else ("yes (below 0)" if hi < 0 else "no")



def plots(out: Path, name: str, table: dict, title: str) -> list[str]:
    entries = table["methods"]
    others = [n for n in entries if n != "baseline"]
    files = []
    p = R.plot_bars_with_ci(out / f"{name}_delta_auc.png", others, [entries[n]["delta_vs_baseline"] for n in others],
                            f"{title}: student AUC − baseline (95% CI)")
    files.append(p.name)
    p = R.plot_reliability(out / f"{name}_reliability.png", table["reliability"], f"{title.split(' (')[0]}: test day, 1st seed")
    files.append(p.name)
    curve = table["multiplier_curve"]
    if len(curve["fractions"]) > 1:
        p = R.plot_curves(out / f"{name}_data_curve.png", curve["fractions"], {"baseline": curve["baseline_auc"]},
                          f"{title}: baseline AUC vs training data", "fraction of training rows", "test AUC", logx=True)
        files.append(p.name)
    return files


def _days(days) -> str:
    return f"{days[0]}..{days[-1]}" if len(days) > 1 else str(days[0])


def header(kind: str, tables: Tables, seeds, lrs, quick: bool, overrides, wall: float, select_seeds: int = 1) -> str:
    w = tables.world
    cfg = w["config"]
    non_default = {k: cfg[k] for k in ("consent_rate", "post_event_strength", "post_event_propensity",
                                       "post_event_price_penalty", "privileged_strength") if k in cfg}
    return "\n".join([
        f"# Fine ranker — `{kind}` experiment ({'QUICK, not a result' if quick else 'world preset: `' + str(w['preset']) + '`'})",
        "",
        f"World: preset `{w['preset']}`, seed {w['seed']}, {w['n_days']} days ({non_default}); "
        f"the LR sweep fits days {_days(tables.valid.days)} and scores validation day {w['n_days'] - 1}, "
        f"the test fits days {_days(tables.test.days)} and scores test day {w['n_days']}.",
        f"Seeds {list(seeds)}; learning-rate sweep {list(lrs)} (Adam) on the validation day, "
        f"{'first seed' if select_seeds == 1 else f'best mean over the first {select_seeds} seeds'}; "
        f"config overrides {list(overrides) or 'none'}. Total wall time {wall / 60:.1f} min on this machine "
        f"(1 torch thread, 2 shared cores).",
        "",
        "Command: `recstack experiment " + kind + " --data DIR --out OUT --seeds " + ",".join(map(str, seeds)) + "` "
        "(or `fine_rank.experiments.run(\"" + kind + "\", DIR, OUT, seeds=...)`).",
        "",
        "Columns: student AUC on the test day (mean ± std over seeds); Δ = paired difference to the baseline "
        "(same seed) with a 95 % t-interval; teacher/aux AUC = the teacher (PFD) or the auxiliary head (SEAD); "
        "AUC vs truth = AUC against the simulator's true probabilities (each row a positive with weight p and a "
        "negative with weight 1−p: the label AUC without label noise), with its paired Δ; calibration = mean "
        "prediction / mean label on the test day (mean over seeds); data × = data-equivalent multiplier "
        "(baseline data needed to reach the method's mean AUC, * = extrapolated beyond 100 %); LR = the rate the "
        "validation day chose; valid AUC = its validation score; train s = training wall time per run.",
        "", "",
    ])


def write_report(kind: str, out: Path, header: str, sections: list[str]) -> Path:
    path = out / "report.md"
    path.write_text(header + "\n".join(sections) + "\n")
    return path


def notes_section(notes: list[str]) -> list[str]:
    """How the simulated world differs from the paper's setting: facts of the simulator and of
    the protocol (not readings of a result), at the end of each report."""
    return ["", "## How this world differs from the paper's setting", ""] + [f"- {n}" for n in notes]
