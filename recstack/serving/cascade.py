"""The serving cascade: feature lookup -> FAISS retrieval -> inner-product coarse -> ONNX fine.

    cascade = Cascade.load("artifacts")   # verifies checksums, loads, warms up
    result = cascade.rank(Query(user_id=7, num_results=10, retrieval_size=1000, coarse_size=200))

Imports numpy, faiss and the bundle / feature contracts; reading and checking the bundle's
files (onnxruntime, pyarrow) is recstack.serving.loading. The server never imports torch or
training code. Every feature tensor is built by
recstack.features, the same functions the trainers use, so training and serving cannot drift.

Retrieval has two sources, merged and deduplicated with per-source quotas (`retrieve`): the
ANN search with the user vector, and item-to-item — the index's nearest neighbours of the
item vectors of the user's most recent behaviours (request first, then the snapshot).
Each returned item says which source found it ("ann" or "i2i"; an item both found is "ann").

The feature-store snapshot's `seconds_ago` is relative to the snapshot time, and a request's
behaviours are relative to the request; the cascade treats both clocks as the same "now"
(the simulated world has no wall clock to advance the snapshot by).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from recstack import features as F
from recstack.bundle import Bundle, BundleError
from recstack.bundle_files import (COARSE_ITEM_VECTORS, COARSE_TOWER, FINE_CTR, FINE_CVR, RETRIEVAL_INDEX,
                                   RETRIEVAL_TOWER)
from recstack.serving.loading import OnnxModel, read_coarse_vectors, read_index, read_item_emb, read_snapshot

SOURCE_ANN = "ann"  # FAISS search with the retrieval user vector
SOURCE_I2I = "i2i"  # nearest neighbours (same index) of the user's most recent behaviours
SOURCES = (SOURCE_ANN, SOURCE_I2I)  # a candidate's source code is its position here

# inputs each ONNX model may declare (docs/ARCHITECTURE.md "Feature tensors")
_TOWER_INPUTS = {"user_feats", "seq_items", "seq_extras"}
_FINE_INPUTS = {"user_feats", "item_feats", "item_dense", "interacted"}


class DeadlineExceeded(RuntimeError):
    """The caller's deadline passed (or the caller left) before a stage or a model started."""


@dataclass(frozen=True)
class Query:
    """A validated request (see recstack.serving.validate); behaviour arrays are (K,) each."""

    user_id: int
    num_results: int
    retrieval_size: int
    coarse_size: int
    item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds_ago: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    dwell: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass
class Ranking:
    """The cascade's answer: (N,) arrays sorted by score descending."""

    item_ids: np.ndarray
    scores: np.ndarray
    pctr: np.ndarray
    pcvr: np.ndarray
    price: np.ndarray
    coarse_scores: np.ndarray
    sources: list[str]
    cold_start: bool
    timings_ms: dict[str, float]
    counts: dict[str, int]


