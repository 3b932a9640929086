"""Stream a world's impressions shard by shard: training without loading every day, on one
process or on `world_size` DDP ranks, resumable from a checkpointed cursor.

An epoch is one pass over the shards (Parquet files) of `days`: the shards in a seeded order,
each shard's rows in a seeded order, concatenated. Rank r takes the r-th of `world_size` equal,
contiguous slices of that sequence, so the ranks' rows are disjoint and every rank gets the
same number of rows, chunks and batches (DDP steps stay in lock-step). The remainder, fewer
than `world_size` rows, is dropped: the epoch's last rows, which the next epoch's order
puts elsewhere. The slice is cut into chunks of `chunk_rows` rows (the last one shorter),
each yielded as `recstack.data.Examples` in a seeded random order, with the `Cursor` at
which it starts. The cursor is the same on every rank (the ranks move in lock-step), so the
checkpoint rank 0 writes resumes every rank. Memory: the shard being read (and its
shuffled copy) plus one chunk.

A training loop (one process or torchrun). A checkpoint stores the chunk's cursor and the
batches of that chunk already done; plain ints, so torch.load(..., weights_only=True) reads it:

    from recstack.data import load, to_torch
    from recstack.data.shards import Cursor, ShardStream

    data = load("data/large")
    st = ShardStream(data, data.train_days, chunk_rows=65_536, seed=cfg.seed,
                     rank=rank, world_size=world_size)       # clicked_only / sessions: see below
    resume, skip, step = None, 0, 0
    if ckpt is not None:
        resume, skip, step = Cursor.from_dict(ckpt["cursor"]), ckpt["chunk_batches_done"], ckpt["step"]
    for epoch in range(resume.epoch if resume else 0, cfg.epochs):
        start = resume if resume is not None and resume.epoch == epoch else None
        for cursor, ex in st.epoch(epoch, start=start):
            for k, batch in enumerate(ex.iterate(cfg.batch_size)):  # rows already shuffled
                if k < skip:
                    continue                                        # done before the checkpoint
                train_step(to_torch(batch))
                step += 1
                if step % cfg.checkpoint_every == 0 and rank == 0:
                    save({..., "step": step, "cursor": cursor.to_dict(), "chunk_batches_done": k + 1})
            skip = 0

A resumed run reads the checkpoint's chunk again (same rows, same order) and skips the
batches it had done, so it goes on exactly where the interrupted one stopped (the cursor
must come from the same stream: same days, files, seed, chunk_rows and world_size).
`st.batches_per_epoch(batch_size)` is every rank's step count per epoch, for a schedule.
`train_chunks(st, epochs, resume)` is that loop's chunk iteration (with `position(cursor, k)`
the snapshot's stream position), as the trainers use it with `stream_chunk_rows > 0`;
`st.scan(columns)` reads a few columns of every streamed row, shard by shard, for global
statistics (label means, click counts).
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Iterator

import numpy as np

from recstack.data import IMPRESSION_COLUMNS, DataError, Examples, Shard, SimData, read_shard
from recstack.data.contract import IMPRESSIONS, default_sources, fill_defaults

_ORDER, _ROWS, _CHUNK = 0, 1, 2  # SeedSequence tags: never let two uses of a seed share a stream


@dataclass(frozen=True)
class Cursor:
    """Where a chunk starts: the `epoch` and the `rows` each rank has been given before it in
    that epoch (a multiple of chunk_rows; the same on every rank). `stream` fingerprints the
    stream that made it (its files, row counts and arguments but the rank), so that a cursor
    is only accepted by the same stream. Plain ints, for checkpoints; `ShardStream.position`
    says where in the shards a rank's chunk starts."""

    epoch: int
    rows: int
    stream: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Cursor":
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or set(d) != set(names):
            raise DataError(f"cursor: expected a dict with keys {', '.join(names)}, got {d!r}")
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise DataError(f"cursor.{k}: expected an int >= 0, got {v!r}")
        return cls(**{k: int(v) for k, v in d.items()})


