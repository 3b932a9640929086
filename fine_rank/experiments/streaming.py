"""SEAD Table 1 (`sead`) and Table 2 (`signal-loss`) in the streaming setting (`--set
streaming=true`): every method trains through the world's days one pass per day, warm-started
(fine_rank.stream), and is scored on each next day. The main metric is the mean next-day AUC
over the last `last_days` days, paired over seeds against the baseline (same seed, same days).

Each (task, method, seed) run is cached as JSON under `out/cache/`, so an interrupted
experiment resumes where it stopped and more seeds can be added later; each cached run carries
the key of its world and Config (`run_key`), and a cached run of another world or Config is
refused, never reused. Without `stream_lrs` every method runs at the config's LR (`*_lr`),
LR x2 at twice it; with it, each row first chooses its LR (and aux-loss weight) on the
validation window (fine_rank.experiments.stream_sweep) and the test window is reported with
that choice. Rows with a validation grid of their own (a setting chosen per run) are not run here.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recstack.config import apply_overrides
from recstack.data import load
from recstack.evaluation import protocol as X
from recstack.evaluation import report as R

from fine_rank import stream as S
from fine_rank import train as T
from fine_rank.experiments import stream_sweep as W
from fine_rank.experiments.plan import TABLES, FinePlan, Method

_DATA: dict = {}  # the loaded days of the running experiment; forked workers read them copy-on-write


def stream_rows(plan: FinePlan) -> dict[str, tuple[Method, ...]]:
    """{task: the rows this plan streams} (rows with a validation grid left out)."""
    return {task: tuple(m for m in plan.rows(task) if len(m.grid) == 1) for task in TABLES[plan.experiment]
            if plan.tasks is None or task in plan.tasks}


def _config(method: Method, base: T.Config, setting: W.Setting | None = None) -> T.Config:
    """A row's Config; `setting` (a swept LR / aux weight) replaces the LR x2 multiple."""
    cfg = apply_overrides(base, list(method.changes) + list(method.grid[0]))
    if setting is not None:
        return apply_overrides(cfg, setting.overrides(method.task))
    if method.lr_times_baseline:
        key = f"{method.task}_lr"
        cfg = apply_overrides(cfg, [f"{key}={getattr(cfg, key) * method.lr_times_baseline}"])
    return cfg


KEYED_WHEN_ON = ("item_stats",)


