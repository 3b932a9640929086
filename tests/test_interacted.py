import numpy as np
import pytest

from recstack import features as FE
from recstack.interacted import EventIndex

H = 3600.0


def _items():
    # 6 items: categories 0,0,1,1,2,2; shops 0..5; brands 0,1,0,1,0,1
    return FE.ItemTable(
        category=np.array([0, 0, 1, 1, 2, 2]), shop=np.arange(6), brand=np.array([0, 1, 0, 1, 0, 1]),
        price_bucket=np.zeros(6, int), price=np.full(6, 10.0), log_price_mean=np.log(10.0), log_price_std=1.0,
    )


def _named(row):
    return {name: float(v) for name, v in zip(FE.INTERACTED_FIELDS, np.expm1(row).round(4))}


def test_the_full_log_counts_every_kind_in_its_windows():
    kinds = {k: i for i, k in enumerate(FE.EVENT_KINDS)}
    now = 10 * 24 * H
    # user 0: viewed item 0 (cat 0) 0.5 h ago, favourited item 1 (cat 0) 30 h ago, carted item 0 8 days ago,
    # clicked item 0 at the request's own second (not before it); user 1: a view of item 0
    ev = dict(user=[0, 0, 0, 0, 1], ts=[now - 0.5 * H, now - 30 * H, now - 8 * 24 * H, now + 0.2, now - H / 2],
              item=[0, 1, 0, 0, 0], kind=[kinds["view"], kinds["favourite"], kinds["cart"], kinds["click"], kinds["view"]])
    index = EventIndex(*(np.array(ev[k]) for k in ("user", "ts", "item", "kind")), _items(), n_users=2)
    x = index.features(np.array([0, 0, 5, -1]), np.array([now] * 4), np.array([0, 3, 0, 0]))
    a, b = _named(x[0]), _named(x[1])
    assert (a["behaviours_same_category_1h"], a["behaviours_same_category_24h"], a["behaviours_same_category_7d"]) == (1, 1, 2)
    assert a["behaviours_same_item_7d"] == 1  # the cart is 8 days old, the click not before the request
    assert a["favourites_carts_same_category_7d"] == 1 and a["favourites_carts_same_shop_7d"] == 0
    assert b["behaviours_same_category_7d"] == 0 and b["behaviours_same_brand_7d"] == 1  # item 1 has brand 1
    assert (x[2] == 0).all() and (x[3] == 0).all()  # unknown users


def test_on_a_click_log_the_index_equals_the_sequence_definition():
    """A log of clicks and purchases only, shorter than the sequence: the full-log counts are the
    sequence counts (the two evaluate one definition)."""
    rng = np.random.default_rng(0)
    items = _items()
    n = 200
    user = rng.integers(0, 8, n)
    ts = rng.integers(0, 9 * 24 * 3600, n).astype(np.float64)
    item = rng.integers(0, 6, n)
    kind = rng.integers(0, 2, n)
    beh = FE.Behaviours(user, ts, item, kind, np.zeros(n, np.float32), n_users=8)
    index = EventIndex(user, ts, item, kind, items, n_users=8)
    q_user = rng.integers(0, 8, 300)
    q_ts = rng.integers(0, 10 * 24 * 3600, 300).astype(np.float64)
    q_item = rng.integers(0, 6, 300)
    idx = beh.last_indices(q_user, q_ts)
    assert (idx[:, -1] < 0).all()  # every user's history fits the sequence
    seq_items, seq_extras = beh.sequence(idx, q_ts, items)
    want = FE.interacted_features(seq_items, seq_extras, items.feats(q_item))
    np.testing.assert_allclose(index.features(q_user, q_ts, q_item), want, rtol=0, atol=1e-6)


def test_a_bad_log_is_refused():
    items = _items()
    with pytest.raises(ValueError, match="event item_id"):
        EventIndex(np.array([0]), np.array([1.0]), np.array([9]), np.array([0]), items, n_users=1)
    with pytest.raises(ValueError, match="event user_id"):
        EventIndex(np.array([3]), np.array([1.0]), np.array([0]), np.array([0]), items, n_users=1)
    with pytest.raises(ValueError, match="event ts"):
        EventIndex(np.array([0]), np.array([-5.0]), np.array([0]), np.array([0]), items, n_users=1)


def test_the_serving_count_of_one_user_equals_the_index():
    """`one_user_features` (serving, per request) gives the index's counts (training) for each
    user's log, events on the windows' edges and inside the request's own second included."""
    from recstack.interacted import one_user_features

    rng = np.random.default_rng(7)
    items = _items()
    now = 20 * 24 * H + 0.75
    edges = now - np.array([0.0, 0.5, 1.0, H, H + 1, 24 * H, 24 * H - 0.25, 7 * 24 * H, 7 * 24 * H + 1, 8 * 24 * H])
    user = np.repeat(np.arange(3), 40)
    ts = np.concatenate([rng.choice(edges, 20), now - rng.uniform(0, 9 * 24 * H, 100)])
    item, kind = rng.integers(0, 6, 120), rng.integers(0, len(FE.EVENT_KINDS), 120)
    index = EventIndex(user, ts, item, kind, items, n_users=3)
    cands = np.array([0, 1, 2, 3, 4, 5, 5, -1, 6])
    for u in range(3):
        mine = user == u
        want = index.features(np.full(len(cands), u), np.full(len(cands), now), cands)
        got = one_user_features(item[mine], ts[mine], kind[mine], now, items, cands)
        np.testing.assert_array_equal(got, want)
        assert want[:7].sum() > 0 and (got[7:] == 0).all()  # counts found; unknown candidates zero
