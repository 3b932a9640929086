"""PFD Table 5: each distillation row's student test AUC as λ (the weight of the distillation
loss in Eq. 5) varies, every row at its own LR chosen at λ = 0.5 (the λ of every other table)."""
from __future__ import annotations

from pathlib import Path

from recstack.evaluation import protocol as X
from recstack.evaluation import report as R

from coarse_rank.experiments import report as CR
from coarse_rank.experiments.plan import CoarsePlan
from coarse_rank.experiments.runner import Runner, ceiling, summary

# PFD Table 5 (1 day of CTR): student test AUC by λ; its baseline is 0.6625
PAPER = {
    "lupi": {0.1: 0.6648, 0.3: 0.6640, 0.5: 0.6637, 0.7: 0.6631, 0.9: 0.6624},
    "md": {0.1: 0.6695, 0.3: 0.6697, 0.5: 0.6704, 0.7: 0.6706, 0.9: 0.6700},
    "pfd": {0.1: 0.6711, 0.3: 0.6709, 0.5: 0.6712, 0.7: 0.6700, 0.9: 0.6696},
    "pfd_md": {0.1: 0.6741, 0.3: 0.6740, 0.5: 0.6745, 0.7: 0.6747, 0.9: 0.6739},
}
SELECT_LAM = 0.5  # the λ each row's LR is chosen at: the λ the paper fixes everywhere but here


def row_name(teacher: str, lam: float) -> str:
    return f"{teacher}_lam{lam:g}"


def lams_of(plan: CoarsePlan) -> list[float]:
    """The table's λ values: the plan's, with the selection λ among them (every row's reference)."""
    return sorted(set(plan.lams) | {SELECT_LAM})


def run(r: Runner, plan: CoarsePlan, seeds, out: Path) -> dict:
    teachers, lams = list(plan.lambda_methods), lams_of(plan)
    sel = r.select(plan, [("baseline", {"teacher": "baseline"})]
                   + [(t, {"teacher": t, "lam": SELECT_LAM}) for t in teachers])
    chosen = {k: v[0] for k, v in sel.items()}
    # seed-major: a run cut short leaves every cell of the table with the same first seeds
    # cached, so `--seeds` with fewer of them reports a whole (partial) table from the cache
    cells = [("baseline", "baseline", None)] + [(row_name(t, lam), t, lam) for t in teachers for lam in lams]
    order = [(name, s) for s in seeds for name, _, _ in cells]
    kw = {name: dict(teacher=t, **chosen[t], **({} if lam is None else {"lam": lam})) for name, t, lam in cells}
    fitted = dict(zip(order, r.many([("test", None, dict(kw[name], seed=s)) for name, s in order])))
    runs = {name: [fitted[(name, s)] for s in seeds] for name, _, _ in cells}
    methods = summary(runs)
    for k in methods:
        methods[k]["lr"] = chosen["baseline" if k == "baseline" else k.rpartition("_lam")[0]]["lr"]
    R.plot_curves(out / "lambda.png", lams,
                  {**{t: [methods[row_name(t, l)]["student_auc"]["mean"] for l in lams] for t in teachers},
                   "baseline": [methods["baseline"]["student_auc"]["mean"]] * len(lams)},
                  "Student test AUC vs λ (PFD Table 5)", "λ", "test AUC")
    return {"methods": methods, "teachers": teachers, "lams": lams, "vs_select_lam": vs_select_lam(methods, teachers, lams),
            "ceiling_auc": ceiling(runs), "lrs": {k: c["lr"] for k, c in chosen.items()},
            "lr_selection": {k: v[1] for k, v in sel.items()}}


def vs_select_lam(methods: dict, teachers: list[str], lams: list[float]) -> dict:
    """Per row, each λ's paired difference to the same row at λ 0.5 (same seeds): how much λ
    matters, which the Δ to the baseline alone cannot say."""
    out = {}
    for t in teachers:
        ref = methods[row_name(t, SELECT_LAM)]["per_seed"]
        out[t] = {f"{lam:g}": X.paired_diff(methods[row_name(t, lam)]["per_seed"], ref) for lam in lams if lam != SELECT_LAM}
    return out


def grid_section(res: dict) -> list[str]:
    """Table 5's layout: a row per method, a column per λ, Δ to the baseline [95 % CI] (the
    paper's Δ to its 0.6625 baseline beside it), then each λ against λ 0.5."""
    teachers, lams, m = res["teachers"], res["lams"], res["methods"]
    rows = []
    for t in teachers:
        cells = []
        for lam in lams:
            d, paper = m[row_name(t, lam)]["delta_vs_baseline"], PAPER.get(t, {}).get(lam)
            cells.append(R.fmt_ci(d) + (f" (paper {paper - 0.6625:+.4f})" if paper is not None else ""))
        rows.append([t] + cells)
    vs = [[t] + ["—" if lam == SELECT_LAM else R.fmt_ci(res["vs_select_lam"][t][f"{lam:g}"]) for lam in lams]
          for t in teachers]
    head = ["method"] + [f"λ {lam:g}" for lam in lams]
    return ["## Table 5's layout: Δ vs baseline [95% CI] by λ", "",
            "Each row at its own LR, chosen at λ 0.5; paired over the same seeds. In parentheses the paper's "
            "student AUC minus its baseline (0.6625).", "", R.markdown_table(head, rows), "",
            f"## Each λ against λ {SELECT_LAM:g}, the same row and seeds (paired, 95% CI)", "",
            R.markdown_table(head, vs), ""]


def _paper(name: str, m: dict) -> str:
    teacher, _, lam = name.rpartition("_lam")
    paper = PAPER.get(teacher, {}).get(float(lam)) if teacher else None
    return f"{paper:.4f}" if paper is not None else "—"


COLUMNS: list[CR.Column] = [("paper (Table 5)", _paper)]


def body(res: dict) -> list[str]:
    return CR.results_section(res["methods"], COLUMNS) + grid_section(res) + ["![lambda](lambda.png)", ""]