class ShardStream:
    """The shards of `days`, checked once (see SimData.impression_shards), streamed per epoch.

    clicked_only keeps the clicked impressions (retrieval's positives, the CVR population):
    the click column of every shard is read once here to count them, so that the ranks'
    shares stay equal. sessions=True shuffles whole sessions instead of rows, so that a
    session's impressions stay together (the coarse ranker's request batches) except where
    a shard, rank or chunk boundary cuts one. shuffle=False streams shards and rows in file
    order (evaluation)."""

    def __init__(self, data: SimData, days: list[int] | int, *, chunk_rows: int, seed: int, rank: int = 0,
                 world_size: int = 1, clicked_only: bool = False, sessions: bool = False, shuffle: bool = True,
                 item_stats: bool = False):
        for name, value, low in (("chunk_rows", chunk_rows, 1), ("seed", seed, 0), ("rank", rank, 0), ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        if rank >= world_size:
            raise ValueError(f"rank {rank} is not below world_size {world_size}")
        self.data, self.chunk_rows, self.seed = data, int(chunk_rows), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.clicked_only, self.sessions, self.shuffle = clicked_only, sessions, shuffle
        self.item_stats = item_stats  # the chunks' Examples append the item statistics to item_dense
        self.shards: list[Shard] = data.impression_shards(days)
        self.sizes = np.array([self._count(s) for s in self.shards], dtype=np.int64)  # rows streamed per shard
        self.total_rows = int(self.sizes.sum())
        self.rows_per_rank = self.total_rows // self.world_size
        self.dropped_rows = self.total_rows - self.rows_per_rank * self.world_size
        self.chunks_per_epoch = math.ceil(self.rows_per_rank / self.chunk_rows)
        ident = [self.seed, self.chunk_rows, self.world_size, clicked_only, sessions, shuffle,
                 [[s.day, s.path.relative_to(data.root).as_posix(), s.rows] for s in self.shards]]
        self.fingerprint = zlib.crc32(json.dumps(ident).encode())

    def _count(self, shard: Shard) -> int:
        if not self.clicked_only:
            return shard.rows
        import pyarrow.parquet as pq

        try:
            click = pq.read_table(shard.path, columns=["click"]).column("click").to_numpy()
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{shard.path}: cannot read impressions: {e}") from e
        return int(click.sum())

    def batches_per_epoch(self, batch_size: int, min_rows: int = 1) -> int:
        """Batches of `ex.iterate(batch_size)` over one epoch's chunks (the same on every rank);
        with min_rows, only those of at least that many rows (a training loop that skips a
        1-row batch, which BatchNorm cannot normalise, counts its steps with min_rows=2)."""
        def per_chunk(rows: int) -> int:
            n = math.ceil(rows / batch_size)
            return n - (n > 0 and rows - (n - 1) * batch_size < min_rows)

        full, last = divmod(self.rows_per_rank, self.chunk_rows)
        return full * per_chunk(self.chunk_rows) + per_chunk(last)

    def scan(self, columns: list[str] | tuple[str, ...]) -> Iterator[dict[str, np.ndarray]]:
        """The streamed rows' `columns` (impression columns), shard by shard in file order, all
        of them whatever the rank (clicked_only applies): for global statistics (label means,
        counts) in one pass that reads only those columns. Memory: one shard's columns."""
        import pyarrow.parquet as pq

        wanted = list(dict.fromkeys(list(columns) + (["click"] if self.clicked_only else [])))
        unknown = [c for c in wanted if c not in IMPRESSION_COLUMNS]
        if unknown:
            raise DataError(f"scan: {unknown} are not impression columns ({', '.join(IMPRESSION_COLUMNS)})")
        for s, size in zip(self.shards, self.sizes):
            try:
                present = set(pq.read_schema(s.path).names)
                read = list(dict.fromkeys(wanted + default_sources(IMPRESSIONS, [c for c in wanted if c not in present])))
                table = pq.read_table(s.path, columns=[c for c in read if c in present])
            except Exception as e:  # noqa: BLE001
                raise DataError(f"{s.path}: cannot read impressions: {e}") from e
            # absent optional columns get the contract's defaults (docs/DATA.md)
            cols = fill_defaults(IMPRESSIONS, {c: table.column(c).to_numpy() for c in table.column_names}, table.num_rows,
                                 only=wanted)
            cols = {c: cols[c] for c in wanted}
            if self.clicked_only:
                keep = np.flatnonzero(cols["click"])
                cols = {c: v[keep] for c, v in cols.items()}
            if len(cols[wanted[0]]) != size:
                raise DataError(f"{s.path}: {len(cols[wanted[0]])} rows to stream, counted {size} when the stream was "
                                f"built (the file changed?)")
            yield {c: cols[c] for c in columns}

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's shard order: indices into self.shards."""
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch, _ORDER]).permutation(len(self.shards))

    def _load(self, index: int, epoch: int) -> dict[str, np.ndarray]:
        cols = read_shard(self.shards[index])
        keep = np.flatnonzero(cols["click"]) if self.clicked_only else np.arange(self.shards[index].rows)
        if len(keep) != self.sizes[index]:
            raise DataError(f"{self.shards[index].path}: {len(keep)} rows to stream, counted {self.sizes[index]} when the stream "
                            f"was built (the file changed?)")
        if self.shuffle:
            keep = keep[self._permutation(cols["session_id"][keep], [self.seed, epoch, _ROWS, index])]
        return {k: cols[k][keep] for k in IMPRESSION_COLUMNS}

    def _permutation(self, session_id: np.ndarray, seed: list[int]) -> np.ndarray:
        """A seeded order of the rows, or (sessions) of the runs of equal session_id, each run's rows kept in order."""
        rng = np.random.default_rng(seed)
        if not self.sessions:
            return rng.permutation(len(session_id))
        group = np.cumsum(np.r_[True, session_id[1:] != session_id[:-1]]) - 1 if len(session_id) else session_id
        rank = rng.permutation(int(group[-1]) + 1 if len(group) else 0)
        return np.argsort(rank[group], kind="stable")

    def position(self, cursor: Cursor) -> tuple[int, int]:
        """Where this rank's chunk at `cursor` starts: (position in the epoch's shard order,
        row offset within that shard's streamed rows)."""
        bounds = np.concatenate([[0], np.cumsum(self.sizes[self.order(cursor.epoch)])])
        return self._locate(bounds, self.rank * self.rows_per_rank + cursor.rows)

    def _locate(self, bounds: np.ndarray, row: int) -> tuple[int, int]:
        """A row of the epoch's sequence -> (position in the shard order, offset in that shard)."""
        j = int(np.searchsorted(bounds, row, side="right")) - 1  # skips empty shards
        return j, row - int(bounds[j])

    def epoch(self, epoch: int, start: Cursor | None = None) -> Iterator[tuple[Cursor, Examples]]:
        """This rank's chunks of `epoch`, from `start` (a cursor this stream yielded) or the beginning."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        order = self.order(int(epoch))
        sizes = self.sizes[order]
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        first = self.rank * self.rows_per_rank  # this rank's slice of the epoch's sequence
        rows = 0
        if start is not None:
            rows = self._check_start(start, int(epoch))
        loaded: tuple[int, dict] | None = None
        while rows < self.rows_per_rank:
            n = min(self.chunk_rows, self.rows_per_rank - rows)
            j, off = self._locate(bounds, first + rows)
            cursor = Cursor(int(epoch), rows, self.fingerprint)
            pieces, need = [], n
            while need:
                take = min(need, int(sizes[j]) - off)
                if take > 0:
                    if loaded is None or loaded[0] != j:
                        loaded = None  # free the previous shard before reading the next
                        loaded = (j, self._load(int(order[j]), int(epoch)))
                    pieces.append({k: v[off : off + take] for k, v in loaded[1].items()})
                    need -= take
                j, off = j + 1, 0
            imps = {k: np.concatenate([p[k] for p in pieces]) for k in IMPRESSION_COLUMNS}
            if self.shuffle:  # mixes the pieces of a chunk that spans shards
                perm = self._permutation(imps["session_id"], [self.seed, int(epoch), _CHUNK, rows // self.chunk_rows])
                imps = {k: v[perm] for k, v in imps.items()}
            del pieces
            yield cursor, Examples(self.data, imps, self.item_stats)
            rows += n

    def _check_start(self, start: Cursor, epoch: int) -> int:
        if not isinstance(start, Cursor):
            raise DataError(f"start: expected a Cursor, got {type(start).__name__} (use Cursor.from_dict)")
        if start.stream != self.fingerprint:
            raise DataError(f"cursor was saved by another stream (fingerprint {start.stream}, this one {self.fingerprint}): "
                            f"the days, their files or row counts, seed, chunk_rows, world_size, clicked_only, "
                            f"sessions or shuffle differ")
        if start.epoch != epoch:
            raise DataError(f"cursor is for epoch {start.epoch}, not {epoch}")
        if start.rows % self.chunk_rows or not 0 <= start.rows < self.rows_per_rank:
            raise DataError(f"cursor.rows {start.rows} is not a chunk start of this stream (chunk_rows {self.chunk_rows}, "
                            f"{self.rows_per_rank} rows per rank)")
        return start.rows


def stream(data: SimData, days: list[int] | int, *, chunk_rows: int, seed: int, epoch: int, rank: int = 0,
           world_size: int = 1, start: Cursor | None = None, clicked_only: bool = False, sessions: bool = False,
           shuffle: bool = True) -> Iterator[tuple[Cursor, Examples]]:
    """One epoch of ShardStream(data, days, ...) from `start`: (cursor, Examples) per chunk."""
    return ShardStream(data, days, chunk_rows=chunk_rows, seed=seed, rank=rank, world_size=world_size,
                       clicked_only=clicked_only, sessions=sessions, shuffle=shuffle).epoch(epoch, start)


def train_chunks(st: ShardStream, epochs: int | None, resume: dict | None = None
                 ) -> Iterator[tuple[int, Cursor, Examples, int]]:
    """The chunks a resumable training loop consumes, epoch after epoch: (epoch, cursor,
    chunk, batches of the chunk to skip). `resume` is a `position(...)` dict a snapshot
    stored: the stream restarts at its chunk and the first `chunk_batches_done` batches are
    skipped (0 for every later chunk). `epochs`: stop after that many epochs (None: never;
    the caller stops at its step count)."""
    epoch, start, skip = 0, None, 0
    if resume is not None:
        if not isinstance(resume, dict) or set(resume) != {"cursor", "chunk_batches_done"}:
            raise DataError(f"stream position: expected a dict with keys cursor, chunk_batches_done, got {resume!r}")
        start, skip = Cursor.from_dict(resume["cursor"]), resume["chunk_batches_done"]
        if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 0:
            raise DataError(f"stream position: chunk_batches_done must be an int >= 0, got {skip!r}")
        epoch = start.epoch
    while epochs is None or epoch < epochs:
        for cursor, ex in st.epoch(epoch, start=start):
            yield epoch, cursor, ex, int(skip)
            skip = 0
        start = None
        epoch += 1


def position(cursor: Cursor, chunk_batches_done: int) -> dict[str, object]:
    """A snapshot's stream position (plain ints: torch.load(..., weights_only=True) reads it)."""
    return {"cursor": cursor.to_dict(), "chunk_batches_done": int(chunk_batches_done)}
