"""The simulated world: entities, a logging policy, clicks, purchases, post-event features,
consent, and the ground truth of every impression. Vectorised numpy; deterministic for a seed.

    recstack simulate --preset small --seed 0 --out data/small

Files and columns: recstack/world/schema.py.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recstack.config import to_dict
from recstack.world.config import WorldConfig
from recstack.world.behaviour import ACTIVITY_RATE, KIND_CART, Browser  # ACTIVITY_RATE: session-rate multiplier per activity level
from recstack.world.writer import IMPRESSION_ORDER, _clear_impressions, _ImpressionWriter

DAY = 86_400.0
FORMAT_VERSION = 1
# Sessions generated (and written) at a time: bounds the simulator's working memory. Part of
# the world's definition too: the random draws are interleaved chunk by chunk, so another
# value gives another world for the same seed.
SESSION_CHUNK = 20_000
EVENT_ORDER = ("user_id", "ts", "item_id", "kind", "dwell")
INTENT_BLOCK = 1024  # users per block of the daily intent draw (was 4096: 300 MB of temporaries at 3,000 categories)
ACTIVITY_SHARE = np.array([0.3, 0.35, 0.25, 0.1])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_weights(n: int, s: float, rng) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return (w / w.sum())[rng.permutation(n)]


def _pick_within(group: np.ndarray, member_group: np.ndarray, rng) -> np.ndarray:
    """For each entry of `group` pick a member (shop, brand) whose home group matches,
    uniformly; a group without members falls back to any member."""
    order = np.argsort(member_group, kind="stable")
    start = np.searchsorted(member_group[order], np.arange(group.max() + 2))
    count = start[group + 1] - start[group]
    pick = start[group] + np.floor(rng.random(len(group)) * np.maximum(count, 1)).astype(np.int64)
    out = order[np.minimum(pick, len(order) - 1)]
    empty = count == 0
    out[empty] = rng.integers(0, len(member_group), int(empty.sum()))
    return out


@dataclass
class World:
    """The hidden state: everything the click and purchase models depend on."""

    cfg: WorldConfig
    # categories
    cat_latent: np.ndarray  # (C, d)
    cat_pop: np.ndarray  # (C,)
    # items
    item_cat: np.ndarray
    item_shop: np.ndarray
    item_brand: np.ndarray
    item_latent: np.ndarray  # (I, d)
    item_quality: np.ndarray
    item_log_price: np.ndarray
    item_price: np.ndarray
    item_price_bucket: np.ndarray
    item_pop: np.ndarray  # (I,) sampling probability under the logging policy's popularity
    # users
    age: np.ndarray
    gender: np.ndarray
    activity: np.ndarray
    taste: np.ndarray  # (U, d)
    price_sens: np.ndarray
    fav_shops: np.ndarray  # (U, n_fav)
    fav_brands: np.ndarray
    consent: np.ndarray  # (U,) bool
    # (U, 3) the categories the user's long-term taste was built from: their habitual intents
    habit_cats: np.ndarray | None = None

    @property
    def mean_log_price(self) -> float:
        return float(self.item_log_price.mean())

    # --- the truth, shared by the simulator and oracle evaluation -------------------
    def click_logit(self, users, items, intent, noise=0.0):
        """users (N,), items (N, K), intent (N, k) categories -> (N, K) click logits."""
        c = self.cfg
        dot = np.einsum("nd,nkd->nk", self.taste[users], self.item_latent[items])
        priv = (
            c.intent_weight * (self.item_cat[items][:, :, None] == intent[:, None, :]).any(-1)
            + c.shop_affinity_weight * (self.item_shop[items][:, :, None] == self.fav_shops[users][:, None, :]).any(-1)
            + c.brand_affinity_weight * (self.item_brand[items][:, :, None] == self.fav_brands[users][:, None, :]).any(-1)
        )
        return c.ctr_bias + c.taste_weight * dot + c.quality_weight * self.item_quality[items] + c.privileged_strength * priv + noise

    def purchase_logit(self, users, items, intent, noise=0.0):
        """users (N,), items (N, K), intent (N, k) -> (N, K) purchase-given-click logits."""
        c = self.cfg
        dot = np.einsum("nd,nkd->nk", self.taste[users], self.item_latent[items])
        in_intent = (self.item_cat[items][:, :, None] == intent[:, None, :]).any(-1)
        return (
            c.cvr_bias + c.cvr_taste_weight * dot + c.cvr_quality_weight * self.item_quality[items]
            - self.price_sens[users][:, None] * (self.item_log_price[items] - self.mean_log_price)
            + c.privileged_strength * c.cvr_intent_weight * in_intent + noise
        )

    def intents(self, users: np.ndarray, rng) -> np.ndarray:
        """Draw each user's intent categories for a day: Gumbel top-k over taste affinity. (N,) -> (N, k)."""
        k = min(self.cfg.intent_categories, self.cfg.n_categories)
        out = np.empty((len(users), k), dtype=np.int64)
        log_pop = np.log(self.cat_pop)
        # blocks of INTENT_BLOCK users bound the (block, C) temporaries; the Gumbel draws are
        # one stream and each row's score its own, so the block size does not change the world
        for s in range(0, len(users), INTENT_BLOCK):
            u = users[s : s + INTENT_BLOCK]
            score = 2.0 * self.taste[u] @ self.cat_latent.T + log_pop + rng.gumbel(size=(len(u), len(log_pop)))
            out[s : s + INTENT_BLOCK] = np.argpartition(-score, k - 1, axis=1)[:, :k]
        if self.cfg.intent_taste_share > 0 and self.habit_cats is not None:
            # part of the day's intent is one of the user's habitual (taste) categories
            habit = self.habit_cats[users][np.arange(len(users))[:, None], rng.integers(0, self.habit_cats.shape[1], out.shape)]
            out = np.where(rng.random(out.shape) < self.cfg.intent_taste_share, habit, out)
        return out


