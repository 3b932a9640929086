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
Both sources' searches are one call to the retrieval backend (recstack.serving.candidates:
the bundle's FAISS index in process, or a Milvus collection); when a remote backend cannot
answer in time, the candidates are the snapshot's most popular items (source "popular") and
the ranking says `degraded_retrieval`.

Times: the feature-store snapshot's `seconds_ago` is relative to the bundle's export time
(manifest `created`), so the cascade holds it as absolute times (`Snapshot`); a request's
behaviours are relative to the request. Both, and the live store's events, are aged at the
request's time (`Query.now`, the server's clock), by `features.history_features` — the
function training builds its features with.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from recstack import features as F
from recstack.bundle import Bundle, BundleError
from recstack.interacted import one_user_features
from recstack.bundle_files import COARSE_TOWER, RETRIEVAL_INDEX, RETRIEVAL_TOWER
from recstack.serving.backends import open_backend
from recstack import browse
from recstack.browse import CategoryItems, browsed_categories
from recstack.serving.candidates import FAISS, RetrievalUnavailable, popularity_order
from recstack.serving.coarse import CoarseVectors, inner_products_by_idx  # noqa: F401 (re-exported)
from recstack.serving.fine import FineScorer, check_item_dense, read_item_stats
from recstack.serving.loading import OnnxModel, read_ids, read_item_emb, read_snapshot, snapshot_time
from recstack.serving.objective import read_values
from recstack.serving.query import DeadlineExceeded, Query, Ranking  # noqa: F401 (re-exported)
from recstack.serving.scratch import ThreadScratch
from recstack.serving.store.base import Snapshot

log = logging.getLogger("recstack.serving")

SOURCE_ANN = "ann"  # FAISS search with the retrieval user vector
SOURCE_I2I = "i2i"  # nearest neighbours (same index) of the user's most recent behaviours
SOURCE_POPULAR = "popular"  # the snapshot's most popular items, when the retrieval backend is unavailable
SOURCE_BROWSE = "browse"  # the best items of the categories just browsed (recstack.browse)
SOURCES = (SOURCE_ANN, SOURCE_I2I, SOURCE_POPULAR, SOURCE_BROWSE)  # a candidate's source code is its position here
# share of the request's remaining time a remote retrieval call may take (the rest is for the
# later stages, or for the degraded answer if the call times out)
RETRIEVAL_DEADLINE_SHARE = 0.5
WARM_UP_TIMEOUT_S = 30.0  # a remote retrieval call during the warm-up (loading the collection may take this)

# inputs each ONNX model may declare (docs/ARCHITECTURE.md "Feature tensors")
_TOWER_INPUTS = {"user_feats", "seq_items", "seq_extras"}
# a fine graph that reads the behaviour sequence declares seq_items / seq_extras as well (one row per request)
_FINE_INPUTS = {"user_feats", "item_feats", "item_dense", "interacted", "seq_items", "seq_extras"}


_degraded_log = {"last": -1e9}


def _log_degraded(backend: str, error: Exception, every_s: float = 10.0) -> None:
    """One warning per `every_s` at most while the backend is down (the metric counts every request)."""
    now = time.monotonic()
    if now - _degraded_log["last"] >= every_s:
        _degraded_log["last"] = now
        log.warning("retrieval backend %s unavailable, serving popularity candidates: %s", backend, error)


