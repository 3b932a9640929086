"""The online feature store's one interface, its event batches, and the bundle snapshot it is seeded from.

    store = open_store("sqlite:/srv/recstack/feature_store.sqlite3")   # or "redis://host:6379/0"
    store.seed(cascade.snapshot)             # the bundle's behaviours, as absolute times
    store.append(events)                     # durable before it returns (else StoreUnavailable)
    store.history(user_id, now)              # snapshot + live events, newest `max_events`, none older than `ttl_s`

Times are absolute (seconds since the epoch): an event is aged when a request reads it, never
when it is written, so a feature such as "hours since the click" grows while the server runs.
The snapshot is held in memory (it comes with the bundle, identical in every worker);
`seed_history` answers from it alone, with no I/O, when the live store is unavailable.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


class StoreUnavailable(RuntimeError):
    """The live store cannot be read or written now (down, unreachable, locked beyond its timeout)."""


@dataclass(frozen=True)
class StoreConfig:
    """Bounds of what a user's history keeps and how long a store call may wait."""

    max_events: int = 500  # newest events kept per user (the sequence uses the last 50 clicks / purchases)
    ttl_s: float = 30 * 86400.0  # events older than this are expired (never read, trimmed on write)
    timeout_s: float = 0.5  # one store call's bound: a slow store degrades Rank rather than stalling it

    def __post_init__(self):
        if self.max_events < 1:
            raise ValueError(f"StoreConfig.max_events: must be >= 1, got {self.max_events}")
        if not self.ttl_s > 0:
            raise ValueError(f"StoreConfig.ttl_s: must be > 0, got {self.ttl_s}")
        if not self.timeout_s > 0:
            raise ValueError(f"StoreConfig.timeout_s: must be > 0, got {self.timeout_s}")


def _col(values, dtype) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1)


@dataclass(frozen=True)
class Events:
    """A batch of behaviour events, columns (N,): user_id, item_id int64, kind int8 (features.EVENT_KINDS),
    ts float64 (seconds since the epoch), dwell float32 seconds, request_id ("" = none)."""

    user_id: np.ndarray
    item_id: np.ndarray
    kind: np.ndarray
    ts: np.ndarray
    dwell: np.ndarray
    request_id: tuple[str, ...] = field(default=())

    def __post_init__(self):
        for name, dtype in (("user_id", np.int64), ("item_id", np.int64), ("kind", np.int8), ("ts", np.float64),
                            ("dwell", np.float32)):
            object.__setattr__(self, name, _col(getattr(self, name), dtype))
        n = len(self.user_id)
        if not all(len(getattr(self, c)) == n for c in ("item_id", "kind", "ts", "dwell")):
            raise ValueError("Events: columns of different lengths")
        rid = tuple(self.request_id) if self.request_id else ("",) * n
        if len(rid) != n:
            raise ValueError("Events: request_id has a different length from the other columns")
        object.__setattr__(self, "request_id", rid)

    def __len__(self) -> int:
        return len(self.user_id)

    @classmethod
    def empty(cls) -> "Events":
        return cls(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))

    @classmethod
    def concat(cls, parts: list["Events"]) -> "Events":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, c) for p in parts]) for c in ("user_id", "item_id", "kind", "ts", "dwell")),
                   request_id=tuple(r for p in parts for r in p.request_id))

    def take(self, rows: np.ndarray) -> "Events":
        return Events(self.user_id[rows], self.item_id[rows], self.kind[rows], self.ts[rows], self.dwell[rows],
                      request_id=tuple(self.request_id[i] for i in np.asarray(rows, np.int64)))


def newest(events: Events, now: float, config: StoreConfig) -> Events:
    """One user's events -> those not expired at `now`, the newest `max_events`, oldest first
    (on equal times the input order is kept: the later row is the newer)."""
    keep = np.flatnonzero(events.ts >= now - config.ttl_s)
    order = keep[np.argsort(events.ts[keep], kind="stable")]
    return events.take(order[-config.max_events:])


class Snapshot:
    """The bundle's feature-store snapshot with absolute times: user u's events are rows
    start[u]:start[u + 1] (any order). Read-only, shared by every request of a process."""

    def __init__(self, user: np.ndarray, ts: np.ndarray, item: np.ndarray, kind: np.ndarray, dwell: np.ndarray,
                 n_users: int, time: float):
        order = np.argsort(np.asarray(user, np.int64), kind="stable")
        self.user = np.asarray(user, np.int64)[order]
        self.ts = np.asarray(ts, np.float64)[order]
        self.item = np.asarray(item, np.int64)[order]
        self.kind = np.asarray(kind, np.int8)[order]
        self.dwell = np.asarray(dwell, np.float32)[order]
        self.start = np.searchsorted(self.user, np.arange(n_users + 1)).astype(np.int64)  # (U+1,)
        self.n_users = n_users
        self.time = float(time)  # when it was taken (seconds since the epoch)

    @classmethod
    def from_seconds_ago(cls, user, seconds_ago, item, kind, dwell, n_users: int, time: float) -> "Snapshot":
        """A snapshot stored as `seconds_ago` relative to `time` -> absolute times `time - seconds_ago`."""
        return cls(user, float(time) - np.asarray(seconds_ago, np.float64), item, kind, dwell, n_users, time)

    def events(self, user_id: int) -> Events:
        if not 0 <= user_id < self.n_users:
            return Events.empty()
        s, e = self.start[user_id], self.start[user_id + 1]
        return Events(self.user[s:e], self.item[s:e], self.kind[s:e], self.ts[s:e], self.dwell[s:e])


class FeatureStore:
    """The one interface: `append` (durable, all-or-nothing), `history` (snapshot + live, bounded).

    Subclasses implement `_append` and `_recent` (a user's live events, newest `max_events`
    not older than `since`) and raise StoreUnavailable when the backing store fails. Safe to
    share between threads; each implementation is also safe across worker processes."""

    def __init__(self, config: StoreConfig | None = None):
        self.config = config or StoreConfig()
        self._seed: Snapshot | None = None
        self._seed_lock = threading.Lock()

    # -- the interface ------------------------------------------------------------------------

    def seed(self, snapshot: Snapshot | None) -> None:
        """Serve `snapshot` (a loaded bundle's) under the live events from now on (an atomic swap)."""
        with self._seed_lock:
            self._seed = snapshot

    def append(self, events: Events) -> None:
        """Write the batch, all of it or none; returns once it is durable. StoreUnavailable otherwise."""
        if len(events):
            self._append(events)

    def history(self, user_id: int, now: float) -> Events:
        """The user's snapshot and live events, newest `max_events` not expired at `now`, oldest first.
        StoreUnavailable when the live part cannot be read (then `seed_history` still answers)."""
        live = self._recent(int(user_id), float(now) - self.config.ttl_s)
        return newest(Events.concat([self._seed_events(user_id), live]), now, self.config)

    def seed_history(self, user_id: int, now: float) -> Events:
        """The snapshot's part of `history` alone (no I/O): what serving falls back on."""
        return newest(self._seed_events(user_id), now, self.config)

    def ping(self) -> bool:
        """Whether the live store answers now."""
        try:
            self._recent(-1, 0.0)
        except StoreUnavailable:
            return False
        return True

    def close(self) -> None:
        """Release connections (idempotent)."""

    # -- implementations ------------------------------------------------------------------------

    def _seed_events(self, user_id: int) -> Events:
        seed = self._seed
        return seed.events(int(user_id)) if seed is not None else Events.empty()

    def _append(self, events: Events) -> None:
        raise NotImplementedError

    def _recent(self, user_id: int, since: float) -> Events:
        raise NotImplementedError
