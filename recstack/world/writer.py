"""Writing a day's impressions as they are generated, in either layout of recstack/world/schema.py."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recstack.world.schema import DAY_FILE, SHARD_FILE

IMPRESSION_ORDER = ("day", "ts", "user_id", "session_id", "position", "item_id", "click", "purchase", "purchase_observed",
                    "dwell", "comments", "chatted", "cart", "true_pctr", "true_pcvr")
# the types numpy's arrays had when each day was written in one piece; fixed, so that every
# shard (an empty one too) has the same schema
IMPRESSION_ARROW_SCHEMA = pa.schema([
    ("day", pa.int16()), ("ts", pa.float64()), ("user_id", pa.int64()), ("session_id", pa.int64()),
    ("position", pa.int64()), ("item_id", pa.int64()), ("click", pa.bool_()), ("purchase", pa.bool_()),
    ("purchase_observed", pa.bool_()), ("dwell", pa.float32()), ("comments", pa.int16()), ("chatted", pa.int16()),
    ("cart", pa.int16()), ("true_pctr", pa.float32()), ("true_pcvr", pa.float32()),
])


class _ImpressionWriter:
    """Writes one day's impressions as they are generated, chunk by chunk: to
    impressions/day=DD.parquet (shard_rows None), or to impressions/day=DD/part-NNNNN.parquet
    files of exactly shard_rows rows each (the day's last one fewer). Peak memory is one chunk
    plus the Parquet writer's buffers, whatever the size of the day."""

    def __init__(self, out: Path, day: int, shard_rows: int | None):
        self.out, self.day, self.shard_rows = out, day, shard_rows
        self.rows: list[int] = []  # rows of each file written, in part order
        self._writer: pq.ParquetWriter | None = None

    def _open(self) -> None:
        name = DAY_FILE if self.shard_rows is None else SHARD_FILE
        path = self.out / name.format(day=self.day, part=len(self.rows))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(path, IMPRESSION_ARROW_SCHEMA, compression="zstd")
        self.rows.append(0)

    def write(self, imps: dict) -> None:
        table = pa.table({k: imps[k] for k in IMPRESSION_ORDER}, schema=IMPRESSION_ARROW_SCHEMA)
        while table.num_rows:
            if self._writer is None:
                self._open()
            room = table.num_rows if self.shard_rows is None else self.shard_rows - self.rows[-1]
            part = table.slice(0, room)
            self._writer.write_table(part)
            self.rows[-1] += part.num_rows
            table = table.slice(part.num_rows)
            if self.shard_rows is not None and self.rows[-1] == self.shard_rows:
                self._writer.close()
                self._writer = None

    def close(self) -> list[int]:
        if not self.rows:  # a day without impressions still has its (empty) file
            self._open()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.rows


def _clear_impressions(out: Path) -> None:
    """Remove the impression files of an earlier run in `out` (either layout), so a day is
    never found in both layouts or with stale extra shards."""
    imp = out / "impressions"
    if not imp.is_dir():
        return
    for f in imp.glob("day=*.parquet"):
        f.unlink()
    for d in imp.glob("day=*"):
        if d.is_dir():
            for f in d.glob("part-*.parquet"):
                f.unlink()
            if not any(d.iterdir()):
                d.rmdir()
