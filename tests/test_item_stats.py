"""recstack.item_stats: daily item counts over whole days before a day, never its own."""
from __future__ import annotations

import numpy as np
import pytest

from recstack import item_stats as S
from recstack.data import load
from recstack.features import EVENT_KINDS

CLICK, VIEW = EVENT_KINDS.index("click"), EVENT_KINDS.index("view")


def field(name: str) -> int:
    return S.FIELDS.index(name)


def stats_of_a_small_log() -> S.ItemStats:
    # impressions: item 0 shown twice on day 1, once on day 2 and 5 times on day 3 (its own day
    # for day-3 rows); views of item 1 on history days -1 and 0, and on day 2
    imp_days = np.array([1, 1, 2, 3, 3, 3, 3, 3])
    imp_items = np.zeros(8, np.int64)
    ev_days = np.array([-1, 0, 2, 2, 3])
    ev_items = np.array([1, 1, 1, 0, 0])
    ev_kinds = np.array([VIEW, VIEW, VIEW, CLICK, CLICK])
    return S.ItemStats.build(imp_days, imp_items, ev_days, ev_items, ev_kinds, n_items=3)


def test_a_day_sees_the_whole_days_before_it_and_never_its_own():
    st = stats_of_a_small_log()
    t3 = st.table(3)
    assert t3.shape == (3, len(S.FIELDS)) and t3.dtype == np.float32
    # yesterday (day 2): one impression of item 0 and its click; day 3's own five are unseen
    assert t3[0, field("impressions_per_day_1d")] == pytest.approx(np.log1p(1.0))
    assert t3[0, field("clicks_per_day_1d")] == pytest.approx(np.log1p(1.0))
    # 7 days: the impression log starts on day 1, so (2 + 1) impressions over its 2 days
    assert t3[0, field("impressions_per_day_7d")] == pytest.approx(np.log1p(3 / 2))
    # the behaviour log starts on day -1: item 1's three views over days -1..2 (4 days)
    assert t3[1, field("views_per_day_7d")] == pytest.approx(np.log1p(3 / 4))
    assert not t3[2].any()  # an item nobody saw
    # day 1: no impression day before it; the history's two views over days -1..0
    t1 = st.table(1)
    assert t1[0, field("impressions_per_day_7d")] == 0.0
    assert t1[1, field("views_per_day_7d")] == pytest.approx(np.log1p(2 / 2))
    # a day past the log's end sees the log's last days: day 4 is day 3 for its 1-day window
    assert st.table(4)[0, field("impressions_per_day_1d")] == pytest.approx(np.log1p(5.0))
    assert st.table(4)[0, field("clicks_per_day_1d")] == pytest.approx(np.log1p(1.0))


def test_rows_read_the_table_of_their_own_day():
    st = stats_of_a_small_log()
    got = st.features(np.array([3, 1, 3, 2]), np.array([0, 1, 1, 0]))
    want = np.stack([st.table(3)[0], st.table(1)[1], st.table(3)[1], st.table(2)[0]])
    np.testing.assert_array_equal(got, want)


def test_bad_logs_and_tables_are_named():
    with pytest.raises(ValueError, match="item ids must be in"):
        S.ItemStats.build(np.array([1]), np.array([5]), np.array([], np.int64), np.array([], np.int64),
                          np.array([], np.int64), n_items=3)
    with pytest.raises(ValueError, match="event kinds"):
        S.ItemStats.build(np.array([1]), np.array([0]), np.array([1]), np.array([0]), np.array([9]), n_items=3)
    good = stats_of_a_small_log().table(3)
    assert S.check_table(good, 3) is None
    assert "expected float32" in S.check_table(good[:2], 3)
    assert "expected float32" in S.check_table(good.astype(np.float64), 3)
    bad = good.copy()
    bad[0, 0] = np.nan
    assert "non-finite" in S.check_table(bad, 3)


def test_a_world_counts_its_impressions_and_events_per_day(tiny_data):
    data = load(tiny_data)
    st = data.item_stats
    day = data.test_day
    imps = data.impressions(day - 1)
    shown = np.bincount(imps["item_id"], minlength=data.vocab.n_items)
    np.testing.assert_allclose(st.table(day)[:, field("impressions_per_day_1d")], np.log1p(shown), rtol=1e-6)
    ev = data.events
    day_s = float(data.world.get("day_seconds", 86400))
    ev_day = np.floor(ev["ts"] / day_s).astype(np.int64) + 1 - int(data.world.get("history_days", 0))
    clicks = np.bincount(ev["item_id"][(ev_day == day - 1) & (ev["kind"] == CLICK)], minlength=data.vocab.n_items)
    np.testing.assert_allclose(st.table(day)[:, field("clicks_per_day_1d")], np.log1p(clicks), rtol=1e-6)
