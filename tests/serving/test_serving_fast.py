"""The serving hot path's replacements give the answers of the code they replaced: the fused
coarse product, the per-thread id scratch (dedupe / membership), the protobuf response builder,
and the BLAS thread bound of `recstack serve`."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recstack.serving.cascade import Ranking, inner_products_by_idx
from recstack.serving.scratch import IdScratch, ThreadScratch


def _old_first(ids):
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 49), max_size=120), st.lists(st.integers(0, 49), max_size=60))
def test_scratch_equals_unique_and_isin(a, b):
    s = IdScratch(50)
    a, b = np.array(a, np.int64), np.array(b, np.int64)
    for _ in range(2):  # stale marks from an earlier call never leak into the next
        np.testing.assert_array_equal(s.first_occurrences(a), _old_first(a))
        np.testing.assert_array_equal(s.member(a, b), np.isin(a, b))
        np.testing.assert_array_equal(s.member(b, a), np.isin(b, a))


def test_scratch_counter_wraps_without_stale_matches():
    s = IdScratch(10)
    s.member(np.arange(10), np.array([3]))
    s.counter = np.iinfo(np.int32).max - 1  # next call resets the marks
    got = s.member(np.arange(10), np.array([5]))
    np.testing.assert_array_equal(got, np.arange(10) == 5)
    np.testing.assert_array_equal(s.member(np.arange(10), np.array([7])), np.arange(10) == 7)


def test_scratch_is_per_thread():
    sc = ThreadScratch(100)
    seen = {}

    def grab(name):
        seen[name] = sc.get()

    ts = [threading.Thread(target=grab, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen[0] is not seen[1] and sc.get() is sc.get()


def test_fused_inner_products_equal_gather_matvec():
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5000, 128), dtype=np.float32)
    ids = rng.choice(5000, 1234, replace=False)
    u = rng.standard_normal(128).astype(np.float32)
    got = inner_products_by_idx(vecs, ids, u)
    assert got.dtype == np.float32 and got.shape == (1234,)
    np.testing.assert_allclose(got, vecs[ids] @ u, rtol=1e-5, atol=1e-5)
    assert inner_products_by_idx(vecs, np.zeros(0, np.int64), u).shape == (0,)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        inner_products_by_idx(vecs.astype(np.float64), ids, u)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        inner_products_by_idx(vecs[:, ::2], ids, u[::2])
    with pytest.raises(ValueError, match="query shape"):
        inner_products_by_idx(vecs, ids, u[:64])
    # int32 ids and a non-contiguous query are converted, not misread
    np.testing.assert_allclose(inner_products_by_idx(vecs, ids.astype(np.int32), np.repeat(u, 2)[::2]), vecs[ids] @ u,
                               rtol=1e-5, atol=1e-5)


def test_response_builder_matches_per_field_conversion():
    from recstack.serving.messages import pb, response_from_ranking

    rng = np.random.default_rng(1)
    n = 7
    r = Ranking(item_ids=rng.integers(0, 10**6, n), scores=rng.random(n), pctr=rng.random(n), pcvr=rng.random(n),
                price=rng.random(n) * 100, coarse_scores=rng.standard_normal(n), sources=["ann", "i2i"] * 3 + ["ann"],
                cold_start=True, timings_ms={"features_ms": 1.0, "retrieval_ms": 2.0, "coarse_ms": 3.0, "fine_ms": 4.0,
                                             "total_ms": 10.0},
                counts={"retrieved": 9, "coarse": 8, "returned": 7, "sequence_length": 3})
    ref = pb.RankResponse(model_version="v1", cold_start=True)
    for i in range(n):
        ref.items.add(item_id=int(r.item_ids[i]), item_key=str(r.item_ids[i]), score=float(r.scores[i]),
                      pctr=float(r.pctr[i]), pcvr=float(r.pcvr[i]), price=float(r.price[i]), coarse_score=float(r.coarse_scores[i]), source=r.sources[i])
    assert response_from_ranking(r, "v1", debug=False) == ref
    dbg = response_from_ranking(r, "v1", debug=True)
    assert list(dbg.items) == list(ref.items) and dbg.timings.total_ms == 10.0 and dbg.stage_counts.returned == 7


def test_limit_threads_bounds_an_already_loaded_blas(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from recstack.serving import process as P

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    with threadpoolctl.threadpool_limits(limits=None):  # restores the caller's limits afterwards
        P._limit_threads(1)
        blas = [d for d in threadpoolctl.threadpool_info() if d.get("user_api") == "blas"]
        assert blas and all(d["num_threads"] == 1 for d in blas)
