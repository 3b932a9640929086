"""The coarse stage's item vectors as served, and the cut of a request's candidates to the
coarse size.

    vectors = CoarseVectors.load(bundle, n_items)
    pos, scores = vectors.top(cands, user_vec, keep)   # the `keep` best of item_vectors[cands] @ user_vec

float32 (the default): every candidate scored by FAISS's fused gather-dot, the cut taken on
those scores. int8 (when the bundle ships int8 codes with per-row scales and the exporter's
ranking check passed, see coarse_rank/export.py): the candidates are scanned at a quarter of
the bytes, the int8 scores pick a shortlist of SHORTLIST_FACTOR x the cut, and the shortlist
is re-scored in float32 (recstack.quant.shortlist_top); the kept items' scores are float32's.
A bundle listing int8 codes without a passed check of this method serves float32, and says so
in `CoarseVectors.reason`.
"""
from __future__ import annotations

import logging

import faiss
import numpy as np

from recstack.bundle import Bundle, BundleError
from recstack.bundle_files import COARSE_ITEM_CODES, COARSE_ITEM_SCALES, COARSE_ITEM_VECTORS
from recstack.quant import (INT8_METHOD, int8_inner_products_by_idx, shortlist_size, shortlist_top, top_positions)
from recstack.serving.loading import read_coarse_vectors

log = logging.getLogger("recstack.serving")

PRECISION_FP32 = "fp32"
PRECISION_INT8 = "int8"
CONSISTENCY_ROWS = 256  # rows of the int8 codes checked against the float32 vectors at load


