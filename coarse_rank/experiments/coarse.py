"""PFD Table 2 at coarse ranking: every teacher against the baseline, the baseline's data curve
(sample efficiency), gains by id frequency and, given a control world, the same methods where
the privileged features carry nothing."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recstack.data import load
from recstack.evaluation import protocol as X
from recstack.evaluation import report as R

from coarse_rank.experiments import report as CR
from coarse_rank.experiments.plan import CONTRASTS, MIN_CONTRAST_SEEDS, ROWS, CoarsePlan, windows
from coarse_rank.experiments.runner import Runner, bucket_deltas, candidate_key, ceiling, summary

PAPER = {  # PFD Table 2 (1 day, CTR at coarse ranking), student testing AUC; PFD+MD's is its Share*&Sync row (Table 7)
    "baseline": 0.6625, "lupi": 0.6637, "md": 0.6704, "pfd": 0.6712, "pfd_md": 0.6745,
}
BUCKETS = ("head", "torso", "tail")


def _control(r: Runner, plan: CoarsePlan, seeds, chosen: dict) -> dict:
    """The control world's test runs, at the learning rates chosen on the main world."""
    cdata = load(plan.control_data)
    cr = Runner(plan.control_data, cdata, r.base, windows(cdata, plan.base_days), r.log, r.workers, r.cache_dir)
    cm = [m for m in plan.control_methods if m in chosen]
    cfits = iter(cr.many([("test", None, dict(ROWS[m], **chosen[m], seed=s)) for m in cm for s in seeds]))
    cruns = {m: [next(cfits) for _ in seeds] for m in cm}
    methods = summary(cruns)  # no Δ to the baseline unless it is among control_methods
    return {"data_dir": str(Path(plan.control_data).resolve()), "lrs": "selected on the main world",
            "world": cdata.world.get("config", {}), "methods": methods, "ceiling_auc": ceiling(cruns),
            "contrasts": contrasts(methods)}


def _plots(out: Path, methods: dict, fr: list, base_curve: list, buckets: dict) -> None:
    others = [m for m in methods if m != "baseline"]
    if len(fr) > 1:  # one data size draws no curve
        R.plot_curves(out / "sample_efficiency.png", fr, {"baseline": base_curve, **{
            f"{m} (1x)": [methods[m]["student_auc"]["mean"]] * len(fr) for m in others}},
            "Baseline AUC vs training data; lines: methods at 1x", "training data (x the train window)", "test AUC", logx=True)
    R.plot_bars_with_ci(out / "delta_vs_baseline.png", others, [methods[m]["delta_vs_baseline"] for m in others],
                        "Coarse student: AUC − baseline (paired, 95% CI)")
    for field in buckets:
        kind = field.split("_")[0]
        R.plot_grouped_bars_with_ci(out / f"buckets_{kind}.png", others,
                                    {b: [buckets[field][m][b]["delta"] for m in others] for b in BUCKETS},
                                    f"Gain by {kind} frequency (paired, 95% CI)")


def _paired_plot(out: Path, paired: dict, control: dict | None) -> None:
    """paired_seeds.png: each contrast's per-seed differences and 95 % CI, the control world's beside them."""
    shown = dict(paired)
    shown.update({f"control: {k}": c for k, c in (control or {}).get("contrasts", {}).items()})
    if shown:
        R.plot_paired_seeds(out / "paired_seeds.png", shown, "Paired contrasts per seed (dots) with 95% CI")


def _data_axis(r: Runner, plan: CoarsePlan, seeds, chosen: dict) -> tuple[list, list[str]]:
    """Specs of the data axis (each method of `data_methods` on the `data_days` days before the
    test day, at its chosen LR) and notes on the sizes the world cannot hold."""
    specs, notes = [], []
    test = r.win["test"]
    for n in plan.data_days:
        if test - n < 1:
            notes.append(f"{n} days skipped: a {r.data.n_days}-day world has {test - 1} days before the test day")
            continue
        days = list(range(test - n, test))
        specs += [("test", days, dict(ROWS[m], **chosen[m], seed=s)) for m in plan.data_methods if m in chosen for s in seeds]
    return specs, notes


