"""Evaluation metrics: AUC, log-loss, calibration, recall@K (numpy in, floats out)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss as _log_loss
from sklearn.metrics import roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(_log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """mean prediction / mean label (1.0 is perfectly calibrated on average)."""
    return float(np.mean(probs) / max(np.mean(labels), 1e-12))


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict:
    """Reliability diagram data over quantile bins of the prediction."""
    edges = np.unique(np.quantile(probs, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, len(edges) - 2)
    pred, obs, count = [], [], []
    for b in range(len(edges) - 1):
        m = which == b
        if m.any():
            pred.append(float(probs[m].mean()))
            obs.append(float(labels[m].mean()))
            count.append(int(m.sum()))
    return {"mean_pred": pred, "mean_label": obs, "count": count}


def recall_at_k(retrieved: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over rows of |retrieved ∩ relevant| / |relevant| (ignoring -1 padding).

    retrieved (N, K) ids; relevant (N, R) ids (-1 = none).
    """
    hits, total = 0, 0
    for r, t in zip(retrieved, relevant):
        t = t[t >= 0]
        if len(t) == 0:
            continue
        hits += np.isin(t, r[r >= 0]).sum()
        total += len(t)
    return float(hits / max(total, 1))
