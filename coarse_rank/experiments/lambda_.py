"""PFD Table 5: the PFD+MD student's test AUC as λ (the weight of the distillation loss) varies."""
from __future__ import annotations

from pathlib import Path

from recstack.evaluation import report as R

from coarse_rank.experiments import report as CR
from coarse_rank.experiments.plan import CoarsePlan
from coarse_rank.experiments.runner import Runner, teacher_variants

TEACHER = "pfd_md"
PAPER = {0.1: 0.6741, 0.3: 0.6740, 0.5: 0.6745, 0.7: 0.6747, 0.9: 0.6739}  # PFD Table 5, PFD+MD student test AUC by λ


def run(r: Runner, plan: CoarsePlan, seeds, out: Path) -> dict:
    methods, rest = teacher_variants(r, plan, seeds, TEACHER, {"lam": 0.5},
                                     [(f"{TEACHER}_lam{lam:g}", {"lam": lam}) for lam in plan.lams])
    R.plot_curves(out / "lambda.png", list(plan.lams), {
        f"{TEACHER} student": [methods[f"{TEACHER}_lam{l:g}"]["student_auc"]["mean"] for l in plan.lams],
        "baseline": [methods["baseline"]["student_auc"]["mean"]] * len(plan.lams)},
        "Student test AUC vs λ (PFD Table 5)", "λ", "test AUC")
    return {"methods": methods, **rest}


def body(res: dict) -> list[str]:
    return CR.results_section(res["methods"], COLUMNS) + ["![lambda](lambda.png)", ""]


def _paper(name: str, m: dict) -> str:
    lam = name.rpartition("_lam")[2]
    return f"{PAPER[float(lam)]:.4f}" if name.startswith(TEACHER + "_lam") and float(lam) in PAPER else "—"


COLUMNS: list[CR.Column] = [("paper (Table 5)", _paper)]
