"""The fine-ranker experiments' data and single runs: the validation and test splits per task
population, one training run scored on a split, the test-day metrics of a run, and a pool of
forked workers for independent runs."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from functools import reduce
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from recstack.config import apply_overrides
from recstack.data import load
from recstack.evaluation import metrics as M

from fine_rank import train as T
from fine_rank.experiments.plan import Method


@dataclass
class Split:
    """Training rows and scoring rows of one split, per task population."""

    fit: dict[str, dict[str, np.ndarray]]  # task -> table
    score: dict[str, dict[str, np.ndarray]]
    agg_rate: float  # aggregated conversion rate of the fit days
    score_agg: dict[str, np.ndarray]  # aggregates of the scored day
    days: tuple[int, ...] = ()  # the fit days (keyed by the fit cache when a window cuts them)
    windowed: bool = False  # the fit days are a window, not every day before the scored one


@dataclass
class Tables:
    vocab: object
    valid: Split
    test: Split
    world: dict = field(default_factory=dict)
    cache: Path | None = None  # where each fit's predictions are kept (None: nowhere)


def _concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def load_tables(data_dir, window_days: int = 0) -> Tables:
    """The validation split (fit on the days before the validation day, score it) and the test
    split (the days before the test day, score it). window_days 0: every day before; N: the N
    days before, in both splits, so the test fit sees as many rows as the fits its LR was chosen on."""
    data = load(data_dir)
    if window_days and not 1 <= window_days <= len(data.fit_days):
        raise ValueError(f"window_days: must be in [1, {len(data.fit_days)}] (the days before the validation day), got {window_days}")
    fit_days = data.fit_days[-window_days:] if window_days else data.fit_days
    train_days = data.train_days[-window_days:] if window_days else data.train_days
    # the paper tables' rankers read no behaviour sequence (its (N, 50) columns would multiply
    # the memory) and no item statistics (experiments.base_config)
    day = {d: T.materialise(data.examples(d), sequence=False, item_stats=False)
           for d in sorted(set(fit_days) | set(train_days) | {data.valid_day, data.test_day})}
    fit = reduce(_concat, [day[d] for d in fit_days])
    train = reduce(_concat, [day[d] for d in train_days])

    def pops(t):
        return {"ctr": t, "cvr": T.clicked(t)}

    return Tables(
        vocab=data.vocab,
        valid=Split(pops(fit), pops(day[data.valid_day]), T.aggregate_rate(T.aggregates(data, fit_days)),
                    T.aggregates(data, data.valid_day), tuple(fit_days), fit_days != data.fit_days),
        test=Split(pops(train), pops(day[data.test_day]), T.aggregate_rate(T.aggregates(data, train_days)),
                   T.aggregates(data, data.test_day), tuple(train_days), train_days != data.train_days),
        world={"preset": data.world.get("preset"), "seed": data.world.get("seed"), "n_days": data.n_days,
               "config": data.world.get("config", {}), "root": str(Path(data_dir).resolve())},
    )


# ------------------------------------------------------------------------- metrics


def truth_auc(true_p: np.ndarray, probs: np.ndarray) -> float:
    """AUC against the simulator's true probabilities: each row counts as a positive with
    weight p and a negative with weight 1 - p (the label AUC's expectation, free of label noise)."""
    p = np.asarray(true_p, dtype=np.float64)
    n = len(p)
    return float(roc_auc_score(np.r_[np.ones(n), np.zeros(n)], np.r_[probs, probs], sample_weight=np.r_[p, 1 - p]))


def eval_label(task: str) -> str:
    return "click" if task == "ctr" else "purchase"


def score_run(kind: str, task: str, rows: dict, probs: np.ndarray, extras: dict, buckets: np.ndarray, agg: dict) -> dict:
    """Test-day metrics of one run."""
    lab = rows[eval_label(task)]
    truth = rows["true_pctr" if task == "ctr" else "true_pcvr"]
    m = {
        "student_auc": M.auc(lab, probs),
        "auc_vs_truth": truth_auc(truth, probs),
        "calibration": M.calibration(lab, probs),
        "calibration_vs_truth": float(np.mean(probs) / np.mean(truth)),
        "logloss": M.logloss(lab, probs),
        "buckets": {b: M.auc(lab[buckets == b], probs[buckets == b]) for b in ("head", "torso", "tail")},
    }
    for name, p in extras.items():
        m[f"{name}_auc"] = M.auc(lab, p)
        m[f"{name}_calibration"] = M.calibration(lab, p)
    if kind == "signal-loss":
        m["auc_observed"] = M.auc(rows["purchase_observed"], probs)
        m["auc_full"] = m["student_auc"]
        m.update(T.aggregate_metrics(rows, probs, agg))
    return m


def validation_score(kind: str, task: str, rows: dict, probs: np.ndarray) -> float:
    """The model-selection score on the validation day. Signal loss: AUC on the consented
    users' rows (their per-example labels are unbiased; nothing hidden is used)."""
    if kind == "signal-loss":
        c = rows["consent"] > 0.5
        return M.auc(rows["purchase_observed"][c], probs[c])
    return M.auc(rows[eval_label(task)], probs)


# --------------------------------------------------------------------------- runs


def _subsample(table: dict, frac: float, seed: int) -> dict:
    if frac >= 1.0:
        return table
    n = len(table["click"])
    keep = np.sort(np.random.default_rng(1000 + seed).choice(n, size=max(2, int(round(frac * n))), replace=False))
    return {k: v[keep] for k, v in table.items()}


def train_eval(method: Method, base: T.Config, split: Split, vocab, lr: float, seed: int, frac: float = 1.0,
               extra_changes: Sequence[str] = ()) -> dict:
    """Train `method` on `split.fit` and predict `split.score`; -> probs, extras, stats, wall_s."""
    task = method.task
    cfg = fit_config(method, base, lr, extra_changes)
    rows = split.fit[task]
    if method.rows == "consented":
        rows = {k: v[rows["consent"] > 0.5] for k, v in rows.items()}
    rows = _subsample(rows, frac, seed)
    t0 = time.perf_counter()
    res = T.fit_task(task, cfg, vocab, rows, seed, aggregate_rate=split.agg_rate)
    wall = time.perf_counter() - t0
    score = split.score[task]
    return {"probs": T.predict(res.model, score, cfg.eval_batch_size), "wall_s": wall, "stats": res.stats,
            "extras": {k: f(score) for k, f in res.extras.items()}}


_TABLES: "Tables | None" = None  # the tables of the running experiment; forked workers read them copy-on-write


def fit_config(method: Method, base: T.Config, lr: float, extra: Sequence[str]) -> T.Config:
    """The Config one fit trains with: the method's changes, its grid setting and the LR."""
    return apply_overrides(base, list(method.changes) + list(extra) + [f"{method.task}_lr={lr}"])


def fit_key(tables: Tables, method: Method, base: T.Config, phase: str, lr: float, seed: int, frac: float,
            extra: Sequence[str]) -> str:
    """The cache key of one fit: the world (without its folder) and everything `train_eval` is
    given -- the fit's whole Config, its rows, phase, seed and data share. (The code is not in it.)"""
    cfg = fit_config(method, base, lr, extra)
    fields = asdict(cfg)
    # fields added later, at the value every fit before them had: keyed only when changed, so
    # the fits cached before the field keep their keys
    for later, before in (("cvr_manner", "share_sync"),):
        if fields.get(later) == before:
            fields.pop(later)
    fit = {"world": {k: v for k, v in tables.world.items() if k != "root"}, "config": fields,
           "task": method.task, "rows": method.rows, "phase": phase, "seed": seed, "frac": frac}
    split = getattr(tables, phase)
    if split.windowed:  # keyed only when a window cuts the days, so the fits on every day keep their keys
        fit["days"] = list(split.days)
    text = json.dumps(fit, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _save(path: Path, key: str, out: dict) -> None:
    arrays = {"probs": out["probs"], **{f"extra_{k}": v for k, v in out["extras"].items()}}
    meta = json.dumps({"key": key, "wall_s": out["wall_s"], "stats": out["stats"]}, default=str)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, meta=np.array(meta), **arrays)
    tmp.replace(path)  # a fit is cached whole or not at all


def _load(path: Path, key: str) -> dict:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        if meta["key"] != key:
            raise ValueError(f"cache {path}: holds fit {meta['key']!r}, not {key!r}; remove the file")
        return {"probs": z["probs"], "wall_s": meta["wall_s"], "stats": meta["stats"],
                "extras": {k[len("extra_"):]: z[k] for k in z.files if k.startswith("extra_")}}


def _job(args: tuple) -> dict:
    """One train_eval in a worker (or inline): (method, base, phase, lr, seed, frac, extra);
    read from the tables' cache when it holds the fit, and kept there once it is done."""
    method, base, phase, lr, seed, frac, extra = args
    torch.set_num_threads(1)
    path = None
    if _TABLES.cache is not None:
        key = fit_key(_TABLES, method, base, phase, lr, seed, frac, extra)
        path = _TABLES.cache / f"{key}.npz"
        if path.exists():
            return _load(path, key)
    out = train_eval(method, base, getattr(_TABLES, phase), _TABLES.vocab, lr, seed, frac, extra)
    if path is not None:
        _save(path, key, out)
    return out


def run_many(tables: Tables, jobs: list[tuple], workers: int) -> list[dict]:
    """Run independent fits of `tables`, each job (method, base, phase, lr, seed, frac, extra),
    in `workers` forked processes when > 1 (each fit seeds itself, so the results equal a
    serial run's)."""
    global _TABLES
    _TABLES = tables
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            return pool.map(_job, jobs, chunksize=1)
    return [_job(j) for j in jobs]
