import numpy as np

from recstack import data as D
from recstack import features as FE


def _items():
    # 6 items: categories 0,0,1,1,2,2; shops 0..5; brands 0,1,0,1,0,1
    return FE.ItemTable(
        category=np.array([0, 0, 1, 1, 2, 2]), shop=np.arange(6), brand=np.array([0, 1, 0, 1, 0, 1]),
        price_bucket=np.zeros(6, int), price=np.full(6, 10.0), log_price_mean=np.log(10.0), log_price_std=1.0,
    )


def test_sequence_is_strictly_before_and_newest_first():
    beh = FE.Behaviours(
        user=np.array([0, 0, 0, 1]), ts=np.array([10.0, 30.0, 20.0, 5.0]), item=np.array([1, 3, 2, 4]),
        kind=np.array([0, 0, 1, 0]), dwell=np.array([5.0, 6.0, 0.0, 1.0]), n_users=3,
    )
    idx = beh.last_indices(np.array([0, 0, 1, 2, 7]), np.array([30.0, 31.0, 100.0, 100.0, 100.0]), seq_len=3)
    items = beh.item[np.where(idx >= 0, idx, 0)]
    items[idx < 0] = -1
    assert items[0].tolist() == [2, 1, -1]  # ts=30 itself is not "before" 30
    assert items[1].tolist() == [3, 2, 1]
    assert items[2].tolist() == [4, -1, -1]
    assert items[3].tolist() == [-1, -1, -1]  # a user with no behaviours
    assert items[4].tolist() == [-1, -1, -1]  # an unknown user
    seq_items, extras = beh.sequence(idx, np.array([30.0, 31.0, 100.0, 100.0, 100.0]), _items())
    assert seq_items.shape == (5, 3, 5) and extras.shape == (5, 3, 3)
    assert (seq_items[3] == 0).all() and (extras[3] == 0).all()
    assert seq_items[1, 0].tolist() == [4, 2, 4, 2, 1]  # item 3: +1 offsets everywhere
    assert extras[1, 1, 2] == 1.0  # the purchase


def _named(row: np.ndarray) -> dict:
    return {name: float(v) for name, v in zip(FE.INTERACTED_FIELDS, np.expm1(row).round(4))}


def test_interacted_features_count_a_sequence_in_windows():
    items = _items()
    # one user: clicked item 0 (cat 0) 0.5 h ago, item 1 (cat 0) 30 h ago, purchased item 2 (cat 1) 2 h ago
    seq = items.feats(np.array([[0, 1, 2, -1]]))
    extras = np.zeros((1, 4, 3), np.float32)
    extras[0, :3, 0] = np.log1p([0.5, 30.0, 2.0])
    extras[0, 2, 2] = 1.0
    cand = items.feats(np.array([0, 3]))
    got = FE.interacted_features(seq, extras, cand)
    assert got.shape == (2, len(FE.INTERACTED_FIELDS))
    a, b = _named(got[0]), _named(got[1])
    # item 0: cat 0, shop 0, brand 0 (brand 0 also holds the purchased item 2)
    assert (a["behaviours_same_category_1h"], a["behaviours_same_category_24h"], a["behaviours_same_category_7d"]) == (1, 1, 2)
    assert (a["behaviours_same_brand_1h"], a["behaviours_same_brand_24h"], a["behaviours_same_brand_7d"]) == (1, 2, 2)
    assert a["behaviours_same_shop_7d"] == 1 and a["behaviours_same_item_7d"] == 1
    # item 3: cat 1 (the purchase 2 h ago), shop 3 (nothing), brand 1 (the click 30 h ago)
    assert (b["behaviours_same_category_1h"], b["behaviours_same_category_24h"]) == (0, 1)
    assert (b["behaviours_same_brand_24h"], b["behaviours_same_brand_7d"]) == (0, 1)
    assert b["behaviours_same_shop_7d"] == 0 and b["behaviours_same_item_7d"] == 0
    # a sequence holds no favourites or carts
    assert a["favourites_carts_same_category_7d"] == b["favourites_carts_same_shop_7d"] == 0


def test_serving_broadcast_equals_training_rows(tiny_data):
    """One sequence against many candidates (serving) == the same sequence repeated per row (training)."""
    d = D.load(tiny_data)
    ex = d.examples(d.test_day)
    b = ex.batch(np.arange(len(ex)))
    row = int(np.argmax((b["seq_items"][:, :, 0] > 0).sum(1)))
    cands = d.items.feats(np.arange(300))
    one = FE.interacted_features(b["seq_items"][row : row + 1], b["seq_extras"][row : row + 1], cands)
    rep = FE.interacted_features(np.repeat(b["seq_items"][row : row + 1], 300, 0), np.repeat(b["seq_extras"][row : row + 1], 300, 0), cands)
    np.testing.assert_array_equal(one, rep)
    assert one.max() > 0


def test_request_behaviours_match_logged_sequence(tiny_data):
    """Behaviours given as raw columns (as a request sends them) give the same tensors as the log."""
    d = D.load(tiny_data)
    beh = d.behaviours
    users, ts = np.array([5, 17]), np.array([d.world["now"]] * 2)
    idx = beh.last_indices(users, ts)
    seq_a, ext_a = beh.sequence(idx, ts, d.items)
    valid = idx >= 0
    safe = np.where(valid, idx, 0)
    seq_b, ext_b = FE.sequence_tensors(beh.item[safe], (ts[:, None] - beh.ts[safe]) / 3600.0, beh.dwell[safe], beh.kind[safe], valid, d.items)
    np.testing.assert_array_equal(seq_a, seq_b)
    np.testing.assert_allclose(ext_a, ext_b)


def test_unknown_ids_map_to_padding():
    items = _items()
    assert items.feats(np.array([-1, 99])).tolist() == [[0] * 5, [0] * 5]
    users = FE.UserTable(np.array([1, 2]), np.array([0, 1]), np.array([3, 0]))
    assert users.feats(np.array([1, 5, -3])).tolist() == [[2, 3, 2, 1], [0] * 4, [0] * 4]


def test_interacted_features_one_user_path_equals_the_comparison():
    """Serving's path (one sequence, many candidates: binary search) counts exactly what the
    (M, L, 5) comparison counts, on sequences with repeats, padding and both windows."""
    rng = np.random.default_rng(3)
    for n_valid in (0, 1, 17, FE.SEQ_LEN):
        seq = np.zeros((1, FE.SEQ_LEN, 5), np.int64)
        seq[0, :n_valid] = rng.integers(1, 6, (n_valid, 5))  # few ids: many repeats
        extras = np.zeros((1, FE.SEQ_LEN, 3), np.float32)
        extras[0, :, 0] = np.log1p(rng.uniform(0, 24 * 10, FE.SEQ_LEN))  # hours ago, inside and outside both windows
        extras[0, :, 2] = rng.integers(0, 2, FE.SEQ_LEN)  # clicks and purchases
        cands = rng.integers(1, 6, (200, 5))
        fast = FE.interacted_features(seq, extras, cands)
        slow = np.concatenate([FE.interacted_features(seq, extras, cands[i : i + 1]) for i in range(len(cands))])
        np.testing.assert_array_equal(fast, slow)