def build_world(cfg: WorldConfig, rng) -> World:
    C, S, B, I, U, d = cfg.n_categories, cfg.n_shops, cfg.n_brands, cfg.n_items, cfg.n_users, cfg.latent_dim
    cat_latent = rng.normal(size=(C, d)) / np.sqrt(d)
    cat_pop = _zipf_weights(C, 0.8, rng)
    cat_log_price = rng.normal(np.log(40.0), 0.9, C)  # categories differ in price level
    shop_cat = rng.choice(C, size=S, p=cat_pop)
    brand_cat = rng.choice(C, size=B, p=cat_pop)
    item_cat = rng.choice(C, size=I, p=cat_pop)
    item_shop = _pick_within(item_cat, shop_cat, rng)
    item_brand = _pick_within(item_cat, brand_cat, rng)
    item_latent = 0.8 * cat_latent[item_cat] + 0.6 * rng.normal(size=(I, d)) / np.sqrt(d)
    item_quality = rng.normal(0.0, 1.0, I)
    item_log_price = cat_log_price[item_cat] + rng.normal(0.0, 0.5, I)
    item_price = np.maximum(np.round(np.exp(item_log_price), 2), 0.5)
    item_log_price = np.log(item_price)
    edges = np.quantile(item_log_price, np.linspace(0, 1, cfg.n_price_buckets + 1)[1:-1])
    item_price_bucket = np.searchsorted(edges, item_log_price, side="right")
    pop = _zipf_weights(I, cfg.zipf_exponent, rng) * np.exp(0.3 * item_quality)
    item_pop = pop / pop.sum()

    taste_cats = rng.choice(C, size=(U, 3), p=cat_pop)
    taste = 1.5 * cat_latent[taste_cats].mean(1) + 0.5 * rng.normal(size=(U, d)) / np.sqrt(d)
    shop_pop = np.bincount(item_shop, weights=item_pop, minlength=S) + 1e-12
    brand_pop = np.bincount(item_brand, weights=item_pop, minlength=B) + 1e-12
    age = rng.integers(0, cfg.n_age_buckets, U)
    gender = rng.integers(0, cfg.n_genders, U)
    activity = rng.choice(len(ACTIVITY_RATE), size=U, p=ACTIVITY_SHARE) % cfg.n_activity_levels
    price_sens = cfg.price_sensitivity * rng.lognormal(0.0, 0.3, U)
    fav_shops = rng.choice(S, size=(U, cfg.favourite_shops), p=shop_pop / shop_pop.sum())
    fav_brands = rng.choice(B, size=(U, cfg.favourite_brands), p=brand_pop / brand_pop.sum())
    if cfg.favourite_taste_share > 0:  # part of the favourites sell in the user's taste categories
        for fav, home in ((fav_shops, shop_cat), (fav_brands, brand_cat)):
            pick = taste_cats[np.arange(U)[:, None], rng.integers(0, taste_cats.shape[1], fav.shape)]
            local = _pick_within(pick.ravel(), home, rng).reshape(fav.shape)
            np.copyto(fav, local, where=rng.random(fav.shape) < cfg.favourite_taste_share)
    u_consent = rng.random(U)
    if cfg.consent_age_slope:
        z = (age - age.mean()) / max(float(age.std()), 1e-9)
        p_consent = _sigmoid(np.log(cfg.consent_rate / (1 - cfg.consent_rate)) + cfg.consent_age_slope * z)
    else:
        p_consent = cfg.consent_rate  # the independent case, as before the knob existed
    return World(
        cfg=cfg, cat_latent=cat_latent, cat_pop=cat_pop,
        item_cat=item_cat, item_shop=item_shop, item_brand=item_brand, item_latent=item_latent,
        item_quality=item_quality, item_log_price=item_log_price, item_price=item_price,
        item_price_bucket=item_price_bucket, item_pop=item_pop,
        age=age, gender=gender, activity=activity, taste=taste, price_sens=price_sens,
        fav_shops=fav_shops, fav_brands=fav_brands, consent=u_consent < p_consent, habit_cats=taste_cats,
    )


