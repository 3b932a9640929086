"""The protocol for one task's table of methods (DESIGN §6), shared by every fine experiment:

1. learning rate: each method trains on the fit days (1..D-2) at every rate of the sweep (and
   every setting of its own grid) with each of the first `select_seeds` seeds and is scored on
   the validation day D-1; the best mean over those seeds is kept. The test day is never looked
   at for a choice. (`lr2x` takes twice the baseline's chosen rate, by definition.)
2. test: each method retrains on days 1..D-1 at its choice for every seed and is scored on the
   test day D; the baseline also trains on a share of the rows for the data curve.
3. statistics: mean ± std over seeds, the paired difference to the baseline with a 95 %
   t-interval, the same by the item's training frequency, and a data-equivalent multiplier.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from recstack.evaluation import metrics as M
from recstack.evaluation import protocol as X

from fine_rank import train as T
from fine_rank.experiments.plan import Method
from fine_rank.experiments.runs import Tables, eval_label, run_many, score_run, validation_score

BUCKETS = ("head", "torso", "tail")


@dataclass
class Choice:
    """What the validation day chose for each method of a table."""

    lr: dict[str, float]  # method -> learning rate
    extra: dict[str, tuple[str, ...]]  # method -> the settings of its grid
    sweeps: dict[str, dict]  # method -> {lr: mean validation score over the selection seeds} at the chosen settings
    grid: dict[str, dict]  # method -> {settings: {lr: mean validation score}} (methods with a grid)
    per_seed: dict[str, dict]  # method -> {lr: [validation score per selection seed]} at the chosen settings


def choose(kind: str, methods: Sequence[Method], tables: Tables, base: T.Config, seeds: Sequence[int],
           lrs: Sequence[float], log: Callable[[str], None], workers: int, select_seeds: int = 1) -> Choice:
    """Step 1: every (method, setting, LR) trained on the fit days with each of the first
    `select_seeds` seeds and scored on the validation day; the best mean over those seeds wins."""
    if not 1 <= select_seeds <= len(seeds):
        raise ValueError(f"select_seeds: must be in [1, {len(seeds)}] (the seeds given), got {select_seeds}")
    task = methods[0].task
    c = Choice({}, {m.name: () for m in methods}, {}, {}, {})
    slots = [(m, extra, lr, seed) for m in methods if not m.lr_times_baseline for extra in m.grid for lr in lrs
             for seed in seeds[:select_seeds]]
    outs = run_many(tables, [(m, base, "valid", lr, seed, 1.0, extra) for m, extra, lr, seed in slots], workers)
    scores: dict[tuple, list[float]] = {}
    for (m, extra, lr, _), o in zip(slots, outs):  # slots list the seeds in order within each candidate
        score = validation_score(kind, task, tables.valid.score[task], o["probs"])
        scores.setdefault((m.name, extra, float(lr)), []).append(score)
    valid_auc = {k: float(np.mean(v)) for k, v in scores.items()}
    for m in methods:
        if m.lr_times_baseline:
            continue
        best = None
        for extra in m.grid:
            lr, sweep = X.select_lr(lambda lr, m=m, extra=extra: valid_auc[(m.name, extra, float(lr))], lrs)
            if len(m.grid) > 1:
                c.grid.setdefault(m.name, {})[",".join(extra)] = sweep
            if best is None or sweep[lr] > best[0]:
                best = (sweep[lr], lr, extra, sweep)
        _, c.lr[m.name], c.extra[m.name], c.sweeps[m.name] = best
        c.per_seed[m.name] = {lr: scores[(m.name, c.extra[m.name], float(lr))] for lr in lrs}
        log(f"  [{task}] {m.name}: valid AUC by LR {c.sweeps[m.name]} -> lr {c.lr[m.name]} {c.extra[m.name] or ''}")
    for m in methods:
        if m.lr_times_baseline:
            c.lr[m.name] = c.lr["baseline"] * m.lr_times_baseline
    return c


def seed_runs(kind: str, methods: Sequence[Method], choice: Choice, tables: Tables, base: T.Config,
              seeds: Sequence[int], fractions: Sequence[float], buckets: np.ndarray, log, workers: int):
    """Step 2: every seed x method at its choice, and the baseline on less data;
    -> ({method: [metrics per seed]}, {method: first seed's test probabilities}, {fraction: [AUC per seed]})."""
    task = methods[0].task
    test_rows = tables.test.score[task]
    per_seed: dict[str, list[dict]] = {m.name: [] for m in methods}
    first_probs: dict[str, np.ndarray] = {}
    base_m = next(m for m in methods if m.name == "baseline")
    test_slots = [(seed, m) for seed in seeds for m in methods]
    frac_slots = [(frac, seed) for frac in fractions if frac < 1.0 for seed in seeds]
    jobs = [(m, base, "test", choice.lr[m.name], seed, 1.0, choice.extra[m.name]) for seed, m in test_slots]
    jobs += [(base_m, base, "test", choice.lr["baseline"], seed, frac, ()) for frac, seed in frac_slots]
    outs = run_many(tables, jobs, workers)
    for (seed, m), out in zip(test_slots, outs):
        r = score_run(kind, task, test_rows, out["probs"], out["extras"], buckets, tables.test.score_agg)
        r["wall_s"] = out["wall_s"]
        per_seed[m.name].append(r)
        if seed == seeds[0]:
            first_probs[m.name] = out["probs"]
        log(f"  [{task}] seed {seed} {m.name}: AUC {r['student_auc']:.4f} cal {r['calibration']:.3f} ({out['wall_s']:.1f}s)")
    curve = {}
    frac_outs = dict(zip(frac_slots, outs[len(test_slots):]))
    for frac in fractions:
        if frac >= 1.0:
            curve[frac] = [r["student_auc"] for r in per_seed["baseline"]]
            continue
        curve[frac] = [M.auc(test_rows[eval_label(task)], frac_outs[(frac, seed)]["probs"]) for seed in seeds]
        log(f"  [{task}] baseline at {frac:.0%} of the rows: AUC {np.mean(curve[frac]):.4f}")
    return per_seed, first_probs, curve


def _mean_of(runs: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in runs]))