class Cascade:
    """A loaded bundle and the per-request pipeline. Thread-safe: `rank` only reads shared state
    (besides each thread's own id scratch, `recstack.serving.scratch.IdScratch`)."""

    def __init__(self, bundle: Bundle, onnx_threads: int = 1, faiss_threads: int = 1,
                 i2i_share: float = 0.3, i2i_seeds: int = 5, retrieval_backend: str = FAISS,
                 retrieval_timeout_s: float = 0.05, browse_share: float = browse.DEFAULT_SHARE,
                 browse_window_s: float = browse.DEFAULT_WINDOW_S,
                 browse_coarse_share: float = browse.DEFAULT_COARSE_SHARE,
                 browse_replaces_i2i: bool = browse.DEFAULT_REPLACES_I2I, clock: Callable[[], float] | None = None):
        for name, share in (("i2i_share", i2i_share), ("browse_share", browse_share),
                            ("browse_coarse_share", browse_coarse_share)):
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {share}")
        if not browse_window_s > 0:
            raise ValueError(f"browse_window_s must be > 0, got {browse_window_s}")
        if i2i_seeds < 0:
            raise ValueError(f"i2i_seeds must be >= 0, got {i2i_seeds}")
        # share of retrieval_size reserved for the item-to-item source (what it does not fill,
        # ANN fills), and how many of the most recent distinct behaviours seed it
        self.i2i_share = float(i2i_share)
        self.i2i_seeds = int(i2i_seeds)
        # share reserved for the browse source, how far back a browse event counts, and the share
        # of the coarse cut reserved for its candidates (the coarse student cannot see browsing)
        self.browse_share, self.browse_window_s = float(browse_share), float(browse_window_s)
        self.browse_coarse_share = float(browse_coarse_share)
        # whether a request with browse triggers skips the i2i source
        self.browse_replaces_i2i = bool(browse_replaces_i2i)
        self.bundle = bundle
        self.version = bundle.version
        m = bundle.manifest
        self.vocab = F.Vocab.from_dict(m["vocab"])
        self.seq_len = int(m["feature_schema"].get("seq_len", F.SEQ_LEN))
        if self.seq_len != F.SEQ_LEN:
            raise BundleError(f"manifest.json: feature_schema.seq_len {self.seq_len}, this server builds {F.SEQ_LEN}")
        fields = list(m["feature_schema"].get("interacted", []))
        if fields != list(F.INTERACTED_FIELDS):
            raise BundleError(f"manifest.json: feature_schema.interacted has {len(fields)} fields, this server computes "
                              f"{len(F.INTERACTED_FIELDS)} ({', '.join(F.INTERACTED_FIELDS[:2])}, ...): a bundle from an "
                              "older recstack; retrain and export it with this one")

        self.users, self.items, beh = read_snapshot(bundle, self.vocab)
        # the objective is pCTR x pCVR x value, the value column the bundle names (price by default)
        self.value_column, self.item_values = read_values(bundle, self.items)
        self.n_users, self.n_items = self.users.n, self.items.n
        self.ids = read_ids(bundle, self.n_users, self.n_items)  # external ids <-> internal indices
        # a request without its own time is aged at this one (recstack.serving.clock: wall or virtual)
        self.clock: Callable[[], float] = clock or time.time
        beh_user, beh_seconds, beh_item, beh_kind, beh_dwell, _ = beh
        self.snapshot = Snapshot.from_seconds_ago(beh_user, beh_seconds, beh_item, beh_kind, beh_dwell, self.n_users,
                                                  time=snapshot_time(m))

        # retrieval; item_emb (the item-to-item source's vectors) is None in an ANN-only bundle
        self.retrieval_tower = OnnxModel(bundle, RETRIEVAL_TOWER, _TOWER_INPUTS, onnx_threads)
        if not retrieval_timeout_s > 0:
            raise ValueError(f"retrieval_timeout_s must be > 0, got {retrieval_timeout_s}")
        self.retrieval = open_backend(bundle, self.n_items, retrieval_backend, timeout_s=retrieval_timeout_s)
        # the longest one remote retrieval call may take; the warm-up lifts it (first calls are slow)
        self.retrieval_timeout_s = float(retrieval_timeout_s)
        # the FAISS backend's index and applied search knobs (None / {} with a remote backend)
        self.index = getattr(self.retrieval, "index", None)
        self.search_params: dict[str, int] = dict(getattr(self.retrieval, "search_params", {}) or {})
        self.item_emb: np.ndarray | None = read_item_emb(bundle, self.n_items, self.retrieval.dim)
        if self.item_emb is not None and self.browse_share > 0:
            # the browse source reads thousands of rows per request: a copy in memory (1e6 items
            # x 64 floats = 256 MB), not page faults on the memory-mapped file
            self.item_emb = np.array(self.item_emb, dtype=np.float32, order="C")
        self.popular = popularity_order(beh_item, self.n_items)  # (I,) the degraded candidates
        self.categories = CategoryItems(self.items.cols[:, 0] - 1)  # the browse source's category -> items
        faiss.omp_set_num_threads(faiss_threads)
        weakref.finalize(self, self.retrieval.close)  # a remote backend's connection goes with the model

        # coarse
        self.coarse_tower = OnnxModel(bundle, COARSE_TOWER, _TOWER_INPUTS, onnx_threads)
        self.coarse_vectors = CoarseVectors.load(bundle, self.n_items)  # (I, D) int8 or float32, score scale folded in
        self._scratch = ThreadScratch(self.n_items)

        # fine
        self.fine = FineScorer.load(bundle, _FINE_INPUTS, onnx_threads)
        self.item_stats = read_item_stats(bundle, self.n_items)  # (I, S) or None: the rankers read no statistics
        check_item_dense(self.fine.models, self.items.dense(np.zeros(1, np.int64)).shape[1]
                         + (self.item_stats.shape[1] if self.item_stats is not None else 0))

    @classmethod
    def load(cls, path: str | Path, onnx_threads: int = 1, faiss_threads: int = 1, warm: bool = True,
             key: bytes | None = None, **options) -> "Cascade":
        """Open (checksums verified; the manifest's signature too when `key` is given), load and
        warm up a bundle dir or artifacts root.

        options: i2i_share, i2i_seeds, retrieval_backend (a URI, see recstack.serving.candidates),
        retrieval_timeout_s (the longest a remote retrieval call may take), browse_share,
        browse_window_s, browse_coarse_share, browse_replaces_i2i (recstack.browse), clock (the
        server's time, recstack.serving.clock; default the wall clock)."""
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
        file, before it serves. A remote retrieval backend must answer every probe (within
        WARM_UP_TIMEOUT_S each: its first calls load the collection)."""
        cap, self.retrieval_timeout_s = self.retrieval_timeout_s, WARM_UP_TIMEOUT_S  # not serving yet: no one else reads it
        try:
            self._warm_up()
        finally:
            self.retrieval_timeout_s = cap

    def _warm_up(self) -> None:
        def finite(values: np.ndarray, name: str, what: str) -> None:
            if not np.all(np.isfinite(values)):
                raise BundleError(f"bundle file {name!r}: {what} not finite on a probe request")

        for q in self.probe_queries():
            seq_items, seq_extras, _ = self.sequence(q)
            tower_in = {"user_feats": self.users.feats(np.array([q.user_id], dtype=np.int64)),
                        "seq_items": seq_items, "seq_extras": seq_extras}
            user_emb = np.ascontiguousarray(self.retrieval_tower(tower_in), dtype=np.float32)  # (1, D)
            finite(user_emb, RETRIEVAL_TOWER, "user embedding")
            if self.index is not None:  # the FAISS index in process: its scores are checked too
                scores, ids = self.index.search(user_emb, q.retrieval_size)  # (1, R) each
                finite(scores[0][ids[0] >= 0], RETRIEVAL_INDEX, "retrieval scores")
            else:
                try:
                    ids = self.retrieval.search(user_emb, q.retrieval_size, timeout_s=WARM_UP_TIMEOUT_S)  # (1, R)
                except RetrievalUnavailable as e:
                    raise BundleError(f"retrieval backend {self.retrieval.name}: {e}") from e
            if not (ids[0] >= 0).any():
                raise BundleError(f"retrieval backend {self.retrieval.name} ({RETRIEVAL_INDEX!r} or its collection): "
                                  "the search found no item for a probe request")
            cands, _ = self.retrieve(user_emb, self.recent_items(seq_items), q.retrieval_size)
            coarse = self.score_coarse(tower_in, cands)  # (R,)
            if not np.all(np.isfinite(coarse)):
                user_vec = self.coarse_tower(tower_in)
                finite(user_vec, COARSE_TOWER, "user vector")
                finite(coarse, self.coarse_vectors.relpath, "coarse scores")
            res = self.rank(q)
            if res.degraded_retrieval:
                raise BundleError(f"retrieval backend {self.retrieval.name}: did not answer a probe request "
                                  f"within {WARM_UP_TIMEOUT_S:.0f} s")
            for name, p in ((self.fine.files["pctr"], res.pctr), (self.fine.files["pcvr"], res.pcvr)):
                if not (np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))):
                    raise BundleError(f"bundle file {name!r}: outputs outside [0, 1]; expected probabilities")
            finite(res.scores, self.fine.files["pctr"], "scores (pCTR x pCVR x value)")

    # -- per request -------------------------------------------------------------------

    def _user_log(self, q: Query) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
        """The user's history (`q.history`, the feature store's: snapshot and live events; the
        bundle's snapshot when that is None) with the request's behaviours last, so on equal
        times they count as the newer ones. -> item, ts (absolute), kind, dwell (N,) each, now."""
        now = float(q.now) if q.now is not None else self.clock()
        hist = q.history if q.history is not None else self.snapshot.events(q.user_id)
        return (np.concatenate([hist.item_id, np.asarray(q.item_ids, np.int64)]),
                np.concatenate([hist.ts, now - np.asarray(q.seconds_ago, np.float64)]),
                np.concatenate([hist.kind, np.asarray(q.kinds, np.int8)]),
                np.concatenate([hist.dwell, np.asarray(q.dwell, np.float32)]), now)

    def sequence(self, q: Query, log: tuple | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
        """The user's last L clicks / purchases (history and request merged), newest first, aged
        at the request's time. -> seq_items (1, L, 5) int64, seq_extras (1, L, 3) float32, cold_start.
        `log`: `_user_log(q)` when the caller has it already (here and below)."""
        known = 0 <= q.user_id < self.n_users
        item, ts, kind, dwell, now = log or self._user_log(q)
        log = F.Behaviours.one_user(item, ts, kind, dwell)
        feats = F.history_features(log, np.zeros(1, np.int64), np.array([now]), self.items, until=np.array([np.inf]))
        return feats.seq_items, feats.seq_extras, not known

    def interacted_for(self, q: Query, log: tuple | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """candidates (M,) raw ids -> their interacted features (M, X), counted over the user's
        whole log (every kind) at the request's time, as training counts them (recstack.interacted)."""
        item, ts, kind, _, now = log or self._user_log(q)
        return lambda cands: one_user_features(item, ts, kind, now, self.items, cands)

    def browsed_for(self, q: Query, log: tuple | None = None) -> np.ndarray:
        """The browse source's triggers: the categories of the user's recent browse events, newest first."""
        item, ts, kind, _, now = log or self._user_log(q)
        return browsed_categories(item, ts, kind, now, self.categories.item_category, self.browse_window_s)

    def recent_items(self, seq_items: np.ndarray) -> np.ndarray:
        """The i2i seeds: the sequence's (1, L, 5) distinct items, newest first, at most i2i_seeds. -> (S,) raw ids."""
        ids = seq_items[0, :, 0]
        ids = ids[ids > 0] - 1  # model ids are raw + 1; 0 = empty slot
        _, first = np.unique(ids, return_index=True)
        return ids[np.sort(first)][: self.i2i_seeds].astype(np.int64)

    def _i2i(self, ids: np.ndarray, seeds: np.ndarray, n: int) -> np.ndarray:
        """Up to n distinct neighbours of the seeds from their search rows ids (S, per_seed), in
        rank-major order across seeds (each seed's best, newest seed first, then each seed's
        second best, ...); seeds themselves excluded."""
        flat = ids.T.ravel()
        flat = flat[(flat >= 0) & (flat < self.n_items)]
        scratch = self._scratch.get()
        flat = flat[~scratch.member(flat, seeds)]
        return scratch.first_occurrences(flat)[:n]

    def retrieve(self, user_emb: np.ndarray, seeds: np.ndarray, k: int,
                 timeout_s: float | None = None, browsed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The sources merged: user_emb (1, D), seeds (S,), browsed categories (B,) -> (item ids
        (R,) int64, source codes (R,) int8), R <= k.

        Quotas: i2i gets round(i2i_share * k) slots (none when `browsed` names categories and
        browse_replaces_i2i), browse round(browse_share * k) (when `browsed` names categories; at
        most what i2i leaves), ANN the rest; unused slots go to ANN (it is asked for k so
        it can backfill). Items are distinct, in [0, n_items) (-1 padding is dropped): ANN's
        head, then i2i, then browse, then ANN's tail, each source in its own order.
        One backend call searches the user vector (for k neighbours) and the seeds' vectors
        together; each seed is asked for per_seed = ceil(2 n_i2i / S) + 1 (2x the quota: the
        seeds' lists overlap each other and ANN's share; +1: a seed finds itself), not for k: an
        IVF search's cost grows with k (at 1e6 items, k = 10,000 for six rows cost 18 ms of CPU,
        k per row 7.5 ms). When the backend is unavailable (`timeout_s` bounds a remote call), the
        candidates are the k most popular items, all with the source code of "popular".
        """
        k = min(k, self.n_items)
        use_browse = self.item_emb is not None and browsed is not None and len(browsed) > 0 and self.browse_share > 0
        use_i2i = (self.item_emb is not None and len(seeds) > 0 and self.i2i_share > 0
                   and not (use_browse and self.browse_replaces_i2i))
        n_i2i = min(k, int(round(self.i2i_share * k))) if use_i2i else 0
        n_browse = min(k - n_i2i, int(round(self.browse_share * k))) if use_browse else 0
        per_seed = min(self.n_items, -(-min(self.n_items, 2 * n_i2i) // len(seeds)) + 1) if n_i2i else 0
        queries = user_emb
        if n_i2i:
            queries = np.concatenate([user_emb, np.asarray(self.item_emb[seeds], np.float32)])  # (1 + S, D)
        try:
            timeout = self.retrieval_timeout_s if timeout_s is None else min(timeout_s, self.retrieval_timeout_s)
            ids = self.retrieval.search(queries, [k] + [per_seed] * (len(queries) - 1), timeout_s=timeout)  # (1 + S, k'), -1 pads
        except RetrievalUnavailable as e:
            _log_degraded(self.retrieval.name, e)
            return self.popular[:k].copy(), np.full(k, SOURCES.index(SOURCE_POPULAR), np.int8)
        ann = ids[0][(ids[0] >= 0) & (ids[0] < self.n_items)]
        scratch = self._scratch.get()
        ann = scratch.first_occurrences(ann)
        head = ann[: k - n_i2i - n_browse]
        i2i = self._i2i(ids[1:, :per_seed], seeds, min(self.n_items, 2 * n_i2i)) if n_i2i else np.zeros(0, np.int64)
        i2i = i2i[~scratch.member(i2i, head)][:n_i2i]
        taken = np.concatenate([head, i2i])
        brw = taken[:0]
        if n_browse:
            item_emb, query = self.item_emb, np.ascontiguousarray(user_emb[0], np.float32)
            brw = self.categories.ranked(query, item_emb, browsed, len(taken) + n_browse,
                                         score=lambda ids: inner_products_by_idx(item_emb, ids, query))
        brw = brw[~scratch.member(brw, taken)][:n_browse]
        tail = ann[k - n_i2i - n_browse :]
        tail = tail[~scratch.member(tail, np.concatenate([i2i, brw]))]
        cands = np.concatenate([head, i2i, brw, tail])[:k].astype(np.int64)
        code = [SOURCES.index(s) for s in (SOURCE_ANN, SOURCE_I2I, SOURCE_BROWSE, SOURCE_ANN)]
        src = np.concatenate([np.full(len(p), c, np.int8) for p, c in zip((head, i2i, brw, tail), code)])[:k]
        return cands, src

    def score_coarse(self, tower_in: dict[str, np.ndarray], cands: np.ndarray) -> np.ndarray:
        """The coarse stage's logits of the candidates (R,) int64 -> (R,) float32: one user-tower
        pass for all of them, then the fused inner product with the precomputed item vectors
        (= item_vectors[cands] @ user_vec). tower_in: user_feats (1, 4), seq_items (1, L, 5),
        seq_extras (1, L, 3). The benchmark's teacher-as-coarse peer overrides this method."""
        return self.coarse_vectors.inner_products(cands, self._coarse_user_vec(tower_in, cands))

    def select_coarse(self, tower_in: dict[str, np.ndarray], cands: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The coarse cut: candidates (R,) int64 -> (positions into cands of the `keep` best (K,)
        int64, all R in order when keep >= R; their logits (K,) float32), through the bundle's
        item vectors (int8 shortlist + float32 re-score when served, recstack.serving.coarse).
        The benchmark's teacher-as-coarse peer overrides this method."""
        return self.coarse_vectors.top(cands, self._coarse_user_vec(tower_in, cands), keep)

    def coarse_cut(self, tower_in: dict[str, np.ndarray], cands: np.ndarray, browsed: np.ndarray | None,
                   keep: int) -> tuple[np.ndarray, np.ndarray]:
        """`select_coarse` with round(browse_coarse_share * keep) places reserved for the best (by
        coarse score) of the candidates in a browsed category, whichever source found them: the
        coarse student does not see browsing, the fine ranker does. The other places go to the
        best of all the rest."""
        in_browsed = (np.isin(self.categories.item_category[cands], browsed)
                      if browsed is not None and len(browsed) and keep < len(cands) else np.zeros(0, bool))
        n_b = min(int(round(self.browse_coarse_share * keep)), int(in_browsed.sum()))
        if n_b == 0:
            return self.select_coarse(tower_in, cands, keep)
        b = np.flatnonzero(in_browsed)
        kb, sb = self.select_coarse(tower_in, cands[b], n_b)
        rest = np.ones(len(cands), bool)
        rest[b[kb]] = False
        rest = np.flatnonzero(rest)
        kr, sr = self.select_coarse(tower_in, cands[rest], keep - n_b)
        return np.concatenate([b[kb], rest[kr]]), np.concatenate([sb, sr])

    def _coarse_user_vec(self, tower_in: dict[str, np.ndarray], cands: np.ndarray) -> np.ndarray:
        if len(cands) and (cands.min() < 0 or cands.max() >= self.n_items):  # the fused kernels do not check
            raise ValueError(f"candidate ids outside [0, {self.n_items})")
        return self.coarse_tower(tower_in)[0]  # (D,)

    def _score_fine(self, user_feats: np.ndarray, seq_items: np.ndarray, seq_extras: np.ndarray, cands: np.ndarray,
                    check: Callable[[str], None], interacted: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The fine stage's pCTR and pCVR of the candidates (M,) int64 -> (M,) float64 each;
        `check("fine pCVR")` runs between the two models when the bundle has two."""
        m = len(cands)
        counts = interacted(cands) if interacted is not None and m else None  # None: counted on the sequence
        fine_in = F.fine_inputs(user_feats, seq_items, seq_extras, self.items, cands, counts, self.item_stats)  # (M, ...) each
        if not m:
            return np.zeros(0, np.float64), np.zeros(0, np.float64)
        return self.fine(fine_in, check)

    def fine_scores(self, user_feats: np.ndarray, seq_items: np.ndarray, seq_extras: np.ndarray, cands: np.ndarray,
                    check: Callable[[str], None], interacted: Callable | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The fine stage as served, for Rank's coarse survivors and Score's given candidates alike:
        candidates (M,) int64 -> pCTR, pCVR, price, score = pCTR x pCVR x value, (M,) float64 each,
        value the bundle's objective column (recstack.serving.objective: price unless it names another)."""
        pctr, pcvr = self._score_fine(user_feats, seq_items, seq_extras, cands, check, interacted)
        price = self.items.price[cands].astype(np.float64)
        return pctr, pcvr, price, pctr * pcvr * self.item_values[cands]

    def rank(self, q: Query, time_remaining: Callable[[], float | None] | None = None) -> Ranking:
        """Run the cascade for one validated query; `time_remaining` (e.g. a gRPC context's)
        is checked before each stage and between the models inside one (retrieval tower |
        search, pCTR | pCVR), raising DeadlineExceeded once it reaches 0."""
        t0 = time.perf_counter()
        log = self._user_log(q)
        seq_items, seq_extras, cold = self.sequence(q, log)
        user_feats = self.users.feats(np.array([q.user_id], dtype=np.int64))  # (1, 4), zeros when cold
        return self.rank_features(q, user_feats, seq_items, seq_extras, cold_start=cold,
                                  time_remaining=time_remaining, t0=t0, interacted=self.interacted_for(q, log),
                                  browsed=self.browsed_for(q, log) if self.browse_share > 0 else None)

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
        interacted: Callable[[np.ndarray], np.ndarray] | None = None,
        browsed: np.ndarray | None = None,
    ) -> Ranking:
        """The cascade on given features: user_feats (1, 4), seq_items (1, L, 5), seq_extras (1, L, 3).

        `rank` calls it with the feature store's features; offline evaluation calls it with
        the features a logged request had (retrieval/cascade_eval.py). `trace`, when given,
        receives each stage's surviving ids: "retrieved", "retrieved_sources", "coarse".
        q's behaviour arrays are not read here (they are in the sequence already). `interacted`:
        candidates (M,) -> their interacted features over the user's full log (`interacted_for`);
        None counts them on the sequence. `browsed`: the browse source's categories (`browsed_for`);
        None: no browse source.
        """

        def check(stage: str) -> float | None:
            left = time_remaining() if time_remaining is not None else None
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")
            return left

        t0 = time.perf_counter() if t0 is None else t0
        timings: dict[str, float] = {}
        tower_in = {"user_feats": user_feats, "seq_items": seq_items, "seq_extras": seq_extras}
        t1 = time.perf_counter()
        timings["features_ms"] = (t1 - t0) * 1e3

        check("retrieval")
        user_emb = np.ascontiguousarray(self.retrieval_tower(tower_in), dtype=np.float32)  # (1, D)
        left = check("retrieval search")
        budget = None if left is None else RETRIEVAL_DEADLINE_SHARE * left  # bounds a remote backend's call
        cands, src = self.retrieve(user_emb, self.recent_items(seq_items), q.retrieval_size, timeout_s=budget,
                                   browsed=browsed)
        degraded = bool(len(src)) and bool(src[0] == SOURCES.index(SOURCE_POPULAR))
        n_retrieved = len(cands)
        if trace is not None:
            trace["retrieved"], trace["retrieved_sources"] = cands.copy(), src.copy()
        t2 = time.perf_counter()
        timings["retrieval_ms"] = (t2 - t1) * 1e3

        check("coarse")
        keep, coarse = self.coarse_cut(tower_in, cands, browsed if self.browse_share > 0 else None, q.coarse_size)
        cands, src = cands[keep], src[keep]
        if trace is not None:
            trace["coarse"] = cands.copy()
        t3 = time.perf_counter()
        timings["coarse_ms"] = (t3 - t2) * 1e3

        check("fine")
        m = len(cands)
        pctr, pcvr, price, score = self.fine_scores(user_feats, seq_items, seq_extras, cands, check, interacted)  # (M,) each
        top = np.lexsort((cands, -score))[: q.num_results]  # score desc, item id breaks ties
        t4 = time.perf_counter()
        timings["fine_ms"] = (t4 - t3) * 1e3
        timings["total_ms"] = (t4 - t0) * 1e3

        return Ranking(
            item_ids=cands[top], scores=score[top], pctr=pctr[top], pcvr=pcvr[top], price=price[top],
            coarse_scores=coarse[top].astype(np.float64), sources=[SOURCES[i] for i in src[top]], cold_start=cold_start,
            timings_ms=timings, degraded_retrieval=degraded,
            counts={"retrieved": n_retrieved, "coarse": int(m), "returned": int(len(top)),
                    "sequence_length": int((seq_items[0, :, 0] > 0).sum())},
        )