def run_key(world: dict, cfg: T.Config, rows: str) -> str:
    """The key of a streamed run's inputs besides the seed (which its file name carries): the
    world (world.json without its timings) and the row's whole Config. (The code is not in it.)"""
    w = {k: v for k, v in world.items() if k != "timings_s"}
    # a field added later is keyed only when it is on, so the runs cached before it keep their keys
    config = {k: v for k, v in asdict(cfg).items() if not (k in KEYED_WHEN_ON and not v)}
    text = json.dumps({"world": w, "config": config, "rows": rows}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cached(path: str, key: str) -> dict | None:
    """The cached run at `path` if it was made from the same world and Config; None if absent."""
    if not Path(path).exists():
        return None
    res = json.loads(Path(path).read_text())
    if res.get("key") != key:
        raise ValueError(f"cache {path}: key {res.get('key')!r} is not this run's {key!r} (another world or "
                         f"Config); remove it or use another --out")
    return res


def _job(args: tuple) -> dict:
    method, cfg, seed, path = args
    torch.set_num_threads(1)
    key = run_key(_DATA["world"], cfg, method.rows)
    found = _cached(path, key)
    if found is not None:
        return found
    t0 = time.perf_counter()
    curve = S.fit_stream(method.task, cfg, _DATA["vocab"], _DATA[method.task], seed,
                         aggregates=_DATA["agg"], rows=method.rows)
    res = {"method": method.name, "task": method.task, "seed": seed, "key": key, "wall_s": time.perf_counter() - t0,
           "lr": getattr(cfg, f"{method.task}_lr"), "aux_weight": cfg.sead_weight,
           "curve": [{k: v for k, v in c.items() if k != "train"} | {"steps": c["train"]["steps"]} for c in curve]}
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    tmp.replace(path)  # a run is cached whole or not at all
    return res


def summarise(runs: list[dict], last: int) -> dict:
    """One method's runs (one per seed, same order as the baseline's) -> its summary."""
    tail = [r["curve"][-last:] for r in runs]
    out = {"auc_per_seed": [float(np.mean([c["auc"] for c in t])) for t in tail],
           # mean prediction / mean label over the last days' rows together
           "calibration": float(np.mean([sum(c["mean_pred"] * c["n"] for c in t) / sum(c["mean_label"] * c["n"] for c in t)
                                         for t in tail])),
           # the same against the simulator's true probabilities (free of the labels' sampling noise)
           "calibration_vs_truth": float(np.mean([sum(c["mean_pred"] * c["n"] for c in t)
                                                  / sum(c["mean_pred"] / c["calibration_vs_truth"] * c["n"] for c in t)
                                                  for t in tail])),
           "curve": [float(np.mean([r["curve"][i]["auc"] for r in runs])) for i in range(len(runs[0]["curve"]))],
           "wall_s": float(np.mean([r["wall_s"] for r in runs]))}
    out["auc"] = X.mean_std(out["auc_per_seed"])
    for k in ("aux_auc", "teacher_auc", "auc_observed", "auc_consented", "auc_aggregated", "calibration_aggregated",
              "calibration_train_day"):
        if k in runs[0]["curve"][0]:
            out[k] = float(np.mean([np.mean([c[k] for c in t]) for t in tail]))
            if k == "auc_observed":
                out["auc_observed_per_seed"] = [float(np.mean([c[k] for c in t])) for t in tail]
    return out


def _pool(jobs: list[tuple], workers: int) -> list[dict]:
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_job, jobs, chunksize=1)
    return [_job(j) for j in jobs]


def _path(cache: Path, plan: FinePlan, m: Method, seed: int, setting: W.Setting | None) -> str:
    tag = "" if setting is None else f"_{setting.key()}"
    return str(cache / f"{plan.experiment}_{m.task}_{m.name}{tag}_s{seed}.json")


def select_metric(experiment: str) -> str:
    """What the sweep maximises: the next-day AUC, or for signal loss the AUC on the consented
    users' rows (their per-example labels are unbiased; no hidden label enters the choice)."""
    return "auc_consented" if experiment == "signal-loss" else "auc"


def _sweep(plan: FinePlan, rows: dict, base: T.Config, cache: Path, eval_days: tuple, log) -> tuple[dict, dict]:
    """Choose each row's setting on the validation window (first `select_seeds` seeds), then
    run the chosen settings on every seed. -> ({(task, name): chosen Setting}, sweep record)."""
    valid, test = W.windows(eval_days, plan.valid_days, plan.last_days)
    picks = plan.seeds[: plan.n_select_seeds()]
    swept = lambda m: not m.lr_times_baseline and (plan.stream_swept is None or m.name in plan.stream_swept  # noqa: E731
                                                   or m.name == "baseline")
    grids = {(t, m.name): W.grid(m, plan.stream_lrs, plan.stream_aux_weights)
             for t, ms in rows.items() for m in ms if swept(m)}
    by_name = {(t, m.name): m for t, ms in rows.items() for m in ms}
    jobs = [(by_name[k], _config(by_name[k], base, st), seed, _path(cache, plan, by_name[k], seed, st))
            for seed in picks for k, g in sorted(grids.items(), key=lambda kv: kv[0][0] != "cvr") for st in g]
    log(f"{plan.experiment} sweep: {len(jobs)} runs ({sum(Path(j[3]).exists() for j in jobs)} cached), "
        f"validation days {list(valid)}, test days {list(test)}, seeds {list(picks)}")
    done = iter(_pool(jobs, plan.workers))
    found = {(j[0].task, j[0].name, j[3]): next(done) for j in jobs}
    chosen, record = {}, {"validation_days": list(valid), "test_days": list(test), "select_seeds": list(picks),
                          "metric": select_metric(plan.experiment), "rows": {}}
    for k, g in grids.items():
        runs = {st: [found[(k[0], k[1], _path(cache, plan, by_name[k], seed, st))] for seed in picks] for st in g}
        chosen[k], scores = W.choose(g, runs, valid, select_metric(plan.experiment))
        record["rows"][f"{k[0]}/{k[1]}"] = {"chosen": chosen[k].record(), "validation_scores": scores}
    for k, m in by_name.items():  # the rows not swept
        if k in chosen:
            continue
        if m.lr_times_baseline:  # LR x2: twice the baseline's chosen LR
            chosen[k] = W.Setting(chosen[(k[0], "baseline")].lr * m.lr_times_baseline)
        else:
            chosen[k] = chosen[(k[0], "sead_max")] if W.has_aux(m) else W.Setting(chosen[(k[0], "baseline")].lr)
        record["rows"][f"{k[0]}/{k[1]}"] = {"chosen": chosen[k].record(), "validation_scores": {},
                                            "inherited": True}
    return chosen, record


