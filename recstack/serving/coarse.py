"""The coarse stage's item vectors as served: int8 codes with per-row scales when the bundle
ships them (the exporter writes them only once their ranking matched float32's, see
coarse_rank/export.py), else the float32 vectors; both scored by a fused gather-dot.

    vectors = CoarseVectors.load(bundle, n_items)
    scores = vectors.inner_products(cands, user_vec)   # (R,) float32 = item_vectors[cands] @ user_vec
"""
from __future__ import annotations

import faiss
import numpy as np

from recstack.bundle import Bundle, BundleError
from recstack.bundle_files import COARSE_ITEM_CODES, COARSE_ITEM_SCALES, COARSE_ITEM_VECTORS
from recstack.quant import int8_inner_products_by_idx
from recstack.serving.loading import read_coarse_vectors

PRECISION_FP32 = "fp32"
PRECISION_INT8 = "int8"


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


class CoarseVectors:
    """Precomputed item vectors (score scale folded in) and the fused product against them."""

    def __init__(self, precision: str, vectors: np.ndarray | None = None, codes: np.ndarray | None = None,
                 scales: np.ndarray | None = None):
        self.precision = precision
        self.vectors, self.codes, self.scales = vectors, codes, scales
        table = vectors if precision == PRECISION_FP32 else codes
        self.relpath = COARSE_ITEM_VECTORS if precision == PRECISION_FP32 else COARSE_ITEM_CODES  # for error messages
        self.n_items, self.dim = table.shape
        self.nbytes = int(table.nbytes + (scales.nbytes if scales is not None else 0))

    @classmethod
    def load(cls, bundle: Bundle, n_items: int) -> "CoarseVectors":
        """The int8 codes when the manifest lists them (their float32 source is not read then),
        else the float32 vectors."""
        files = bundle.manifest.get("files", {})
        if COARSE_ITEM_CODES in files or COARSE_ITEM_SCALES in files:
            if not (COARSE_ITEM_CODES in files and COARSE_ITEM_SCALES in files):
                raise BundleError(f"bundle lists only one of {COARSE_ITEM_CODES!r} and {COARSE_ITEM_SCALES!r}; "
                                  "int8 item vectors need both")
            dim = int(bundle.stage("coarse").get("meta", {}).get("dim", 0))
            if dim <= 0:
                raise BundleError("manifest.json: stages.coarse.meta.dim missing; needed to check the int8 item codes")
            codes = _load_npy(bundle, COARSE_ITEM_CODES, np.dtype(np.int8), (n_items, dim))
            scales = _load_npy(bundle, COARSE_ITEM_SCALES, np.dtype(np.float32), (n_items,))
            if not (np.isfinite(scales).all() and (scales >= 0).all()):
                raise BundleError(f"bundle file {COARSE_ITEM_SCALES!r}: scales must be finite and >= 0")
            return cls(PRECISION_INT8, codes=codes, scales=scales)
        return cls(PRECISION_FP32, vectors=read_coarse_vectors(bundle, n_items))

    def inner_products(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """ids (R,) int64 in [0, n_items) (not checked here), query (D,) float32 -> (R,) float32."""
        if self.precision == PRECISION_INT8:
            return int8_inner_products_by_idx(self.codes, self.scales, ids, query)
        return inner_products_by_idx(self.vectors, ids, query)
