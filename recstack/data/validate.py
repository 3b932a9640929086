"""Check a data folder against the contract (recstack.data.contract, docs/DATA.md).

    problems = validate("data/mine")      # [] when the folder is usable
    for p in problems: print(p.line())    # file: column: what is wrong (N rows, e.g. ...)

The check streams every table in record batches (memory: one batch of the columns it
checks, plus a boolean per item and per user), so it runs before every `recstack train`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recstack.data import contract as K
from recstack.world.schema import DAY_FILE, SHARD_DIR

BATCH_ROWS = 1 << 18


@dataclass(frozen=True)
class Problem:
    file: str
    column: str  # "" when the problem is the file's
    what: str
    rows: int = 0  # how many rows have it (0: not a per-row problem)
    example: str = ""

    def line(self) -> str:
        where = f"{self.file}: {self.column}: " if self.column else f"{self.file}: "
        count = f" ({self.rows} rows, e.g. {self.example})" if self.rows else (f" ({self.example})" if self.example else "")
        return f"{where}{self.what}{count}"


class _Report:
    """Collects problems; a per-row problem is counted over all batches and reported once."""

    def __init__(self):
        self.problems: list[Problem] = []
        self._rows: dict[tuple[str, str, str], list] = {}

    def add(self, file: str, column: str, what: str, example: str = "") -> None:
        self.problems.append(Problem(file, column, what, 0, example))

    def rows(self, file: str, column: str, what: str, bad: np.ndarray, values: np.ndarray, offset: int) -> None:
        """Count the rows where `bad` holds; keep the first as the example (row number and value)."""
        n = int(np.count_nonzero(bad))
        if not n:
            return
        entry = self._rows.setdefault((file, column, what), [0, ""])
        if not entry[1]:
            i = int(np.flatnonzero(bad)[0])
            value = values[i].item() if isinstance(values[i], np.generic) else values[i]
            entry[1] = f"row {offset + i}: {value!r}"
        entry[0] += n

    def result(self) -> list[Problem]:
        return self.problems + [Problem(f, c, w, n, ex) for (f, c, w), (n, ex) in self._rows.items()]


def _kind_ok(kind: str, t: pa.DataType) -> bool:
    if kind == "int":
        return pa.types.is_integer(t)
    if kind == "float":
        return pa.types.is_floating(t) or pa.types.is_integer(t)
    if kind == "bool":
        return pa.types.is_boolean(t) or pa.types.is_integer(t)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)  # "id"


def _open(root: Path, rel: str, table: K.Table, report: _Report) -> pq.ParquetFile | None:
    """The file opened, with its required columns present and every contract column of the
    right type and the file not empty; else None after reporting why."""
    path = root / rel
    if not path.exists():
        report.add(rel, "", "missing file" + (" (required)" if table.required else ""))
        return None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        report.add(rel, "", f"not a Parquet file: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None
    schema = pf.schema_arrow
    ok = True
    for c in table.columns:
        if c.name not in schema.names:
            if c.required:
                report.add(rel, c.name, "missing required column")
                ok = False
        elif not _kind_ok(c.kind, schema.field(c.name).type):
            report.add(rel, c.name, f"wrong type {schema.field(c.name).type}, expected {c.kind}")
            ok = False
    if pf.metadata.num_rows == 0:
        report.add(rel, "", "empty table (0 rows)")
        ok = False
    return pf if ok else None


def _numpy(col: pa.Array) -> np.ndarray:
    """The column as numpy, nulls as 0 (False)."""
    if col.null_count:
        col = col.fill_null(False if pa.types.is_boolean(col.type) else 0)
    return col.to_numpy(zero_copy_only=False)


def _batches(pf: pq.ParquetFile, table: K.Table) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(row offset, the contract's numeric columns with nulls as 0, the null mask of each
    column that has nulls), one record batch at a time."""
    names = [c.name for c in table.columns if c.name in pf.schema_arrow.names and c.kind != "id"]
    offset = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=names):
        nulls = {n: np.asarray(batch.column(n).is_null()) for n in names if batch.column(n).null_count}
        cols = {n: _numpy(batch.column(n)) for n in names}
        yield offset, cols, nulls
        offset += batch.num_rows