def _load_npy(bundle: Bundle, rel: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(bundle.path(rel), allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"bundle file {rel!r}: {e}") from e
    if arr.dtype != dtype or arr.shape != shape:
        raise BundleError(f"bundle file {rel!r}: {arr.dtype} {arr.shape}, expected {np.dtype(dtype)} {shape}")
    return np.ascontiguousarray(arr)


def inner_products_by_idx(vectors: np.ndarray, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """vectors (I, D) float32 C-contiguous, ids (N,) int64 in [0, I), query (D,) float32 ->
    (N,) float32 vectors[ids] @ query, fused: FAISS reads each row once in place, with no
    gathered (N, D) copy and no BLAS call (whose thread pool oversubscribes the cores when
    several requests run at once). The caller guarantees the bounds: FAISS does not check them."""
    if vectors.dtype != np.float32 or vectors.ndim != 2 or not vectors.flags["C_CONTIGUOUS"]:
        raise ValueError(f"vectors must be a C-contiguous float32 (I, D) array, got {vectors.dtype} {vectors.shape}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    query = np.ascontiguousarray(query, dtype=np.float32)
    if query.shape != (vectors.shape[1],):
        raise ValueError(f"query shape {query.shape}, expected ({vectors.shape[1]},)")
    out = np.empty(len(ids), np.float32)
    if len(ids):
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(query), faiss.swig_ptr(vectors),
                                         faiss.swig_ptr(ids), vectors.shape[1], 1, len(ids))
    return out


def int8_check(bundle: Bundle) -> tuple[bool, str]:
    """Whether the exporter's ranking check of the int8 codes passed, for the method served here.
    -> (passed, why)."""
    check = bundle.stage("coarse").get("meta", {}).get("item_vectors_int8")
    if not isinstance(check, dict):
        return False, "manifest.json: stages.coarse.meta.item_vectors_int8 missing (the int8 ranking check)"
    if check.get("method") != INT8_METHOD:
        return False, (f"manifest.json: the int8 ranking check used method {check.get('method')!r}, "
                       f"this server serves {INT8_METHOD!r}")
    if check.get("served") is not True:
        return False, f"manifest.json: the int8 ranking check did not pass ({check.get('reason', 'no reason given')})"
    return True, str(check.get("reason", "passed"))


def _check_codes_match(codes: np.ndarray, scales: np.ndarray, vectors: np.ndarray) -> None:
    """Refuse codes that are not the quantisation of the float32 vectors (rows spread over the table)."""
    rows = np.unique(np.linspace(0, len(codes) - 1, num=min(CONSISTENCY_ROWS, len(codes))).astype(np.int64))
    err = np.abs(codes[rows].astype(np.float32) * scales[rows, None] - vectors[rows])
    step = np.maximum(scales[rows], np.abs(vectors[rows]).max(axis=1) * 1e-6)[:, None]  # one quantisation step
    if len(rows) and not np.all(err <= 0.5 * step * (1 + 1e-3) + 1e-12):
        raise BundleError(f"bundle file {COARSE_ITEM_CODES!r}: codes x scales differ from {COARSE_ITEM_VECTORS!r} "
                          "by more than half a quantisation step; not the quantised item vectors")


class CoarseVectors:
    """Precomputed item vectors (score scale folded in), their int8 codes when served, and the cut."""

    def __init__(self, vectors: np.ndarray, codes: np.ndarray | None = None, scales: np.ndarray | None = None,
                 shortlist_factor: float | None = None, reason: str = "float32 item vectors"):
        self.vectors, self.codes, self.scales = vectors, codes, scales
        self.precision = PRECISION_FP32 if codes is None else PRECISION_INT8
        self.shortlist_factor = shortlist_factor
        self.reason = reason  # why this precision serves
        self.relpath = COARSE_ITEM_VECTORS if codes is None else COARSE_ITEM_CODES  # for error messages
        self.n_items, self.dim = vectors.shape
        self.nbytes = int(vectors.nbytes + (codes.nbytes + scales.nbytes if codes is not None else 0))

    @classmethod
    def load(cls, bundle: Bundle, n_items: int) -> "CoarseVectors":
        """The float32 vectors, plus the int8 codes when the manifest lists them and records a
        passed ranking check of this method (else float32 serves, with the reason logged)."""
        vectors = read_coarse_vectors(bundle, n_items)
        files = bundle.manifest.get("files", {})
        if COARSE_ITEM_CODES not in files and COARSE_ITEM_SCALES not in files:
            return cls(vectors)
        if not (COARSE_ITEM_CODES in files and COARSE_ITEM_SCALES in files):
            raise BundleError(f"bundle lists only one of {COARSE_ITEM_CODES!r} and {COARSE_ITEM_SCALES!r}; "
                              "int8 item vectors need both")
        passed, why = int8_check(bundle)
        if not passed:
            log.warning("coarse stage serves float32 item vectors: %s", why)
            return cls(vectors, reason=f"float32: {why}")
        codes = _load_npy(bundle, COARSE_ITEM_CODES, np.dtype(np.int8), vectors.shape)
        scales = _load_npy(bundle, COARSE_ITEM_SCALES, np.dtype(np.float32), (n_items,))
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise BundleError(f"bundle file {COARSE_ITEM_SCALES!r}: scales must be finite and >= 0")
        _check_codes_match(codes, scales, vectors)
        factor = bundle.stage("coarse")["meta"]["item_vectors_int8"].get("shortlist_factor")
        if not isinstance(factor, (int, float)) or not factor >= 1:
            raise BundleError(f"manifest.json: stages.coarse.meta.item_vectors_int8.shortlist_factor {factor!r}: "
                              "expected a number >= 1")
        return cls(vectors, codes, scales, float(factor), reason=f"int8 scan + float32 re-score: {why}")

    def inner_products(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """ids (R,) int64 in [0, n_items) (not checked here), query (D,) float32 -> (R,) float32
        item_vectors[ids] @ query: exact (float32) for either precision."""
        return inner_products_by_idx(self.vectors, ids, query)

    def top(self, ids: np.ndarray, query: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The `keep` best candidates: ids (R,) int64 in [0, n_items) (not checked here), query (D,)
        -> (positions into ids (K,) int64, unordered, all R in order when keep >= R; their float32
        scores (K,)). int8: float32's top-keep whenever it lies in the int8 shortlist."""
        if self.codes is None or keep >= len(ids):
            scores = self.inner_products(ids, query)
            pos = top_positions(scores, keep)
            return pos, scores[pos]
        approx = int8_inner_products_by_idx(self.codes, self.scales, ids, query)
        return shortlist_top(approx, keep, shortlist_size(keep, len(ids), self.shortlist_factor),
                             lambda p: inner_products_by_idx(self.vectors, ids[p], query))