def _dedupe_rows(cand: np.ndarray) -> np.ndarray:
    """(S, P) candidate ids -> (S, P) bool, True for the first occurrence in each row."""
    order = np.argsort(cand, axis=1, kind="stable")
    sorted_c = np.take_along_axis(cand, order, axis=1)
    first_sorted = np.ones_like(sorted_c, dtype=bool)
    first_sorted[:, 1:] = sorted_c[:, 1:] != sorted_c[:, :-1]
    first = np.empty_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    return first


def simulate_day(world: World, day: int, rng, items_by_cat, cat_start,
                 browser: Browser | None = None) -> tuple[np.ndarray, Iterator[dict]]:
    """One day of traffic. Returns (today's intent categories (U, k), a generator of impression
    chunks): each chunk is a dict of the impression columns (IMPRESSION_ORDER) for up to
    20,000 sessions (x impressions_per_session rows), in session-time order. The chunks draw
    from `rng` as they are generated, so the day's log is the same whatever the consumer does
    with them, provided it consumes them all before the next day and draws nothing in between."""
    cfg = world.cfg
    U = cfg.n_users
    n_sess = rng.poisson(cfg.sessions_per_day * ACTIVITY_RATE[world.activity])
    s_user = np.repeat(np.arange(U), n_sess)
    s_ts = (day - 1 + cfg.history_days) * DAY + rng.random(len(s_user)) * DAY
    order = np.argsort(s_ts, kind="stable")
    s_user, s_ts = s_user[order], s_ts[order]
    intent_u = world.intents(np.arange(U), rng)  # (U, k) today's intent per user
    browser = browser if browser is not None else Browser(world, items_by_cat, cat_start)
    return intent_u, _day_chunks(world, day, rng, browser, s_user, s_ts, intent_u)


