"""The rolling Parquet logs: rows land in finished files (rolled by rows, flushed on close), a
full queue drops and counts without blocking the caller."""
from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq

from recstack.serving.impressions import EVENT_SCHEMA, ParquetLog


def _rows(n, start=0):
    return {"user_id": list(range(start, start + n)), "ts": [1.0] * n, "item_id": [7] * n, "kind": [0] * n,
            "dwell": [2.5] * n, "request_id": ["r"] * n}


def test_rows_roll_into_finished_files_and_close_flushes(tmp_path):
    log = ParquetLog(tmp_path, "events", EVENT_SCHEMA, roll_rows=5, roll_s=3600)
    for i in range(4):
        assert log.put(_rows(3, start=3 * i))
    log.close()
    files = log.files()
    assert len(files) >= 2 and not list(tmp_path.glob("*.inprogress"))  # rolled at least once; nothing left open
    users = sorted(u for f in files for u in pq.read_table(f).column("user_id").to_pylist())
    assert users == list(range(12))
    assert not log.put(_rows(1))  # closed: refused, not queued forever


def test_files_roll_by_size_on_disk(tmp_path):
    log = ParquetLog(tmp_path, "events", EVENT_SCHEMA, roll_bytes=1, roll_s=3600)  # any row group fills a file
    for i in range(2):
        assert log.put(_rows(2, start=2 * i))
        deadline = time.monotonic() + 30
        while len(log.files()) < i + 1:  # the writer finishes the file once the row group is on disk
            assert time.monotonic() < deadline, "the file did not roll at its size"
            time.sleep(0.05)
    log.close()
    assert [pq.read_metadata(f).num_rows for f in log.files()] == [2, 2]


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path):
    drops = []
    log = ParquetLog(tmp_path, "events", EVENT_SCHEMA, max_queue=1, roll_s=3600, on_drop=lambda: drops.append(1))
    entered, release = threading.Event(), threading.Event()
    real_write = log._write

    def held_write(batch):
        entered.set()
        release.wait(30)
        real_write(batch)

    log._write = held_write
    assert log.put(_rows(1, 0))
    assert entered.wait(30)  # the writer holds batch 0: the queue is empty again
    assert log.put(_rows(1, 1))  # fills the queue (max 1)
    assert not log.put(_rows(1, 2))  # full: dropped at once
    assert log.dropped == 1 and drops == [1]
    release.set()
    log.close()
    users = sorted(u for f in log.files() for u in pq.read_table(f).column("user_id").to_pylist())
    assert users == [0, 1]
