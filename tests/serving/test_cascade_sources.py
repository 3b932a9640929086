"""The cascade's two retrieval sources (ANN + item-to-item): quotas, dedup, provenance, FAISS padding.

Against a small FAKE bundle (random ONNX towers, clustered item embeddings) so that every
property is checked independently of training: which items i2i may return is recomputed
here by brute force from item_emb.npy. The tests of the `backend` fixture run over both
retrieval backends: the bundle's FAISS index and the same embeddings in Milvus (milvus-lite).
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from recstack.evaluation.metrics import in_exact_top_k
from recstack.serving.cascade import SOURCE_ANN, SOURCE_I2I, Cascade, DeadlineExceeded, Query


@pytest.fixture(scope="module")
def flat_bundle(tmp_path_factory, make_cascade_bundle) -> Path:
    return make_cascade_bundle(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def backend(request, flat_bundle, milvus_lite, tmp_path_factory) -> dict:
    """Cascade.load options selecting the retrieval backend (a remote call's timeout far beyond
    any machine's load: these tests check answers, not latency)."""
    uri = "faiss" if request.param == "faiss" else milvus_lite(flat_bundle, tmp_path_factory.mktemp("milvus"))
    return {"retrieval_backend": uri, "retrieval_timeout_s": 120.0}


@pytest.fixture(scope="module")
def cascade(flat_bundle, backend) -> Cascade:
    return Cascade.load(flat_bundle, i2i_share=0.25, i2i_seeds=3, **backend)


def _q(user_id=0, r=100, c=50, n=20, items=(), secs=None) -> Query:
    items = np.asarray(items, np.int64)
    secs = np.arange(1, len(items) + 1, dtype=np.float64) if secs is None else np.asarray(secs, np.float64)
    return Query(user_id=user_id, num_results=n, retrieval_size=r, coarse_size=c, item_ids=items, seconds_ago=secs,
                 kinds=np.zeros(len(items), np.int8), dwell=np.full(len(items), 10.0, np.float32))


def _trace(cascade: Cascade, q: Query):
    seq_items, seq_extras, cold = cascade.sequence(q)
    trace: dict = {}
    res = cascade.rank_features(q, cascade.users.feats(np.array([q.user_id])), seq_items, seq_extras, cold_start=cold, trace=trace)
    return res, trace, cascade.recent_items(seq_items)


def _brute_neighbours(emb: np.ndarray, seeds: np.ndarray, per_seed: int) -> set[int]:
    """Items among some seed's `per_seed` nearest by exact inner product, those tied with the
    per_seed-th included (a float32 index may return any of them)."""
    every = np.broadcast_to(np.arange(len(emb)), (len(seeds), len(emb)))  # (S, I)
    return set(every[in_exact_top_k(every, emb[seeds], emb, per_seed)].tolist())


def test_request_behaviours_seed_i2i_newest_first(cascade):
    # the request's items are newer than any snapshot behaviour: they lead the seeds
    q = _q(user_id=0, items=[7, 300, 7, 42], secs=[1.0, 2.0, 3.0, 4.0])
    _, _, seeds = _trace(cascade, q)
    assert list(seeds) == [7, 300, 42]  # distinct, newest first, capped at i2i_seeds = 3


def test_sources_quota_dedup_and_provenance(cascade, flat_bundle, cascade_vocab):
    emb = np.load(flat_bundle / "retrieval/item_emb.npy")
    q = _q(user_id=0, r=100, c=100, n=100, items=[5, 17, 250])
    res, trace, seeds = _trace(cascade, q)
    ids, src = trace["retrieved"], trace["retrieved_sources"]
    assert len(ids) == 100 and len(set(ids.tolist())) == 100 and ids.min() >= 0 and ids.max() < cascade_vocab.n_items
    n_i2i = int((src == 1).sum())
    assert n_i2i == 25  # round(0.25 * 100): enough neighbours exist to fill the quota
    # i2i items are true nearest neighbours of the seeds (never the seeds themselves) ...
    i2i = set(ids[src == 1].tolist())
    assert i2i <= _brute_neighbours(emb, seeds, 1 + -(-2 * 25 // len(seeds))) - set(seeds.tolist())
    # ... that ANN's own share did not already hold
    ann_head = ids[src == 0][:75]
    assert not i2i & set(ann_head.tolist())
    # and the response reports each returned item's source
    served_src = dict(zip(ids.tolist(), src.tolist()))
    assert res.sources == [SOURCE_I2I if served_src[i] == 1 else SOURCE_ANN for i in res.item_ids]
    assert set(res.sources) == {SOURCE_ANN, SOURCE_I2I}


def test_no_behaviours_means_ann_only(cascade):
    for q in (_q(user_id=1), _q(user_id=10_000)):  # known user without history; unknown user (cold start)
        res, trace, seeds = _trace(cascade, q)
        assert len(seeds) == 0 and (trace["retrieved_sources"] == 0).all() and set(res.sources) == {SOURCE_ANN}
    # a cold-start user with behaviours in the request gets i2i candidates from them
    res, trace, seeds = _trace(cascade, _q(user_id=10_000, items=[3, 9]))
    assert res.cold_start and list(seeds) == [3, 9] and (trace["retrieved_sources"] == 1).any()


def test_share_zero_is_plain_ann_and_share_one_backfills(flat_bundle, cascade_vocab, backend):
    c0 = Cascade.load(flat_bundle, i2i_share=0.0, warm=False, **backend)
    index = faiss.read_index(str(flat_bundle / "retrieval/index.faiss"))
    q = _q(user_id=0, r=60, c=60, n=60, items=[5])
    _, trace, _ = _trace(c0, q)
    seq_items, seq_extras, _ = c0.sequence(q)
    user_emb = c0.retrieval_tower({"user_feats": c0.users.feats(np.array([0])), "seq_items": seq_items, "seq_extras": seq_extras})
    np.testing.assert_array_equal(trace["retrieved"], index.search(np.ascontiguousarray(user_emb, np.float32), 60)[1][0])
    # share 1: i2i takes every slot it can fill, ANN fills the rest; nothing repeats
    c1 = Cascade.load(flat_bundle, i2i_share=1.0, i2i_seeds=1, warm=False, **backend)
    _, trace, _ = _trace(c1, _q(user_id=10_000, r=cascade_vocab.n_items, c=10, n=10, items=[5]))
    ids = trace["retrieved"]
    assert len(ids) == cascade_vocab.n_items and len(np.unique(ids)) == cascade_vocab.n_items
    assert (trace["retrieved_sources"] == 1).sum() == cascade_vocab.n_items - 1  # every item but the seed itself


def test_ivf_padding_and_too_few_candidates_never_leak(tmp_path, make_cascade_bundle, cascade_vocab):
    """nprobe=1 over 64 lists returns far fewer than k hits: the -1 padding must not reach any stage."""
    bdir = make_cascade_bundle(tmp_path, factory="IVF64,Flat", nprobe=1)
    cas = Cascade.load(bdir, i2i_share=0.5, i2i_seeds=4)
    assert cas.search_params == {"nprobe": 1}
    q = _q(user_id=0, r=cascade_vocab.n_items, c=cascade_vocab.n_items, n=cascade_vocab.n_items, items=[1, 2])
    res, trace, _ = _trace(cas, q)
    ids = trace["retrieved"]
    assert 0 < len(ids) < cascade_vocab.n_items  # fewer than asked: IVF padded with -1
    assert ids.min() >= 0 and len(np.unique(ids)) == len(ids)
    assert res.counts["retrieved"] == len(ids) == res.counts["coarse"] == len(res.item_ids)
    assert res.item_ids.min() >= 0 and np.all(np.isfinite(res.scores))
    # through the public entry point too
    assert cas.rank(q).item_ids.min() >= 0


def test_rank_and_rank_features_agree_and_deadlines_hold(cascade):
    q = _q(user_id=0, items=[11, 12])
    a = cascade.rank(q)
    b, _, _ = _trace(cascade, q)
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    assert a.sources == b.sources
    assert set(a.timings_ms) == {"features_ms", "retrieval_ms", "coarse_ms", "fine_ms", "total_ms"}
    with pytest.raises(DeadlineExceeded, match="retrieval"):
        cascade.rank(q, time_remaining=lambda: 0.0)
    calls = iter([1.0, 1.0, 0.0])  # before retrieval, before its search, then before coarse
    with pytest.raises(DeadlineExceeded, match="coarse"):
        cascade.rank(q, time_remaining=lambda: next(calls))


def test_bad_i2i_options_are_refused(flat_bundle):
    with pytest.raises(ValueError, match="i2i_share"):
        Cascade.load(flat_bundle, i2i_share=1.5, warm=False)
    with pytest.raises(ValueError, match="i2i_seeds"):
        Cascade.load(flat_bundle, i2i_seeds=-1, warm=False)
