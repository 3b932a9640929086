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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recstack.config import to_dict
from recstack.world.config import WorldConfig

DAY = 86_400.0
FORMAT_VERSION = 1
ACTIVITY_RATE = np.array([0.4, 0.8, 1.5, 3.0])  # session-rate multiplier per activity level
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
        for s in range(0, len(users), 4096):
            u = users[s : s + 4096]
            score = 2.0 * self.taste[u] @ self.cat_latent.T + log_pop + rng.gumbel(size=(len(u), len(log_pop)))
            out[s : s + 4096] = np.argpartition(-score, k - 1, axis=1)[:, :k]
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
    return World(
        cfg=cfg, cat_latent=cat_latent, cat_pop=cat_pop,
        item_cat=item_cat, item_shop=item_shop, item_brand=item_brand, item_latent=item_latent,
        item_quality=item_quality, item_log_price=item_log_price, item_price=item_price,
        item_price_bucket=item_price_bucket, item_pop=item_pop,
        age=rng.integers(0, cfg.n_age_buckets, U), gender=rng.integers(0, cfg.n_genders, U),
        activity=rng.choice(len(ACTIVITY_RATE), size=U, p=ACTIVITY_SHARE) % cfg.n_activity_levels,
        taste=taste,
        price_sens=cfg.price_sensitivity * rng.lognormal(0.0, 0.3, U),
        fav_shops=rng.choice(S, size=(U, cfg.favourite_shops), p=shop_pop / shop_pop.sum()),
        fav_brands=rng.choice(B, size=(U, cfg.favourite_brands), p=brand_pop / brand_pop.sum()),
        consent=rng.random(U) < cfg.consent_rate,
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


def simulate_day(world: World, day: int, rng, items_by_cat, cat_start) -> tuple[dict, dict]:
    """One day of traffic. Returns (impression columns, behaviour-event columns)."""
    cfg = world.cfg
    U = cfg.n_users
    n_sess = rng.poisson(cfg.sessions_per_day * ACTIVITY_RATE[world.activity])
    s_user = np.repeat(np.arange(U), n_sess)
    s_ts = (day - 1 + cfg.history_days) * DAY + rng.random(len(s_user)) * DAY
    order = np.argsort(s_ts, kind="stable")
    s_user, s_ts = s_user[order], s_ts[order]
    intent_u = world.intents(np.arange(U), rng)  # (U, k) today's intent per user
    K = cfg.impressions_per_session
    cum_pop = np.cumsum(world.item_pop)
    imp_cols: dict[str, list] = {k: [] for k in ("user_id", "ts", "session_id", "position", "item_id", "click", "purchase",
                                                 "dwell", "comments", "chatted", "cart", "true_pctr", "true_pcvr")}
    session_base = (day + cfg.history_days) * 10_000_000
    for s0 in range(0, len(s_user), 20_000):
        su, sts = s_user[s0 : s0 + 20_000], s_ts[s0 : s0 + 20_000]
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
        aff = np.einsum("nd,npd->np", world.taste[su], world.item_latent[pool])
        score = (cfg.policy_popularity_weight * np.log(world.item_pop[pool]) + cfg.policy_affinity_weight * aff
                 + cfg.policy_noise * rng.normal(size=pool.shape))
        score = np.where(_dedupe_rows(pool), score, -np.inf)
        top = np.argpartition(-score, K - 1, axis=1)[:, :K]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, axis=1), axis=1), axis=1)
        shown = np.take_along_axis(pool, top, axis=1)  # (n, K)
        # clicks and purchases from the truth
        pctr = _sigmoid(world.click_logit(su, shown, intent, cfg.click_noise * rng.normal(size=shown.shape)))
        pcvr = _sigmoid(world.purchase_logit(su, shown, intent))
        click = rng.random(shown.shape) < pctr
        purchase = click & (rng.random(shown.shape) < pcvr)
        # post-event features, caused by the purchase (and dwell by price too)
        st = cfg.post_event_strength
        lp = world.item_log_price[shown] - world.mean_log_price
        dwell = np.exp(3.0 + 0.35 * lp + st * 0.9 * purchase + rng.normal(0, 0.6, shown.shape))
        comments = rng.poisson(np.exp(-0.7 + 0.2 * lp + st * 1.2 * purchase))
        chatted = rng.random(shown.shape) < _sigmoid(-3.0 + 0.4 * lp + st * 2.0 * purchase)
        cart = rng.random(shown.shape) < _sigmoid(-2.5 + st * 3.0 * purchase)
        for name, val in (("dwell", dwell), ("comments", comments), ("chatted", chatted), ("cart", cart)):
            imp_cols[name].append(np.where(click, val, 0).astype(np.float32 if name == "dwell" else np.int16))
        imp_cols["user_id"].append(np.repeat(su, K))
        imp_cols["ts"].append(np.repeat(sts, K))
        imp_cols["session_id"].append(np.repeat(session_base + s0 + np.arange(n), K))
        imp_cols["position"].append(np.tile(np.arange(K), n))
        imp_cols["item_id"].append(shown.ravel())
        imp_cols["click"].append(click.ravel())
        imp_cols["purchase"].append(purchase.ravel())
        imp_cols["true_pctr"].append(pctr.ravel().astype(np.float32))
        imp_cols["true_pcvr"].append(pcvr.ravel().astype(np.float32))
    imps = {k: np.concatenate(v) if v else np.zeros(0) for k, v in imp_cols.items()}
    for k in ("dwell", "comments", "chatted", "cart"):
        imps[k] = imps[k].ravel()
    imps["day"] = np.full(len(imps["user_id"]), day, dtype=np.int16)
    imps["purchase_observed"] = imps["purchase"] & world.consent[imps["user_id"]]
    # behaviour log: a click lands a few seconds after the impression, a purchase after the dwell
    c = imps["click"]
    click_ts = imps["ts"][c] + 5.0 + 3.0 * imps["position"][c]
    p = imps["purchase"][c]
    events = {
        "user_id": np.concatenate([imps["user_id"][c], imps["user_id"][c][p]]),
        "ts": np.concatenate([click_ts, click_ts[p] + imps["dwell"][c][p]]),
        "item_id": np.concatenate([imps["item_id"][c], imps["item_id"][c][p]]),
        "kind": np.concatenate([np.zeros(c.sum(), np.int8), np.ones(p.sum(), np.int8)]),
        "dwell": np.concatenate([imps["dwell"][c], np.zeros(p.sum(), np.float32)]),
    }
    return imps, events, intent_u


