"""The impression log and the event log: every Rank response and every accepted event, written
to rolling Parquet files by a background thread, for training to read back
(recstack.data.live_log turns them into a simulated world's tables).

    log = ParquetLog(Path("runs/live"), "impressions", IMPRESSION_SCHEMA)
    log.put(rows)      # a dict of equal-length columns; never blocks: False (and counted) when the queue is full
    log.close()        # drains the queue, closes the open file (SIGTERM's drain calls it)

Files: DIR/<prefix>-<UTC start>-<pid>-<n>.parquet. The open file is `<name>.inprogress` and
is renamed when it rolls (at `roll_rows` rows, `roll_bytes` on disk or `roll_s` seconds) or on close, so a reader
never sees a half-written file. The queue is bounded (`max_queue` batches): when it is full the
batch is dropped and counted (`dropped`), so a slow disk never stalls Rank. A kill -9 loses
the rows of the open file and the queue (at most `roll_s` seconds' worth): the log is for
training, and the feature store, not this log, is what acknowledges an event.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("recstack.serving")

# one row per served item
IMPRESSION_SCHEMA = pa.schema([
    ("request_id", pa.string()), ("ts", pa.float64()), ("user_id", pa.int64()), ("model_version", pa.string()),
    ("worker", pa.int32()), ("position", pa.int32()), ("item_id", pa.int64()), ("score", pa.float64()),
    ("pctr", pa.float64()), ("pcvr", pa.float64()), ("price", pa.float64()), ("coarse_score", pa.float64()),
    ("source", pa.string()), ("cold_start", pa.bool_()), ("degraded_features", pa.bool_()),
])
# one row per accepted LogEvents event
EVENT_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("ts", pa.float64()), ("item_id", pa.int64()), ("kind", pa.int8()),
    ("dwell", pa.float32()), ("request_id", pa.string()),
])


class ParquetLog:
    """Rows to rolling Parquet files, written by one background thread from a bounded queue."""

    def __init__(self, directory: str | Path, prefix: str, schema: pa.Schema, *, max_queue: int = 10_000,
                 roll_rows: int = 200_000, roll_bytes: int = 64 << 20, roll_s: float = 60.0, on_drop=None, on_write=None):
        if max_queue < 1 or roll_rows < 1 or not roll_s > 0:
            raise ValueError("ParquetLog: max_queue and roll_rows must be >= 1 and roll_s > 0")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.schema = prefix, schema
        self.roll_rows, self.roll_bytes, self.roll_s = roll_rows, roll_bytes, roll_s
        self.dropped = 0
        self._on_drop, self._on_write = on_drop, on_write
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._rows = 0
        self._opened = 0.0
        self._n = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"recstack-{prefix}-log", daemon=True)
        self._thread.start()

    def put(self, columns: dict) -> bool:
        """Queue one batch of rows (columns of equal length); False, counted in `dropped`, when full."""
        if self._closed.is_set():
            return False
        try:
            self._queue.put_nowait(columns)
            return True
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return False

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, close the open file (renamed into place); idempotent."""
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)  # wakes the writer; it drains everything before this
            self._thread.join(timeout)

    def files(self) -> list[Path]:
        """The finished files, oldest first."""
        return sorted(self.dir.glob(f"{self.prefix}-*.parquet"))

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        pending: list[dict] = []  # batches not yet in a row group
        n_pending = 0
        while True:
            try:
                item = self._queue.get(timeout=min(1.0, self.roll_s))
            except queue.Empty:
                item = ...
            try:
                if isinstance(item, dict):
                    pending.append(item)
                    n_pending += len(next(iter(item.values()), ()))
                # a row group when the file is full, the queue is idle, or at close; then maybe a roll
                if pending and (item is None or item is ... or self._rows + n_pending >= self.roll_rows):
                    self._write(pending)
                    pending, n_pending = [], 0
                if self._writer is not None and (item is None or self._rows >= self.roll_rows or self._full()
                                                 or time.monotonic() - self._opened >= self.roll_s):
                    self._roll()
            except Exception:  # noqa: BLE001 - a full disk must not kill the thread; the rows are counted lost
                log.exception("%s log: write failed; dropping %d batches", self.prefix, len(pending))
                self.dropped += len(pending)
                pending, n_pending = [], 0
            if item is None:
                return

    def _write(self, batch: list[dict]) -> None:
        table = pa.Table.from_batches([pa.RecordBatch.from_pydict(b, schema=self.schema) for b in batch], self.schema)
        if self._writer is None:
            self._n += 1
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self._path = self.dir / f"{self.prefix}-{stamp}-{os.getpid()}-{self._n:05d}.parquet"
            self._writer = pq.ParquetWriter(str(self._path) + ".inprogress", self.schema)
            self._rows, self._opened = 0, time.monotonic()
        self._writer.write_table(table)
        self._rows += table.num_rows
        if self._on_write is not None:
            self._on_write(table.num_rows)

    def _full(self) -> bool:
        """The open file has reached `roll_bytes` on disk (its written row groups)."""
        return os.path.getsize(str(self._path) + ".inprogress") >= self.roll_bytes

    def _roll(self) -> None:
        self._writer.close()
        os.replace(str(self._path) + ".inprogress", self._path)
        self._writer, self._path = None, None
