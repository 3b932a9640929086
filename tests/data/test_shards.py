"""Sharded impressions (simulate(..., shard_rows=N)) and the streaming reader (recstack.data.shards)."""
from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recstack import data as D
from recstack.config import apply_overrides
from recstack.data.shards import Cursor, ShardStream, stream
from recstack.world import preset, simulate

sim_mod = importlib.import_module("recstack.world.simulate")  # the module (the package exports the function)

SHARD_ROWS = 700  # not a multiple of a chunk's rows: shards and chunks cut each other


def _key(imps: dict) -> np.ndarray:
    """A unique id per impression row."""
    return imps["session_id"] * 1000 + imps["position"]


def _day_table(root: Path, day: int) -> pa.Table:
    one = root / f"impressions/day={day:02d}.parquet"
    if one.exists():
        return pq.read_table(one)
    return pa.concat_tables([pq.read_table(p) for p in sorted((root / f"impressions/day={day:02d}").glob("part-*.parquet"))])


def _assert_same_world(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.parquet"))
    assert names == sorted(p.name for p in b.glob("*.parquet"))
    for name in names:
        assert pq.read_table(a / name).equals(pq.read_table(b / name), check_metadata=True), name
    ma, mb = (json.loads((r / "world.json").read_text()) for r in (a, b))
    for m in (ma, mb):
        m.pop("timings_s")
        m.pop("impression_shards", None)
    assert ma == mb
    for day in range(1, ma["n_days"] + 1):
        ta, tb = _day_table(a, day), _day_table(b, day)
        assert ta.num_rows > 0 and ta.equals(tb, check_metadata=True), day
    da, db = D.load(a), D.load(b)
    ia, ib = da.impressions(list(range(1, ma["n_days"] + 1))), db.impressions(list(range(1, ma["n_days"] + 1)))
    for k in D.IMPRESSION_COLUMNS:
        assert ia[k].dtype == ib[k].dtype and np.array_equal(ia[k], ib[k]), k


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    """The `tiny` world of the tiny_data fixture (seed 0), written as shards of SHARD_ROWS rows."""
    out = tmp_path_factory.mktemp("tiny_sharded")
    simulate(preset("tiny"), seed=0, out=out, preset="tiny", progress=False, shard_rows=SHARD_ROWS)
    return str(out)


def test_sharded_world_equals_one_file_world(tiny_data, sharded):
    root = Path(sharded)
    meta = json.loads((root / "world.json").read_text())
    rows = meta["impression_shards"]["rows"]
    for day in (1, 2, 3):
        parts = sorted((root / f"impressions/day={day:02d}").glob("part-*.parquet"))
        assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == rows[str(day)]
        assert len(parts) > 1 and all(r == SHARD_ROWS for r in rows[str(day)][:-1]) and 0 < rows[str(day)][-1] <= SHARD_ROWS
        assert not (root / f"impressions/day={day:02d}.parquet").exists()
    _assert_same_world(Path(tiny_data), root)


def test_layouts_agree_across_generation_chunks(tmp_path, monkeypatch):
    """Many generation chunks per day (a smaller SESSION_CHUNK makes another world, the same
    for both layouts), shard boundaries inside chunks; rewriting a directory in the other
    layout leaves no stale files."""
    monkeypatch.setattr(sim_mod, "SESSION_CHUNK", 97)
    cfg = apply_overrides(preset("tiny"), ["history_days=1", "n_users=150"])
    simulate(cfg, 5, tmp_path / "one", progress=False)
    simulate(cfg, 5, tmp_path / "sh", progress=False)  # first one file per day...
    simulate(cfg, 5, tmp_path / "sh", progress=False, shard_rows=333)  # ...then sharded over it
    assert not list((tmp_path / "sh" / "impressions").glob("*.parquet"))
    _assert_same_world(tmp_path / "one", tmp_path / "sh")
    simulate(cfg, 5, tmp_path / "sh", progress=False)  # and back
    assert not [p for p in (tmp_path / "sh" / "impressions").iterdir() if p.is_dir()]
    with pytest.raises(ValueError, match="shard_rows"):
        simulate(cfg, 5, tmp_path / "bad", progress=False, shard_rows=0)


@pytest.mark.parametrize("clicked_only,sessions", [(False, False), (True, False), (False, True)])
def test_every_row_once_per_epoch_split_evenly_across_ranks(sharded, clicked_only, sessions):
    data = D.load(sharded)
    all_imps = data.impressions(data.train_days)
    keep = all_imps["click"] if clicked_only else np.ones(len(all_imps["click"]), bool)
    everything = np.sort(_key(all_imps)[keep])
    chunk = 64 if clicked_only else 500
    for world_size in (1, 2, 3):
        seen, counts, chunk_lens = [], [], []
        for rank in range(world_size):
            st = ShardStream(data, data.train_days, chunk_rows=chunk, seed=11, rank=rank, world_size=world_size,
                             clicked_only=clicked_only, sessions=sessions)
            chunks = [ex for _, ex in st.epoch(2)]
            parts = [(len(ex), _key(ex.imps)) for ex in chunks]
            if sessions:  # a session's rows are one run, in position order, unless a boundary cut it
                for ex in chunks:
                    sid, pos = ex.imps["session_id"], ex.imps["position"]
                    runs = np.r_[True, sid[1:] != sid[:-1]].sum()
                    assert runs == len(np.unique(sid)) and (np.diff(pos)[sid[1:] == sid[:-1]] == 1).all()
            chunk_lens.append([n for n, _ in parts])
            rows = np.concatenate([k for _, k in parts])
            seen.append(rows)
            counts.append(len(rows))
            assert len(parts) == st.chunks_per_epoch
            assert sum(-(-n // 32) for n in chunk_lens[-1]) == st.batches_per_epoch(32)
        # equal shares, the same chunk sizes (so the same batch counts) on every rank
        assert len(set(counts)) == 1 and all(c == chunk_lens[0] for c in chunk_lens)
        assert counts[0] == len(everything) // world_size and st.dropped_rows == len(everything) % world_size
        union = np.concatenate(seen)
        assert len(np.unique(union)) == len(union)  # disjoint, and no row twice within a rank
        assert np.isin(union, everything).all()
        assert len(everything) - len(union) == st.dropped_rows < world_size


def test_epochs_are_reshuffled_and_seeded(sharded):
    data = D.load(sharded)
    st = ShardStream(data, data.train_days, chunk_rows=1000, seed=3)
    e0 = np.concatenate([_key(ex.imps) for _, ex in st.epoch(0)])
    e1 = np.concatenate([_key(ex.imps) for _, ex in st.epoch(1)])
    again = np.concatenate([_key(ex.imps) for _, ex in stream(data, data.train_days, chunk_rows=1000, seed=3, epoch=0)])
    assert np.array_equal(e0, again) and not np.array_equal(e0, e1)
    assert np.array_equal(np.sort(e0), np.sort(e1))
    # in order without shuffling: the days' rows as SimData reads them
    plain = np.concatenate([_key(ex.imps) for _, ex in stream(data, data.train_days, chunk_rows=1000, seed=3, epoch=0, shuffle=False)])
    assert np.array_equal(plain, _key(data.impressions(data.train_days)))


def test_chunks_build_the_same_batches_as_in_memory_examples(sharded):
    data = D.load(sharded)
    full = data.examples(data.train_days)
    index = {k: i for i, k in enumerate(_key(full.imps))}
    _, ex = next(iter(stream(data, data.train_days, chunk_rows=300, seed=0, epoch=0, rank=1, world_size=2)))
    rows = np.array([index[k] for k in _key(ex.imps)])
    got, want = ex.batch(np.arange(len(ex))), full.batch(rows)
    assert got.keys() == want.keys()
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_resume_from_a_cursor_replays_the_rest_exactly(sharded):
    """On every rank, from the cursor any rank yielded (rank 0 writes the DDP checkpoint)."""
    data = D.load(sharded)
    make = lambda rank: ShardStream(data, data.train_days, chunk_rows=450, seed=5, rank=rank, world_size=2)  # noqa: E731
    runs = [list(make(rank).epoch(3)) for rank in (0, 1)]
    assert [c for c, _ in runs[0]] == [c for c, _ in runs[1]] and len(runs[0]) > 4  # lock-step cursors
    for i in (0, 3, len(runs[0]) - 1):
        saved = json.loads(json.dumps(runs[0][i][0].to_dict()))  # rank 0's, as plain ints through a checkpoint
        for rank in (0, 1):
            resumed = list(make(rank).epoch(3, start=Cursor.from_dict(saved)))
            assert len(resumed) == len(runs[rank]) - i
            for (c0, e0), (c1, e1) in zip(runs[rank][i:], resumed):
                assert c0 == c1
                for k in D.IMPRESSION_COLUMNS:
                    assert np.array_equal(e0.imps[k], e1.imps[k]), k
    st, cur = make(1), runs[1][2][0]
    shard, offset = st.position(cur)
    assert 0 <= offset < st.sizes[st.order(3)[shard]]
    for other in (dict(seed=6), dict(chunk_rows=400), dict(sessions=True), dict(world_size=3), dict(rank=0, world_size=1)):
        kw = dict(chunk_rows=450, seed=5, rank=1, world_size=2) | other
        with pytest.raises(D.DataError, match="saved by another stream"):
            next(ShardStream(data, data.train_days, **kw).epoch(3, start=cur))
    with pytest.raises(D.DataError, match="saved by another stream"):  # other days
        next(ShardStream(data, [1], chunk_rows=450, seed=5, rank=1, world_size=2).epoch(3, start=cur))
    with pytest.raises(D.DataError, match="epoch 3, not 4"):
        next(st.epoch(4, start=cur))
    with pytest.raises(D.DataError, match="not a chunk start"):
        next(st.epoch(3, start=Cursor.from_dict({**cur.to_dict(), "rows": cur.rows + 1})))
    with pytest.raises(D.DataError, match="cursor.rows"):
        Cursor.from_dict({**cur.to_dict(), "rows": -1})
    with pytest.raises(D.DataError, match="keys epoch, rows, stream"):
        Cursor.from_dict({"epoch": 3})


def test_one_file_days_stream_too(tiny_data):
    data = D.load(tiny_data)
    st = ShardStream(data, data.train_days, chunk_rows=1000, seed=0, world_size=2)
    assert [s.path.name for s in st.shards] == ["day=01.parquet", "day=02.parquet"]
    got = np.concatenate([_key(ex.imps) for _, ex in st.epoch(0)])
    assert len(got) == st.rows_per_rank == len(data.impressions(data.train_days)["ts"]) // 2


def _copy(sharded: str, tmp_path: Path) -> Path:
    root = tmp_path / "w"
    shutil.copytree(sharded, root)
    return root


def test_a_missing_or_extra_shard_is_refused_naming_it(sharded, tmp_path):
    root = _copy(sharded, tmp_path)
    victim = root / "impressions/day=02/part-00001.parquet"
    victim.unlink()
    data = D.load(root)
    for read in (lambda: data.impressions(2), lambda: ShardStream(data, [1, 2], chunk_rows=100, seed=0)):
        with pytest.raises(D.DataError, match=f"missing shard {victim}"):
            read()
    data.impressions(1)  # the other days still load
    shutil.copy(root / "impressions/day=02/part-00000.parquet", victim)
    stray = root / "impressions/day=02/part-00099.parquet"
    shutil.copy(victim, stray)
    with pytest.raises(D.DataError, match=f"unexpected shard {stray}"):
        D.load(root).impressions(2)


def test_a_corrupt_shard_is_refused_naming_it(sharded, tmp_path):
    root = _copy(sharded, tmp_path)
    victim = root / "impressions/day=01/part-00002.parquet"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated: no footer
    with pytest.raises(D.DataError, match=f"{victim}: not a readable Parquet file"):
        D.load(root).impressions(1)
    with pytest.raises(D.DataError, match=f"{victim}: not a readable Parquet file"):
        ShardStream(D.load(root), [1], chunk_rows=100, seed=0)
    # a readable file with other rows than world.json lists
    pq.write_table(pq.read_table(root / "impressions/day=01/part-00000.parquet").slice(0, 10), victim)
    with pytest.raises(D.DataError, match=f"{victim}: 10 rows, world.json lists {SHARD_ROWS}"):
        D.load(root).impressions(1)
    # a file replaced after the stream checked it
    shutil.copy(root / "impressions/day=01/part-00000.parquet", victim)
    st = ShardStream(D.load(root), [1], chunk_rows=10_000, seed=0, shuffle=False)
    victim.write_bytes(b"not parquet at all")
    with pytest.raises(D.DataError, match=f"{victim}: cannot read impressions"):
        list(st.epoch(0))
    # both layouts for one day is ambiguous
    shutil.copy(Path(sharded) / "impressions/day=01/part-00000.parquet", root / "impressions/day=03.parquet")
    with pytest.raises(D.DataError, match="day 3 is in both layouts"):
        D.load(root).impressions(3)


def test_a_world_whose_simulation_did_not_finish_is_refused(tmp_path, monkeypatch):
    cfg = apply_overrides(preset("tiny"), ["history_days=1", "n_users=50"])
    simulate(cfg, 1, tmp_path, progress=False, shard_rows=100)

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(sim_mod, "build_world", boom)
    with pytest.raises(RuntimeError):
        simulate(cfg, 1, tmp_path, progress=False, shard_rows=100)
    with pytest.raises(D.DataError, match="no world.json"):
        D.load(tmp_path)


def _train(st: ShardStream, epochs: int, batch_size: int, ckpt: dict | None, stop_at: int | None):
    """The loop of recstack.data.shards' docstring, with a training step that records its batch."""
    seen, saved = [], None
    resume, skip, step = None, 0, 0
    if ckpt is not None:
        resume, skip, step = Cursor.from_dict(ckpt["cursor"]), ckpt["chunk_batches_done"], ckpt["step"]
    for epoch in range(resume.epoch if resume else 0, epochs):
        start = resume if resume is not None and resume.epoch == epoch else None
        for cursor, ex in st.epoch(epoch, start=start):
            for k, batch in enumerate(ex.iterate(batch_size)):
                if k < skip:
                    continue
                seen.append(np.stack([batch["user_id"], batch["item_id"]]))  # what a step trains on
                step += 1
                if step % 7 == 0:
                    saved = json.loads(json.dumps({"step": step, "cursor": cursor.to_dict(), "chunk_batches_done": k + 1}))
                if step == stop_at:
                    return seen, saved
            skip = 0
    return seen, saved


def test_the_documented_loop_resumes_where_it_stopped(sharded):
    data = D.load(sharded)
    make = lambda: ShardStream(data, data.train_days, chunk_rows=600, seed=2, rank=0, world_size=2)  # noqa: E731
    st = make()
    full, _ = _train(st, 2, 64, None, None)
    assert len(full) == 2 * st.batches_per_epoch(64)
    for stop in (9, st.batches_per_epoch(64) + 3, len(full) - 2):  # mid-chunk, the next epoch, near the end
        done, ckpt = _train(make(), 2, 64, None, stop)
        rest, _ = _train(make(), 2, 64, ckpt, None)  # killed at `stop`, restarted from the last checkpoint
        redo = stop - ckpt["step"]  # at most checkpoint_every - 1 batches are done again
        assert 0 <= redo < 7
        replay = done[: ckpt["step"]] + rest
        assert len(replay) == len(full) and all(np.array_equal(a, b) for a, b in zip(replay, full))