def _affinity(world: World, users: np.ndarray, pool: np.ndarray, rows: int = 2048) -> np.ndarray:
    """taste . item latent for (N,) users and their (N, P) pools -> (N, P), a block of rows at a
    time: the (N, P, d) gather was the simulator's largest temporary (256 MB for a chunk).
    Each row's sums do not depend on the blocking: the small and medium worlds came out
    bit-identical to those of one einsum over the chunk."""
    out = np.empty(pool.shape)
    for s in range(0, len(users), rows):
        out[s : s + rows] = np.einsum("nd,npd->np", world.taste[users[s : s + rows]], world.item_latent[pool[s : s + rows]])
    return out


def _day_chunks(world: World, day: int, rng, browser: Browser, s_user, s_ts, intent_u) -> Iterator[dict]:
    cfg = world.cfg
    items_by_cat, cat_start = browser.items_by_cat, browser.cat_start
    K = cfg.impressions_per_session
    cum_pop = np.cumsum(world.item_pop)
    session_base = (day + cfg.history_days) * 10_000_000
    for s0 in range(0, len(s_user), SESSION_CHUNK):
        su, sts = s_user[s0 : s0 + SESSION_CHUNK], s_ts[s0 : s0 + SESSION_CHUNK]
        n = len(su)
        intent = intent_u[su]
        # the logging policy: a pool of popular items and items of the intent categories...
        pop_c = np.minimum(np.searchsorted(cum_pop, rng.random((n, cfg.policy_pool_popular)) * cum_pop[-1]), cfg.n_items - 1)
        ic = intent[np.arange(n)[:, None], rng.integers(0, intent.shape[1], (n, cfg.policy_pool_intent))]
        cnt = cat_start[ic + 1] - cat_start[ic]
        int_c = items_by_cat[np.minimum(cat_start[ic] + (rng.random(ic.shape) * np.maximum(cnt, 1)).astype(np.int64), cfg.n_items - 1)]
        int_c = np.where(cnt > 0, int_c, pop_c[:, : ic.shape[1]] if cfg.policy_pool_popular >= ic.shape[1] else int_c)
        pool = np.concatenate([pop_c, int_c], axis=1)  # (n, P)
        # ...scored by popularity plus a noisy affinity; the top K are shown, in score order
        aff = _affinity(world, su, pool)
        score = (cfg.policy_popularity_weight * np.log(world.item_pop[pool]) + cfg.policy_affinity_weight * aff
                 + cfg.policy_noise * rng.normal(size=pool.shape))
        score = np.where(_dedupe_rows(pool), score, -np.inf)
        top = np.argpartition(-score, K - 1, axis=1)[:, :K]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, axis=1), axis=1), axis=1)
        shown = np.take_along_axis(pool, top, axis=1)  # (n, K)
        # clicks and purchases from the truth
        pctr = _sigmoid(world.click_logit(su, shown, intent, cfg.click_noise * rng.normal(size=shown.shape)))
        cvr_logit = world.purchase_logit(su, shown, intent)
        pcvr = _sigmoid(cvr_logit)
        click = rng.random(shown.shape) < pctr
        purchase = click & (rng.random(shown.shape) < pcvr)
        # post-event features, caused by the purchase and the latent propensity to buy (and
        # dwell by price too)
        st = cfg.post_event_strength
        a = cfg.post_event_propensity
        propensity = cvr_logit - cfg.cvr_bias  # centred: its spread over clicks (~0.9) is about a purchase's effect
        lp = world.item_log_price[shown] - world.mean_log_price
        if cfg.post_event_price_penalty != 1.0:  # the part of the price's pull the page does not show
            propensity = propensity + (1.0 - cfg.post_event_price_penalty) * world.price_sens[su][:, None] * lp
        purchase_signal = (1.0 - a) * purchase + a * propensity
        dwell = np.exp(3.0 + 0.35 * lp + st * 0.9 * purchase_signal + rng.normal(0, 0.6, shown.shape))
        comments = rng.poisson(np.exp(-0.7 + 0.2 * lp + st * 1.2 * purchase_signal))
        chatted = rng.random(shown.shape) < _sigmoid(-3.0 + 0.4 * lp + st * 2.0 * purchase_signal)
        cart = rng.random(shown.shape) < _sigmoid(-2.5 + st * 3.0 * purchase_signal)
        imps = {
            "day": np.full(n * K, day, dtype=np.int16),
            "ts": np.repeat(sts, K),
            "user_id": np.repeat(su, K),
            "session_id": np.repeat(session_base + s0 + np.arange(n), K),
            "position": np.tile(np.arange(K), n),
            "item_id": shown.ravel(),
            "click": click.ravel(),
            "purchase": purchase.ravel(),
        }
        imps["purchase_observed"] = imps["purchase"] & world.consent[imps["user_id"]]
        for name, val in (("dwell", dwell), ("comments", comments), ("chatted", chatted), ("cart", cart)):
            imps[name] = np.where(click, val, 0).astype(np.float32 if name == "dwell" else np.int16).ravel()
        imps["true_pctr"] = pctr.ravel().astype(np.float32)
        imps["true_pcvr"] = pcvr.ravel().astype(np.float32)
        chunk = {k: imps[k] for k in IMPRESSION_ORDER}
        # the session's browsing before its list: logged in the full behaviour log only
        chunk["browse_events"] = browser.session_events(su, sts, intent, rng)
        yield chunk


