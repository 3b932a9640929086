"""Feature schema and the pure-numpy feature computation shared by training and serving.

Everything a model sees is built here, from the same functions in the trainer and in the
server, so the two cannot drift. Ids in model inputs are raw id + 1; 0 is padding or
unknown (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

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
# events.parquet's `kind` and the proto's BehaviourKind: the index into this tuple. The behaviour
# sequence keeps clicks and purchases; the interacted features count every kind over the full log.
EVENT_KINDS = ("click", "purchase", "view", "favourite", "cart")
BEHAVIOUR_CLICK, BEHAVIOUR_PURCHASE, BEHAVIOUR_VIEW, BEHAVIOUR_FAVOURITE, BEHAVIOUR_CART = range(len(EVENT_KINDS))
SEQUENCE_KINDS = (BEHAVIOUR_CLICK, BEHAVIOUR_PURCHASE)  # what the behaviour sequence keeps


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

    def dense(self, item_ids: np.ndarray, stats: np.ndarray | None = None) -> np.ndarray:
        """(N,) raw ids -> (N, 1) float32 `item_dense` (standardised log price); with `stats`, one
        day's item statistics table (I, S) (recstack.item_stats), the ids' rows follow the price:
        (N, 1 + S)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        if stats is None:
            return self._dense[ids][:, None]
        return np.concatenate([self._dense[ids][:, None], np.asarray(stats, np.float32)[ids]], axis=1)


class Behaviours:
    """A user event history in CSR form, rows sorted by (user, ts), keeping the kinds the
    behaviour sequence uses (clicks and purchases; views, favourites and carts are dropped).

    Built from the full event log, in training (every user of a world) and in serving (one
    user's history from the feature store plus the request's behaviours) alike: the features
    both see come from `history_features` on one of these. The interacted features are counted
    over the sequence today; counting them over more of the log changes only this class and
    `HistoryFeatures`."""

    def __init__(self, user: np.ndarray, ts: np.ndarray, item: np.ndarray, kind: np.ndarray, dwell: np.ndarray, n_users: int):
        kind = np.asarray(kind, dtype=np.int8)
        keep = np.isin(kind, SEQUENCE_KINDS)
        user, ts = np.asarray(user, dtype=np.int64)[keep], np.asarray(ts, dtype=np.float64)[keep]
        item, kind, dwell = np.asarray(item, dtype=np.int64)[keep], kind[keep], np.asarray(dwell, dtype=np.float32)[keep]
        order = np.lexsort((ts, user))  # stable: of two rows at the same time, the later one is the newer
        self.user = user[order]
        self.ts = ts[order]
        self.item = item[order]
        self.kind = kind[order]
        self.dwell = dwell[order]
        self.n_users = n_users
        self.start = np.searchsorted(self.user, np.arange(n_users + 1)).astype(np.int64)  # (U+1,)
        # a single sortable key per row: user-major, then time
        self._span = float(self.ts.max() + 1.0) if len(self.ts) else 1.0
        self._key = self.user.astype(np.float64) * self._span + self.ts

    @classmethod
    def one_user(cls, item: np.ndarray, ts: np.ndarray, kind: np.ndarray, dwell: np.ndarray) -> "Behaviours":
        """One user's events (any order; absolute times) as user 0 of a one-user history."""
        return cls(np.zeros(len(item), np.int64), ts, item, kind, dwell, 1)

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
        if not len(self.item):  # no behaviours at all: every slot is empty (and there is no row 0 to gather)
            zeros = np.zeros(idx.shape)
            return sequence_tensors(np.full(idx.shape, -1), zeros, zeros, zeros, valid, items)
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


class HistoryFeatures(NamedTuple):
    """The features of N (user, time) pairs drawn from their event histories:
    seq_items (N, L, 5) int64, seq_extras (N, L, 3) float32 (see `sequence_tensors`)."""

    seq_items: np.ndarray
    seq_extras: np.ndarray

    def interacted(self, cand_items: np.ndarray) -> np.ndarray:
        """cand_items (M, 5) -> `interacted` (M, X), X = len(INTERACTED_FIELDS); N == M (one row per candidate) or N == 1."""
        return interacted_features(self.seq_items, self.seq_extras, cand_items)


def history_features(log: Behaviours, user_ids: np.ndarray, now: np.ndarray, items: ItemTable,
                     rows: np.ndarray | None = None, until: np.ndarray | None = None) -> HistoryFeatures:
    """The one function from event histories to features, for training and serving alike.

    user_ids (N,), now (N,) absolute times -> each user's last SEQ_LEN clicks / purchases in
    `log` before `until` (default: strictly before `now`), newest first, each aged at `now`.
    `rows` (N, L) are those rows when the caller has them already (`Behaviours.last_indices`).
    Training passes an impression's time as `now`; serving passes the request's time and no
    cut (`until` = inf: everything the store has is in the past, and a clock that runs ahead of
    the request by a little counts as "just now").
    """
    now = np.asarray(now, dtype=np.float64)
    if rows is None:
        rows = log.last_indices(user_ids, now if until is None else np.asarray(until, dtype=np.float64))
    seq_items, seq_extras = log.sequence(rows, now, items)
    return HistoryFeatures(seq_items, seq_extras)


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


def fine_inputs(user_feats: np.ndarray, seq_items: np.ndarray, seq_extras: np.ndarray, items: ItemTable,
                cands: np.ndarray, interacted: np.ndarray | None = None, item_stats: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
    """One user's fine-ranker inputs for M candidates, as served: user_feats (1, 4), seq_items
    (1, L, 5), seq_extras (1, L, 3), cands (M,) raw item ids -> {user_feats (M, 4), item_feats
    (M, 5), item_dense (M, 1), interacted (M, X), seq_items (1, L, 5), seq_extras (1, L, 3)}.
    The sequence stays one row: a graph that reads it computes its side once per request.
    `interacted` (M, X): the counts over the user's full log
    (recstack.interacted.one_user_features); None: counted on the sequence. `item_stats` (I, S):
    the item statistics table (recstack.item_stats), appended to item_dense; None: the price only."""
    cands = np.asarray(cands, dtype=np.int64)
    item_feats = items.feats(cands)
    dense = items.dense(cands, item_stats)
    if interacted is None:
        interacted = HistoryFeatures(seq_items, seq_extras).interacted(item_feats)
    return {
        "user_feats": np.repeat(user_feats, len(cands), axis=0),
        "item_feats": item_feats,
        "item_dense": dense,
        "interacted": interacted,
        "seq_items": seq_items,
        "seq_extras": seq_extras,
    }


def post_event_features(dwell, comments, chatted, cart) -> np.ndarray:
    """Post-click columns (N,) -> (N, 4) float32 `post_event` (CVR privileged features)."""
    return np.stack(
        [np.log1p(np.maximum(dwell, 0)), np.log1p(np.maximum(comments, 0)), chatted, cart], axis=1
    ).astype(np.float32)