def run(plan: FinePlan, data_dir, out: Path, base: T.Config, log: Callable[[str], None]) -> tuple[dict, list[str]]:
    """-> (results.json entries, report sections)."""
    data = load(data_dir)
    if data.n_days < 4:
        raise ValueError(f"streaming needs a world of >= 4 days (simulate with --set n_days=...), got {data.n_days}")
    rows = stream_rows(plan)
    _DATA.clear()
    tables = {t: S.day_tables(data, t, item_stats=base.item_stats) for t in rows}
    _DATA.update({"world": data.world, "vocab": data.vocab, "agg": S.day_aggregates(data), **tables})
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    chosen, sweep = {}, None
    if plan.stream_lrs:
        chosen, sweep = _sweep(plan, rows, base, cache, tuple(range(2, data.n_days + 1)), log)
    # seed after seed (each seed every task's rows): a run stopped early still has paired seeds
    jobs = [(m, _config(m, base, chosen.get((task, m.name))), seed,
             _path(cache, plan, m, seed, chosen.get((task, m.name))))
            for seed in plan.seeds for task, ms in sorted(rows.items(), key=lambda kv: kv[0] != "cvr") for m in ms]
    log(f"{plan.experiment} (streaming): {len(jobs)} runs, {sum(Path(j[3]).exists() for j in jobs)} cached")
    done = _pool(jobs, plan.workers)
    results = {"streaming": True, "last_days": plan.last_days, "days": data.n_days, "tasks": {}}
    if sweep is not None:
        results["sweep"] = sweep
    sections = []
    for task, ms in rows.items():
        by = {m.name: [r for r in done if r["task"] == task and r["method"] == m.name] for m in ms}
        tab = {n: summarise(rs, plan.last_days) for n, rs in by.items()}
        base_auc = tab["baseline"]["auc_per_seed"]
        for n, e in tab.items():
            e["delta_vs_baseline"] = X.paired_diff(e["auc_per_seed"], base_auc)
            e["per_seed_differs_from_baseline"] = bool(np.any(np.abs(np.subtract(e["auc_per_seed"], base_auc)) > 0))
            if "auc_observed_per_seed" in e:
                e["delta_auc_observed"] = X.paired_diff(e["auc_observed_per_seed"], tab["baseline"]["auc_observed_per_seed"])
            if (task, n) in chosen:
                e["chosen"] = chosen[(task, n)].record()
        eval_days = [c["eval_day"] for c in next(iter(by.values()))[0]["curve"]]
        found = {"methods": tab, "eval_days": eval_days, "notes": {m.name: m.note for m in ms},
                 "label_noise": label_noise(task, _DATA[task], eval_days[-plan.last_days:])}
        if "sead_max" in tab and "sead_min" in tab:
            found["sead_max_minus_min"] = X.paired_diff(tab["sead_max"]["auc_per_seed"], tab["sead_min"]["auc_per_seed"])
        results["tasks"][task] = found
        sections += _section(plan, task, tab, eval_days, out, {m.name: m.note for m in ms}) + _notes(found)
    if sweep is not None:
        sections += W.section(sweep)
    return results, sections