class _DayLog:
    """What one day's impression chunks leave behind besides the impressions themselves:
    the behaviour events and the per-day statistics, accumulated chunk by chunk. The events
    keep the order of the one-day-at-a-time simulator (the day's clicks, then its purchases),
    so the global (user_id, ts) sort and everything after it are unchanged."""

    def __init__(self, world: World):
        self.world = world
        self.clicks: list[dict] = []
        self.purchases: list[dict] = []
        self.others: list[dict] = []  # browsing (views, favourites, carts) and carts after a click
        C = world.cfg.n_categories
        self.n = self.n_clicks = self.n_purchases = self.n_observed = 0
        self.cat_clicks = np.zeros(C, np.int64)
        self.cat_conv = np.zeros(C)
        self.cat_conv_obs = np.zeros(C)

    def add(self, imps: dict) -> None:
        # behaviour log: a click lands a few seconds after the impression, a purchase after the dwell
        c = imps["click"]
        click_ts = imps["ts"][c] + 5.0 + 3.0 * imps["position"][c]
        p = imps["purchase"][c]
        self.clicks.append({"user_id": imps["user_id"][c], "ts": click_ts, "item_id": imps["item_id"][c],
                            "kind": np.zeros(int(c.sum()), np.int8), "dwell": imps["dwell"][c]})
        self.purchases.append({"user_id": imps["user_id"][c][p], "ts": click_ts[p] + imps["dwell"][c][p],
                               "item_id": imps["item_id"][c][p], "kind": np.ones(int(p.sum()), np.int8),
                               "dwell": np.zeros(int(p.sum()), np.float32)})
        carted = imps["cart"][c] > 0  # an add-to-cart on the detail page, halfway through the dwell
        self.others.append({"user_id": imps["user_id"][c][carted], "ts": click_ts[carted] + 0.5 * imps["dwell"][c][carted],
                            "item_id": imps["item_id"][c][carted], "kind": np.full(int(carted.sum()), KIND_CART, np.int8),
                            "dwell": np.zeros(int(carted.sum()), np.float32)})
        if "browse_events" in imps:
            self.others.append(imps["browse_events"])
        cat = self.world.item_cat[imps["item_id"][c]]
        C = self.world.cfg.n_categories
        self.cat_clicks += np.bincount(cat, minlength=C)
        # 0/1 weights: the float sums are exact, as in one bincount over the whole day
        self.cat_conv += np.bincount(cat, weights=imps["purchase"][c], minlength=C)
        self.cat_conv_obs += np.bincount(cat, weights=imps["purchase_observed"][c], minlength=C)
        self.n += len(c)
        self.n_clicks += int(c.sum())
        self.n_purchases += int(imps["purchase"][c].sum())
        self.n_observed += int(imps["purchase_observed"][c].sum())

    def events(self) -> dict:
        parts = self.clicks + self.purchases + self.others
        return {k: np.concatenate([e[k] for e in parts]) for k in EVENT_ORDER}

    def aggregates(self, day: int) -> dict:
        C = self.world.cfg.n_categories
        return {"day": np.full(C, day, np.int16), "category": np.arange(C), "clicks": self.cat_clicks.copy(),
                "conversions": self.cat_conv.astype(np.int64), "conversions_observed": self.cat_conv_obs.astype(np.int64)}

    def stats(self, day: int) -> dict:
        # count / n is bit-identical to the mean of the 0/1 array (exact sum, one rounding)
        return {"day": day, "impressions": self.n, "ctr": self.n_clicks / self.n if self.n else 0.0,
                "cvr": self.n_purchases / self.n_clicks if self.n_clicks else 0.0,
                "observed_cvr": self.n_observed / self.n_clicks if self.n_clicks else 0.0}


