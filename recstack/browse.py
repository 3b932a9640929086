"""The browse source of retrieval: the best items of the categories a user has just browsed.

A session's views, favourites and add-to-carts come before its list (a user browses, then
gets recommendations), and they name what the user is after *today*. The two-tower's user
vector is built from the profile and the click / purchase sequence, so it knows the user's
long-term taste but not today's intent. This source is a trigger-based retrieval with no model
of its own: the categories of the user's browse events in the last `window_s` seconds (newest
first, at most `max_categories`) are the triggers, and their items are ranked by the same
user-vector inner product as the ANN source, over the item vectors the i2i source reads.

Training never sees this source (the retrieval model is trained as before); offline
evaluation calls `browsed_categories` on the log strictly before the request, serving on the
feature store's history (every event there is in the past).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from recstack import features as F

BROWSE_KINDS = tuple(F.EVENT_KINDS.index(k) for k in ("view", "favourite", "cart"))
DEFAULT_WINDOW_S = 3_600.0  # a browse event older than this no longer says what the user is after now
DEFAULT_MAX_CATEGORIES = 8
# The serving defaults, chosen on the validation day of `small` (docs/results/cascade/browse.md):
# a fifth of the retrieved candidates, and three quarters of the coarse cut kept for the best of
# the candidates in a browsed category.
DEFAULT_SHARE = 0.2
DEFAULT_COARSE_SHARE = 0.75
# a request with browse triggers skips the i2i source: beside the browse source it adds no GMV and
# its seeds' searches cost more (same report, "Browse replaces i2i")
DEFAULT_REPLACES_I2I = True


def browsed_categories(item: np.ndarray, ts: np.ndarray, kind: np.ndarray, now: float, item_category: np.ndarray,
                       window_s: float = DEFAULT_WINDOW_S, max_categories: int = DEFAULT_MAX_CATEGORIES) -> np.ndarray:
    """One user's events (N,) each (raw item ids, absolute times, kind codes) -> the distinct raw
    categories of the browse events (view / favourite / cart) newer than now - window_s, newest
    first, at most max_categories: (<= max_categories,) int64. Items outside the corpus are
    ignored; the caller decides which events are in the past (all of the store's are)."""
    item = np.asarray(item, dtype=np.int64)
    ts = np.asarray(ts, dtype=np.float64)
    keep = np.isin(np.asarray(kind), BROWSE_KINDS) & (ts > now - window_s) & (item >= 0) & (item < len(item_category))
    if not keep.any() or max_categories <= 0:
        return np.zeros(0, np.int64)
    order = np.argsort(-ts[keep], kind="stable")  # newest first; equal times keep log order
    cats = np.asarray(item_category, dtype=np.int64)[item[keep][order]]
    _, first = np.unique(cats, return_index=True)
    return cats[np.sort(first)][:max_categories]


class CategoryItems:
    """The items of each category, for the browse source: item_category (I,) raw ids -> members."""

    def __init__(self, item_category: np.ndarray):
        item_category = np.asarray(item_category, dtype=np.int64)
        if len(item_category) and item_category.min() < 0:
            raise ValueError(f"item categories must be >= 0, got {item_category.min()}")
        n_cats = int(item_category.max()) + 1 if len(item_category) else 0
        self.item_category = item_category
        self.items = np.argsort(item_category, kind="stable")  # item ids grouped by category, id order inside
        self.start = np.searchsorted(item_category[self.items], np.arange(n_cats + 1))

    def members(self, cats: np.ndarray) -> np.ndarray:
        """Raw categories (C,) -> the item ids of all of them (unknown categories have none)."""
        cats = np.asarray(cats, dtype=np.int64)
        cats = cats[(cats >= 0) & (cats < len(self.start) - 1)]
        if not len(cats):
            return np.zeros(0, np.int64)
        return np.concatenate([self.items[self.start[c] : self.start[c + 1]] for c in cats])

    def ranked(self, user_emb: np.ndarray, item_emb: np.ndarray, cats: np.ndarray, n: int,
               score: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The items of `cats` by inner product with user_emb (D,) over item_emb (I, D), best
        first (equal scores: lower id first), at most n: (<= n,) int64. `score`: ids (P,) ->
        their inner products (P,), when the caller has a faster way than a gather and a matvec."""
        pool = self.members(cats)  # ties are broken by id below, whatever the order here
        if not len(pool) or n <= 0:
            return np.zeros(0, np.int64)
        if score is not None:
            scores = np.asarray(score(pool), dtype=np.float32)
        else:
            scores = np.asarray(item_emb[pool], dtype=np.float32) @ np.asarray(user_emb, np.float32).reshape(-1)
        if n < len(pool):  # the n best (and every item tied with the n-th), then their order
            cut = np.partition(scores, len(pool) - n)[len(pool) - n]
            keep = scores >= cut
            pool, scores = pool[keep], scores[keep]
        return pool[np.lexsort((pool, -scores))[:n]]
