"""Evaluation metrics: AUC, log-loss, calibration, recall@K, ANN recall against exact search (numpy in, floats out)."""
from __future__ import annotations

from collections.abc import Sequence

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


# Unit roundoff of float32: FAISS and the exported embeddings compute inner products in it.
_F32_ROUNDOFF = 2.0 ** -24


def _tie_tolerance(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    """(Q,) how far apart two exact scores can be and still be ordered either way by a float32 index.

    A float32 dot product of length D is within D * u * sum_i |q_i c_i| <= D * u * |q| |c| of
    the exact value whatever its summation order (u = 2^-24; BLAS kernels, SIMD widths and
    thread counts only change that order). Two items whose exact scores differ by less than
    twice that bound are a tie as far as any float32 index can tell.
    """
    dim = queries.shape[1]
    max_norm = float(np.sqrt((corpus.astype(np.float64) ** 2).sum(axis=1).max())) if len(corpus) else 0.0
    return 2.0 * dim * _F32_ROUNDOFF * np.linalg.norm(queries, axis=1) * max_norm


def exact_kth_scores(queries: np.ndarray, corpus: np.ndarray, ks: Sequence[int],
                     chunk_elems: int = 1 << 23) -> dict[int, np.ndarray]:
    """The k-th best exact inner product of each query over the whole corpus, per k.

    queries (Q, D), corpus (N, D) -> {k: (Q,) float64}; k is capped at N. Scores are computed
    in float64 (queries in chunks of about `chunk_elems` scores) so that they are the exact
    reference, not one more float32 summation order.
    """
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(corpus, dtype=np.float64)
    ks = sorted({min(int(k), len(c)) for k in ks})
    out = {k: np.empty(len(q)) for k in ks}
    rows = max(1, chunk_elems // max(len(c), 1))
    for s in range(0, len(q), rows):
        neg = -(q[s : s + rows] @ c.T)  # (n, N)
        part = -np.partition(neg, [k - 1 for k in ks], axis=1)  # descending at every k-1
        for k in ks:
            out[k][s : s + rows] = part[:, k - 1]
    return out


def in_exact_top_k(found: np.ndarray, queries: np.ndarray, corpus: np.ndarray, k: int,
                   kth: np.ndarray | None = None, chunk_elems: int = 1 << 23) -> np.ndarray:
    """Whether each id is among its query's exact top k by inner product, ties counted.

    found (Q, M) ids, -1 = none; queries (Q, D); corpus (N, D) with row = id -> (Q, M) bool.
    An id is in when its exact score is at least the k-th best exact score, less the float32
    tie tolerance: every item tied with the k-th is an equally right answer, and which of them
    an index returns depends on its summation order, not on its quality. `kth` is the (Q,)
    `exact_kth_scores(queries, corpus, [k])[k]` when it is already known.
    """
    found = np.asarray(found, dtype=np.int64)
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(corpus)
    k = min(int(k), len(c))
    if found.ndim != 2 or len(found) != len(q):
        raise ValueError(f"found must be (Q={len(q)}, M) ids, got {found.shape}")
    kth = exact_kth_scores(q, c, [k], chunk_elems)[k] if kth is None else np.asarray(kth, np.float64)
    bar = kth - _tie_tolerance(q, c)  # (Q,)
    out = np.zeros(found.shape, bool)
    rows = max(1, chunk_elems // max(found.shape[1] * q.shape[1], 1))
    for s in range(0, len(q), rows):
        ids = found[s : s + rows]
        valid = ids >= 0
        score = np.einsum("nd,nmd->nm", q[s : s + rows], c[np.where(valid, ids, 0)].astype(np.float64))  # (n, M)
        out[s : s + rows] = valid & (score >= bar[s : s + rows, None])
    return out


def recall_vs_exact(found: np.ndarray, queries: np.ndarray, corpus: np.ndarray, ks: Sequence[int],
                    kth: dict[int, np.ndarray] | None = None, chunk_elems: int = 1 << 23) -> dict[int, np.ndarray]:
    """Per-query recall@k of an ANN index's results against exact inner-product search, ties counted.

    found (Q, >=k) ids the index returned for queries (Q, D), best first, -1 = no result; corpus
    (N, D) with row = id. recall@k = (distinct ids of found[:, :k] that are `in_exact_top_k`) / k,
    so an exact Flat index scores 1.0 on every CPU, whichever tied items it returns. `kth` is
    `exact_kth_scores(queries, corpus, ks)` when several indexes are measured against the same
    queries. Returns {k: (Q,) recall@k in [0, 1]}; k is capped at N.
    """
    found = np.asarray(found, dtype=np.int64)
    ks = sorted({min(int(k), len(corpus)) for k in ks})
    if found.ndim != 2 or len(found) != len(queries) or found.shape[1] < ks[-1]:
        raise ValueError(f"found must be (Q={len(queries)}, >={ks[-1]}) ids, got {found.shape}")
    kth = kth if kth is not None else exact_kth_scores(queries, corpus, ks, chunk_elems)
    out = {}
    for k in ks:
        head = found[:, :k]
        hit = in_exact_top_k(head, queries, corpus, k, kth[k], chunk_elems)
        # a repeated id counts once: sort each row and drop entries equal to their predecessor
        order = np.argsort(head, axis=1, kind="stable")
        h, o = np.take_along_axis(head, order, axis=1), np.take_along_axis(hit, order, axis=1)
        o[:, 1:] &= h[:, 1:] != h[:, :-1]
        out[k] = o.sum(axis=1) / k
    return out
