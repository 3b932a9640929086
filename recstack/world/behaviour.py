"""The behaviour log beyond the recommender's clicks: a user's browsing before each session's
list (detail-page views), and the favourites and add-to-carts those views lead to.

The views follow the hidden state that drives clicks: most land in the day's intent
categories or in the user's favourite shops / brands. They are written to events.parquet
with the clicks and purchases (the full log, which PFD's interacted features count), but
the recommender's behaviour sequence keeps only clicks and purchases: what the coarse
student encodes is a small part of what the log knows.
"""
from __future__ import annotations

import numpy as np

from recstack.features import EVENT_KINDS

KIND_VIEW, KIND_FAVOURITE, KIND_CART = (EVENT_KINDS.index(k) for k in ("view", "favourite", "cart"))
ACTIVITY_RATE = np.array([0.4, 0.8, 1.5, 3.0])  # as the simulator's session rates: active users browse more
BROWSE_SPAN = 1_800.0  # seconds: the browsing happens in the half hour before the session's list


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _csr(group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(group, kind="stable")
    return order, np.searchsorted(group[order], np.arange(n_groups + 1))


def _pick(members: np.ndarray, start: np.ndarray, groups: np.ndarray, fallback: np.ndarray, rng) -> np.ndarray:
    """A uniform member of each of `groups` (CSR `members`/`start`); `fallback` where a group is empty."""
    cnt = start[groups + 1] - start[groups]
    pick = members[np.minimum(start[groups] + (rng.random(len(groups)) * np.maximum(cnt, 1)).astype(np.int64), len(members) - 1)]
    return np.where(cnt > 0, pick, fallback)


class Browser:
    """Draws the browsing events of a chunk of sessions. Holds the catalogue indices (items by
    category, shop and brand), built once per world."""

    def __init__(self, world, items_by_cat: np.ndarray, cat_start: np.ndarray):
        self.world = world
        self.items_by_cat, self.cat_start = items_by_cat, cat_start
        cfg = world.cfg
        self.items_by_shop, self.shop_start = _csr(world.item_shop, cfg.n_shops)
        self.items_by_brand, self.brand_start = _csr(world.item_brand, cfg.n_brands)
        self.cum_pop = np.cumsum(world.item_pop)

    def session_events(self, su: np.ndarray, sts: np.ndarray, intent: np.ndarray, rng) -> dict[str, np.ndarray]:
        """Sessions' users (n,), list times (n,) and today's intents (n, k) -> event columns
        (user_id, ts, item_id, kind, dwell) of their views, favourites and carts."""
        w, cfg = self.world, self.world.cfg
        n_views = rng.poisson(cfg.views_per_session * ACTIVITY_RATE[w.activity[su] % len(ACTIVITY_RATE)])
        sess = np.repeat(np.arange(len(su)), n_views)
        user = su[sess]
        m = len(sess)
        ts = np.maximum(sts[sess] - rng.random(m) * BROWSE_SPAN, 0.0)  # the log starts at 0
        popular = np.minimum(np.searchsorted(self.cum_pop, rng.random(m) * self.cum_pop[-1]), cfg.n_items - 1)
        source = rng.random(m)
        cat = intent[sess, rng.integers(0, intent.shape[1], m)]
        item = np.where(source < cfg.view_intent_share, _pick(self.items_by_cat, self.cat_start, cat, popular, rng), popular)
        fav = source - cfg.view_intent_share
        in_fav = (fav >= 0) & (fav < cfg.view_favourite_share)
        shop = w.fav_shops[user, rng.integers(0, w.fav_shops.shape[1], m)]
        brand = w.fav_brands[user, rng.integers(0, w.fav_brands.shape[1], m)]
        by_shop = _pick(self.items_by_shop, self.shop_start, shop, popular, rng)
        by_brand = _pick(self.items_by_brand, self.brand_start, brand, popular, rng)
        item = np.where(in_fav, np.where(fav < cfg.view_favourite_share / 2, by_shop, by_brand), item)
        dwell = np.exp(2.5 + rng.normal(0, 0.6, m))
        # favourites and carts follow how much the user would buy the item
        centred = w.purchase_logit(user, item[:, None], intent[sess])[:, 0] - cfg.cvr_bias
        fav_ev = rng.random(m) < _sigmoid(np.log(cfg.favourite_rate / (1 - cfg.favourite_rate)) + centred)
        cart_ev = rng.random(m) < _sigmoid(np.log(cfg.cart_rate / (1 - cfg.cart_rate)) + centred)
        parts = [(np.ones(m, bool), KIND_VIEW, 0.0), (fav_ev, KIND_FAVOURITE, 0.5), (cart_ev, KIND_CART, 0.8)]
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("user_id", "ts", "item_id", "kind", "dwell")}
        for keep, kind, at in parts:  # a favourite / cart lands during the view's dwell
            cols["user_id"].append(user[keep])
            cols["ts"].append(ts[keep] + at * dwell[keep])
            cols["item_id"].append(item[keep])
            cols["kind"].append(np.full(int(keep.sum()), kind, np.int8))
            cols["dwell"].append(np.where(kind == KIND_VIEW, dwell[keep], 0.0).astype(np.float32))
        return {k: np.concatenate(v) for k, v in cols.items()}
