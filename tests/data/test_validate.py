"""`recstack validate`: a test per bad input, each found and named (file, column, what, how many
rows, an example); a good folder has no problem; `recstack train` refuses a bad folder first."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recstack.cli import main
from recstack.data.validate import validate


@pytest.fixture
def world(tiny_data, tmp_path) -> Path:
    """A copy of the tiny world to break."""
    out = tmp_path / "world"
    shutil.copytree(tiny_data, out)
    return out


def _rewrite(path: Path, change) -> None:
    """Replace the Parquet file at `path` by change(its table)."""
    pq.write_table(change(pq.read_table(path)), path)


def _set(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _lines(root: Path) -> list[str]:
    return [p.line() for p in validate(root)]


def _only(root: Path, *needles: str) -> str:
    """The one problem found; it contains every needle."""
    lines = _lines(root)
    assert len(lines) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_a_simulated_world_is_valid(world):
    assert _lines(world) == []


def test_missing_column(world):
    _rewrite(world / "items.parquet", lambda t: t.drop_columns(["category"]))
    _only(world, "items.parquet: category: missing required column")


def test_a_missing_optional_column_is_fine(world):
    _rewrite(world / "users.parquet", lambda t: t.drop_columns(["consent", "gender"]))
    _rewrite(world / "impressions/day=02.parquet", lambda t: t.drop_columns(["true_pctr", "true_pcvr", "dwell"]))
    (world / "aggregates.parquet").unlink()
    assert _lines(world) == []


def test_wrong_dtype(world):
    _rewrite(world / "events.parquet", lambda t: _set(t, "item_id", pa.array([str(x) for x in t.column("item_id").to_pylist()])))
    _only(world, "events.parquet: item_id: wrong type string, expected int")


def test_null_ids(world):
    def change(t):
        ids = t.column("user_id").to_pylist()
        ids[5] = ids[9] = None
        return _set(t, "user_id", pa.array(ids, pa.int64()))

    _rewrite(world / "impressions/day=01.parquet", change)
    _only(world, "impressions/day=01.parquet: user_id: null values (2 rows, e.g. row 5")


def test_negative_timestamps(world):
    _rewrite(world / "events.parquet", lambda t: _set(t, "ts", pa.array(-np.abs(t.column("ts").to_numpy()) - 1.0)))
    line = _only(world, "events.parquet: ts: must be finite and >= 0")
    assert f"({pq.read_metadata(world / 'events.parquet').num_rows} rows" in line


def test_non_monotone_timestamps(world):
    def change(t):
        ts = t.column("ts").to_numpy().copy()
        ts[100] = ts[0] - 1.0  # earlier than every row before it, also than the day before's last
        return _set(t, "ts", pa.array(ts))

    _rewrite(world / "impressions/day=02.parquet", change)
    _only(world, "impressions/day=02.parquet: ts: not in time order", "(1 rows, e.g. row 100")


def test_a_day_earlier_than_the_day_before(world):
    _rewrite(world / "impressions/day=03.parquet", lambda t: _set(t, "ts", pa.array(t.column("ts").to_numpy() - 86400.0 * 2)))
    _only(world, "impressions/day=03.parquet: ts: not in time order", "(1 rows, e.g. row 0")


def test_an_impression_of_an_unknown_item(world):
    n_items = json.loads((world / "world.json").read_text())["vocab"]["n_items"]

    def change(t):
        ids = t.column("item_id").to_numpy().copy()
        ids[[3, 7, 11]] = n_items + 4
        return _set(t, "item_id", pa.array(ids))

    _rewrite(world / "impressions/day=01.parquet", change)
    _only(world, "impressions/day=01.parquet: item_id: unknown item", "(3 rows, e.g. row 3", str(n_items + 4))


def test_duplicate_ids(world):
    def change(t):
        ids = t.column("item_id").to_numpy().copy()
        ids[10] = ids[11]
        return _set(t, "item_id", pa.array(ids))

    _rewrite(world / "items.parquet", change)
    _only(world, "items.parquet: item_id: duplicate ids (2 rows, e.g. row 10")


def test_duplicate_external_ids(world):
    _rewrite(world / "users.parquet", lambda t: t.append_column("external_id", pa.array(["u"] * 3 + [f"x{i}" for i in range(t.num_rows - 3)])))
    _only(world, "users.parquet: external_id: duplicate values (3 rows")


def test_sparse_ids_are_refused(world):
    _rewrite(world / "users.parquet", lambda t: _set(t, "user_id", pa.array(t.column("user_id").to_numpy() * 10)))
    _only(world, "users.parquet: user_id: ids must be 0..n-1 in row order (map your own ids with external_id)")


def test_empty_table(world):
    _rewrite(world / "events.parquet", lambda t: t.slice(0, 0))
    _only(world, "events.parquet: empty table (0 rows)")


def test_a_parquet_file_that_is_not_parquet(world):
    (world / "impressions/day=02.parquet").write_bytes(b"user_id,item_id\n1,2\n")
    _only(world, "impressions/day=02.parquet: not a Parquet file")


def test_missing_files_and_metadata(world, tmp_path):
    (world / "impressions/day=03.parquet").unlink()
    _only(world, "impressions/day=03.parquet: missing file")
    (world / "world.json").write_text(json.dumps({"n_days": 3}))
    _only(world, "world.json: vocab: missing")
    assert "not a folder" in _only(tmp_path / "nothing")


def test_every_problem_is_listed(world):
    """Problems in several files are all reported, one line each."""
    _rewrite(world / "items.parquet", lambda t: t.drop_columns(["category"]))
    _rewrite(world / "events.parquet", lambda t: _set(t, "kind", pa.array(np.full(t.num_rows, 9, np.int8))))
    lines = _lines(world)
    assert len(lines) == 2 and any("items.parquet: category" in x for x in lines)
    assert any(x.startswith("events.parquet: kind: not an event kind 0..4") for x in lines)


def test_validate_and_train_commands(world, tmp_path, capsys):
    assert main(["validate", str(world)]) == 0
    assert capsys.readouterr().out.strip() == f"{world}: valid"
    (world / "items.parquet").write_text("not parquet")
    _rewrite(world / "events.parquet", lambda t: t.drop_columns(["kind"]))
    assert main(["validate", str(world)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["items.parquet: not a Parquet file: Parquet magic bytes not found in footer. "
                                         "Either the file is corrupted or this is not a parquet file.",
                                         "events.parquet: kind: missing required column"]
    assert "2 problem(s)" in captured.err
    # training checks the folder first: one line naming the first problem, nothing trained
    assert main(["train", "coarse", "--data", str(world), "--out", str(tmp_path / "runs")]) == 1
    err = capsys.readouterr().err
    assert "items.parquet: not a Parquet file" in err and "and 1 more problems" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
