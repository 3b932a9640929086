"""Predictions of the fine rankers and their calibration: serving-forward probabilities, the
aggregated (per day and category) conversion counts of signal loss, and the head-bias shift
that calibrates a model to a target rate."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score

from recstack.data import SimData

from fine_rank.inputs import row_inputs
from fine_rank.model import Ranker


@torch.no_grad()
def predict(model: Ranker, table: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """-> (N,) float32 probabilities from the serving forward (eval mode)."""
    model.eval()
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        out[sl] = model(*_torch_rows(table, sl)).numpy()
    return out


@torch.no_grad()
def predict_with(fn: Callable[..., torch.Tensor], table: dict[str, np.ndarray], batch_size: int = 8192,
                 privileged: bool = False) -> np.ndarray:
    """-> (N,) probabilities of sigmoid(fn(*serving inputs[, post_event])) (models in eval mode)."""
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        extra = [torch.from_numpy(table["post_event"][sl])] if privileged else []
        out[sl] = torch.sigmoid(fn(*_torch_rows(table, sl), *extra)).numpy()
    return out


def _torch_rows(table: dict[str, np.ndarray], rows) -> list:
    """Every ranker's positional inputs (fine_rank.inputs.row_inputs) of `rows`, as tensors."""
    return [torch.from_numpy(np.ascontiguousarray(v)) if v is not None else None for v in row_inputs(table, rows)]


# ---------------------------------------------------------------- aggregated conversions


def aggregates(data: SimData, days: list[int] | int) -> dict[str, np.ndarray] | None:
    """The daily per-category conversion counts (SKAdNetwork-like) of `days`:
    columns day, category, clicks, conversions (all users, consent or not). None when the
    folder has no aggregates.parquet (an optional file, docs/DATA.md)."""
    days = [days] if isinstance(days, int) else list(days)
    if not (data.root / "aggregates.parquet").exists():
        return None
    t = pq.read_table(data.root / "aggregates.parquet").to_pydict()
    keep = np.isin(np.asarray(t["day"]), days)
    return {k: np.asarray(t[k])[keep] for k in ("day", "category", "clicks", "conversions")}


def aggregate_rate(agg: dict[str, np.ndarray]) -> float:
    """Aggregated conversions / clicks."""
    return float(agg["conversions"].sum() / max(agg["clicks"].sum(), 1))


HOLDOUT_SEED = 4241  # the held-out slice's own stream, apart from the fit's shuffling


def holdout_split(table: dict[str, np.ndarray], frac: float, seed: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """-> (rows to fit, rows to fit the calibration shift on): a seeded random `frac` of the
    rows held out of fitting."""
    n = len(table["click"])
    k = int(round(frac * n))
    if not 1 <= k < n:
        raise ValueError(f"calibration_holdout={frac} of {n} rows leaves no rows to fit or none to calibrate on")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(HOLDOUT_SEED + seed).choice(n, size=k, replace=False)] = True
    return {c: v[~held] for c, v in table.items()}, {c: v[held] for c, v in table.items()}


def calibrate_to_rate(model: Ranker, table: dict[str, np.ndarray], rate: float, batch_size: int = 8192) -> float:
    """Shift the head bias so that the mean prediction on `table` equals `rate`; -> the shift.

    A global logit shift keeps the ordering (AUC) and is part of the exported graph.
    """
    model.eval()
    z = np.log(predict(model, table, batch_size).astype(np.float64))
    z = z - np.log1p(-np.exp(z))  # logit
    lo, hi = -20.0, 20.0
    for _ in range(80):  # mean(sigmoid(z + b)) is increasing in b
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(z + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    shift = (lo + hi) / 2
    with torch.no_grad():
        model.head.linear.bias += shift
    return float(shift)


def aggregate_metrics(table: dict[str, np.ndarray], probs: np.ndarray, agg: dict[str, np.ndarray]) -> dict:
    """Scores against the aggregated labels of the same day(s).

    auc: the per-(day, category) mean prediction scored against the aggregated counts (each
    aggregate = `conversions` positives and `clicks - conversions` negatives, all with the
    cell's score); calibration: mean prediction / aggregated conversion rate.
    """
    cat = table["item_feats"][:, 1] - 1  # model ids are raw + 1
    # one cell per (day, category); rows carry no day column, so `agg` must hold one day
    if len(np.unique(agg["day"])) != 1:
        raise ValueError("aggregate_metrics scores one day at a time")
    n_cat = int(max(cat.max(), agg["category"].max())) + 1
    sums = np.bincount(cat, weights=probs, minlength=n_cat)
    counts = np.bincount(cat, minlength=n_cat)
    clicks = np.zeros(n_cat)
    conv = np.zeros(n_cat)
    clicks[agg["category"]] = agg["clicks"]
    conv[agg["category"]] = agg["conversions"]
    cells = (counts > 0) & (clicks > 0)
    score = sums[cells] / counts[cells]
    pos, neg = conv[cells], clicks[cells] - conv[cells]
    labels = np.r_[np.ones(cells.sum()), np.zeros(cells.sum())]
    auc = float(roc_auc_score(labels, np.r_[score, score], sample_weight=np.r_[pos, neg])) if pos.sum() and neg.sum() else float("nan")
    return {"auc_aggregated": auc, "calibration_aggregated": float(np.mean(probs) / max(aggregate_rate(agg), 1e-12)),
            "aggregated_rate": aggregate_rate(agg)}