def _write(path: Path, cols: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: np.asarray(v) for k, v in cols.items()}), path, compression="zstd")


def simulate(cfg: WorldConfig, seed: int, out: str | Path, preset: str | None = None, progress: bool = True) -> dict:
    """Simulate `cfg.n_days` days and write the logs to `out`. Returns world.json's content."""
    from tqdm import tqdm

    cfg.validate()
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    world = build_world(cfg, rng)
    items_by_cat = np.argsort(world.item_cat, kind="stable")
    cat_start = np.searchsorted(world.item_cat[items_by_cat], np.arange(cfg.n_categories + 1))
    t_build = time.perf_counter() - t0
    all_events, day_stats, aggs, intents = [], [], [], []
    for day in tqdm(range(1 - cfg.history_days, cfg.n_days + 1), desc="simulate", unit="day", disable=not progress):
        imps, events, intent_u = simulate_day(world, day, rng, items_by_cat, cat_start)
        all_events.append(events)
        if day < 1:  # history: behaviours only
            continue
        order = ["day", "ts", "user_id", "session_id", "position", "item_id", "click", "purchase", "purchase_observed",
                 "dwell", "comments", "chatted", "cart", "true_pctr", "true_pcvr"]
        _write(out / "impressions" / f"day={day:02d}.parquet", {k: imps[k] for k in order})
        intents.append({"user_id": np.repeat(np.arange(cfg.n_users), intent_u.shape[1]), "day": np.full(intent_u.size, day, np.int16),
                        "category": intent_u.ravel()})
        clicked = imps["click"]
        cat = world.item_cat[imps["item_id"][clicked]]
        aggs.append({
            "day": np.full(cfg.n_categories, day, np.int16), "category": np.arange(cfg.n_categories),
            "clicks": np.bincount(cat, minlength=cfg.n_categories),
            "conversions": np.bincount(cat, weights=imps["purchase"][clicked], minlength=cfg.n_categories).astype(np.int64),
            "conversions_observed": np.bincount(cat, weights=imps["purchase_observed"][clicked], minlength=cfg.n_categories).astype(np.int64),
        })
        day_stats.append({"day": day, "impressions": int(len(imps["item_id"])), "ctr": float(imps["click"].mean()),
                          "cvr": float(imps["purchase"][clicked].mean()) if clicked.any() else 0.0,
                          "observed_cvr": float(imps["purchase_observed"][clicked].mean()) if clicked.any() else 0.0})
    events = {k: np.concatenate([e[k] for e in all_events]) for k in all_events[0]}
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
               "favourite_shops": list(world.fav_shops), "favourite_brands": list(world.fav_brands), "taste": list(world.taste.astype(np.float32))}
    pq.write_table(pa.table(truth_u), out / "truth_users.parquet", compression="zstd")
    truth_i = {"item_id": np.arange(cfg.n_items), "quality": world.item_quality, "popularity": world.item_pop,
               "latent": list(world.item_latent.astype(np.float32))}
    pq.write_table(pa.table(truth_i), out / "truth_items.parquet", compression="zstd")
    _write(out / "truth_intents.parquet", {k: np.concatenate([x[k] for x in intents]) for k in intents[0]})
    _write(out / "truth_categories.parquet", {"category": np.arange(cfg.n_categories), "popularity": world.cat_pop})
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
        "timings_s": {"build": round(t_build, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2))
    return meta
