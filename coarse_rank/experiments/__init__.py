"""Coarse-ranker distillation experiments (PFD Tables 2, 5 and 7) under the shared protocol.

    from coarse_rank.experiments import run
    results = run("coarse", "data/small7", "docs/results/coarse")        # Table 2 + items 4-5
    results = run("lambda", "data/small7", "docs/results/lambda")        # Table 5
    results = run("manner", "data/small7", "docs/results/manner")        # Table 7 (with wall time)

Protocol (DESIGN §6), the same for every method, the baseline included:

1. Learning rate: each method trains on the fit window (the `base_days` days before the
   validation day) with every LR of `lrs` and each of the first `select_seeds` (>= 3) seeds,
   and keeps the LR with the best mean student AUC over the whole validation day (day D-1);
   the whole curve is reported. The test day is not touched. baseline_wd sweeps LR x
   `weight_decays` the same way.
2. Test: each method retrains with its LR on the train window (the `base_days` days before
   the test day D) for every seed and is scored once on the whole of day D. Teachers are
   wired Share*&Sync (the paper's Table 2 manner for PFD+MD); the manner table varies it.
3. Paired differences to the baseline over seeds (same seed = same init and data order)
   with 95 % t-intervals (recstack.evaluation.protocol.paired_diff), and the contrasts
   PFD - SD, PFD+MD - MD, PFD - baseline (>= 10 seeds for the protocol; fewer is PARTIAL).
   Controls: sd_lam0 (SD's head trained alongside, λ = 0), baseline_wd (the baseline with
   its own weight-decay sweep); bounds: oracle / oracle_lam1 (the true pCTR as the teacher).
4. Sample efficiency (coarse only): the baseline at 0.25x / 0.5x (seeded share of the train
   window's sessions), 1x, and 2x (the 2 * base_days days before the test day: more days of
   the same world, so the test day and its users are unchanged; needs D >= 2 * base_days + 1
   and is skipped, with a note, otherwise). Each method's data-equivalent multiplier is read
   off that curve.
5. Gains by id frequency (coarse only): test rows bucketed head / torso / tail by their
   user's and their item's frequency in the train window.
6. Control (coarse only, when `control_data` is given): the same world simulated with
   privileged_strength=0; baseline, PFD, PFD+MD and the oracle with the LRs selected on the
   main world.
7. Data axis (coarse only): `data_methods` trained on the `data_days` (2 / 4 / 8) days before
   the test day; sizes the world cannot hold are skipped with a note.
8. λ table (Table 5): each row of `lambda_methods` (the paper's LUPI, MD, PFD, PFD+MD) at
   every λ of `lams` and at 0.5, at its own LR chosen at λ 0.5 (the λ of every other table),
   with each λ's paired difference to λ 0.5 beside the Δ to the baseline.

`--set` keys besides any `coarse_rank.train.Config` field are the fields of `CoarsePlan`:
lrs=0.025,0.05,0.1  base_days=3  methods=baseline,pfd  lams=0.1,0.5  lambda_methods=pfd,pfd_md
manners=ind_sync,...
fractions=0.25,0.5  double=false  control_methods=baseline,pfd  workers=3  cache=DIR
control_data=PATH  selected_lrs=baseline:0.05,pfd_md:0.1 (skip the sweep for those methods)
select_only=true (coarse: run step 1 alone and report its curves and the selected_lrs= line
that hands the choices to the test-day run).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from recstack.config import ConfigError, apply_overrides
from recstack.data import load
from recstack.evaluation import report as R

from coarse_rank.experiments import coarse, lambda_, manner
from coarse_rank.experiments import report as CR
from coarse_rank.experiments.plan import QUICK, CoarsePlan, windows
from coarse_rank.experiments.runner import Runner
from coarse_rank.train import Config

# name -> the module whose run(runner, plan, seeds, out) fits the table and body(results) writes its report
EXPERIMENTS = {"coarse": coarse, "lambda": lambda_, "manner": manner}


def base_config(plan: CoarsePlan) -> Config:
    """Every fit's starting Config: one full epoch over every window (no step cap), so 2x data
    really is twice the updates, scored on the whole evaluation day, teachers wired
    Share*&Sync (the manner of the paper's Table 2 PFD+MD figure, its Table 7 row); quick:
    the tiny sizes. Then the plan's overrides."""
    # objective=ctr: the paper's click-only student, what its tables measure
    base = Config(**QUICK, manner="share_star_sync", objective="ctr", item_stats=False) if plan.quick else Config(
        max_steps=0, eval_max_rows=0, manner="share_star_sync", objective="ctr", item_stats=False)
    return apply_overrides(base, list(plan.overrides))


def run(name: str, data_dir, out_dir, seeds=(1, 2, 3), quick: bool = False, overrides=(), *,
        workers: int = 1, cache_dir: str | Path | None = None) -> dict:
    """Run experiment `name` ("coarse", "lambda" or "manner") on the world in `data_dir`;
    writes report.md, results.json and PNG plots to `out_dir` and returns the results.

    `workers` > 1 runs independent fits in that many processes (one thread each); a
    `cache_dir` keeps every fit's metrics and predictions keyed by (world, config, days), so
    runs shared by the tables (e.g. PFD+MD at λ = 0.5, Share&Sync) are trained once.
    `--set workers=` / `cache=` in `overrides` take precedence over these arguments."""
    plan = CoarsePlan.from_cli(name, seeds, quick=quick, workers=workers, overrides=overrides, config=Config,
                               cache=str(cache_dir or ""))
    return run_plan(plan, data_dir, out_dir)


def run_plan(plan: CoarsePlan, data_dir, out_dir) -> dict:
    """Run a checked plan; see `run`."""
    torch.set_num_threads(1)
    base = base_config(plan)
    data = load(data_dir)
    win = windows(data, plan.base_days)
    if not win["fit"]:
        raise ConfigError(f"a {data.n_days}-day world leaves no fit days before the validation day")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        if not plan.quick:
            print(msg, flush=True)

    t0 = time.perf_counter()
    runner = Runner(data_dir, data, base, win, log, plan.workers, plan.cache)
    experiment = EXPERIMENTS[plan.experiment]
    res = experiment.run(runner, plan, plan.seeds, out)
    res.update({
        "experiment": plan.experiment, "data_dir": str(Path(data_dir).resolve()), "world": data.world.get("config", {}),
        "preset": data.world.get("preset"), "seeds": list(plan.seeds), "quick": plan.quick, "windows": win,
        "plan": plan.record(), "config": dataclasses.asdict(base),
    })
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["workers"] = plan.workers
    res["log"] = lines
    R.write_results(out, res)
    (out / "report.md").write_text(CR.write(plan.experiment, res, experiment.body(res)))
    return res
