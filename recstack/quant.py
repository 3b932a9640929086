"""Item vectors at a quarter of their width: int8 codes with one float32 scale per row, and
the fused gather-dot that scores a request's candidates against them.

    codes, scales = quantise_rows(vecs)                      # (I, D) int8, (I,) float32
    scores = int8_inner_products_by_idx(codes, scales, ids, user_vec)   # ~= vecs[ids] @ user_vec
    pos, exact = shortlist_top(scores, 500, shortlist_size(500, len(ids)), lambda p: vecs[ids[p]] @ user_vec)

Candidates arrive in retrieval order, i.e. random rows of a table far larger than the
caches, so the product is bound by memory latency, not arithmetic: an int8 row is 2 cache
lines where a float32 one is 8. The kernel (numba, compiled on its first call) reads each
row once in place, with no gathered copy, and works on 4 rows at a time so the loads of
4 rows are in flight together. numpy cannot fuse the gather, and its int8 -> float32 and
float16 -> float32 conversions cost more than the gather saves (measured in the bench
report). Shared by the coarse exporter (parity check) and the server (serving).

The int8 scores alone reorder near-ties at the top-500 boundary (top-500 overlap with float32
~0.99 on 10,000 candidates), so they only choose a shortlist somewhat larger than the cut;
the shortlist is re-scored exactly in float32 and the cut taken on those scores
(`shortlist_top`): the standard quantised scan + exact re-rank. The kept items are float32's
top-c whenever float32's top-c lies inside the int8 shortlist, and their scores are exact.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

INT8_MAX = 127
# shortlist = ceil(SHORTLIST_FACTOR x the cut): the int8 scores pick it, float32 re-scores it
SHORTLIST_FACTOR = 1.5
# what the exporter's int8 ranking check measured, and the server serves: the cut taken on the
# float32 re-score of the int8 shortlist
INT8_METHOD = "int8_shortlist_fp32_rescore"


def quantise_rows(vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """vecs (I, D) float32 -> codes (I, D) int8, scales (I,) float32 with
    vecs[i] ~= codes[i] * scales[i]: symmetric, one scale per row (max |v| / 127), so the
    largest entry of each row is exact and the rest round to the nearest step. A zero row
    gets scale 0 (its codes are 0)."""
    vecs = np.asarray(vecs, dtype=np.float32)
    if vecs.ndim != 2:
        raise ValueError(f"vecs must be (I, D), got shape {vecs.shape}")
    if not np.isfinite(vecs).all():
        raise ValueError("vecs hold NaN or infinite values; cannot quantise")
    scales = (np.abs(vecs).max(axis=1) / INT8_MAX).astype(np.float32) if vecs.shape[1] else np.zeros(len(vecs), np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    codes = np.clip(np.rint(vecs / safe[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scales


def _dot_rows(codes, scales, ids, query, out):  # pragma: no cover - compiled by `_kernel`
    d = codes.shape[1]
    n = ids.shape[0]
    n4 = n - n % 4
    for i in range(0, n4, 4):
        r0, r1, r2, r3 = ids[i], ids[i + 1], ids[i + 2], ids[i + 3]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for j in range(d):
            qj = query[j]
            a0 += np.float32(codes[r0, j]) * qj
            a1 += np.float32(codes[r1, j]) * qj
            a2 += np.float32(codes[r2, j]) * qj
            a3 += np.float32(codes[r3, j]) * qj
        out[i] = a0 * scales[r0]
        out[i + 1] = a1 * scales[r1]
        out[i + 2] = a2 * scales[r2]
        out[i + 3] = a3 * scales[r3]
    for i in range(n4, n):
        r = ids[i]
        acc = np.float32(0.0)
        for j in range(d):
            acc += np.float32(codes[r, j]) * query[j]
        out[i] = acc * scales[r]


_compiled = None


def _kernel():
    """`_dot_rows` compiled (on first use): importing numba, and the scipy it probes for when
    installed, is paid only by a process that scores int8 vectors. Two threads racing here
    compile it twice, harmlessly."""
    global _compiled
    if _compiled is None:
        import numba

        _compiled = numba.njit(nogil=True, fastmath=True, boundscheck=False, cache=False)(_dot_rows)
    return _compiled


def int8_inner_products_by_idx(codes: np.ndarray, scales: np.ndarray, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """codes (I, D) int8 C-contiguous, scales (I,) float32, ids (N,) int64 in [0, I), query (D,)
    float32 -> (N,) float32 (codes[ids] * scales[ids, None]) @ query, fused (rows read in place).
    The caller guarantees the id bounds: the kernel does not check them. Releases the GIL."""
    if codes.dtype != np.int8 or codes.ndim != 2 or not codes.flags["C_CONTIGUOUS"]:
        raise ValueError(f"codes must be a C-contiguous int8 (I, D) array, got {codes.dtype} {codes.shape}")
    if scales.dtype != np.float32 or scales.shape != (codes.shape[0],):
        raise ValueError(f"scales must be float32 ({codes.shape[0]},), got {scales.dtype} {scales.shape}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    query = np.ascontiguousarray(query, dtype=np.float32)
    if query.shape != (codes.shape[1],):
        raise ValueError(f"query shape {query.shape}, expected ({codes.shape[1]},)")
    out = np.empty(len(ids), np.float32)
    if len(ids):
        _kernel()(codes, scales, ids, query, out)
    return out


def topk_overlap(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """The share of `reference`'s top-k positions (by score, descending) that are also in
    `candidate`'s top-k; both (N,) scores of the same N items. k is clipped to N; 1.0 when N = 0."""
    n = len(reference)
    k = min(k, n)
    if k == 0:
        return 1.0
    top_ref = np.argpartition(-reference, k - 1)[:k]
    top_cand = np.argpartition(-candidate, k - 1)[:k]
    return float(len(np.intersect1d(top_ref, top_cand, assume_unique=True)) / k)


def shortlist_size(keep: int, n: int, factor: float = SHORTLIST_FACTOR) -> int:
    """The shortlist for a cut of `keep` out of `n`: ceil(factor * keep), within [keep, n]."""
    if factor < 1:
        raise ValueError(f"shortlist factor must be >= 1, got {factor}")
    return int(min(n, max(keep, math.ceil(keep * factor))))


def top_positions(scores: np.ndarray, keep: int) -> np.ndarray:
    """Positions (int64) of the `keep` highest of `scores` (N,), unordered; all N, in order,
    when keep >= N."""
    n = len(scores)
    if keep >= n:
        return np.arange(n, dtype=np.int64)
    if keep <= 0:
        return np.zeros(0, np.int64)
    return np.argpartition(-scores, keep - 1)[:keep].astype(np.int64)


def shortlist_top(approx: np.ndarray, keep: int, shortlist: int,
                  exact: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """approx (N,) approximate scores; the `shortlist` positions they rank highest are scored by
    `exact(positions) -> (S,) float32`, and the `keep` highest of those kept.
    -> (positions (K,) int64 into approx, unordered; their exact scores (K,) float32)."""
    short = top_positions(approx, max(keep, shortlist))
    exact_scores = np.asarray(exact(short), dtype=np.float32)
    if exact_scores.shape != short.shape:
        raise ValueError(f"exact scores shape {exact_scores.shape}, expected {short.shape}")
    best = top_positions(exact_scores, keep)
    return short[best], exact_scores[best]