def _entry(kind: str, m: Method, runs: list[dict], base_runs: list[dict], choice: Choice, fr: list, curve_means: list) -> dict:
    """Step 3: one method's row of results.json from its runs over seeds."""
    auc = [r["student_auc"] for r in runs]
    paired = lambda key: X.paired_diff([r[key] for r in runs], [r[key] for r in base_runs])  # noqa: E731
    e = {
        "task": m.task,
        "note": m.note,
        "lr": choice.lr[m.name],
        "validation_auc": choice.sweeps.get(m.name, {}).get(choice.lr[m.name]) if m.name in choice.sweeps else None,
        "validation_sweep": choice.sweeps.get(m.name),
        "validation_per_seed": choice.per_seed.get(m.name),
        "chosen_settings": list(choice.extra[m.name]),
        "validation_grid": choice.grid.get(m.name),
        "student_auc": X.mean_std(auc),
        "student_auc_per_seed": auc,
        "teacher_auc": X.mean_std([r["teacher_auc"] for r in runs]) if "teacher_auc" in runs[0] else None,
        "delta_vs_baseline": X.paired_diff(auc, [r["student_auc"] for r in base_runs]),
        "calibration": _mean_of(runs, "calibration"),
        "calibration_std": X.mean_std([r["calibration"] for r in runs])["std"],
        "calibration_vs_truth": _mean_of(runs, "calibration_vs_truth"),
        "auc_vs_truth": X.mean_std([r["auc_vs_truth"] for r in runs]),
        "delta_vs_truth_auc": paired("auc_vs_truth"),
        "logloss": X.mean_std([r["logloss"] for r in runs]),
        "wall_s": _mean_of(runs, "wall_s"),
        "buckets": {b: {"auc": X.mean_std([r["buckets"][b] for r in runs]),
                        "delta_vs_baseline": X.paired_diff([r["buckets"][b] for r in runs], [r["buckets"][b] for r in base_runs])}
                    for b in BUCKETS},
        "data_equivalent": X.data_equivalent_multiplier(fr, curve_means, float(np.mean(auc))) if len(fr) > 1 else None,
    }
    for extra in ("aux", "teacher_aux"):
        if f"{extra}_auc" in runs[0]:
            e[f"{extra}_auc"] = X.mean_std([r[f"{extra}_auc"] for r in runs])
            e[f"{extra}_calibration"] = _mean_of(runs, f"{extra}_calibration")
    if kind == "signal-loss":
        for k in ("auc_observed", "auc_full", "auc_aggregated"):
            e[k] = X.mean_std([r[k] for r in runs])
            e[f"delta_{k}"] = paired(k)
        e["calibration_aggregated"] = _mean_of(runs, "calibration_aggregated")
    return e


def run_table(kind: str, methods: Sequence[Method], tables: Tables, base: T.Config, seeds: Sequence[int],
              lrs: Sequence[float], fractions: Sequence[float], log: Callable[[str], None], workers: int = 1,
              select_seeds: int = 1) -> dict:
    """The protocol for one task's methods, the LR chosen by the mean over the first
    `select_seeds` seeds; -> {"methods": {...}, "multiplier_curve": ..., ...}
    (keys starting with "_" are for the caller, not for results.json)."""
    task = methods[0].task
    choice = choose(kind, methods, tables, base, seeds, lrs, log, workers, select_seeds)
    test_rows = tables.test.score[task]
    buckets = X.frequency_buckets(tables.test.fit[task]["item_id"], test_rows["item_id"])
    per_seed, first_probs, curve = seed_runs(kind, methods, choice, tables, base, seeds, fractions, buckets, log, workers)
    fr = sorted(curve)
    curve_means = [float(np.mean(curve[f])) for f in fr]
    entries = {m.name: _entry(kind, m, per_seed[m.name], per_seed["baseline"], choice, fr, curve_means) for m in methods}
    label = test_rows[eval_label(task)]
    reliability = {name: M.reliability(label, p) for name, p in first_probs.items()}
    n_buckets = {b: int((buckets == b).sum()) for b in BUCKETS}
    return {"methods": entries, "multiplier_curve": {"fractions": fr, "baseline_auc": curve_means},
            "reliability": reliability, "bucket_rows": n_buckets, "n_test": int(len(label)),
            "n_train": int(len(tables.test.fit[task]["click"])), "test_positive_rate": float(np.mean(label)),
            "_per_seed": per_seed, "_chosen": choice.lr}


def strip(table: dict) -> dict:
    """A table's results.json part: without the caller-only keys."""
    return {k: v for k, v in table.items() if not k.startswith("_")}
