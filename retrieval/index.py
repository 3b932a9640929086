"""FAISS inner-product indexes for retrieval: factory strings, the default by corpus size, shards.

    from retrieval.index import build, default_spec, ShardedIndex
    spec = default_spec(len(item_emb))                  # {"factory": ..., "nprobe": ..., "ef_search": ...}
    index = build(item_emb, spec["factory"], nprobe=spec["nprobe"], ef_search=spec["ef_search"])
    scores, ids = index.search(user_emb, 1000)          # FAISS id == row == item_id; -1 pads

Factory strings are FAISS's own (`faiss.index_factory`), always with METRIC_INNER_PRODUCT,
the metric the two towers are trained with:

    "Flat"                 exact scan (the reference every ANN index is measured against)
    "IVF4096,Flat"         inverted lists over k-means cells; `nprobe` cells scanned per query
    "IVF4096,PQ32x4fs"     the same with 16-byte 4-bit product-quantised codes (16x less memory, approximate scores)
    "HNSW32"               graph search; `ef_search` >= k candidates kept per query

The default by corpus size (`default_spec`) comes from the recall-latency sweep of
retrieval/bench.py on the `large` corpus (1e6 items, docs/results/retrieval/report.md):
the cheapest point with recall@1000 >= 0.95 against exact search, for the user vectors of
the ANN source and the item vectors of the item-to-item source alike.
"""
from __future__ import annotations

import math

import faiss
import numpy as np

# Below this corpus size an exact scan is already within the serving budget (~2 ms per
# query single-threaded at 2e5 x 64 floats) and there is nothing to tune or to get wrong.
EXACT_MAX_ITEMS = 200_000
# The serving default for larger corpora: IVF-Flat, ~4 sqrt(n) cells; nprobe from the bench on
# the large corpus (docs/results/retrieval/): IVF4096,Flat at nprobe 48 is the cheapest swept
# point with recall@1000 >= 0.95 for both query sets the index serves (user vectors 0.997,
# item vectors of clicked items 0.955), p50 0.29 / 0.45 ms single-threaded vs 45 / 20 ms exact.
DEFAULT_IVF_NPROBE = 48
DEFAULT_HNSW_EF_SEARCH = 1024  # HNSW must keep >= k candidates; k = 1000 at serving
# k-means sample per IVF cell: FAISS warns under 39 points per centroid; 64 keeps the cells
# as good as a full-corpus training at a fraction of the build time.
TRAIN_POINTS_PER_LIST = 64


def default_nlist(n_items: int) -> int:
    """~4 sqrt(n) inverted lists, as a power of two in [64, 65536]."""
    return int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n_items, 1)))))))


def default_spec(n_items: int) -> dict:
    """The index the exporter builds when the config says `index_factory = "auto"`.

    -> {"factory": str, "nprobe": int | None, "ef_search": int | None}
    """
    if n_items <= EXACT_MAX_ITEMS:
        return {"factory": "Flat", "nprobe": None, "ef_search": None}
    return {"factory": f"IVF{default_nlist(n_items)},Flat", "nprobe": DEFAULT_IVF_NPROBE, "ef_search": None}


def resolve(factory: str, n_items: int, nprobe: int | None = None, ef_search: int | None = None) -> dict:
    """A config's (factory, nprobe, ef_search) with "auto" and unset knobs filled in by corpus size."""
    if factory == "auto":
        spec = default_spec(n_items)
    else:
        spec = {"factory": factory, "nprobe": DEFAULT_IVF_NPROBE if "IVF" in factory else None,
                "ef_search": DEFAULT_HNSW_EF_SEARCH if "HNSW" in factory else None}
    if nprobe is not None and "IVF" in spec["factory"]:
        spec["nprobe"] = int(nprobe)
    if ef_search is not None and "HNSW" in spec["factory"]:
        spec["ef_search"] = int(ef_search)
    return spec


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> dict:
    """Set the search-time knobs the index has (IVF nprobe, HNSW efSearch); returns those applied.

    FAISS serialises both with the index, so the server reading index.faiss gets them too.
    """
    applied: dict = {}
    if nprobe is not None:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = int(min(nprobe, ivf.nlist))
            applied["nprobe"] = int(ivf.nprobe)
    if ef_search is not None:
        try:
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", int(ef_search))
            applied["ef_search"] = int(ef_search)
        except RuntimeError:  # not an HNSW index: the parameter does not exist
            pass
    return applied