def _section(plan: FinePlan, task: str, tab: dict, eval_days: list, out: Path, notes: dict) -> list[str]:
    name = f"{plan.experiment.replace('-', '_')}_{task}_stream"
    series = {n: np.subtract(e["curve"], tab["baseline"]["curve"]) for n, e in tab.items() if n != "baseline"}
    files = [R.plot_curves(out / f"{name}_daily_delta.png", eval_days, series,
                           f"{plan.experiment} {task.upper()}: next-day AUC − baseline (mean over seeds)",
                           "scored day", "AUC − baseline").name,
             R.plot_curves(out / f"{name}_daily_auc.png", eval_days, {n: e["curve"] for n, e in tab.items()},
                           f"{plan.experiment} {task.upper()}: next-day AUC (mean over seeds)", "scored day", "AUC").name]
    extra = [k for k in ("calibration_train_day", "aux_auc", "teacher_auc", "auc_observed", "auc_consented",
                         "auc_aggregated", "calibration_aggregated") if any(k in e for e in tab.values())]
    swept = any("chosen" in e for e in tab.values())
    header = ["method", f"next-day AUC, last {plan.last_days} days", "Δ vs baseline [95% CI]", "calibration",
              "calibration vs truth", *extra, *(["chosen LR / aux weight"] if swept else []), "s/run", "note"]
    body = [[n, R.fmt_mean_std(e["auc"]), R.fmt_ci(e["delta_vs_baseline"]), f"{e['calibration']:.4f}",
             f"{e['calibration_vs_truth']:.4f}",
             *[("–" if k not in e else f"{e[k]:.4f}") for k in extra], *([_chosen(e)] if swept else []),
             f"{e['wall_s']:.0f}", notes[n]]
            for n, e in tab.items()]
    return [f"## {plan.experiment} — {task.upper()}, streaming (one pass per day, warm start, next-day AUC)\n",
            R.markdown_table(header, body), "", "Plots: " + ", ".join(f"`{f}`" for f in files), ""]


def label_noise(task: str, days: dict[int, dict[str, np.ndarray]], test_days: list[int]) -> dict:
    """The test window's labels against the simulator's true probabilities: their sum over the
    true sum, and the relative standard error of the label sum (sqrt(sum p(1 - p)) / sum p), how
    far the label mean strays from the true mean by sampling alone. A model calibrated to the
    truth reads 1 / label_over_truth against the labels."""
    lab, col = ("click", "true_pctr") if task == "ctr" else ("purchase", "true_pcvr")
    y = np.concatenate([days[d][lab] for d in test_days]).astype(np.float64)
    p = np.concatenate([days[d][col] for d in test_days]).astype(np.float64)
    return {"days": [int(d) for d in test_days], "labels": int(y.sum()), "expected": float(p.sum()),
            "label_over_truth": float(y.sum() / p.sum()), "rel_se": float(np.sqrt(np.sum(p * (1 - p))) / p.sum())}


def _notes(found: dict) -> list[str]:
    """The lines under a task's table: the test window's label noise, SEAD (max) - SEAD (min)."""
    n = found["label_noise"]
    out = [f"Test window (scored days {n['days']}): {n['labels']} positives; label mean / true-probability mean "
           f"{n['label_over_truth']:.4f}, relative standard error of the label mean {n['rel_se']:.2%}: a model "
           f"calibrated to the truth reads {1 / n['label_over_truth']:.4f} against the labels.", ""]
    if "sead_max_minus_min" in found:
        out += [f"SEAD (max) − SEAD (min), paired over seeds: {R.fmt_ci(found['sead_max_minus_min'])}.", ""]
    return out


def _chosen(e: dict) -> str:
    c = e.get("chosen")
    if c is None:
        return "–"
    return f"{c['lr']:g}" + ("" if c["aux_weight"] is None else f" / {c['aux_weight']:g}")
