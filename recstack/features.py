"""Feature schema and the pure-numpy feature computation shared by training and serving.

Everything a model sees is built here, from the same functions in the trainer and in the
server, so the two cannot drift. Ids in model inputs are raw id + 1; 0 is padding or
unknown (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SEQ_LEN = 50  # behaviours per user sequence (PFD: k = 50)
USER_FIELDS = ("user", "age_bucket", "gender", "activity")
ITEM_FIELDS = ("item", "category", "shop", "brand", "price_bucket")
SEQ_EXTRA_FIELDS = ("log_hours_since", "log_dwell", "is_purchase")
# The interacted (user x candidate) features, PFD's privileged features at coarse ranking: the
# user's behaviours on the candidate's category / shop / brand / the item itself over the
# full behaviour log (views, favourites, carts, clicks, purchases), in windows before the
# request. Each field: (name, item_feats column it matches, event kinds counted, window
# hours); the value is log1p(count). Computed from the full log by
# recstack.interacted.EventIndex (training, and serving from an event history), or from a
# behaviour sequence by `interacted_features` (only the kinds a sequence holds).
_ALL_KINDS = (0, 1, 2, 3, 4)  # indices into EVENT_KINDS
_FAV_CART = (3, 4)
_MATCH = {"category": 1, "shop": 2, "brand": 3, "item": 0}
INTERACTED_SPEC: tuple[tuple[str, int, tuple[int, ...], float], ...] = tuple(
    (f"behaviours_same_{ent}_{win}", _MATCH[ent], _ALL_KINDS, hours)
    for win, hours in (("1h", 1.0), ("24h", 24.0), ("7d", 168.0)) for ent in ("category", "shop", "brand")
) + (
    ("behaviours_same_item_7d", _MATCH["item"], _ALL_KINDS, 168.0),
    ("favourites_carts_same_category_7d", _MATCH["category"], _FAV_CART, 168.0),
    ("favourites_carts_same_shop_7d", _MATCH["shop"], _FAV_CART, 168.0),
)
INTERACTED_FIELDS = tuple(f[0] for f in INTERACTED_SPEC)
POST_EVENT_FIELDS = ("log_dwell", "log_comments", "chatted", "added_to_cart")
BEHAVIOUR_CLICK, BEHAVIOUR_PURCHASE = 0, 1
# events.parquet's `kind`: the index into this tuple. The behaviour sequence keeps clicks and
# purchases; the interacted features count every kind over the full log.
EVENT_KINDS = ("click", "purchase", "view", "favourite", "cart")


@dataclass(frozen=True)
class Vocab:
    """Raw cardinalities of every categorical field (embedding tables add 1 for padding)."""

    n_users: int
    n_items: int
    n_categories: int
    n_shops: int
    n_brands: int
    n_price_buckets: int
    n_age_buckets: int
    n_genders: int
    n_activity_levels: int
    log_price_mean: float
    log_price_std: float

    def user_sizes(self) -> tuple[int, ...]:
        """Embedding table sizes for the columns of `user_feats` (padding row included)."""
        return (self.n_users + 1, self.n_age_buckets + 1, self.n_genders + 1, self.n_activity_levels + 1)

    def item_sizes(self) -> tuple[int, ...]:
        """Embedding table sizes for the columns of `item_feats` / `seq_items`."""
        return (self.n_items + 1, self.n_categories + 1, self.n_shops + 1, self.n_brands + 1, self.n_price_buckets + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def feature_schema() -> dict:
    """The model-input contract, written into checkpoints and bundle manifests."""
    return {
        "seq_len": SEQ_LEN,
        "user_feats": list(USER_FIELDS),
        "item_feats": list(ITEM_FIELDS),
        "seq_items": list(ITEM_FIELDS),
        "seq_extras": list(SEQ_EXTRA_FIELDS),
        "item_dense": ["log_price_standardised"],
        "interacted": list(INTERACTED_FIELDS),
        "post_event": list(POST_EVENT_FIELDS),
        "id_offset": 1,
    }


class UserTable:
    """Profile columns indexed by raw user id."""

    def __init__(self, age_bucket: np.ndarray, gender: np.ndarray, activity: np.ndarray):
        self.cols = np.stack([age_bucket, gender, activity], axis=1).astype(np.int64) + 1  # (U, 3)
        self.n = len(age_bucket)

    def known(self, user_ids: np.ndarray) -> np.ndarray:
        user_ids = np.asarray(user_ids, dtype=np.int64)
        return (user_ids >= 0) & (user_ids < self.n)

    def feats(self, user_ids: np.ndarray) -> np.ndarray:
        """(N,) raw ids -> (N, 4) int64 `user_feats`; unknown users get an all-zero row."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        ok = self.known(user_ids)
        out = np.zeros((len(user_ids), 4), dtype=np.int64)
        out[ok, 0] = user_ids[ok] + 1
        out[ok, 1:] = self.cols[user_ids[ok]]
        return out


