"""Fine-ranker experiments: PFD for CVR (PFD Table 4 + Table 6), SEAD selectors and ablations
(SEAD Table 1, CTR and CVR), and SEAD's signal-loss variant (SEAD Table 2).

    from fine_rank.experiments import run
    results = run("cvr", "data/small", "docs/results/cvr", seeds=(1, 2, 3))
    # writes report.md, results.json and PNG plots to out_dir; returns the results dict

Every table follows one protocol (`table`); each experiment module (`cvr`, `sead`,
`signal_loss`) names its rows, runs its tables and writes its report sections.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from recstack.config import ConfigError, apply_overrides
from recstack.evaluation import report as R

from fine_rank import train as T
from fine_rank.experiments import cvr, sead, signal_loss, streaming
from fine_rank.experiments import report as FR
from fine_rank.experiments.plan import QUICK, FinePlan
from fine_rank.experiments.runs import load_tables

# name -> run(plan, tables, base config, out dir, log) -> (results.json entries, report sections)
EXPERIMENTS = {"cvr": cvr.run, "sead": sead.run, "signal-loss": signal_loss.run}


def base_config(plan: FinePlan) -> T.Config:
    """The Config every method of the plan starts from: no teacher, no aux head and no item
    statistics (the papers' rankers read none), whatever the default config exports (each
    method says what it trains; calibration keeps the default unless a method sets it), then
    the plan's overrides."""
    base = T.Config(**QUICK) if plan.quick else T.Config()
    return apply_overrides(base, ["cvr_teacher=none", "ctr_sead=none", "cvr_sead=none", "item_stats=false"]
                           + list(plan.overrides))


def run(name: str, data_dir, out_dir, seeds: Sequence[int] = (1, 2, 3), quick: bool = False,
        overrides: Sequence[str] = (), log: Callable[[str], None] | None = None, workers: int = 1) -> dict:
    """Run experiment `name` ("cvr", "sead" or "signal-loss") on a simulated data dir and
    write report.md, results.json and PNG plots to `out_dir`; -> the results dict.

    quick=True shrinks the models, steps, LR sweep and λ list so that a test runs it on
    `tiny` in seconds (the numbers then mean nothing). `overrides` are `FinePlan` keys
    (lrs=, fractions=, methods=, ctr_methods=, cvr_methods=, workers=) or fine `Config`
    key=value pairs applied to every method. `workers` > 1 runs independent fits in that
    many forked processes (one thread each); the numbers equal a serial run's.
    """
    plan = FinePlan.from_cli(name, seeds, quick=quick, workers=workers, overrides=overrides, config=T.Config)
    return run_plan(plan, data_dir, out_dir, log)


def run_plan(plan: FinePlan, data_dir, out_dir, log: Callable[[str], None] | None = None) -> dict:
    """Run a checked plan; see `run`."""
    torch.set_num_threads(1)
    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_config(plan)
    if plan.streaming:
        return _run_streaming(plan, data_dir, out, base, log, t0)
    tables = load_tables(data_dir, plan.window_days)
    if plan.cache:
        tables.cache = Path(plan.cache)
        tables.cache.mkdir(parents=True, exist_ok=True)
    results: dict = {"experiment": plan.experiment, "quick": plan.quick, "seeds": list(plan.seeds), **plan.record(),
                     "world": {k: v for k, v in tables.world.items() if k != "config"},
                     "world_config": tables.world["config"]}
    found, sections = EXPERIMENTS[plan.experiment](plan, tables, base, out, log)
    results.update(found)
    wall = time.perf_counter() - t0
    results["wall_s"] = wall
    R.write_results(out, results)
    header = FR.header(plan.experiment, tables, plan.seeds, plan.lrs, plan.quick, plan.overrides, wall, plan.n_select_seeds())
    FR.write_report(plan.experiment, out, header, sections)
    return results


def _run_streaming(plan: FinePlan, data_dir, out: Path, base: T.Config, log, t0: float) -> dict:
    if plan.experiment not in ("sead", "signal-loss"):
        raise ConfigError(f"streaming=true runs the sead and signal-loss experiments, not {plan.experiment!r}")
    if plan.last_days < 1:
        raise ConfigError(f"last_days must be >= 1, got {plan.last_days}")
    results: dict = {"experiment": plan.experiment, "quick": plan.quick, "seeds": list(plan.seeds), **plan.record()}
    found, sections = streaming.run(plan, data_dir, out, base, log)
    results.update(found)
    results["wall_s"] = time.perf_counter() - t0
    R.write_results(out, results)
    head = (f"# Fine ranker — `{plan.experiment}` experiment, streaming\n\nWorld `{Path(data_dir).name}`, "
            f"{found['days']} days: each method trains day 1, 2, … one pass each (warm start, optimiser state "
            f"carried, constant LR) and the model after day d is scored on day d + 1. Seeds {list(plan.seeds)}; "
            f"config overrides {list(plan.overrides) or 'none'}; wall {results['wall_s'] / 60:.1f} min.\n")
    FR.write_report(plan.experiment, out, head, sections)
    return results
