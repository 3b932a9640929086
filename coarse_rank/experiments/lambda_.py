"""PFD Table 5: the PFD+MD student's test AUC as λ (the weight of the distillation loss) varies."""
from __future__ import annotations

from pathlib import Path

from recstack.evaluation import report as R

from coarse_rank.experiments import report as CR
from coarse_rank.experiments.plan import CoarsePlan
from coarse_rank.experiments.runner import Runner, teacher_variants

TEACHER = "pfd_md"


def run(r: Runner, plan: CoarsePlan, seeds, out: Path) -> dict:
    methods, rest = teacher_variants(r, plan, seeds, TEACHER, {"lam": 0.5},
                                     [(f"{TEACHER}_lam{lam:g}", {"lam": lam}) for lam in plan.lams])
    R.plot_curves(out / "lambda.png", list(plan.lams), {
        f"{TEACHER} student": [methods[f"{TEACHER}_lam{l:g}"]["student_auc"]["mean"] for l in plan.lams],
        "baseline": [methods["baseline"]["student_auc"]["mean"]] * len(plan.lams)},
        "Student test AUC vs λ (PFD Table 5)", "λ", "test AUC")
    return {"methods": methods, **rest}


def body(res: dict) -> list[str]:
    return CR.results_section(res["methods"]) + ["![lambda](lambda.png)", ""]
