"""The hidden world rebuilt from a simulate output directory, for oracle evaluation.

    truth = Truth.load("data/small")
    gmv = truth.expected_gmv(users, items, day)        # (N, K) true E[click] x P(buy | click) x price
    top = truth.oracle_top_k(users, day, k=50)          # (N, 50) best items of the whole corpus

`recstack simulate` writes the latent state it drew clicks and purchases from
(truth_users / truth_items / truth_intents / truth_categories .parquet, world.json's config).
`Truth` puts it back into a `recstack.world.simulate.World` and scores with that class's own
`click_logit` / `purchase_logit`, so the oracle cannot drift from the simulator.

The click logit of an impression carries per-impression noise N(0, click_noise²) that nobody
observes. The true pCTR of a (user, item, day) *before* the impression happens is therefore
the expectation E[sigmoid(logit + noise)], computed here by Gauss-Hermite quadrature (exact
to ~1e-7 for the noise levels of the presets). The purchase logit has no noise term.

Never a model input: only evaluation code imports this module.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recstack.config import from_dict
from recstack.world.config import WorldConfig
from recstack.world.simulate import World

_HERMITE_NODES = 24


def _col(table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _matrix(table, name: str) -> np.ndarray:
    """A list<float> column -> (N, d) float64."""
    col = table.column(name).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), -1).astype(np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def expected_sigmoid(logit: np.ndarray, noise_std: float, nodes: int = _HERMITE_NODES) -> np.ndarray:
    """E[sigmoid(logit + noise_std * Z)], Z ~ N(0, 1), elementwise (Gauss-Hermite quadrature)."""
    if noise_std <= 0:
        return _sigmoid(logit)
    z, w = np.polynomial.hermite_e.hermegauss(nodes)  # probabilists' Hermite: weight exp(-z^2 / 2)
    w = w / w.sum()
    out = np.zeros_like(logit, dtype=np.float64)
    for zi, wi in zip(z, w):
        out += wi * _sigmoid(logit + noise_std * zi)
    return out


class Truth:
    """The simulator's World plus every day's intents; scores any (user, item, day)."""

    def __init__(self, world: World, intents: dict[int, np.ndarray], meta: dict):
        self.world = world
        self.intents = intents  # day -> (n_users, k) intent categories
        self.meta = meta
        self.n_users = len(world.taste)
        self.n_items = len(world.item_cat)

    @classmethod
    def load(cls, data_dir: str | Path) -> "Truth":
        root = Path(data_dir)
        meta = json.loads((root / "world.json").read_text())
        known = {f.name for f in fields(WorldConfig)}
        cfg = from_dict(WorldConfig, {k: v for k, v in meta["config"].items() if k in known})
        users = pq.read_table(root / "users.parquet")
        items = pq.read_table(root / "items.parquet")
        tu = pq.read_table(root / "truth_users.parquet")
        ti = pq.read_table(root / "truth_items.parquet")
        tc = pq.read_table(root / "truth_categories.parquet")
        if not (np.array_equal(_col(tu, "user_id"), np.arange(cfg.n_users))
                and np.array_equal(_col(ti, "item_id"), np.arange(cfg.n_items))):
            raise ValueError(f"{root}: truth tables are not in id order 0..n-1")
        # items.parquet stores the price as float32; the world drew it rounded to cents in
        # float64, so rounding back to cents recovers it exactly (prices << 1e5).
        price = np.round(_col(items, "price").astype(np.float64), 2)
        world = World(
            cfg=cfg,
            # The category latents only shaped how items and tastes were drawn; neither logit
            # reads them, and they are not saved. NaN makes any accidental use visible.
            cat_latent=np.full((cfg.n_categories, cfg.latent_dim), np.nan),
            cat_pop=_col(tc, "popularity").astype(np.float64),
            item_cat=_col(items, "category").astype(np.int64),
            item_shop=_col(items, "shop").astype(np.int64),
            item_brand=_col(items, "brand").astype(np.int64),
            item_latent=_matrix(ti, "latent"),
            item_quality=_col(ti, "quality").astype(np.float64),
            item_log_price=np.log(price),
            item_price=price,
            item_price_bucket=_col(items, "price_bucket").astype(np.int64),
            item_pop=_col(ti, "popularity").astype(np.float64),
            age=_col(users, "age_bucket").astype(np.int64),
            gender=_col(users, "gender").astype(np.int64),
            activity=_col(users, "activity").astype(np.int64),
            taste=_matrix(tu, "taste"),
            price_sens=_col(tu, "price_sensitivity").astype(np.float64),
            fav_shops=_matrix(tu, "favourite_shops").astype(np.int64),
            fav_brands=_matrix(tu, "favourite_brands").astype(np.int64),
            habit_cats=_matrix(tu, "habit_categories").astype(np.int64) if "habit_categories" in tu.column_names else None,
            consent=_col(users, "consent").astype(bool),
        )
        ints = pq.read_table(root / "truth_intents.parquet")
        iu, iday, icat = _col(ints, "user_id"), _col(ints, "day"), _col(ints, "category")
        intents: dict[int, np.ndarray] = {}
        for day in np.unique(iday):
            sel = iday == day
            order = np.argsort(iu[sel], kind="stable")  # each user's k rows, in the order drawn
            u, c = iu[sel][order], icat[sel][order]
            if not np.array_equal(np.bincount(u, minlength=cfg.n_users), np.full(cfg.n_users, len(u) // cfg.n_users)):
                raise ValueError(f"{root}: truth_intents day {day} does not hold the same number of intents per user")
            intents[int(day)] = c.reshape(cfg.n_users, -1).astype(np.int64)
        return cls(world, intents, meta)

    # --- scores ------------------------------------------------------------------------

    def intent(self, users: np.ndarray, day: int) -> np.ndarray:
        """(N,) users -> (N, k) their intent categories on `day`."""
        if day not in self.intents:
            raise KeyError(f"no intents for day {day}; days with intents: {sorted(self.intents)}")
        return self.intents[day][np.asarray(users, dtype=np.int64)]

    def _args(self, users, items):
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if items.ndim != 2 or users.shape != (items.shape[0],):
            raise ValueError(f"users (N,) and items (N, K) expected, got {users.shape} and {items.shape}")
        return users, items

    def click_logit(self, users, items, day: int) -> np.ndarray:
        """Noise-free click logits, (N,), (N, K) -> (N, K)."""
        users, items = self._args(users, items)
        return self.world.click_logit(users, items, self.intent(users, day))

    def pctr(self, users, items, day: int) -> np.ndarray:
        """True P(click) of showing each item to the user on `day`, expected over the
        unobserved per-impression noise: (N,), (N, K) -> (N, K)."""
        return expected_sigmoid(self.click_logit(users, items, day), float(self.world.cfg.click_noise))

    def pcvr(self, users, items, day: int) -> np.ndarray:
        """True P(purchase | click): (N,), (N, K) -> (N, K)."""
        users, items = self._args(users, items)
        return _sigmoid(self.world.purchase_logit(users, items, self.intent(users, day)))

    def expected_gmv(self, users, items, day: int) -> np.ndarray:
        """True expected GMV of one impression, pCTR x pCVR x price: (N,), (N, K) -> (N, K)."""
        users, items = self._args(users, items)
        return self.pctr(users, items, day) * self.pcvr(users, items, day) * self.world.item_price[items]

    def oracle_top_k(self, users, day: int, k: int = 50, chunk_items: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
        """The k items of the whole corpus with the highest true expected GMV for each user.

        (N,) -> (ids (N, k) int64, expected GMV (N, k) float64), best first; ties by item id.
        """
        users = np.asarray(users, dtype=np.int64)
        k = min(k, self.n_items)
        ids = np.empty((len(users), k), np.int64)
        vals = np.empty((len(users), k), np.float64)
        for n, u in enumerate(users):
            best_ids, best_vals = np.zeros(0, np.int64), np.zeros(0)
            for s in range(0, self.n_items, chunk_items):
                cand = np.arange(s, min(s + chunk_items, self.n_items))
                g = self.expected_gmv(u[None], cand[None], day)[0]
                best_ids = np.concatenate([best_ids, cand])
                best_vals = np.concatenate([best_vals, g])
                if len(best_ids) > k:
                    keep = np.argpartition(-best_vals, k - 1)[:k]
                    best_ids, best_vals = best_ids[keep], best_vals[keep]
            order = np.lexsort((best_ids, -best_vals))
            ids[n], vals[n] = best_ids[order], best_vals[order]
        return ids, vals
