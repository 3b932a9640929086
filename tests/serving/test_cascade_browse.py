"""The browse source inside the served cascade: its quota in the merged candidate list and its
reserved share of the coarse cut.

Against the small FAKE bundle of the sources tests (random ONNX towers, clustered item
embeddings); what the source may return is recomputed here by brute force."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recstack import features as F
from recstack.serving.cascade import SOURCE_BROWSE, SOURCES, Cascade, Query

VIEW, CART, CLICK = F.EVENT_KINDS.index("view"), F.EVENT_KINDS.index("cart"), F.EVENT_KINDS.index("click")


@pytest.fixture(scope="module")
def flat_bundle(tmp_path_factory, make_cascade_bundle) -> Path:
    return make_cascade_bundle(tmp_path_factory.mktemp("browse"))


def _q(items=(), kinds=(), secs=None, user_id=0, r=100) -> Query:
    items = np.asarray(items, np.int64)
    secs = np.arange(1, len(items) + 1, dtype=np.float64) if secs is None else np.asarray(secs, np.float64)
    return Query(user_id=user_id, num_results=20, retrieval_size=r, coarse_size=r, item_ids=items, seconds_ago=secs,
                 kinds=np.asarray(kinds, np.int8), dwell=np.full(len(items), 10.0, np.float32), now=1e9)


def _retrieved(cas: Cascade, q: Query):
    seq_items, seq_extras, cold = cas.sequence(q)
    trace: dict = {}
    res = cas.rank_features(q, cas.users.feats(np.array([q.user_id])), seq_items, seq_extras, cold_start=cold,
                            trace=trace, interacted=cas.interacted_for(q), browsed=cas.browsed_for(q))
    user_emb = cas.retrieval_tower({"user_feats": cas.users.feats(np.array([q.user_id])), "seq_items": seq_items,
                                    "seq_extras": seq_extras})[0]
    return res, trace, user_emb


def test_browse_source_fills_its_quota_with_the_best_items_of_the_browsed_categories(flat_bundle):
    cas = Cascade.load(flat_bundle, i2i_share=0.25, i2i_seeds=3, browse_share=0.2, browse_coarse_share=0.0,
                       browse_replaces_i2i=False, warm=False)
    emb = np.load(flat_bundle / "retrieval/item_emb.npy")
    q = _q(items=[5, 17, 250], kinds=[VIEW, VIEW, CART])  # browse only: no i2i seeds
    browsed = cas.browsed_for(q)
    assert browsed.tolist() == list(dict.fromkeys(cas.categories.item_category[[5, 17, 250]].tolist()))
    res, trace, user_emb = _retrieved(cas, q)
    ids, src = trace["retrieved"], trace["retrieved_sources"]
    assert len(ids) == 100 and len(np.unique(ids)) == 100
    brw = ids[src == SOURCES.index(SOURCE_BROWSE)]
    assert len(brw) == 20  # round(0.2 * 100), the categories hold enough items
    n_i2i = int((src == SOURCES.index("i2i")).sum())  # user 0's snapshot behaviours seed i2i
    assert n_i2i == 25
    head = ids[: 100 - 25 - 20]  # ANN's head, then i2i, then browse
    assert (src[: len(head)] == SOURCES.index("ann")).all()
    assert (src[len(head) : len(head) + 25] == SOURCES.index("i2i")).all() and (src[len(head) + 25 :] == 3).all()
    # the browse items: the best of those categories by the user vector, among those not taken before
    pool = np.flatnonzero(np.isin(cas.categories.item_category, browsed))
    pool = pool[~np.isin(pool, ids[: len(head) + 25])]
    scores = emb[pool] @ user_emb
    assert set(brw.tolist()) <= set(pool[scores >= np.sort(scores)[::-1][19] - 1e-6].tolist())
    served = dict(zip(ids.tolist(), src.tolist()))
    assert res.sources == [SOURCES[served[i]] for i in res.item_ids]


def test_a_browsing_request_skips_the_i2i_source_by_default_and_a_request_without_keeps_it(flat_bundle):
    cas = Cascade.load(flat_bundle, i2i_share=0.25, i2i_seeds=3, browse_share=0.2, browse_coarse_share=0.0, warm=False)
    both = Cascade.load(flat_bundle, i2i_share=0.25, i2i_seeds=3, browse_share=0.2, browse_coarse_share=0.0,
                        browse_replaces_i2i=False, warm=False)
    browsing = _q(items=[5, 17, 250], kinds=[VIEW, VIEW, CART])
    _, trace, _ = _retrieved(cas, browsing)
    src = trace["retrieved_sources"]
    assert (src == SOURCES.index("i2i")).sum() == 0 and (src == SOURCES.index(SOURCE_BROWSE)).sum() == 20
    _, trace_both, _ = _retrieved(both, browsing)
    head = trace_both["retrieved"][: 100 - 25 - 20]
    np.testing.assert_array_equal(trace["retrieved"][: len(head)], head)  # the same ANN list, a longer head
    # user 0's snapshot clicks seed i2i; no browse event in the window: the i2i quota is kept
    quiet = _q(items=[5], kinds=[CLICK])
    _, t1, _ = _retrieved(cas, quiet)
    _, t2, _ = _retrieved(both, quiet)
    assert (t1["retrieved_sources"] == SOURCES.index("i2i")).sum() == 25
    np.testing.assert_array_equal(t1["retrieved"], t2["retrieved"])


def test_no_recent_browse_event_means_no_browse_candidates(flat_bundle):
    cas = Cascade.load(flat_bundle, i2i_share=0.0, browse_share=0.5, browse_window_s=100.0, warm=False)
    for q in (_q(), _q(items=[5, 6], kinds=[CLICK, CLICK]), _q(items=[5], kinds=[VIEW], secs=[101.0])):
        assert len(cas.browsed_for(q)) == 0
        _, trace, _ = _retrieved(cas, q)
        assert (trace["retrieved_sources"] == SOURCES.index("ann")).all() and len(trace["retrieved"]) == 100
    # share 0: browse events are ignored
    c0 = Cascade.load(flat_bundle, browse_share=0.0, warm=False)
    assert SOURCE_BROWSE not in c0.rank(_q(items=[5], kinds=[VIEW])).sources


def test_bad_browse_options_are_refused(flat_bundle):
    with pytest.raises(ValueError, match="browse_share must be in"):
        Cascade.load(flat_bundle, browse_share=-0.1, warm=False)
    with pytest.raises(ValueError, match="browse_coarse_share must be in"):
        Cascade.load(flat_bundle, browse_coarse_share=1.5, warm=False)
    with pytest.raises(ValueError, match="browse_window_s"):
        Cascade.load(flat_bundle, browse_share=0.3, browse_window_s=0.0, warm=False)


def test_the_coarse_cut_reserves_its_share_for_candidates_of_the_browsed_categories(flat_bundle):
    cas = Cascade.load(flat_bundle, i2i_share=0.0, browse_share=0.3, browse_coarse_share=0.5, warm=False)
    q = _q(items=[5, 17, 250], kinds=[VIEW, VIEW, CART], user_id=1, r=100)
    q = Query(**{**q.__dict__, "coarse_size": 20})
    _, trace, _ = _retrieved(cas, q)
    ids, src, kept = trace["retrieved"], trace["retrieved_sources"], trace["coarse"]
    seq_items, seq_extras, _ = cas.sequence(q)
    tower_in = {"user_feats": cas.users.feats(np.array([1])), "seq_items": seq_items, "seq_extras": seq_extras}
    scores = cas.score_coarse(tower_in, ids)
    in_b = np.isin(cas.categories.item_category[ids], cas.browsed_for(q))  # any source
    assert (src == SOURCES.index(SOURCE_BROWSE)).sum() == 30 and in_b.sum() >= 30
    assert len(kept) == 20 and len(np.unique(kept)) == 20 and np.isin(kept, ids).all()
    # the 10 reserved places hold the browsed-category candidates of the 10 highest coarse scores ...
    b_ids, b_scores = ids[in_b], scores[in_b]
    tenth = np.sort(b_scores)[::-1][9]
    assert np.isin(b_ids[b_scores > tenth + 1e-5], kept).all() and np.isin(kept, b_ids).sum() >= 10
    # ... and the other 10 the best of all the rest (ties within float tolerance aside)
    others = ~np.isin(ids, b_ids[np.argsort(-b_scores, kind="stable")[:10]])
    tenth_rest = np.sort(scores[others])[::-1][9]
    assert np.isin(ids[others][scores[others] > tenth_rest + 1e-5], kept).all()
    # share 0: the plain coarse cut, the 20 best of all
    c0 = Cascade.load(flat_bundle, i2i_share=0.0, browse_share=0.3, browse_coarse_share=0.0, warm=False)
    _, trace0, _ = _retrieved(c0, q)
    np.testing.assert_array_equal(trace0["retrieved"], ids)
    assert np.isin(ids[scores > np.sort(scores)[::-1][19] + 1e-5], trace0["coarse"]).all()