def _data_summary(fits, plan: CoarsePlan, seeds, chosen: dict, days: list[int]) -> dict:
    out = {}
    for n in days:
        runs = {m: [next(fits) for _ in seeds] for m in plan.data_methods if m in chosen}
        tab = summary(runs)  # Δ to the baseline when it is among the rows
        out[str(n)] = {"methods": tab, "contrasts": axis_contrasts(tab)}
    return out


def axis_contrasts(methods: dict) -> dict:
    """A data-axis point's paired contrasts: the protocol's among its rows, and SD − baseline
    (with PFD − SD, how the plain and the privileged soft labels move with data)."""
    out = dict(contrasts(methods))
    if "sd" in methods and "baseline" in methods:
        out["sd - baseline"] = X.paired_diff(methods["sd"]["per_seed"], methods["baseline"]["per_seed"])
    return out


def _main_point(methods: dict, plan: CoarsePlan) -> dict:
    """The main table's own window as a point of the data axis (its rows, same seeds)."""
    tab = {m: {k: methods[m][k] for k in ("student_auc", "teacher_auc", "delta_vs_baseline", "cpu_s", "per_seed")}
           for m in plan.data_methods if m in methods}
    return {"methods": tab, "contrasts": axis_contrasts(tab), "main_window": True}


def _axis_plot(out: Path, days: dict) -> None:
    """data_axis.png: each contrast's paired difference against the days of training data."""
    xs = sorted(int(n) for n in days)
    names = sorted({k for p in days.values() for k in p["contrasts"]})
    if xs and names:
        R.plot_lines_with_ci(out / "data_axis.png", xs, {k: [days[str(n)]["contrasts"].get(k) for n in xs] for k in names},
                             "Paired contrasts by days of training data", "training days before the test day")


def contrasts(methods: dict) -> dict:
    """The paired contrasts of the protocol (CONTRASTS) among the rows run, over every seed."""
    out = {}
    for a, b in CONTRASTS:
        if a in methods and b in methods:
            d = X.paired_diff(methods[a]["per_seed"], methods[b]["per_seed"])
            per_seed = [float(x - y) for x, y in zip(methods[a]["per_seed"], methods[b]["per_seed"])]
            out[f"{a} - {b}"] = {**d, "enough_seeds": d["n"] >= MIN_CONTRAST_SEEDS, "per_seed": per_seed}
    return out


def selection(rows: list[str], sel: dict) -> dict:
    """The results of an LR sweep run alone (`select_only`): each row's validation curve and
    choice, and the `selected_lrs` value that hands the choices to the test-day run."""
    methods = {m: {"lr": sel[m][0]["lr"], "chosen": sel[m][0], "validation_curve": sel[m][1]} for m in rows}
    # selected_lrs carries a rate only: a row whose choice has more (baseline_wd's weight decay) is left out
    given = ",".join(f"{m}:{c['lr']:g}" for m, c in ((m, sel[m][0]) for m in rows) if set(c) == {"lr"})
    return {"select_only": True, "methods": methods, "selected_lrs": given}


