"""The embedded feature store: one SQLite file shared by every worker process.

Durability: WAL journal with `synchronous=FULL`, so a commit returns only after its WAL frames
are fsynced; an acknowledged append survives the server's crash (kill -9) and the machine's
power loss. (`NORMAL` would fsync only at checkpoints: safe against a process crash, but the
last commits could be lost with the machine.) WAL lets every worker read while one writes; a
writer waits up to `timeout_s` for the lock (busy timeout) and then fails as StoreUnavailable.

Retries: a row's content (user, time, item, kind, dwell, request id) and `dup`, which counts
identical events within one batch, are unique, and rows are inserted with OR IGNORE: a client
that sends a batch again because it lost the acknowledgement writes nothing twice (an event
identical in every field to one of an earlier batch is taken for its retry), as the Redis
stores do.

Bounding: every append trims the users it touched to their newest `max_events` rows and
deletes their expired ones, so a user's rows stay bounded without a background job.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import numpy as np

from recstack.serving.store.base import Events, FeatureStore, StoreConfig, StoreUnavailable

_TABLE = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- write order: on equal times the later row is the newer
    user_id INTEGER NOT NULL,
    ts REAL NOT NULL,
    item_id INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    dwell REAL NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    dup INTEGER NOT NULL DEFAULT 0  -- k-th identical event of its batch: a retried batch maps onto the same rows
)"""
_BY_TIME = "CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts)"
_CONTENT = "user_id, ts, item_id, kind, dwell, request_id"
_UNIQUE = f"CREATE UNIQUE INDEX IF NOT EXISTS events_content ON events ({_CONTENT}, dup)"
# A file written before `dup` existed: add it, numbering identical rows in write order, so the
# unique index can be built over the rows already there.
_MIGRATE = [
    "ALTER TABLE events ADD COLUMN dup INTEGER NOT NULL DEFAULT 0",
    f"UPDATE events SET dup = r.k FROM (SELECT seq, ROW_NUMBER() OVER (PARTITION BY {_CONTENT} ORDER BY seq) - 1 AS k "
    "FROM events) AS r WHERE events.seq = r.seq AND r.k > 0",
]


class SQLiteStore(FeatureStore):
    """SQLite (WAL, synchronous=FULL) at `path`; one connection per thread."""

    def __init__(self, path: str | Path, config: StoreConfig | None = None):
        super().__init__(config)
        self.path = Path(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._conn()
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreUnavailable(f"feature store {self.path}: cannot use WAL journaling (got {mode!r})")
            conn.execute("BEGIN IMMEDIATE")  # one worker creates or migrates; the others then see it done
            try:
                conn.execute(_TABLE)
                if "dup" not in {row[1] for row in conn.execute("PRAGMA table_info(events)")}:
                    for stmt in _MIGRATE:
                        conn.execute(stmt)
                conn.execute(_BY_TIME)
                conn.execute(_UNIQUE)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreUnavailable(f"feature store {self.path}: {e}") from e

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(str(self.path), timeout=self.config.timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={int(self.config.timeout_s * 1000)}")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._conns.append(conn)
        return conn

    def _append(self, events: Events) -> None:
        rows, seen = [], {}
        for row in zip(events.user_id.tolist(), events.ts.tolist(), events.item_id.tolist(), events.kind.tolist(),
                       events.dwell.tolist(), events.request_id):
            seen[row] = seen.get(row, -1) + 1
            rows.append((*row, seen[row]))
        users = sorted(set(events.user_id.tolist()))
        horizon = float(events.ts.max()) - self.config.ttl_s
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(f"INSERT OR IGNORE INTO events ({_CONTENT}, dup) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                for u in users:  # bound each touched user: expired rows, then all but the newest max_events
                    conn.execute("DELETE FROM events WHERE user_id = ? AND ts < ?", (u, horizon))
                    conn.execute(
                        "DELETE FROM events WHERE user_id = ? AND seq NOT IN "
                        "(SELECT seq FROM events WHERE user_id = ? ORDER BY ts DESC, seq DESC LIMIT ?)",
                        (u, u, self.config.max_events))
                conn.execute("COMMIT")  # returns once the WAL is fsynced (synchronous=FULL)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreUnavailable(f"feature store {self.path}: append failed: {e}") from e

    def _recent(self, user_id: int, since: float) -> Events:
        try:
            rows = self._conn().execute(
                "SELECT item_id, kind, ts, dwell FROM events WHERE user_id = ? AND ts >= ? "
                "ORDER BY ts DESC, seq DESC LIMIT ?", (user_id, since, self.config.max_events)).fetchall()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"feature store {self.path}: read failed: {e}") from e
        rows.reverse()  # oldest first, write order kept on equal times
        if not rows:
            return Events.empty()
        item, kind, ts, dwell = (np.array(c) for c in zip(*rows))
        return Events(np.full(len(rows), user_id), item, kind, ts, dwell)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