class _IdScratch:
    """Per-thread scratch arrays over the item-id space, so deduplication and membership tests
    over a request's candidates cost O(candidates) instead of a sort (np.unique / np.isin).

    `pos` (int32) holds, after `first_occurrences`, the first position of each id just written;
    `stamp` (int32) marks the ids of one set with a per-thread counter that only grows, so a
    stale mark from an earlier request never matches. Every slot read in a call was written in
    the same call (or holds an older, smaller stamp), so the arrays are never cleared."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.pos = np.zeros(n_items, np.int32)  # lazily zero-filled pages: 8 bytes per item per thread in all
        self.stamp = np.zeros(n_items, np.int32)
        self.counter = 0

    def first_occurrences(self, ids: np.ndarray) -> np.ndarray:
        """-> ids without repeats, each kept at its first position (= np.unique's first indices, sorted)."""
        n = len(ids)
        if n < 2:
            return ids
        ar = np.arange(n, dtype=np.int32)
        self.pos[ids] = n
        np.minimum.at(self.pos, ids, ar)  # the smallest position per id, whatever the write order
        return ids[self.pos[ids] == ar]

    def member(self, ids: np.ndarray, of: np.ndarray) -> np.ndarray:
        """-> bool mask (len(ids),): whether each id is in `of` (= np.isin(ids, of))."""
        if len(of) == 0 or len(ids) == 0:
            return np.zeros(len(ids), bool)
        if self.counter >= np.iinfo(np.int32).max - 1:  # after ~2e9 calls on this thread
            self.stamp.fill(0)
            self.counter = 0
        self.counter += 1
        self.stamp[of] = self.counter
        return self.stamp[ids] == self.counter


class _Scratch:
    """One `_IdScratch` per thread, created on the thread's first request."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self._local = threading.local()

    def get(self) -> _IdScratch:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = _IdScratch(self.n_items)
        return s


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


class Cascade:
    """A loaded bundle and the per-request pipeline. Thread-safe: `rank` only reads shared state
    (besides each thread's own id scratch, `_IdScratch`)."""

    def __init__(self, bundle: Bundle, onnx_threads: int = 1, faiss_threads: int = 1,
                 i2i_share: float = 0.3, i2i_seeds: int = 5):
        if not 0.0 <= i2i_share <= 1.0:
            raise ValueError(f"i2i_share must be in [0, 1], got {i2i_share}")
        if i2i_seeds < 0:
            raise ValueError(f"i2i_seeds must be >= 0, got {i2i_seeds}")
        # share of retrieval_size reserved for the item-to-item source (what it does not fill,
        # ANN fills), and how many of the most recent distinct behaviours seed it
        self.i2i_share = float(i2i_share)
        self.i2i_seeds = int(i2i_seeds)
        self.bundle = bundle
        self.version = bundle.version
        m = bundle.manifest
        self.vocab = F.Vocab.from_dict(m["vocab"])
        self.seq_len = int(m["feature_schema"].get("seq_len", F.SEQ_LEN))
        if self.seq_len != F.SEQ_LEN:
            raise BundleError(f"manifest.json: feature_schema.seq_len {self.seq_len}, this server builds {F.SEQ_LEN}")

        self.users, self.items, beh = read_snapshot(bundle, self.vocab)
        self.n_users, self.n_items = self.users.n, self.items.n
        self._beh_user, self._beh_seconds, self._beh_item, self._beh_kind, self._beh_dwell, self._beh_start = beh

        # retrieval; item_emb (the item-to-item source's vectors) is None in an ANN-only bundle
        self.retrieval_tower = OnnxModel(bundle, RETRIEVAL_TOWER, _TOWER_INPUTS, onnx_threads)
        self.index = read_index(bundle, self.n_items)
        self.item_emb: np.ndarray | None = read_item_emb(bundle, self.n_items, self.index.d)
        rmeta = bundle.stage("retrieval").get("meta", {})
        self._set_search_params(rmeta)
        faiss.omp_set_num_threads(faiss_threads)

        # coarse
        self.coarse_tower = OnnxModel(bundle, COARSE_TOWER, _TOWER_INPUTS, onnx_threads)
        self.item_vectors = read_coarse_vectors(bundle, self.n_items)  # (I, D), score scale folded in
        self._scratch = _Scratch(self.n_items)

        # fine
        self.ctr = OnnxModel(bundle, FINE_CTR, _FINE_INPUTS, onnx_threads)
        self.cvr = OnnxModel(bundle, FINE_CVR, _FINE_INPUTS, onnx_threads)

    def _set_search_params(self, meta: dict) -> None:
        """Apply the exporter's search-time knobs; the retrieval config carries them whatever the
        index type, so one that does not apply (nprobe on a flat index) is skipped."""
        self.search_params: dict[str, int] = {}
        space = faiss.ParameterSpace()
        for key, faiss_name in (("nprobe", "nprobe"), ("ef_search", "efSearch")):
            if meta.get(key):
                try:
                    space.set_index_parameter(self.index, faiss_name, int(meta[key]))
                except RuntimeError:  # not a parameter of this index type
                    continue
                self.search_params[key] = int(meta[key])

    @classmethod
    def load(cls, path: str | Path, onnx_threads: int = 1, faiss_threads: int = 1, warm: bool = True,
             key: bytes | None = None, **options) -> "Cascade":
        """Open (checksums verified; the manifest's signature too when `key` is given), load and
        warm up a bundle dir or artifacts root.

        options: i2i_share, i2i_seeds (see __init__)."""
        cascade = cls(Bundle.open(path, verify=True, key=key), onnx_threads=onnx_threads, faiss_threads=faiss_threads,
                      **options)
        if warm:
            cascade.warm_up()
        return cascade

    def probe_queries(self) -> list[Query]:
        """Fixed probe requests for the warm-up: a cold-start user; a cold-start user with request
        behaviours (a click and a purchase: the item-to-item source runs); the first known user."""
        r = min(1000, self.n_items)
        c = min(200, r)
        n = min(10, c)
        items = np.array([0, self.n_items - 1], np.int64)
        queries = [
            Query(user_id=self.n_users, num_results=n, retrieval_size=r, coarse_size=c),
            Query(user_id=self.n_users, num_results=n, retrieval_size=r, coarse_size=c, item_ids=items,
                  seconds_ago=np.array([60.0, 3600.0]), kinds=np.array([0, 1], np.int8),
                  dwell=np.array([12.0, 0.0], np.float32)),
        ]
        if self.n_users:
            queries.append(Query(user_id=0, num_results=n, retrieval_size=r, coarse_size=c))
        return queries

    def warm_up(self) -> None:
        """Check every stage's outputs on the probe requests, then run the full cascade on them:
        first-call costs are paid here, and a model whose outputs break a stage's contract
        (a non-finite embedding or score, a probability outside [0, 1]) is refused, naming its
        file, before it serves."""

        def finite(values: np.ndarray, name: str, what: str) -> None:
            if not np.all(np.isfinite(values)):
                raise BundleError(f"bundle file {name!r}: {what} not finite on a probe request")

        for q in self.probe_queries():
            seq_items, seq_extras, _ = self.sequence(q)
            tower_in = {"user_feats": self.users.feats(np.array([q.user_id], dtype=np.int64)),
                        "seq_items": seq_items, "seq_extras": seq_extras}
            user_emb = np.ascontiguousarray(self.retrieval_tower(tower_in), dtype=np.float32)  # (1, D)
            finite(user_emb, RETRIEVAL_TOWER, "user embedding")
            scores, ids = self.index.search(user_emb, q.retrieval_size)  # (1, R) each
            found = ids[0] >= 0
            if not found.any():
                raise BundleError(f"bundle file {RETRIEVAL_INDEX!r}: the search found no item for a probe request")
            finite(scores[0][found], RETRIEVAL_INDEX, "retrieval scores")
            cands, _ = self.retrieve(user_emb, self.recent_items(seq_items), q.retrieval_size)
            coarse = self.score_coarse(tower_in, cands)  # (R,)
            if not np.all(np.isfinite(coarse)):
                user_vec = self.coarse_tower(tower_in)
                finite(user_vec, COARSE_TOWER, "user vector")
                finite(coarse, COARSE_ITEM_VECTORS, "coarse scores")
            res = self.rank(q)
            for name, p in ((FINE_CTR, res.pctr), (FINE_CVR, res.pcvr)):
                if not (np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))):
                    raise BundleError(f"bundle file {name!r}: outputs outside [0, 1]; expected probabilities")
            finite(res.scores, FINE_CTR, "scores (pCTR x pCVR x price)")

    # -- per request -------------------------------------------------------------------

    def sequence(self, q: Query) -> tuple[np.ndarray, np.ndarray, bool]:
        """Snapshot behaviours merged with the request's, newest first, truncated to the sequence length.

        -> seq_items (1, L, 5) int64, seq_extras (1, L, 3) float32, cold_start.
        """
        known = 0 <= q.user_id < self.n_users
        if known:
            s, e = self._beh_start[q.user_id], self._beh_start[q.user_id + 1]
            e = min(e, s + self.seq_len)
            snap = (self._beh_item[s:e], self._beh_seconds[s:e], self._beh_kind[s:e], self._beh_dwell[s:e])
        else:
            snap = (np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int8), np.zeros(0, np.float32))
        # request first, so on equal times the request's behaviour counts as the newer one
        item = np.concatenate([np.asarray(q.item_ids, np.int64), snap[0]])
        secs = np.concatenate([np.asarray(q.seconds_ago, np.float64), snap[1]])
        kind = np.concatenate([np.asarray(q.kinds, np.int8), snap[2]])
        dwell = np.concatenate([np.asarray(q.dwell, np.float32), snap[3]])
        order = np.argsort(secs, kind="stable")[: self.seq_len]
        n, L = len(order), self.seq_len
        pad = lambda a, fill: np.concatenate([a[order], np.full(L - n, fill, a.dtype)])[None]  # (1, L)
        valid = np.arange(L)[None] < n
        seq_items, seq_extras = F.sequence_tensors(
            pad(item, -1), pad(secs, 0.0) / 3600.0, pad(dwell, 0.0), pad(kind, 0), valid, self.items
        )
        return seq_items, seq_extras, not known

    def recent_items(self, seq_items: np.ndarray) -> np.ndarray:
        """The i2i seeds: the sequence's (1, L, 5) distinct items, newest first, at most i2i_seeds. -> (S,) raw ids."""
        ids = seq_items[0, :, 0]
        ids = ids[ids > 0] - 1  # model ids are raw + 1; 0 = empty slot
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)][: self.i2i_seeds].astype(np.int64)

    def _i2i(self, seeds: np.ndarray, n: int) -> np.ndarray:
        """Up to n distinct neighbours of the seeds, in rank-major order across seeds (each seed's
        best, newest seed first, then each seed's second best, ...); seeds themselves excluded.
        One batched search of ceil(n / S) + 1 neighbours per seed (+1: a seed finds itself)."""
        per_seed = min(self.n_items, -(-n // len(seeds)) + 1)
        vecs = np.ascontiguousarray(self.item_emb[seeds], dtype=np.float32)  # (S, D)
        _, ids = self.index.search(vecs, per_seed)  # (S, per_seed), -1 pads
        flat = ids.T.ravel()
        flat = flat[(flat >= 0) & (flat < self.n_items)]
        scratch = self._scratch.get()
        flat = flat[~scratch.member(flat, seeds)]
        return scratch.first_occurrences(flat)[:n]

    def retrieve(self, user_emb: np.ndarray, seeds: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Both sources merged: user_emb (1, D), seeds (S,) -> (item ids (R,) int64, source codes (R,) int8), R <= k.

        Quotas: i2i gets round(i2i_share * k) slots, ANN the rest; either source's unused
        slots go to the other (ANN is asked for k so it can backfill). Items are distinct, in
        [0, n_items) (FAISS -1 padding is dropped), ANN's first, each source in its own order.
        """
        k = min(k, self.n_items)
        use_i2i = self.item_emb is not None and len(seeds) > 0 and self.i2i_share > 0
        n_i2i = min(k, int(round(self.i2i_share * k))) if use_i2i else 0
        _, ids = self.index.search(user_emb, k)  # (1, k); -1 pads when the index finds fewer
        ann = ids[0][(ids[0] >= 0) & (ids[0] < self.n_items)]
        scratch = self._scratch.get()
        ann = scratch.first_occurrences(ann)
        head = ann[: k - n_i2i]
        # ask for 2x the quota: the seeds' neighbour lists overlap each other and ANN's share
        i2i = self._i2i(seeds, min(self.n_items, 2 * n_i2i)) if n_i2i else np.zeros(0, np.int64)
        i2i = i2i[~scratch.member(i2i, head)][:n_i2i]
        tail = ann[k - n_i2i :]
        tail = tail[~scratch.member(tail, i2i)]
        cands = np.concatenate([head, i2i, tail])[:k].astype(np.int64)
        src = np.concatenate([np.zeros(len(head), np.int8), np.ones(len(i2i), np.int8), np.zeros(len(tail), np.int8)])[:k]
        return cands, src

    def score_coarse(self, tower_in: dict[str, np.ndarray], cands: np.ndarray) -> np.ndarray:
        """The coarse stage's logits of the candidates (R,) int64 -> (R,) float32: one user-tower
        pass for all of them, then the fused inner product with the precomputed item vectors
        (= item_vectors[cands] @ user_vec). tower_in: user_feats (1, 4), seq_items (1, L, 5),
        seq_extras (1, L, 3). The benchmark's teacher-as-coarse peer overrides this method."""
        user_vec = self.coarse_tower(tower_in)[0]  # (D,)
        if len(cands) and (cands.min() < 0 or cands.max() >= self.n_items):  # the fused kernel does not check
            raise ValueError(f"candidate ids outside [0, {self.n_items})")
        return inner_products_by_idx(self.item_vectors, cands, user_vec)

    def _score_fine(self, user_feats: np.ndarray, seq_items: np.ndarray, seq_extras: np.ndarray, cands: np.ndarray,
                    check: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
        """The fine stage's pCTR and pCVR of the candidates (M,) int64 -> (M,) float64 each;
        `check("fine pCVR")` runs between the two models."""
        m = len(cands)
        item_feats = self.items.feats(cands)  # (M, 5)
        fine_in = {
            "user_feats": np.repeat(user_feats, m, axis=0),  # (M, 4)
            "item_feats": item_feats,
            "item_dense": self.items.dense(cands),  # (M, 1)
            "interacted": F.interacted_features(seq_items, seq_extras, item_feats),  # (M, len(INTERACTED_FIELDS))
        }
        if not m:
            return np.zeros(0, np.float64), np.zeros(0, np.float64)
        pctr = self.ctr(fine_in).reshape(-1).astype(np.float64)  # (M,)
        check("fine pCVR")
        pcvr = self.cvr(fine_in).reshape(-1).astype(np.float64)
        return pctr, pcvr

    def rank(self, q: Query, time_remaining: Callable[[], float | None] | None = None) -> Ranking:
        """Run the cascade for one validated query; `time_remaining` (e.g. a gRPC context's)
        is checked before each stage and between the models inside one (retrieval tower |
        search, pCTR | pCVR), raising DeadlineExceeded once it reaches 0."""
        t0 = time.perf_counter()
        seq_items, seq_extras, cold = self.sequence(q)
        user_feats = self.users.feats(np.array([q.user_id], dtype=np.int64))  # (1, 4), zeros when cold
        return self.rank_features(q, user_feats, seq_items, seq_extras, cold_start=cold,
                                  time_remaining=time_remaining, t0=t0)

    def rank_features(
        self,
        q: Query,
        user_feats: np.ndarray,
        seq_items: np.ndarray,
        seq_extras: np.ndarray,
        *,
        cold_start: bool = False,
        time_remaining: Callable[[], float | None] | None = None,
        trace: dict | None = None,
        t0: float | None = None,
    ) -> Ranking:
        """The cascade on given features: user_feats (1, 4), seq_items (1, L, 5), seq_extras (1, L, 3).

        `rank` calls it with the feature store's features; offline evaluation calls it with
        the features a logged request had (retrieval/cascade_eval.py). `trace`, when given,
        receives each stage's surviving ids: "retrieved", "retrieved_sources", "coarse".
        q's behaviour arrays are not read here (they are in the sequence already).
        """

        def check(stage: str) -> None:
            left = time_remaining() if time_remaining is not None else None
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")

        t0 = time.perf_counter() if t0 is None else t0
        timings: dict[str, float] = {}
        tower_in = {"user_feats": user_feats, "seq_items": seq_items, "seq_extras": seq_extras}
        t1 = time.perf_counter()
        timings["features_ms"] = (t1 - t0) * 1e3

        check("retrieval")
        user_emb = np.ascontiguousarray(self.retrieval_tower(tower_in), dtype=np.float32)  # (1, D)
        check("retrieval search")
        cands, src = self.retrieve(user_emb, self.recent_items(seq_items), q.retrieval_size)  # (R,), (R,)
        n_retrieved = len(cands)
        if trace is not None:
            trace["retrieved"], trace["retrieved_sources"] = cands.copy(), src.copy()
        t2 = time.perf_counter()
        timings["retrieval_ms"] = (t2 - t1) * 1e3

        check("coarse")
        coarse = self.score_coarse(tower_in, cands)  # (R,)
        c = min(q.coarse_size, len(cands))
        if c < len(cands):
            keep = np.argpartition(-coarse, c - 1)[:c]
            cands, coarse, src = cands[keep], coarse[keep], src[keep]
        if trace is not None:
            trace["coarse"] = cands.copy()
        t3 = time.perf_counter()
        timings["coarse_ms"] = (t3 - t2) * 1e3

        check("fine")
        m = len(cands)
        pctr, pcvr = self._score_fine(user_feats, seq_items, seq_extras, cands, check)  # (M,) each
        price = self.items.price[cands].astype(np.float64)
        score = pctr * pcvr * price
        top = np.lexsort((cands, -score))[: q.num_results]  # score desc, item id breaks ties
        t4 = time.perf_counter()
        timings["fine_ms"] = (t4 - t3) * 1e3
        timings["total_ms"] = (t4 - t0) * 1e3

        return Ranking(
            item_ids=cands[top], scores=score[top], pctr=pctr[top], pcvr=pcvr[top], price=price[top],
            coarse_scores=coarse[top].astype(np.float64), sources=[SOURCES[i] for i in src[top]], cold_start=cold_start,
            timings_ms=timings,
            counts={"retrieved": n_retrieved, "coarse": int(m), "returned": int(len(top)),
                    "sequence_length": int((seq_items[0, :, 0] > 0).sum())},
        )
