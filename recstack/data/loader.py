"""Load a simulated data directory and build model-input batches (training side).

    data = load("data/small")
    train = data.examples(data.train_days)          # impressions of days 1..D-2
    for batch in train.iterate(1024, shuffle=True):  # dict of numpy arrays, names as in ARCHITECTURE.md
        ...

Days beyond memory (a sharded world, DDP): recstack.data.shards streams them a chunk at a time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from recstack import features as FE
from recstack.data import contract as K
from recstack.interacted import EventIndex
from recstack.item_stats import ItemStats
from recstack.world.schema import DAY_FILE, SHARD_DIR, SHARD_FILE

IMPRESSION_COLUMNS = (
    "day", "ts", "user_id", "session_id", "position", "item_id", "click", "purchase", "purchase_observed",
    "dwell", "comments", "chatted", "cart", "true_pctr", "true_pcvr",
)


class DataError(RuntimeError):
    """A data directory that is missing files or columns."""


def _read(path: Path, table: K.Table, unreadable: str = "not a readable Parquet file") -> dict[str, np.ndarray]:
    """A contract table's columns: the required ones (DataError naming any missing) and the
    optional ones, absent ones filled with their defaults (recstack.data.contract)."""
    if not path.exists():
        raise DataError(f"missing {path} (see docs/DATA.md; `recstack validate DIR` checks a folder)")
    try:
        pf = pq.ParquetFile(path)
        present = set(pf.schema_arrow.names)
        missing = [c for c in table.required_columns if c not in present]
        wanted = [c.name for c in table.columns if c.name in present and c.kind != "id"]
        t = None if missing else pf.read(columns=wanted)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{path}: {unreadable}: {e}") from e
    if missing:
        raise DataError(f"{path}: missing required columns {missing} (see docs/DATA.md)")
    return K.fill_defaults(table, {name: t.column(name).to_numpy() for name in wanted}, t.num_rows)


class Shard(NamedTuple):
    """One Parquet file of impressions: a whole day (impressions/day=NN.parquet) or one part
    of a sharded day (impressions/day=NN/part-PPPPP.parquet)."""

    day: int
    path: Path
    rows: int


def read_shard(shard: Shard) -> dict[str, np.ndarray]:
    """A shard's impression columns (IMPRESSION_COLUMNS), checked against its listed row count."""
    cols = _read(shard.path, K.IMPRESSIONS, unreadable="cannot read impressions")
    n = len(cols["item_id"])
    if n != shard.rows:
        raise DataError(f"{shard.path}: {n} rows, expected {shard.rows}")
    return {name: cols[name] for name in IMPRESSION_COLUMNS}


def _check_shard(path: Path, day: int, rows: int | None) -> Shard:
    """Open a shard's footer: a readable Parquet file with the impression columns (and the
    row count world.json lists, when it lists one)."""
    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable Parquet file: {e}") from e
    missing = [c for c in K.IMPRESSIONS.required_columns if c not in meta.schema.names]
    if missing:
        raise DataError(f"{path}: missing required impression columns {missing}")
    if rows is not None and meta.num_rows != rows:
        raise DataError(f"{path}: {meta.num_rows} rows, world.json lists {rows}")
    return Shard(day, path, meta.num_rows)


