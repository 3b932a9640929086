"""The browse source's triggers (the user's recent browse events) and its category index."""
from __future__ import annotations

import numpy as np
import pytest

from recstack import features as F
from recstack.browse import BROWSE_KINDS, CategoryItems, browsed_categories

VIEW, CART, CLICK = F.EVENT_KINDS.index("view"), F.EVENT_KINDS.index("cart"), F.EVENT_KINDS.index("click")


def test_browse_kinds_are_views_favourites_and_carts():
    assert sorted(F.EVENT_KINDS[k] for k in BROWSE_KINDS) == ["cart", "favourite", "view"]


def test_browsed_categories_newest_first_distinct_within_the_window():
    item_category = np.array([0, 0, 1, 2, 3, 3])
    item = np.array([0, 2, 1, 3, 4, 5, 99])  # 99: outside the corpus
    ts = np.array([100.0, 900.0, 950.0, 500.0, 990.0, 10.0, 999.0])
    kind = np.array([VIEW, VIEW, CART, CLICK, VIEW, VIEW, VIEW])
    cats = browsed_categories(item, ts, kind, now=1000.0, item_category=item_category, window_s=950.0)
    # 990 -> cat 3, 950 -> cat 0, 900 -> cat 1 (cart counts), 100 -> cat 0 again; the click
    # (cat 2) is not a browse event; ts 10 is outside the window; item 99 is ignored
    assert cats.tolist() == [3, 0, 1]
    assert browsed_categories(item, ts, kind, 1000.0, item_category, 950.0, max_categories=2).tolist() == [3, 0]
    assert browsed_categories(item, ts, kind, 1000.0, item_category, window_s=5.0).tolist() == []
    assert browsed_categories(item[:0], ts[:0], kind[:0], 1000.0, item_category).dtype == np.int64


def test_category_items_ranked_by_inner_product_ties_by_id():
    item_category = np.array([1, 0, 1, 1, 2, 1])
    idx = CategoryItems(item_category)
    assert sorted(idx.members(np.array([1, 7, -1])).tolist()) == [0, 2, 3, 5]  # unknown categories: none
    emb = np.array([[0.5], [9.0], [0.9], [0.5], [8.0], [0.1]], np.float32)
    assert idx.ranked(np.array([1.0], np.float32), emb, np.array([1]), 3).tolist() == [2, 0, 3]  # 0 and 3 tie: lower id
    assert idx.ranked(np.array([1.0], np.float32), emb, np.array([1, 2]), 10).tolist() == [4, 2, 0, 3, 5]
    with pytest.raises(ValueError, match="categories"):
        CategoryItems(np.array([0, -1]))