def _check_range(report: _Report, rel: str, name: str, values: np.ndarray, high: int | None, offset: int) -> None:
    if high is None:
        return
    bad = (values < 0) | (values >= high)
    report.rows(rel, name, f"outside 0..{high - 1} (vocab)", bad, values, offset)


def _vocab(root: Path, report: _Report) -> tuple[dict, int] | None:
    path = root / "world.json"
    if not path.exists():
        report.add("world.json", "", "missing file (required: n_days and vocab, see docs/DATA.md)")
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        report.add("world.json", "", f"not JSON: {e}")
        return None
    n_days = meta.get("n_days") if isinstance(meta, dict) else None
    vocab = meta.get("vocab") if isinstance(meta, dict) else None
    if not isinstance(n_days, int) or isinstance(n_days, bool) or n_days < 1:
        report.add("world.json", "n_days", f"must be an int >= 1, got {n_days!r}")
        return None
    if not isinstance(vocab, dict):
        report.add("world.json", "vocab", "missing (the cardinalities, see docs/DATA.md)")
        return None
    missing = [k for k in K.VOCAB_FIELDS if not isinstance(vocab.get(k), (int, float)) or isinstance(vocab.get(k), bool)]
    if missing:
        report.add("world.json", "vocab", f"missing or not a number: {', '.join(missing)}")
        return None
    return vocab, n_days


def _check_dense(report: _Report, rel: str, name: str, pf: pq.ParquetFile, n_vocab: int) -> np.ndarray | None:
    """A table keyed by a dense id: row i has id i, no duplicates, n_vocab rows. -> the ids."""
    ids = pf.read(columns=[name]).column(name)
    if ids.null_count:
        report.rows(rel, name, "null ids", np.asarray(ids.is_null()), np.arange(len(ids)), 0)
        return None
    ids = ids.to_numpy()
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = np.isin(ids, uniq[counts > 1])
        report.rows(rel, name, "duplicate ids", dup, ids, 0)
    elif not np.array_equal(ids, np.arange(len(ids))):
        report.rows(rel, name, "ids must be 0..n-1 in row order (map your own ids with external_id)",
                    ids != np.arange(len(ids)), ids, 0)
    if len(ids) != n_vocab:
        report.add(rel, name, f"{len(ids)} rows, world.json vocab says {n_vocab}")
    return ids


def _check_external(report: _Report, rel: str, pf: pq.ParquetFile) -> None:
    if "external_id" not in pf.schema_arrow.names:
        return
    col = pf.read(columns=["external_id"]).column("external_id")
    if col.null_count:
        report.rows(rel, "external_id", "null values", np.asarray(col.is_null()), np.arange(len(col)), 0)
    values = np.asarray(col.drop_null().to_pylist(), dtype=object)
    uniq, inverse, counts = np.unique(values.astype(str), return_inverse=True, return_counts=True)
    report.rows(rel, "external_id", "duplicate values", counts[inverse] > 1, values, 0)


def _check_table(report: _Report, root: Path, table: K.Table, vocab: dict) -> None:
    """users, items, events: types, nulls, ids within the vocabulary, value ranges."""
    rel = table.file
    pf = _open(root, rel, table, report)
    if pf is None:
        return
    key = {"users.parquet": "user_id", "items.parquet": "item_id"}.get(rel)
    if key:
        _check_dense(report, rel, key, pf, int(vocab[K.VOCAB_COLUMNS[(rel, key)]]))
        _check_external(report, rel, pf)
    bounds = {"user_id": int(vocab["n_users"]), "item_id": int(vocab["n_items"]),
              **{col: int(vocab[v]) for (f, col), v in K.VOCAB_COLUMNS.items() if f == rel}}
    for offset, cols, nulls in _batches(pf, table):
        for name, mask in nulls.items():
            report.rows(rel, name, "null values", mask, cols[name], offset)
        for name, values in cols.items():
            if name in bounds and name != key and table.column(name).kind == "int":  # the key: _check_dense
                _check_range(report, rel, name, values, bounds[name], offset)
        if "price" in cols:
            p = cols["price"]
            report.rows(rel, "price", "must be finite and > 0", ~(np.isfinite(p) & (p > 0)), p, offset)
        if "value" in cols:
            v = cols["value"]
            report.rows(rel, "value", "must be finite and >= 0", ~(np.isfinite(v) & (v >= 0)), v, offset)
        if "ts" in cols:
            t = cols["ts"]
            report.rows(rel, "ts", "must be finite and >= 0", ~(np.isfinite(t) & (t >= 0)), t, offset)
        if "kind" in cols:
            k = cols["kind"]
            report.rows(rel, "kind", f"not an event kind 0..{len(K.EVENT_KINDS) - 1}", (k < 0) | (k >= len(K.EVENT_KINDS)),
                        k, offset)


