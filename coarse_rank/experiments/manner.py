"""PFD Table 7: the PFD+MD student by training manner (independent or shared components,
synchronous or asynchronous teacher), with the training cost of each."""
from __future__ import annotations

from pathlib import Path

from recstack.evaluation import report as R

from coarse_rank.experiments import report as CR
from coarse_rank.experiments.plan import CoarsePlan
from coarse_rank.experiments.runner import Runner, teacher_variants

TEACHER = "pfd_md"
# PFD Table 7 (1 day of CTR), PFD+MD student test AUC by manner; the baseline 0.6625
PAPER = {"baseline": 0.6625, "ind_async": 0.6751, "ind_sync": 0.6748, "share_sync": 0.6717, "share_star_sync": 0.6745}


def run(r: Runner, plan: CoarsePlan, seeds, out: Path) -> dict:
    methods, rest = teacher_variants(r, plan, seeds, TEACHER, {}, [(f"{TEACHER}_{m}", {"manner": m}) for m in plan.manners])
    base_wall = methods["baseline"]["wall_s"]
    base_cpu = methods["baseline"]["cpu_s"]
    for k in methods:
        methods[k]["wall_ratio_vs_baseline"] = methods[k]["wall_s"] / base_wall
        methods[k]["cpu_ratio_vs_baseline"] = methods[k]["cpu_s"] / base_cpu
    names = [k for k in methods if k != "baseline"]
    R.plot_bars_with_ci(out / "manner.png", names, [methods[k]["delta_vs_baseline"] for k in names],
                        "PFD+MD student by training manner: AUC − baseline")
    R.plot_bars(out / "wall_time.png", list(methods), [methods[k]["cpu_s"] for k in methods],
                "Training cost per run", "training CPU time (s, 1 thread)")
    return {"methods": methods, **rest}


COLUMNS: list[CR.Column] = [
    ("wall / CPU vs baseline", lambda n, m: f"{m['wall_ratio_vs_baseline']:.2f}x / {m['cpu_ratio_vs_baseline']:.2f}x"),
    ("paper (Table 7)", lambda n, m: f"{PAPER[k]:.4f}" if (k := n.removeprefix(TEACHER + "_")) in PAPER else "—"),
]


def body(res: dict) -> list[str]:
    return CR.results_section(res["methods"], COLUMNS) + ["![manner](manner.png) ![wall time](wall_time.png)", ""]