def _list_column(mat: np.ndarray) -> pa.ListArray:
    """(N, d) -> a list<item> column of N rows: the type pyarrow infers from a list of N row
    arrays, built without N Python objects (1e6 of them for the large corpus)."""
    offsets = np.arange(0, mat.size + 1, mat.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(mat).ravel()))


def _write(path: Path, cols: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: np.asarray(v) for k, v in cols.items()}), path, compression="zstd")


def _write_tables(out: Path, cfg: WorldConfig, world: World, events: dict, aggs: list[dict], intents: list[dict]) -> None:
    """Every Parquet file but the impressions: behaviours, aggregates, users, items and the hidden truth."""
    order = np.lexsort((events["ts"], events["user_id"]))
    _write(out / "events.parquet", {k: v[order] for k, v in events.items()})
    _write(out / "aggregates.parquet", {k: np.concatenate([a[k] for a in aggs]) for k in aggs[0]})
    _write(out / "users.parquet", {"user_id": np.arange(cfg.n_users), "age_bucket": world.age, "gender": world.gender,
                                   "activity": world.activity, "consent": world.consent})
    _write(out / "items.parquet", {"item_id": np.arange(cfg.n_items), "category": world.item_cat, "shop": world.item_shop,
                                   "brand": world.item_brand, "price": world.item_price.astype(np.float32),
                                   "price_bucket": world.item_price_bucket})
    # the hidden truth, for oracle evaluation only (never a model input)
    truth_u = {"user_id": np.arange(cfg.n_users), "price_sensitivity": world.price_sens,
               "favourite_shops": _list_column(world.fav_shops), "favourite_brands": _list_column(world.fav_brands),
               "habit_categories": _list_column(world.habit_cats),
               "taste": _list_column(world.taste.astype(np.float32))}
    pq.write_table(pa.table(truth_u), out / "truth_users.parquet", compression="zstd")
    truth_i = {"item_id": np.arange(cfg.n_items), "quality": world.item_quality, "popularity": world.item_pop,
               "latent": _list_column(world.item_latent.astype(np.float32))}
    pq.write_table(pa.table(truth_i), out / "truth_items.parquet", compression="zstd")
    _write(out / "truth_intents.parquet", {k: np.concatenate([x[k] for x in intents]) for k in intents[0]})
    _write(out / "truth_categories.parquet", {"category": np.arange(cfg.n_categories), "popularity": world.cat_pop})