def run(r: Runner, plan: CoarsePlan, seeds, out: Path) -> dict:
    rows = list(plan.methods)
    sel = r.select(plan, [(m, ROWS[m]) for m in rows])
    if plan.select_only:
        return selection(rows, sel)
    chosen = {m: sel[m][0] for m in rows}
    # every test-day fit in one batch: methods x seeds, the baseline's data curve, the data axis
    specs = [("test", None, dict(ROWS[m], **chosen[m], seed=s)) for m in rows for s in seeds]
    specs += [("test", None, dict(teacher="baseline", **chosen["baseline"], seed=s, train_fraction=f))
              for f in plan.fractions for s in seeds]
    notes = []
    do_double = bool(r.win["double"]) and plan.double
    if do_double:
        specs += [("test", r.win["double"], dict(teacher="baseline", **chosen["baseline"], seed=s)) for s in seeds]
    elif plan.double:
        notes.append(f"2x skipped: a {r.data.n_days}-day world has no {2 * len(r.win['train'])} days before the test day")
    axis_specs, axis_notes = _data_axis(r, plan, seeds, chosen)
    specs += axis_specs
    fits = iter(r.many(specs))
    runs = {m: [next(fits) for _ in seeds] for m in rows}
    curve = {1.0: [f.result["auc"] for f in runs["baseline"]]}
    for f in plan.fractions:
        curve[f] = [next(fits).result["auc"] for _ in seeds]
    if do_double:
        curve[2.0] = [next(fits).result["auc"] for _ in seeds]
    axis_days = [n for n in plan.data_days if r.win["test"] - n >= 1]
    data_axis = {"days": _data_summary(fits, plan, seeds, chosen, axis_days), "notes": axis_notes}
    control = _control(r, plan, seeds, chosen) if plan.control_data else None

    methods = summary(runs)
    for m in methods:
        methods[m]["lr"] = chosen[m]["lr"]
        methods[m]["chosen"] = chosen[m]
        methods[m]["validation_curve"] = sel[m][1]
    fr = sorted(curve)
    base_curve = [float(np.mean(curve[f])) for f in fr]
    for m in methods:
        methods[m]["data_multiplier"] = (X.data_equivalent_multiplier(fr, base_curve, methods[m]["student_auc"]["mean"])
                                         if len(fr) > 1 else None)
    if data_axis["days"]:
        data_axis["days"].setdefault(str(len(r.win["train"])), _main_point(methods, plan))
        data_axis["days"] = dict(sorted(data_axis["days"].items(), key=lambda kv: int(kv[0])))
        _axis_plot(out, data_axis["days"])
    buckets = bucket_deltas(runs)
    _plots(out, methods, fr, base_curve, buckets)
    paired = contrasts(methods)
    _paired_plot(out, paired, control)
    return {"methods": methods, "ceiling_auc": ceiling(runs), "contrasts": paired, "data_axis": data_axis,
            "sample_efficiency": {
                "fractions": fr, "baseline_auc": {str(f): X.mean_std(curve[f]) for f in fr},
                "how": "0.25x / 0.5x: a seeded share of the train window's sessions; 2x: the 2 * base_days days before "
                       "the test day (more days of the same world; same test day and users)", "notes": notes},
            "buckets": buckets, "control": control}


COLUMNS: list[CR.Column] = [
    ("data-equiv. multiplier", lambda n, m: "—" if not m.get("data_multiplier") else
     ("%.2fx" % m["data_multiplier"]["multiplier"]) + (" (extrapolated)" if m["data_multiplier"].get("extrapolated") else "")),
    ("paper (1 day)", lambda n, m: f"{PAPER[n]:.4f}" if n in PAPER else "—"),
]


def _buckets_section(res: dict) -> list[str]:
    body = ["## Gains by id frequency (paired Δ vs baseline within the bucket)", ""]
    for field, tab in res["buckets"].items():
        names = list(tab)
        shares = {b: tab[names[0]][b]["share_of_test_rows"] for b in BUCKETS}
        body += [f"{field.split('_')[0]}s (share of test rows: " + ", ".join(f"{b} {s:.2f}" for b, s in shares.items()) + ")", "",
                 R.markdown_table(["method", "head", "torso", "tail"],
                                  [[n] + [R.fmt_ci(tab[n][b]["delta"]) for b in BUCKETS] for n in names if n != "baseline"]),
                 "", f"![{field}](buckets_{field.split('_')[0]}.png)", ""]
    return body


