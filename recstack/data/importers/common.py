"""What the importers share: dense id maps, the output folder, streaming Parquet writers,
the vocabulary and world.json of an imported folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recstack.data import contract as K
from recstack.world.schema import DAY_FILE

DAY_SECONDS = 86400
TMP_DIR = ".import-tmp"  # spill files of a running import, removed when it ends


class SourceError(ValueError):
    """A source file that cannot be imported (names the file, row and reason)."""


class IdMap:
    """Raw (sparse, possibly huge) integer ids -> dense ids 0..n-1, in order of first
    appearance. Memory: 16 bytes per distinct id (a sorted key array and its dense ids)."""

    def __init__(self):
        self._keys = np.zeros(0, np.int64)  # sorted raw ids
        self._vals = np.zeros(0, np.int64)  # their dense ids
        self._raw: list[np.ndarray] = []  # raw ids in dense order, one array per call that added some

    def __len__(self) -> int:
        return len(self._keys)

    def map(self, raw: np.ndarray) -> np.ndarray:
        """(N,) raw ids -> (N,) dense ids; unseen ids get the next ones, in row order."""
        raw = np.asarray(raw, dtype=np.int64)
        uniq, first = np.unique(raw, return_index=True)
        pos = np.minimum(np.searchsorted(self._keys, uniq), max(len(self._keys) - 1, 0))
        seen = (self._keys[pos] == uniq) if len(self._keys) else np.zeros(len(uniq), bool)
        new = uniq[~seen][np.argsort(first[~seen], kind="stable")]
        if len(new):
            n = len(self._keys)
            keys = np.concatenate([self._keys, new])
            vals = np.concatenate([self._vals, np.arange(n, n + len(new), dtype=np.int64)])
            order = np.argsort(keys, kind="stable")
            self._keys, self._vals = keys[order], vals[order]
            self._raw.append(new)
        return self._vals[np.searchsorted(self._keys, raw)]

    def external(self) -> np.ndarray:
        """(n,) the raw id of each dense id."""
        return np.concatenate(self._raw) if self._raw else np.zeros(0, np.int64)


class Grow:
    """A per-id attribute array filled as ids appear (the first value seen for an id wins)."""

    def __init__(self, dtype=np.int64):
        self.values = np.zeros(0, dtype)
        self.n = 0

    def set_new(self, dense: np.ndarray, values: np.ndarray) -> None:
        """Record `values` for the ids in `dense` that are >= the count so far (new ones)."""
        new = dense >= self.n
        if not new.any():
            return
        ids, first = np.unique(dense[new], return_index=True)
        top = int(ids.max()) + 1
        if top > len(self.values):
            grown = np.zeros(max(top, 2 * len(self.values)), self.values.dtype)
            grown[: len(self.values)] = self.values
            self.values = grown
        self.values[ids] = np.asarray(values)[new][first]
        self.n = top

    def array(self, n: int) -> np.ndarray:
        return self.values[:n].copy()


def prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SourceError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise SourceError(f"--out {out}: the folder is not empty; pass --force to overwrite it")
        for name in ("impressions", TMP_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    (out / "impressions").mkdir(parents=True, exist_ok=True)


class Writer:
    """One Parquet file written a batch at a time (bounded memory); opened on the first batch."""

    def __init__(self, path: Path):
        self.path, self._w, self.rows = path, None, 0

    def write(self, cols: dict[str, np.ndarray]) -> None:
        table = pa.table(cols)
        if self._w is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._w = pq.ParquetWriter(self.path, table.schema)
        self._w.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None


def day_path(out: Path, day: int) -> Path:
    return out / DAY_FILE.format(day=day)


def write_users(out: Path, external: np.ndarray, features: dict[str, np.ndarray] | None = None) -> None:
    n = len(external)
    cols = {"user_id": np.arange(n, dtype=np.int64), **(features or {}), "external_id": np.asarray(external, np.int64)}
    pq.write_table(pa.table(cols), out / K.USERS.file)


def write_items(out: Path, external: np.ndarray, category: np.ndarray, shop: np.ndarray | None = None,
                brand: np.ndarray | None = None) -> None:
    """Items without a price: price 1 for all (the log-price feature is constant; the objective's
    value column is then `one`)."""
    n = len(external)
    cols = {"item_id": np.arange(n, dtype=np.int64), "category": np.asarray(category, np.int64)}
    if shop is not None:
        cols["shop"] = np.asarray(shop, np.int64)
    if brand is not None:
        cols["brand"] = np.asarray(brand, np.int64)
    cols.update(price=np.ones(n, np.float32), price_bucket=np.zeros(n, np.int64), external_id=np.asarray(external, np.int64))
    pq.write_table(pa.table(cols), out / K.ITEMS.file)


def write_world(out: Path, *, n_days: int, counts: dict[str, int], source: dict, days: list[dict], n_events: int) -> dict:
    """world.json of an imported folder. `counts`: the vocabulary's cardinalities present
    (the others are 1: a field the source lacks is one constant value)."""
    vocab = {k: int(counts.get(k, 1)) for k in K.VOCAB_FIELDS if k.startswith("n_")}
    vocab.update(log_price_mean=0.0, log_price_std=1.0)  # every price is 1
    meta = {
        "format_version": 1, "preset": None, "source": source, "n_days": n_days, "history_days": 0,
        "day_seconds": DAY_SECONDS, "now": float(n_days * DAY_SECONDS), "vocab": vocab, "days": days,
        "n_events": int(n_events), "objective_value": "one",
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def day_stats(day: int, click: np.ndarray, purchase: np.ndarray) -> dict:
    n, c = len(click), int(np.count_nonzero(click))
    return {"day": day, "impressions": n, "ctr": c / max(n, 1), "cvr": int(np.count_nonzero(purchase)) / max(c, 1)}
