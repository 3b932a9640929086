"""The interacted features (recstack.features.INTERACTED_SPEC) counted over a full event log.

    index = EventIndex(user, ts, item, kind, items, n_users)   # once per log
    x = index.features(user_ids, ts, item_ids)                  # (N, X) float32, log1p(counts)

For each (matched item column, counted kinds) pair of the spec the log is sorted once by
(user x matched value, second); a count over a window is then the difference of two
searchsorted positions, so N impressions cost O(N log E) with no per-row Python. A count
holds the user's events of those kinds on the candidate's value whose whole second lies in
(floor(ts) - window, floor(ts)): nothing at or after the request's own second is seen, and
on integer times the windows are those of `recstack.features.interacted_features` (an
event exactly `window` old is out).
"""
from __future__ import annotations

import numpy as np

from recstack.features import INTERACTED_SPEC, ItemTable

_INT64_MAX = np.iinfo(np.int64).max


class EventIndex:
    """Sorted (user x value, second) keys of a behaviour log, one array per (column, kinds) of the spec."""

    def __init__(self, user: np.ndarray, ts: np.ndarray, item: np.ndarray, kind: np.ndarray, items: ItemTable,
                 n_users: int):
        user = np.asarray(user, dtype=np.int64)
        item = np.asarray(item, dtype=np.int64)
        kind = np.asarray(kind, dtype=np.int64)
        sec = np.floor(np.asarray(ts, dtype=np.float64)).astype(np.int64)
        if len(user) and (user.min() < 0 or user.max() >= n_users):
            raise ValueError(f"event user_id must be in [0, {n_users}), got [{user.min()}, {user.max()}]")
        if len(item) and (item.min() < 0 or item.max() >= items.n):
            raise ValueError(f"event item_id must be in [0, {items.n}), got [{item.min()}, {item.max()}]")
        if len(sec) and sec.min() < 0:
            raise ValueError(f"event ts must be >= 0, got {sec.min()}")
        self.items, self.n_users = items, n_users
        self.span = int(sec.max()) + 2 if len(sec) else 2  # seconds per group; the last second is past every event
        self._value = {}  # item column -> (n_items,) raw value of that column (0-based) and its cardinality
        for col in {c for _, c, _, _ in INTERACTED_SPEC}:
            raw = np.arange(items.n) if col == 0 else items.cols[:, col - 1] - 1
            card = int(raw.max()) + 1 if len(raw) else 1
            if n_users * card > _INT64_MAX // self.span:
                raise ValueError(f"interacted index: {n_users} users x {card} values x {self.span} s overflows int64 keys")
            self._value[col] = (raw, card)
        self._keys: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        for _, col, kinds, _ in INTERACTED_SPEC:
            if (col, kinds) in self._keys:
                continue
            keep = np.isin(kind, kinds)
            raw, card = self._value[col]
            group = user[keep] * card + raw[item[keep]]
            self._keys[(col, kinds)] = np.sort(group * self.span + sec[keep])

    def features(self, user_ids: np.ndarray, ts: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """(N,) users, request times, candidate items -> (N, X) float32 log1p(counts); unknown
        users or items get zeros."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        ok = (user_ids >= 0) & (user_ids < self.n_users) & self.items.known(item_ids)
        u, it = np.where(ok, user_ids, 0), np.where(ok, item_ids, 0)
        t = np.floor(np.asarray(ts, dtype=np.float64))
        hi = np.clip(t, 0, self.span - 1).astype(np.int64)  # every event's second is below span - 1
        out = np.zeros((len(u), len(INTERACTED_SPEC)), dtype=np.float32)
        for j, (_, col, kinds, hours) in enumerate(INTERACTED_SPEC):
            keys = self._keys[(col, kinds)]
            raw, card = self._value[col]
            base = (u * card + raw[it]) * self.span
            lo = np.clip(t - round(hours * 3600) + 1, 0, self.span - 1).astype(np.int64)
            count = np.searchsorted(keys, base + hi, side="left") - np.searchsorted(keys, base + lo, side="left")
            out[:, j] = np.where(ok, count, 0)
        return np.log1p(out)


def one_user_features(item: np.ndarray, ts: np.ndarray, kind: np.ndarray, now: float, items: ItemTable,
                      cand_ids: np.ndarray) -> np.ndarray:
    """One user's event log (any kinds, any order; absolute times) -> the interacted features of
    the candidates (M,) raw ids at `now`, (M, X) float32: the counts `EventIndex` gives training
    for that user's log at that time, per request at serving. Its cost follows the log and the
    candidates, never the corpus: per field, the log's events in the window are sorted by the
    matched value and each candidate's value is found by two searchsorted."""
    item = np.asarray(item, dtype=np.int64)
    kind = np.asarray(kind, dtype=np.int64)
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    if len(item) and (item.min() < 0 or item.max() >= items.n):
        raise ValueError(f"event item_id must be in [0, {items.n}), got [{item.min()}, {item.max()}]")
    sec = np.floor(np.asarray(ts, dtype=np.float64)).astype(np.int64)
    t = np.floor(float(now))
    ok = items.known(cand_ids)
    safe = np.where(ok, cand_ids, 0)
    # (N, 5) / (M, 5): id, category, shop, brand, price bucket of each event's and candidate's item
    ev_cols = np.concatenate([item[:, None], items.cols[item]], axis=1)
    cand_cols = np.concatenate([safe[:, None], items.cols[safe]], axis=1)
    masks: dict = {}
    out = np.zeros((len(cand_ids), len(INTERACTED_SPEC)), dtype=np.float32)
    for j, (_, col, kinds, hours) in enumerate(INTERACTED_SPEC):
        if (kinds, hours) not in masks:  # EventIndex's window: whole seconds in (floor(now) - window, floor(now))
            masks[(kinds, hours)] = np.isin(kind, kinds) & (sec > t - round(hours * 3600)) & (sec < t)
        keep = masks[(kinds, hours)]
        if not keep.any():
            continue
        ev = np.sort(ev_cols[keep, col])
        cand = cand_cols[:, col]
        out[:, j] = np.searchsorted(ev, cand, side="right") - np.searchsorted(ev, cand, side="left")
    out[~ok] = 0.0
    return np.log1p(out)