def search_params(index: faiss.Index) -> dict:
    """The search-time knobs an index actually holds: {"nprobe": int | None, "ef_search": int | None}."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(index)
    hnsw = getattr(inner, "hnsw", None)
    return {"nprobe": int(ivf.nprobe) if ivf is not None else None, "ef_search": int(hnsw.efSearch) if hnsw is not None else None}


def _check(emb: np.ndarray) -> np.ndarray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, D) matrix, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or inf")
    return emb


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a factory string; ValueError names a bad string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"bad faiss index factory string {factory!r}: {str(e).splitlines()[-1]}") from None


def build(
    emb: np.ndarray,
    factory: str = "Flat",
    *,
    nprobe: int | None = None,
    ef_search: int | None = None,
    ids: np.ndarray | None = None,
    max_train: int | None = None,
    seed: int = 0,
) -> faiss.Index:
    """(n, D) embeddings -> a trained METRIC_INNER_PRODUCT index holding them.

    ids: None = row numbers 0..n-1 (FAISS id == row == item_id); else (n,) int64 global ids
    (a shard of a larger corpus), stored through an IndexIDMap where the index type has no
    ids of its own. Indexes that need training (IVF, PQ) are trained on a sample of the
    embeddings themselves (the corpus is the distribution): TRAIN_POINTS_PER_LIST per
    inverted list unless `max_train` says otherwise.
    """
    emb = _check(emb)
    index = new_index(emb.shape[1], factory)
    if not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and len(emb) < ivf.nlist:
            raise ValueError(f"{factory!r}: {len(emb)} vectors cannot train {ivf.nlist} inverted lists")
        cap = max_train or (TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else 65_536)
        sample = emb
        if len(emb) > cap:
            sample = emb[np.sort(np.random.default_rng(seed).choice(len(emb), cap, replace=False))]
        index.train(sample)
    if ids is None:
        index.add(emb)
    else:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (len(emb),):
            raise ValueError(f"ids must be ({len(emb)},), got {ids.shape}")
        if faiss.try_extract_index_ivf(index) is None:
            index = faiss.IndexIDMap2(index)  # flat and graph indexes number their rows 0..n-1
        index.add_with_ids(emb, ids)
    set_search_params(index, nprobe, ef_search)
    return index


def memory_bytes(index: faiss.Index) -> int:
    """The index's serialised size: what index.faiss takes on disk and, to within a few %, in RAM."""
    return int(faiss.serialize_index(index).nbytes)


# --- shards --------------------------------------------------------------------------


def shard_assignment(n_items: int, n_shards: int) -> list[np.ndarray]:
    """Item ids of each shard: item_id % n_shards, so every shard spans the whole id range
    (popular and new items spread evenly) and a shard can be rebuilt alone."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    ids = np.arange(n_items, dtype=np.int64)
    return [ids[ids % n_shards == s] for s in range(n_shards)]


def merge_top_k(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-shard (Q, k_s) results with global ids -> the global (Q, k) top-k, best first.

    -1 padding from a shard is dropped before the merge and pads the result only when all
    shards together hold fewer than k hits. Equal scores are ordered by item id, so the
    merge does not depend on the order in which shards answer.
    """
    s = np.concatenate(scores, axis=1).astype(np.float32)  # (Q, sum k_s)
    i = np.concatenate(ids, axis=1).astype(np.int64)
    s = np.where(i >= 0, s, -np.inf)
    out_s = np.full((len(s), k), -np.inf, np.float32)
    out_i = np.full((len(s), k), -1, np.int64)
    for r in range(len(s)):
        order = np.lexsort((np.where(i[r] >= 0, i[r], np.iinfo(np.int64).max), -s[r].astype(np.float64)))[:k]
        keep = order[i[r][order] >= 0]
        out_s[r, : len(keep)], out_i[r, : len(keep)] = s[r][keep], i[r][keep]
    return out_s, out_i


class ShardedIndex:
    """A corpus split across N indexes that answers like one.

    Each shard returns its own top-k with global item ids; the global top-k is among the
    union of the shards' top-k's, so with exact shards the merge equals a single exact index
    (tests/retrieval/test_retrieval_index.py). With ANN shards each shard's recall is that of its own
    index. On one machine the shards are searched in turn; across machines each shard is
    one process (see `search` for the contract a remote shard must honour).
    """

    def __init__(self, shards: list[faiss.Index]):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        self.shards = shards
        self.ntotal = int(sum(s.ntotal for s in shards))
        self.d = shards[0].d

    @classmethod
    def build(cls, emb: np.ndarray, n_shards: int, factory: str = "Flat", **kwargs) -> "ShardedIndex":
        """Split (n, D) embeddings by `shard_assignment` and build one index per shard (kwargs: `build`'s)."""
        emb = _check(emb)
        return cls([build(emb[ids], factory, ids=ids, **kwargs) for ids in shard_assignment(len(emb), n_shards)])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> (scores (Q, k) float32, ids (Q, k) int64), like faiss.Index.search.

        A remote shard is anything that returns its own (Q, k) top-k by inner product with
        global ids and -1 padding; the merge needs nothing else.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        parts = [s.search(queries, min(k, s.ntotal)) if s.ntotal else
                 (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)) for s in self.shards]
        return merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)