class ItemTable:
    """Attribute columns indexed by raw item id."""

    def __init__(self, category, shop, brand, price_bucket, price, log_price_mean: float, log_price_std: float):
        self.cols = np.stack([category, shop, brand, price_bucket], axis=1).astype(np.int64) + 1  # (I, 4)
        self.price = np.asarray(price, dtype=np.float32)
        self.n = len(self.price)
        self.log_price_mean = float(log_price_mean)
        self.log_price_std = float(log_price_std)
        self._dense = ((np.log(self.price) - self.log_price_mean) / self.log_price_std).astype(np.float32)

    def known(self, item_ids: np.ndarray) -> np.ndarray:
        item_ids = np.asarray(item_ids, dtype=np.int64)
        return (item_ids >= 0) & (item_ids < self.n)

    def feats(self, item_ids: np.ndarray) -> np.ndarray:
        """(...,) raw ids -> (..., 5) int64 `item_feats`; ids < 0 (empty slots) give zeros."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        ok = self.known(item_ids)
        out = np.zeros(item_ids.shape + (5,), dtype=np.int64)
        safe = np.where(ok, item_ids, 0)
        out[..., 0] = np.where(ok, item_ids + 1, 0)
        out[..., 1:] = np.where(ok[..., None], self.cols[safe], 0)
        return out

    def dense(self, item_ids: np.ndarray) -> np.ndarray:
        """(N,) raw ids -> (N, 1) float32 `item_dense` (standardised log price)."""
        return self._dense[np.asarray(item_ids, dtype=np.int64)][:, None]


class Behaviours:
    """A behaviour log (clicks and purchases) in CSR form: rows sorted by (user, ts)."""

    def __init__(self, user: np.ndarray, ts: np.ndarray, item: np.ndarray, kind: np.ndarray, dwell: np.ndarray, n_users: int):
        order = np.lexsort((ts, user))
        self.user = np.asarray(user, dtype=np.int64)[order]
        self.ts = np.asarray(ts, dtype=np.float64)[order]
        self.item = np.asarray(item, dtype=np.int64)[order]
        self.kind = np.asarray(kind, dtype=np.int8)[order]
        self.dwell = np.asarray(dwell, dtype=np.float32)[order]
        self.n_users = n_users
        self.start = np.searchsorted(self.user, np.arange(n_users + 1)).astype(np.int64)  # (U+1,)
        # a single sortable key per row: user-major, then time
        self._span = float(self.ts.max() + 1.0) if len(self.ts) else 1.0
        self._key = self.user.astype(np.float64) * self._span + self.ts

    def last_indices(self, user_ids: np.ndarray, ts: np.ndarray, seq_len: int = SEQ_LEN) -> np.ndarray:
        """Rows of each user's last `seq_len` behaviours strictly before `ts`, most recent first.

        (N,), (N,) -> (N, seq_len) int64, -1 where the user has fewer behaviours.
        """
        user_ids = np.asarray(user_ids, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.float64)
        known = (user_ids >= 0) & (user_ids < self.n_users)
        u = np.where(known, user_ids, 0)
        pos = np.searchsorted(self._key, u.astype(np.float64) * self._span + np.minimum(ts, self._span - 0.5), side="left")
        idx = pos[:, None] - 1 - np.arange(seq_len)[None, :]  # (N, L)
        valid = (idx >= self.start[u][:, None]) & known[:, None]
        return np.where(valid, idx, -1)

    def sequence(self, idx: np.ndarray, now: np.ndarray, items: ItemTable) -> tuple[np.ndarray, np.ndarray]:
        """Rows from `last_indices` -> (`seq_items` (N, L, 5) int64, `seq_extras` (N, L, 3) float32)."""
        valid = idx >= 0
        safe = np.where(valid, idx, 0)
        item = np.where(valid, self.item[safe], -1)
        hours = np.maximum(np.asarray(now, dtype=np.float64)[:, None] - self.ts[safe], 0.0) / 3600.0
        return sequence_tensors(item, hours, self.dwell[safe], self.kind[safe], valid, items)


def sequence_tensors(item, hours, dwell, kind, valid, items: ItemTable) -> tuple[np.ndarray, np.ndarray]:
    """Raw behaviour columns (N, L) -> (`seq_items` (N, L, 5), `seq_extras` (N, L, 3)).

    Used for logged sequences and for behaviours sent in a request alike.
    """
    item = np.where(valid, item, -1)
    seq_items = items.feats(item)
    extras = np.stack(
        [np.log1p(np.maximum(hours, 0.0)), np.log1p(np.maximum(dwell, 0.0)), (kind == BEHAVIOUR_PURCHASE).astype(np.float64)],
        axis=-1,
    ).astype(np.float32)
    extras[~(valid & (item >= 0))] = 0.0
    return seq_items, extras


def interacted_features(seq_items: np.ndarray, seq_extras: np.ndarray, cand_items: np.ndarray) -> np.ndarray:
    """INTERACTED_SPEC evaluated on a behaviour sequence (which holds clicks and purchases only).

    seq_items (S, L, 5), seq_extras (S, L, 3), cand_items (M, 5) -> (M, X) float32, where S == M
    (one sequence per candidate) or S == 1 (one user, many candidates). Only the kinds a
    sequence holds are counted, so the fields on favourites / carts are 0: the full-log value
    comes from recstack.interacted.EventIndex.
    """
    hours = np.expm1(seq_extras[..., 0])  # (S, L)
    present = seq_items[..., 0] > 0  # (S, L)
    kind = np.where(seq_extras[..., 2] > 0.5, BEHAVIOUR_PURCHASE, BEHAVIOUR_CLICK)  # (S, L)
    eq = seq_items == cand_items[:, None, :]  # (M, L, 5) (seq broadcast when S == 1)
    out = np.empty((cand_items.shape[0], len(INTERACTED_SPEC)), dtype=np.float32)
    for j, (_, col, kinds, window) in enumerate(INTERACTED_SPEC):
        counted = present & (hours < window) & np.isin(kind, kinds)  # (S, L); broadcasts when S == 1
        out[:, j] = (eq[..., col] & counted).sum(-1)
    return np.log1p(out)


def post_event_features(dwell, comments, chatted, cart) -> np.ndarray:
    """Post-click columns (N,) -> (N, 4) float32 `post_event` (CVR privileged features)."""
    return np.stack(
        [np.log1p(np.maximum(dwell, 0)), np.log1p(np.maximum(comments, 0)), chatted, cart], axis=1
    ).astype(np.float32)