def _day_files(root: Path, day: int) -> list[str]:
    one, folder = DAY_FILE.format(day=day), SHARD_DIR.format(day=day)
    if (root / folder).is_dir():
        return sorted(p.relative_to(root).as_posix() for p in (root / folder).glob("part-*.parquet"))
    return [one]


def _check_impressions(report: _Report, root: Path, vocab: dict, n_days: int) -> None:
    """Every day's file(s): types, nulls, known users and items, the day column, labels, and
    ts non-decreasing within and across days (rows in time order)."""
    bounds = {"user_id": int(vocab["n_users"]), "item_id": int(vocab["n_items"])}
    last_ts = -np.inf
    for day in range(1, n_days + 1):
        for rel in _day_files(root, day):
            pf = _open(root, rel, K.IMPRESSIONS, report)
            if pf is None:
                continue
            for offset, cols, nulls in _batches(pf, K.IMPRESSIONS):
                for name, mask in nulls.items():
                    if name not in K.TRUTH_COLUMNS:  # NaN truth = no truth
                        report.rows(rel, name, "null values", mask, cols[name], offset)
                for name, high in bounds.items():
                    what = "unknown " + name.split("_")[0] + f" (outside 0..{high - 1})"
                    report.rows(rel, name, what, (cols[name] < 0) | (cols[name] >= high), cols[name], offset)
                report.rows(rel, "day", f"must be {day} in this file", cols["day"] != day, cols["day"], offset)
                click, buy = cols["click"].astype(bool), cols["purchase"].astype(bool)
                report.rows(rel, "purchase", "a purchase without a click", buy & ~click, cols["purchase"], offset)
                ts = cols["ts"].astype(np.float64)
                report.rows(rel, "ts", "must be finite and >= 0", ~(np.isfinite(ts) & (ts >= 0)), ts, offset)
                back = np.diff(np.concatenate([[last_ts], ts])) < 0
                report.rows(rel, "ts", "not in time order (earlier than the row before, this day or the last)",
                            back, ts, offset)
                if len(ts):
                    last_ts = max(last_ts, float(ts[-1]))


def validate(root: str | Path) -> list[Problem]:
    """Every problem of the folder `root` against the contract; [] when it is usable."""
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "", "not a folder (a data folder holds world.json, users.parquet, items.parquet, "
                                       "events.parquet and impressions/; see docs/DATA.md)")]
    report = _Report()
    meta = _vocab(root, report)
    if meta is None:
        return report.result()
    vocab, n_days = meta
    for table in (K.USERS, K.ITEMS, K.EVENTS):
        _check_table(report, root, table, vocab)
    _check_impressions(report, root, vocab, n_days)
    if (root / K.AGGREGATES.file).exists():
        _open(root, K.AGGREGATES.file, K.AGGREGATES, report)
    return report.result()


def require_valid(root: str | Path) -> float:
    """Validate `root` before training: DataError naming the first problem and how many more
    there are (`recstack validate DIR` lists them all). -> the seconds the check took."""
    import time

    from recstack.data.loader import DataError

    t0 = time.perf_counter()
    problems = validate(root)
    if problems:
        more = f" (and {len(problems) - 1} more problems: `recstack validate {root}` lists them)" if len(problems) > 1 else ""
        first = problems[0].line()
        raise DataError(f"{first if problems[0].file == str(root) else Path(root) / first}{more}")
    return time.perf_counter() - t0
