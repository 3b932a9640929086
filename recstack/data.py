"""Load a simulated data directory and build model-input batches (training side).

    data = load("data/small")
    train = data.examples(data.train_days)          # impressions of days 1..D-2
    for batch in train.iterate(1024, shuffle=True):  # dict of numpy arrays, names as in ARCHITECTURE.md
        ...
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from recstack import features as F

IMPRESSION_COLUMNS = (
    "day", "ts", "user_id", "session_id", "position", "item_id", "click", "purchase", "purchase_observed",
    "dwell", "comments", "chatted", "cart", "true_pctr", "true_pcvr",
)


class DataError(RuntimeError):
    """A data directory that is missing files or columns."""


def _read(path: Path, columns=None) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"missing {path} (is this a `recstack simulate` output directory?)")
    table = pq.read_table(path, columns=columns)
    return {name: table.column(name).to_numpy() for name in table.column_names}


class SimData:
    """A simulated world's logs, loaded into numpy tables."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "world.json"
        if not meta_path.exists():
            raise DataError(f"{self.root} has no world.json (is this a `recstack simulate` output directory?)")
        self.world = json.loads(meta_path.read_text())
        self.vocab = F.Vocab.from_dict(self.world["vocab"])
        self.n_days = int(self.world["n_days"])
        u = _read(self.root / "users.parquet")
        self.users = F.UserTable(u["age_bucket"], u["gender"], u["activity"])
        self.consent = u["consent"].astype(bool)
        it = _read(self.root / "items.parquet")
        self.items = F.ItemTable(
            it["category"], it["shop"], it["brand"], it["price_bucket"], it["price"],
            self.vocab.log_price_mean, self.vocab.log_price_std,
        )
        ev = _read(self.root / "events.parquet")
        self.behaviours = F.Behaviours(ev["user_id"], ev["ts"], ev["item_id"], ev["kind"], ev["dwell"], self.vocab.n_users)

    # next-day split, as in both papers: train on days 1..D-1, test on day D; the day
    # before the test day doubles as the validation day for learning-rate selection.
    @property
    def test_day(self) -> int:
        return self.n_days

    @property
    def valid_day(self) -> int:
        return self.n_days - 1

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
        parts = [_read(self.root / "impressions" / f"day={d:02d}.parquet") for d in days]
        if not parts:
            raise DataError("no days selected")
        return {k: np.concatenate([p[k] for p in parts]) for k in IMPRESSION_COLUMNS}

    def examples(self, days: list[int] | int, clicked_only: bool = False) -> "Examples":
        imps = self.impressions(days)
        if clicked_only:
            keep = imps["click"].astype(bool)
            imps = {k: v[keep] for k, v in imps.items()}
        return Examples(self, imps)


def load(root: str | Path) -> SimData:
    return SimData(root)


class Examples:
    """Impressions plus the features each one had at its logging time."""

    def __init__(self, data: SimData, imps: dict[str, np.ndarray]):
        self.data = data
        self.imps = imps
        # one searchsorted for all rows; the (N, 50) gathers happen per batch
        self.seq_idx_last = data.behaviours.last_indices(imps["user_id"], imps["ts"], 1)[:, 0]

    def __len__(self) -> int:
        return len(self.imps["item_id"])

    def subset(self, rows: np.ndarray) -> "Examples":
        return Examples(self.data, {k: v[rows] for k, v in self.imps.items()})

    def _seq_idx(self, rows: np.ndarray) -> np.ndarray:
        last = self.seq_idx_last[rows]  # (B,) row of the newest behaviour before ts, or -1
        users = self.imps["user_id"][rows]
        idx = last[:, None] - np.arange(F.SEQ_LEN)[None, :]  # (B, L)
        start = self.data.behaviours.start[users][:, None]
        return np.where((last[:, None] >= 0) & (idx >= start), idx, -1)

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Row indices (B,) -> dict of model inputs and labels (see docs/ARCHITECTURE.md)."""
        d, im = self.data, self.imps
        users, items, ts = im["user_id"][rows], im["item_id"][rows], im["ts"][rows]
        seq_items, seq_extras = d.behaviours.sequence(self._seq_idx(rows), ts, d.items)
        item_feats = d.items.feats(items)
        return {
            "user_feats": d.users.feats(users),
            "seq_items": seq_items,
            "seq_extras": seq_extras,
            "item_feats": item_feats,
            "item_dense": d.items.dense(items),
            "interacted": F.interacted_features(seq_items, seq_extras, item_feats),
            "post_event": F.post_event_features(im["dwell"][rows], im["comments"][rows], im["chatted"][rows], im["cart"][rows]),
            "click": im["click"][rows].astype(np.float32),
            "purchase": im["purchase"][rows].astype(np.float32),
            "purchase_observed": im["purchase_observed"][rows].astype(np.float32),
            "true_pctr": im["true_pctr"][rows].astype(np.float32),
            "true_pcvr": im["true_pcvr"][rows].astype(np.float32),
            "consent": d.consent[users].astype(np.float32),
            "user_id": users.astype(np.int64),
            "item_id": items.astype(np.int64),
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