def simulate(cfg: WorldConfig, seed: int, out: str | Path, preset: str | None = None, progress: bool = True,
             shard_rows: int | None = None) -> dict:
    """Simulate `cfg.n_days` days and write the logs to `out`. Returns world.json's content.

    shard_rows: None writes impressions/day=DD.parquet, one file per day; an int writes each
    day as impressions/day=DD/part-NNNNN.parquet files of at most that many rows, listed in
    world.json's `impression_shards`. Either way the impressions are generated and written a
    chunk of sessions at a time, and the rows (their content and order) are the same for a
    seed: the layouts differ only in how the rows are split into files.
    """
    from tqdm import tqdm

    cfg.validate()
    if shard_rows is not None and (isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1):
        raise ValueError(f"shard_rows must be a positive int or None, got {shard_rows!r}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # world.json is written last: a directory whose simulation did not finish is refused by the loader
    (out / "world.json").unlink(missing_ok=True)
    _clear_impressions(out)
    rng = np.random.default_rng(seed)
    world = build_world(cfg, rng)
    items_by_cat = np.argsort(world.item_cat, kind="stable")
    cat_start = np.searchsorted(world.item_cat[items_by_cat], np.arange(cfg.n_categories + 1))
    browser = Browser(world, items_by_cat, cat_start)
    t_build = time.perf_counter() - t0
    all_events, day_stats, aggs, intents, shards = [], [], [], [], {}
    for day in tqdm(range(1 - cfg.history_days, cfg.n_days + 1), desc="simulate", unit="day", disable=not progress):
        intent_u, chunks = simulate_day(world, day, rng, items_by_cat, cat_start, browser)
        log = _DayLog(world)
        writer = _ImpressionWriter(out, day, shard_rows) if day >= 1 else None  # history: behaviours only
        for imps in chunks:
            log.add(imps)
            if writer is not None:
                writer.write(imps)
            del imps
        all_events.append(log.events())
        if writer is None:
            continue
        rows = writer.close()
        if shard_rows is not None:
            shards[str(day)] = rows
        intents.append({"user_id": np.repeat(np.arange(cfg.n_users), intent_u.shape[1]), "day": np.full(intent_u.size, day, np.int16),
                        "category": intent_u.ravel()})
        aggs.append(log.aggregates(day))
        day_stats.append(log.stats(day))
    events = {k: np.concatenate([e[k] for e in all_events]) for k in all_events[0]}
    _write_tables(out, cfg, world, events, aggs, intents)
    lp = np.log(world.item_price)
    meta = {
        "format_version": FORMAT_VERSION,
        "preset": preset,
        "seed": seed,
        "config": to_dict(cfg),
        "n_days": cfg.n_days,
        "day_seconds": DAY,
        # ts is seconds since the start of the first history day; day d >= 1 spans
        # [(history_days + d - 1) * DAY, (history_days + d) * DAY)
        "history_days": cfg.history_days,
        "now": (cfg.history_days + cfg.n_days) * DAY,  # the end of the logs: serving time for the snapshot
        "vocab": {
            "n_users": cfg.n_users, "n_items": cfg.n_items, "n_categories": cfg.n_categories, "n_shops": cfg.n_shops,
            "n_brands": cfg.n_brands, "n_price_buckets": cfg.n_price_buckets, "n_age_buckets": cfg.n_age_buckets,
            "n_genders": cfg.n_genders, "n_activity_levels": cfg.n_activity_levels,
            "log_price_mean": float(lp.mean()), "log_price_std": float(lp.std() + 1e-6),
        },
        "days": day_stats,
        "n_events": int(len(events["ts"])),
        **({"impression_shards": {"shard_rows": shard_rows, "rows": shards}} if shard_rows is not None else {}),
        "timings_s": {"build": round(t_build, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2))
    return meta