class SimData:
    """A simulated world's logs, loaded into numpy tables."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "world.json"
        if not meta_path.exists():
            raise DataError(f"{self.root} has no world.json (is this a `recstack simulate` output directory?)")
        self.world = json.loads(meta_path.read_text())
        self.vocab = FE.Vocab.from_dict(self.world["vocab"])
        self.n_days = int(self.world["n_days"])
        u = _read(self.root / K.USERS.file, K.USERS)
        self.users = FE.UserTable(u["age_bucket"], u["gender"], u["activity"])
        self.consent = u["consent"].astype(bool)
        it = _read(self.root / K.ITEMS.file, K.ITEMS)
        self.item_value = it["value"]  # (I,) float32, NaN without a value column (see docs/DATA.md)
        self.items = FE.ItemTable(
            it["category"], it["shop"], it["brand"], it["price_bucket"], it["price"],
            self.vocab.log_price_mean, self.vocab.log_price_std,
        )
        ev = _read(self.root / K.EVENTS.file, K.EVENTS)
        # the student's sequence: clicks and purchases (Behaviours keeps those); the interacted
        # features: the full log
        self.behaviours = FE.Behaviours(ev["user_id"], ev["ts"], ev["item_id"], ev["kind"], ev["dwell"], self.vocab.n_users)
        self._events = ev
        self._event_index: EventIndex | None = None
        self._item_stats: ItemStats | None = None

    @property
    def events(self) -> dict[str, np.ndarray]:
        """The full behaviour log (every kind), as read: user_id, ts, item_id, kind, dwell."""
        return self._events

    @property
    def event_index(self) -> EventIndex:
        """The full behaviour log indexed for the interacted features (built on first use)."""
        if self._event_index is None:
            ev = self._events
            try:
                self._event_index = EventIndex(ev["user_id"], ev["ts"], ev["item_id"], ev["kind"], self.items, self.vocab.n_users)
            except ValueError as e:
                raise DataError(f"{self.root / K.EVENTS.file}: {e}") from e
        return self._event_index

    def day_of(self, ts: np.ndarray) -> np.ndarray:
        """The simulated day of each time (N,) -> (N,) int64: day d >= 1 is
        [(history_days + d - 1) x day_seconds, ...); the history's days are <= 0."""
        day_s = float(self.world.get("day_seconds", 86400))
        return np.floor(np.asarray(ts, np.float64) / day_s).astype(np.int64) + 1 - int(self.world.get("history_days", 0))

    @property
    def item_stats(self) -> ItemStats:
        """Every item's daily counts of impressions and of each event kind (recstack.item_stats),
        built on first use from every impression day and the full behaviour log."""
        if self._item_stats is None:
            ev_day = self.day_of(self._events["ts"])
            days = list(range(1, self.n_days + 1))
            imp_items = [self.impressions(d)["item_id"] for d in days]
            imp_days = np.concatenate([np.full(len(i), d, np.int64) for d, i in zip(days, imp_items)])
            try:
                self._item_stats = ItemStats.build(imp_days, np.concatenate(imp_items), ev_day, self._events["item_id"],
                                                   self._events["kind"], self.vocab.n_items)
            except ValueError as e:
                raise DataError(f"{self.root}: item statistics: {e}") from e
        return self._item_stats

    # next-day split, as in both papers: train on days 1..D-1, test on day D; the day
    # before the test day doubles as the validation day for learning-rate selection.
    @property
    def test_day(self) -> int:
        return self.n_days

    @property
    def valid_day(self) -> int:
        return self.n_days - 1

    def split_days(self, split: str) -> tuple[list[int], int]:
        """(days to fit on, day to score) of a split: "test" fits 1..D-1 and scores D; "valid" fits
        1..D-2 and scores D-1 (what option choices are made on)."""
        if split == "test":
            return self.train_days, self.test_day
        if split == "valid":
            return self.fit_days, self.valid_day
        raise ValueError(f"split must be 'test' or 'valid', got {split!r}")

    @property
    def train_days(self) -> list[int]:
        """Days used to fit models whose hyper-parameters are already chosen (1..D-1)."""
        return list(range(1, self.n_days))

    @property
    def fit_days(self) -> list[int]:
        """Days used to fit models during a validation sweep (1..D-2)."""
        return list(range(1, self.n_days - 1))

    def impressions(self, days: list[int] | int) -> dict[str, np.ndarray]:
        days = [days] if isinstance(days, int) else list(days)
        parts = [_read(self.root / DAY_FILE.format(day=d), K.IMPRESSIONS) if self._one_file(d) else self._read_day_shards(d)
                 for d in days]
        if not parts:
            raise DataError("no days selected")
        return {k: np.concatenate([p[k] for p in parts]) for k in IMPRESSION_COLUMNS}

    def _one_file(self, day: int) -> bool:
        # the one-file layout is read as it always was; anything else goes through the shard checks
        return not (self.root / SHARD_DIR.format(day=day)).exists()

    def _read_day_shards(self, day: int) -> dict[str, np.ndarray]:
        parts = [read_shard(s) for s in self.impression_shards(day)]
        return {k: np.concatenate([p[k] for p in parts]) for k in IMPRESSION_COLUMNS}

    def impression_shards(self, days: list[int] | int) -> list[Shard]:
        """The impression files of `days`, in day then part order, each checked: present,
        readable, with the impression columns, and (sharded layout) exactly the parts and row
        counts world.json's `impression_shards` lists. A one-file day is one shard."""
        days = [days] if isinstance(days, int) else list(days)
        if not days:
            raise DataError("no days selected")
        out: list[Shard] = []
        for d in days:
            one, parts = self.root / DAY_FILE.format(day=d), self.root / SHARD_DIR.format(day=d)
            if one.exists() and parts.exists():
                raise DataError(f"day {d} is in both layouts: {one} and {parts}/ (remove one)")
            if one.exists():
                out.append(_check_shard(one, d, None))
            elif parts.exists():
                out.extend(self._day_shards(d, parts))
            else:
                raise DataError(f"missing {one} (is this a `recstack simulate` output directory?)")
        return out

    def _day_shards(self, day: int, folder: Path) -> list[Shard]:
        manifest = self.world.get("impression_shards")
        rows = manifest.get("rows") if isinstance(manifest, dict) else None
        listed = rows.get(str(day)) if isinstance(rows, dict) else None
        if not isinstance(listed, list) or not listed:
            raise DataError(f"{folder}: a sharded day, but world.json's impression_shards lists no parts for day {day}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in listed):
            raise DataError(f"world.json: impression_shards.rows[{str(day)!r}] must be row counts (ints >= 0), got {listed!r}")
        expected = [self.root / SHARD_FILE.format(day=day, part=i) for i in range(len(listed))]
        found = set(folder.glob("part-*.parquet"))
        for path in expected:
            if path not in found:
                raise DataError(f"missing shard {path} (world.json lists {len(listed)} parts for day {day})")
        extra = sorted(found - set(expected))
        if extra:
            raise DataError(f"unexpected shard {extra[0]} (world.json lists {len(listed)} parts for day {day})")
        return [_check_shard(path, day, int(rows)) for path, rows in zip(expected, listed)]

    def examples(self, days: list[int] | int, clicked_only: bool = False, item_stats: bool = False) -> "Examples":
        """The impressions of `days` with their features; `item_stats`: their batches' item_dense
        also holds the item statistics (`Examples`)."""
        imps = self.impressions(days)
        if clicked_only:
            keep = imps["click"].astype(bool)
            imps = {k: v[keep] for k, v in imps.items()}
        return Examples(self, imps, item_stats)


def load(root: str | Path) -> SimData:
    return SimData(root)


class Examples:
    """Impressions plus the features each one had at its logging time. With `item_stats`, a
    batch's item_dense holds the row's item statistics on its day after the price
    (recstack.item_stats: what the rankers that read them are trained and served with)."""

    def __init__(self, data: SimData, imps: dict[str, np.ndarray], item_stats: bool = False):
        self.data = data
        self.imps = imps
        self.item_stats = bool(item_stats)
        # one searchsorted for all rows; the (N, 50) gathers happen per batch
        self.seq_idx_last = data.behaviours.last_indices(imps["user_id"], imps["ts"], 1)[:, 0]

    def __len__(self) -> int:
        return len(self.imps["item_id"])

    def subset(self, rows: np.ndarray) -> "Examples":
        return Examples(self.data, {k: v[rows] for k, v in self.imps.items()}, self.item_stats)

    def _seq_idx(self, rows: np.ndarray) -> np.ndarray:
        last = self.seq_idx_last[rows]  # (B,) row of the newest behaviour before ts, or -1
        users = self.imps["user_id"][rows]
        idx = last[:, None] - np.arange(FE.SEQ_LEN)[None, :]  # (B, L)
        start = self.data.behaviours.start[users][:, None]
        return np.where((last[:, None] >= 0) & (idx >= start), idx, -1)

    def batch(self, rows: np.ndarray, item_stats: bool | None = None) -> dict[str, np.ndarray]:
        """Row indices (B,) -> dict of model inputs and labels (see docs/ARCHITECTURE.md);
        `item_stats` (default: the Examples' own) appends the item statistics to item_dense."""
        d, im = self.data, self.imps
        stats = self.item_stats if item_stats is None else item_stats
        users, items, ts = im["user_id"][rows], im["item_id"][rows], im["ts"][rows]
        # the serving cascade builds its features with the same function (at the request's time)
        hist = FE.history_features(d.behaviours, users, ts, d.items, rows=self._seq_idx(rows))
        item_feats = d.items.feats(items)
        return {
            "user_feats": d.users.feats(users),
            "seq_items": hist.seq_items,
            "seq_extras": hist.seq_extras,
            "item_feats": item_feats,
            "item_dense": (np.concatenate([d.items.dense(items), d.item_stats.features(im["day"][rows], items)], axis=1)
                           if stats else d.items.dense(items)),
            "interacted": d.event_index.features(users, ts, items),
            "post_event": FE.post_event_features(im["dwell"][rows], im["comments"][rows], im["chatted"][rows], im["cart"][rows]),
            "click": im["click"][rows].astype(np.float32),
            "purchase": im["purchase"][rows].astype(np.float32),
            "purchase_observed": im["purchase_observed"][rows].astype(np.float32),
            "true_pctr": im["true_pctr"][rows].astype(np.float32),
            "true_pcvr": im["true_pcvr"][rows].astype(np.float32),
            "consent": d.consent[users].astype(np.float32),
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
            "day": im["day"][rows].astype(np.int64),
        }

    def iterate(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for s in range(0, n, batch_size):
            yield self.batch(order[s : s + batch_size])


def to_torch(batch: dict[str, np.ndarray]):
    """numpy batch -> dict of torch tensors (zero-copy where possible)."""
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def materialise(examples: Examples, keys: tuple[str, ...], chunk: int = 8192) -> dict[str, np.ndarray]:
    """Every row of `examples` as `Examples.batch` columns (only `keys`), built `chunk` rows at a
    time, so that the per-row features are computed once rather than once per epoch.
    ValueError when there are no rows."""
    n = len(examples)
    if n == 0:
        raise ValueError("no examples to materialise")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for s in range(0, n, chunk):
        batch = examples.batch(np.arange(s, min(s + chunk, n)))
        for k in keys:
            parts[k].append(batch[k])
    return {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