def body(res: dict) -> list[str]:
    """The report below the header."""
    if res.get("select_only"):
        return _selection_body(res)
    methods = res["methods"]
    se = res["sample_efficiency"]
    out = CR.results_section(methods, COLUMNS)
    if len(se["fractions"]) > 1:
        out += ["## Sample efficiency (baseline)", "",
                R.markdown_table(["data", "baseline AUC"],
                                 [[f"{f:g}x", R.fmt_mean_std(se["baseline_auc"][str(f)])] for f in se["fractions"]]),
                "", *[f"- {n}" for n in se["notes"]], "", "![sample efficiency](sample_efficiency.png)", ""]
    out += ["![delta](delta_vs_baseline.png)", ""]
    out += _buckets_section(res)
    if res["control"]:
        c = res["control"]
        out += [f"## Control: privileged_strength = {c['world'].get('privileged_strength')} ({c['data_dir']})", "",
                R.markdown_table(["method", "student AUC", "teacher AUC", "Δ vs baseline [95% CI]"],
                                 [[n, R.fmt_mean_std(m["student_auc"]),
                                   f"{m['teacher_auc']['mean']:.4f}" if m["teacher_auc"]["mean"] is not None else "—",
                                   R.fmt_ci(m["delta_vs_baseline"]) if n != "baseline" and m["delta_vs_baseline"] else "—"]
                                  for n, m in c["methods"].items()]), ""]
        out += _contrasts_section(c, "Control: paired contrasts (same seeds)")
    out += _contrasts_section(res)
    if res["contrasts"] or (res["control"] or {}).get("contrasts"):
        out += ["![paired contrasts per seed](paired_seeds.png)", ""]
    out += _data_axis_section(res)
    out += ["## Validation curves (student AUC on the whole validation day, mean ± sd over the selection seeds)", "",
            R.markdown_table(["method", "AUC by candidate", "chosen"],
                             [[n, _curve(m["validation_curve"]), _label(m["chosen"])] for n, m in methods.items()]), ""]
    return out


def _selection_body(res: dict) -> list[str]:
    """The report of an LR sweep run alone: every candidate's mean, sd and per-seed AUCs."""
    rows = []
    for n, m in res["methods"].items():
        for label, v in m["validation_curve"].items():
            if not isinstance(v, dict):  # a given or fixed rate: no curve
                rows.append([n, label, str(v), "", "yes"])
                continue
            rows.append([n, label, R.fmt_mean_std(v), ", ".join(f"{x:.4f}" for x in v["per_seed"]),
                         "yes" if label == candidate_key(m["chosen"]) else ""])
    return ["## Validation curves (student AUC on the whole validation day; no test-day fit in this run)", "",
            R.markdown_table(["method", "candidate", "mean ± sd", "per seed", "chosen"], rows), "",
            "The test-day run takes these choices with:", "", "```", f"--set selected_lrs={res['selected_lrs']}",
            "```", ""]


def _label(cand: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in cand.items())


def _curve(curve: dict) -> str:
    return ", ".join(f"{k}: {v['mean']:.4f} ± {v['std']:.4f}" if isinstance(v, dict) else f"{k}: {v}" for k, v in curve.items())


def _contrasts_section(res: dict, title: str = "Paired contrasts (same seeds)") -> list[str]:
    rows = [[k, R.fmt_ci(c), str(c["n"]), "" if c["enough_seeds"] else f"PARTIAL (< {MIN_CONTRAST_SEEDS} seeds)"]
            for k, c in res["contrasts"].items()]
    return [f"## {title}", "", R.markdown_table(["contrast", "Δ AUC [95% CI]", "seeds", ""], rows), ""]


def _data_axis_section(res: dict) -> list[str]:
    ax = res["data_axis"]
    if not ax["days"] and not ax["notes"]:
        return []
    rows = [[f"{n} days" + (" (main)" if p.get("main_window") else ""), m, R.fmt_mean_std(s["student_auc"]),
             R.fmt_mean_std(s["teacher_auc"]) if s["teacher_auc"]["n"] else "—", f"{s['cpu_s']:.0f}"]
            for n, p in ax["days"].items() for m, s in p["methods"].items()]
    names = sorted({k for p in ax["days"].values() for k in p["contrasts"]})
    crows = [[f"{n} days", *[R.fmt_ci(p["contrasts"][k]) if k in p["contrasts"] else "—" for k in names]]
             for n, p in ax["days"].items()]
    plot = ["![data axis](data_axis.png)", ""] if ax["days"] and names else []
    return (["## Data axis (train window before the test day, same rates and seeds)", "",
             R.markdown_table(["train days", "method", "student AUC", "teacher AUC", "CPU s"], rows), "",
             R.markdown_table(["train days", *[f"{k} [95% CI]" for k in names]], crows), "", *plot]
            + [f"- {n}" for n in ax["notes"]] + [""])
