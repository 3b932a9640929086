"""The online feature store, every implementation (SQLite, Redis, Redis Cluster) through the one interface: durable appends,
newest-N bounded and expired histories, the snapshot seed, sharing across processes, and
StoreUnavailable (then recovery) when Redis goes away."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recstack.serving.store import Events, Snapshot, StoreConfig, StoreUnavailable, open_store
from recstack.serving.store.redis_store import user_key

REPO = Path(__file__).resolve().parents[2]
CONFIG = StoreConfig(max_events=5, ttl_s=1000.0)
SERVERS = {"redis": "redis_server", "redis-cluster": "redis_cluster"}  # conftest fixtures, each a real server


def _events(user, ts, item=None, kind=0, dwell=1.0, rid=()):
    ts = np.asarray(ts, np.float64)
    n = len(ts)
    item = np.arange(n) if item is None else item
    return Events(np.full(n, user), item, np.broadcast_to(kind, n), ts, np.full(n, dwell), request_id=rid)


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_store(str(tmp_path / "fs.sqlite3"), config=CONFIG)
    else:
        s = open_store(request.getfixturevalue(SERVERS[request.param]).url, config=CONFIG)
    yield s
    s.close()


def test_history_is_newest_n_oldest_first_and_expires(store):
    store.append(_events(3, [100, 200, 300, 400, 500, 600, 700, 800], item=np.arange(10, 18)))
    store.append(_events(4, [150], item=[99]))
    h = store.history(3, now=900.0)
    assert h.ts.tolist() == [400, 500, 600, 700, 800] and h.item_id.tolist() == [13, 14, 15, 16, 17]
    assert set(h.user_id.tolist()) == {3}
    # aged at read time: at t=1650 only events of the last 1000 s are left
    assert store.history(3, now=1650.0).ts.tolist() == [700, 800]
    assert store.history(4, now=900.0).item_id.tolist() == [99]
    assert len(store.history(5, now=900.0)) == 0


def test_append_trims_each_user_to_max_events(store, tmp_path):
    for start in range(0, 40, 4):
        store.append(_events(7, np.arange(start, start + 4) + 1000.0))
    assert store.history(7, now=1050.0).ts.tolist() == [1035.0, 1036.0, 1037.0, 1038.0, 1039.0]
    if hasattr(store, "path"):  # the rows themselves are bounded, not only what is read
        import sqlite3

        assert sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM events WHERE user_id = 7").fetchone()[0] == 5
    else:
        assert store.client.zcard(user_key(7)) == 5


def test_equal_times_keep_write_order_and_columns_round_trip(store):
    store.append(Events([1, 1], [5, 6], [2, 4], [100.0, 100.0], [0.0, 12.5], request_id=("r1", "")))
    h = store.history(1, now=100.0)
    assert h.item_id.tolist() == [5, 6] and h.kind.tolist() == [2, 4] and h.dwell.tolist() == [0.0, 12.5]


def test_history_merges_the_snapshot_seed(store):
    snap = Snapshot.from_seconds_ago([0, 2, 2], [10.0, 50.0, 20.0], [7, 8, 9], [0, 1, 0], [3.0, 0.0, 4.0], n_users=3,
                                     time=1000.0)
    store.seed(snap)
    store.append(_events(2, [995.0], item=[42]))
    h = store.history(2, now=1000.0)
    assert h.ts.tolist() == [950.0, 980.0, 995.0] and h.item_id.tolist() == [8, 9, 42]
    assert store.seed_history(2, now=1000.0).item_id.tolist() == [8, 9]
    assert store.history(0, now=1000.0).item_id.tolist() == [7]
    assert len(store.history(99, now=1000.0)) == 0  # a user the snapshot does not know


_WRITER = """
import sys
import numpy as np
from recstack.serving.store import Events, StoreConfig, open_store
s = open_store(sys.argv[1], config=StoreConfig(max_events=5, ttl_s=1000.0))
s.append(Events([11, 11], [1, 2], [0, 1], [500.0, 501.0], [3.0, 0.0]))
s.close()
"""


def test_another_process_reads_what_one_wrote(store, tmp_path):
    spec = str(store.path) if hasattr(store, "path") else store.url
    subprocess.run([sys.executable, "-c", _WRITER, spec], cwd=REPO, check=True, timeout=60,
                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert store.history(11, now=600.0).item_id.tolist() == [1, 2]


def test_a_batch_sent_again_is_written_once(store):
    """The client retries a batch whose acknowledgement it did not get: no event twice, and
    identical events within one batch still kept apart (every store alike)."""
    batch = Events([8, 8, 8, 9], [1, 2, 2, 3], [0, 1, 1, 0], [100.0, 101.0, 101.0, 102.0], [1.5, 0.0, 0.0, 2.0],
                   request_id=("r", "r", "r", ""))
    for _ in range(2):
        store.append(batch)
    assert store.history(8, now=200.0).item_id.tolist() == [1, 2, 2] and store.history(9, now=200.0).item_id.tolist() == [3]
    store.append(_events(8, [103.0], item=[1], kind=0, dwell=1.5))  # same item, a new time: a new event
    assert store.history(8, now=200.0).item_id.tolist() == [1, 2, 2, 1]


@pytest.mark.parametrize("server", sorted(SERVERS))
def test_redis_a_retried_batch_adds_no_member(request, server):
    s = open_store(request.getfixturevalue(SERVERS[server]).url, config=CONFIG)
    batch = Events([8, 8, 8], [1, 2, 2], [0, 1, 1], [100.0, 101.0, 101.0], [1.5, 0.0, 0.0], request_id=("r", "r", "r"))
    for _ in range(2):
        s.append(batch)
    assert s.client.zcard(user_key(8)) == 3
    s.close()


def test_sqlite_file_from_before_retry_ids_is_migrated_in_place(tmp_path):
    """A store file written without the `dup` column keeps every row (duplicates included) and
    from then on takes a retried batch once."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id INTEGER NOT NULL, ts REAL NOT NULL,
                             item_id INTEGER NOT NULL, kind INTEGER NOT NULL, dwell REAL NOT NULL,
                             request_id TEXT NOT NULL DEFAULT '');
        CREATE INDEX events_user_ts ON events (user_id, ts);
        INSERT INTO events (user_id, ts, item_id, kind, dwell, request_id) VALUES
            (4, 10.0, 7, 0, 1.0, ''), (4, 10.0, 7, 0, 1.0, ''), (4, 11.0, 8, 1, 0.0, 'q');""")
    conn.commit()
    conn.close()
    s = open_store(str(path), config=CONFIG)
    assert s.history(4, now=20.0).item_id.tolist() == [7, 7, 8]
    s.append(_events(4, [11.0], item=[8], kind=1, dwell=0.0, rid=("q",)))  # a retry of the third row
    s.append(_events(4, [12.0], item=[9]))
    assert s.history(4, now=20.0).item_id.tolist() == [7, 7, 8, 9]
    s.close()


def test_sqlite_runs_wal_with_full_sync(tmp_path):
    s = open_store("", artifacts_root=tmp_path)
    assert s.path == tmp_path / "feature_store.sqlite3"
    conn = s._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    s.close()


def test_redis_keys_hash_to_one_cluster_slot_per_user():
    assert user_key(12) == "recstack:{u:12}:events"  # the hash tag is the user's part only


def test_redis_outage_is_unavailable_then_recovers(redis_server):
    s = open_store(redis_server.url, config=CONFIG)
    s.append(_events(1, [100.0]))
    redis_server.stop()
    with pytest.raises(StoreUnavailable, match="feature store"):
        s.append(_events(1, [200.0]))
    with pytest.raises(StoreUnavailable):
        s.history(1, now=300.0)
    assert not s.ping()
    redis_server.start()  # same socket and AOF file: what was acknowledged is back
    assert s.ping()
    assert s.history(1, now=300.0).ts.tolist() == [100.0]
    s.append(_events(1, [200.0]))
    assert s.history(1, now=300.0).ts.tolist() == [100.0, 200.0]
    s.close()


@pytest.mark.parametrize("spec, message", [("ftp://x", "unknown scheme"), ("", "no path given")])
def test_bad_store_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        open_store(spec)


def test_store_config_is_checked():
    with pytest.raises(ValueError, match="max_events"):
        StoreConfig(max_events=0)
