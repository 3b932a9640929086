"""SEAD's selectors and ablations (SEAD Table 1) for the CTR and the CVR model."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from recstack.evaluation import protocol as X
from recstack.evaluation import report as R

from fine_rank import train as T
from fine_rank.experiments import report as FR
from fine_rank.experiments.plan import FinePlan, sead_methods
from fine_rank.experiments.runs import Tables
from fine_rank.experiments.table import run_table, strip

NOTES = [
    "Scale and regime: the paper's models train continuously on streaming production traffic and count "
    "+0.1 % AUC as significant; here CTR is one epoch over a few hundred thousand impressions, CVR two epochs "
    "over the clicked ones, and 3 seeds give paired intervals about as wide as the paper's effects.",
    "Negatives are weak positives here too: the logging policy (popularity + noisy affinity) shows items that "
    "passed an older recommender, which is the premise of max(y, y').",
    "The calibration column is the main head's raw output (no post-hoc shift: `*_calibrate=none` for every "
    "method of this table), since SEAD's claim is that the serving head stays calibrated by construction; "
    "for CVR the test day's label mean has a sampling error of several % at this size, so the ratio to the "
    "mean true pCVR (`calibration_vs_truth` in results.json) is the sharper check.",
]


def targets(task: str, e: dict) -> list[str]:
    """The SEAD target lines for the rows present (`ctr_methods=` / `cvr_methods=` may run a subset)."""
    lines = []
    if "sead_max" in e:
        lines += [
            f"- SEAD (max) ≥ baseline: Δ {R.fmt_ci(e['sead_max']['delta_vs_baseline'])}.",
            f"- main head's mean prediction / mean label on the test day: {e['sead_max']['calibration']:.4f} "
            f"(target within 1 %; the baseline's {e['baseline']['calibration']:.4f}; vs the true probabilities "
            f"{e['sead_max']['calibration_vs_truth']:.4f}).",
        ]
    if "sead_max" in e and "sead_min" in e:
        lines.append(f"- SEAD (max) > SEAD (min): {e['sead_max']['student_auc']['mean']:.4f} vs "
                     f"{e['sead_min']['student_auc']['mean']:.4f} (paired Δ max − min "
                     f"{R.fmt_ci(X.paired_diff(e['sead_max']['student_auc_per_seed'], e['sead_min']['student_auc_per_seed']))}).")
    if "sga" in e:
        lines.append(f"- SGA no better than SEAD: SGA Δ {R.fmt_ci(e['sga']['delta_vs_baseline'])}.")
    cut = [m.name for m in sead_methods(task) if m.name not in e]
    if cut:
        lines.append(f"- not run in this table (`{task}_methods=`, a CPU cut): {', '.join(cut)}.")
    return lines


def run(plan: FinePlan, tables: Tables, base: T.Config, out: Path, log: Callable[[str], None]) -> tuple[dict, list[str]]:
    """SEAD Table 1 for pCTR and pCVR; -> (results.json entries, report sections)."""
    tabs = {task: run_table("sead", plan.rows(task), tables, base, plan.seeds, plan.lrs, plan.data_fractions(), log, plan.workers,
                            plan.n_select_seeds())
            for task in ("ctr", "cvr")}
    results = {"methods": tabs["ctr"]["methods"], "methods_cvr": tabs["cvr"]["methods"],
               "tasks": {t: strip(v) for t, v in tabs.items()}}
    sections: list[str] = []
    for task, title in (("ctr", "pCTR"), ("cvr", "pCVR")):
        tab = tabs[task]
        e = tab["methods"]
        files = FR.plots(out, f"sead_{task}", tab, f"SEAD {title}")
        sections += [
            f"## SEAD — {title} model (SEAD Table 1)\n",
            f"{tab['n_train']} training rows, {tab['n_test']} test rows, test positive rate "
            f"{tab['test_positive_rate']:.4f}. The student AUC is the main (serving) head's; the aux column is the "
            f"auxiliary head's own AUC. aux weight {base.sead_weight}.\n",
            FR.methods_table(e, "sead"), "",
            "Gains by item frequency:\n", FR.buckets_table(e, tab["bucket_rows"]), "",
            "Against the issue's targets:\n",
            *targets(task, e),
            f"- Best method on the validation day: {max(e, key=lambda n: e[n]['validation_auc'] or -1)}.",
            "", "Plots: " + ", ".join(f"`{f}`" for f in files), "",
        ]
    return results, sections + FR.notes_section(NOTES)
