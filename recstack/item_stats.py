"""Item statistics: how often each item was shown, clicked, bought, viewed, favourited and
carted over the whole days before a day, from the impression log and the full behaviour log.

    stats = ItemStats.build(impression_days, impression_items, event_days, event_items, event_kinds, n_items)
    x = stats.table(day)            # (n_items, len(FIELDS)) float32, what every item had that day
    x = stats.features(days, items)  # (N, len(FIELDS)) float32, per row

Each field is log1p(mean count per day) of one source over the last 1 or 7 whole days before
the day (fewer where a source's log starts later; 0 before it starts). They are a daily batch
feature: a row of day d sees only days < d, never its own day, and the served value is the
table of the day after the bundle's training days (`table(last training day + 1)`), shipped in
the bundle and refreshed by the next day's retrain. So training and serving read the same
numbers for the same day.

Why: an item's own history carries what its id embedding cannot learn from a few clicks, e.g.
its quality (favourites and carts per view, clicks per impression) and its appeal to the users
who see it; on `small` most items have no click in the training days.
"""
from __future__ import annotations

import numpy as np

from recstack.features import EVENT_KINDS

SOURCES = ("impression",) + EVENT_KINDS  # impression, click, purchase, view, favourite, cart
WINDOWS = (("1d", 1), ("7d", 7))  # whole days before the row's day
FIELDS = tuple(f"{src}s_per_day_{name}" for name, _ in WINDOWS for src in SOURCES)


class ItemStats:
    """Per-day per-item counts of each source, cumulated, so that any day's window is one subtraction."""

    def __init__(self, daily: np.ndarray, first_day: int, source_first: np.ndarray):
        """daily (D + 1, len(SOURCES), n_items) counts, row r is day first_day + r - 1 (row 0:
        zeros); source_first (len(SOURCES),) the first day each source's log covers (the
        impression log may start later than the behaviour log's history)."""
        if daily.ndim != 3 or daily.shape[1] != len(SOURCES) or daily.shape[0] < 1:
            raise ValueError(f"daily counts must be (days + 1, {len(SOURCES)}, items), got {daily.shape}")
        self.first_day, self.n_items = int(first_day), daily.shape[2]
        self.last_day = self.first_day + daily.shape[0] - 2
        self.source_first = np.asarray(source_first, np.int64)
        # row r: days first_day .. first_day + r - 1; float32 holds counts below 2^24 exactly
        self._cum = np.cumsum(daily, axis=0, dtype=np.float32)
        self._tables: dict[int, np.ndarray] = {}

    @classmethod
    def build(cls, impression_days: np.ndarray, impression_items: np.ndarray, event_days: np.ndarray,
              event_items: np.ndarray, event_kinds: np.ndarray, n_items: int) -> "ItemStats":
        """The logs' rows: days (any integers, e.g. a simulated history before day 1), item ids
        in [0, n_items), event kinds indexing EVENT_KINDS."""
        imp_d, imp_i = np.asarray(impression_days, np.int64), np.asarray(impression_items, np.int64)
        ev_d, ev_i, ev_k = (np.asarray(a, np.int64) for a in (event_days, event_items, event_kinds))
        for name, i in (("impression", imp_i), ("event", ev_i)):
            if len(i) and (i.min() < 0 or i.max() >= n_items):
                raise ValueError(f"{name} item ids must be in [0, {n_items}), got [{i.min()}, {i.max()}]")
        if len(ev_k) and (ev_k.min() < 0 or ev_k.max() >= len(EVENT_KINDS)):
            raise ValueError(f"event kinds must be in [0, {len(EVENT_KINDS)}), got [{ev_k.min()}, {ev_k.max()}]")
        days = np.concatenate([imp_d, ev_d])
        first, last = (int(days.min()), int(days.max())) if len(days) else (1, 0)
        daily = np.zeros((last - first + 2, len(SOURCES), n_items), np.float32)
        for r in range(1, last - first + 2):  # one bincount per day and source
            daily[r, 0] = np.bincount(imp_i[imp_d == first + r - 1], minlength=n_items)
            on_day = ev_d == first + r - 1
            for k in range(len(EVENT_KINDS)):
                daily[r, k + 1] = np.bincount(ev_i[on_day & (ev_k == k)], minlength=n_items)
        # a source counts from its own log's first day (a day before it is unknown, not zero)
        source_first = np.array([imp_d.min() if len(imp_d) else last + 1]
                                + [ev_d.min() if len(ev_d) else last + 1] * len(EVENT_KINDS), np.int64)
        return cls(daily, first, source_first)

    def _total(self, source: int, lo: int, hi: int) -> np.ndarray:
        """(I,) counts of one source over days lo..hi (within the log)."""
        return self._cum[hi - self.first_day + 1, source] - self._cum[lo - self.first_day, source]

    def table(self, day: int) -> np.ndarray:
        """(n_items, len(FIELDS)) float32: every item's fields on `day`, from whole days before
        it (a day past the log's end sees the log's last days)."""
        day = int(day)
        if day not in self._tables:
            last = min(day - 1, self.last_day)  # the newest whole day before `day` that the log holds
            parts = []
            for _, w in WINDOWS:
                lo = np.maximum(max(day - w, self.first_day), self.source_first)  # (S,) each source's oldest day
                n = last - lo + 1  # (S,) whole days of the window each source's log holds
                out = np.zeros((len(SOURCES), self.n_items), np.float64)
                for s in np.flatnonzero(n > 0):
                    out[s] = self._total(int(s), int(lo[s]), last) / n[s]
                parts.append(np.log1p(out.T).astype(np.float32))
            self._tables[day] = np.ascontiguousarray(np.concatenate(parts, axis=1))
        return self._tables[day]

    def features(self, days: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Rows' days (N,) and item ids (N,) -> (N, len(FIELDS)) float32."""
        days, items = np.asarray(days, np.int64), np.asarray(items, np.int64)
        out = np.empty((len(items), len(FIELDS)), np.float32)
        for d in np.unique(days):
            at = days == d
            out[at] = self.table(int(d))[items[at]]
        return out


def check_table(table: np.ndarray, n_items: int) -> str | None:
    """Why a served table cannot be used (shape, dtype, non-finite or negative values), else None."""
    want = (n_items, len(FIELDS))
    if table.dtype != np.float32 or table.shape != want:
        return f"expected float32 {want}, got {table.dtype} {table.shape}"
    if not np.isfinite(table).all() or (table < 0).any():
        return "holds non-finite or negative values"
    return None
