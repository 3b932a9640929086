"""The rows a fine-ranker fit trains on: a materialised table, or (`StreamRows`) the training
days streamed from their Parquet shards, behind one `Source` the fit functions index."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from recstack.training import distributed as D
from recstack.data import SimData
from recstack.features import post_event_features
from recstack.data.shards import ShardStream

from fine_rank.inputs import ALL_INPUTS, materialise

if TYPE_CHECKING:
    from fine_rank.config import ModelSettings


# rows of the bounded sample a streamed fit uses where the in-memory one reads every row:
# BatchNorm re-estimation (refresh_batchnorm uses at most this many rows anyway) and the
# label calibration's predictions
STREAM_SAMPLE_ROWS = 65536


class StreamRows:
    """A task's training population streamed from the Parquet shards of `days` (cfg.stream_chunk_rows
    > 0) instead of a materialised table: CTR every impression, CVR (clicked_only) the clicked ones.

    What stays global, computed without holding the rows: the row count and the label /
    consent / post-event statistics a method needs (one pass over a few columns, `scan`),
    and a bounded sample (`sample_table`: the first STREAM_SAMPLE_ROWS rows of a seeded,
    shuffled pass, the same on every rank; shards and their rows are shuffled, but the rows
    come from the first shard(s) of that order) for BatchNorm re-estimation and calibration.
    """

    def __init__(self, data: SimData, days: list[int], chunk_rows: int, clicked_only: bool = False,
                 item_stats: bool = True):
        self.data, self.days, self.chunk_rows, self.clicked_only = data, list(days), int(chunk_rows), clicked_only
        self.item_stats = item_stats  # the rows' item_dense carries the item statistics (fine_rank.inputs.materialise)
        self._streams: dict[tuple, ShardStream] = {}
        self._sample: dict[int, dict[str, np.ndarray]] = {}
        self._sums: dict[str, dict] = {}

    def stream(self, seed: int, rank: int | None = None, world_size: int | None = None) -> ShardStream:
        """This rank's training stream (or another rank's / world size's, for the sample)."""
        w = D.world()
        key = (seed, w.rank if rank is None else rank, w.size if world_size is None else world_size)
        if key not in self._streams:
            self._streams[key] = ShardStream(self.data, self.days, chunk_rows=self.chunk_rows, seed=seed, rank=key[1],
                                             world_size=key[2], clicked_only=self.clicked_only)
        return self._streams[key]

    def _any(self) -> ShardStream:
        """A stream of these rows built already (row counts and `scan` do not depend on the seed)."""
        return next(iter(self._streams.values())) if self._streams else self.stream(0)

    def __len__(self) -> int:
        return self._any().total_rows

    def steps(self, s: "ModelSettings", seed: int) -> int:
        """Optimiser steps of a streamed fit: every batch of batch_size // world_size rows (a
        batch never spans two chunks) with at least 2 rows, for s.epochs, capped at s.max_steps."""
        total = s.epochs * self.stream(seed).batches_per_epoch(s.batch_size // D.world_size(), min_rows=2)
        return min(total, s.max_steps) if s.max_steps else total

    def sums(self, label: str) -> dict:
        """One pass over the label / consent / post-event columns: row count, label sum,
        consented rows and their label sum, and the first two moments of the post-event features."""
        if label not in self._sums:
            n = y = c = yc = 0.0
            pe, pe2 = np.zeros(4), np.zeros(4)
            for cols in self._any().scan([label, "user_id", "dwell", "comments", "chatted", "cart"]):
                lab = cols[label].astype(np.float64)
                cons = self.data.consent[cols["user_id"]].astype(np.float64)
                post = post_event_features(cols["dwell"], cols["comments"], cols["chatted"], cols["cart"]).astype(np.float64)
                n, y, c, yc = n + len(lab), y + lab.sum(), c + cons.sum(), yc + (lab * cons).sum()
                pe, pe2 = pe + post.sum(0), pe2 + (post ** 2).sum(0)
            self._sums[label] = {"n": n, "label": y, "consent": c, "label_consent": yc, "post": pe, "post2": pe2}
        return self._sums[label]

    def mean(self, label: str) -> float:
        t = self.sums(label)
        return float(t["label"] / max(t["n"], 1.0))

    def sample_table(self, seed: int) -> dict[str, np.ndarray]:
        """The bounded sample, materialised (the same rows on every rank)."""
        if seed not in self._sample:
            st = ShardStream(self.data, self.days, chunk_rows=min(STREAM_SAMPLE_ROWS, self.chunk_rows), seed=seed,
                             clicked_only=self.clicked_only)
            parts, got = [], 0
            for _, ex in st.epoch(0):
                parts.append(materialise(ex, item_stats=self.item_stats))
                got += len(ex)
                if got >= STREAM_SAMPLE_ROWS:
                    break
            self._sample[seed] = {k: np.concatenate([p[k] for p in parts])[:STREAM_SAMPLE_ROWS] for k in parts[0]}
        return self._sample[seed]


class Source:
    """The rows a fit function trains on, as the tensors its closures index: `x` holds the
    serving inputs, post_event, "y" (the label) and "consent". In memory (a table) `x`
    holds every row; streamed (a `StreamRows`) `optimise` swaps each chunk's rows into the
    same dict, so the closures that index `x[k][idx]` need not know which."""

    def __init__(self, table: "dict[str, np.ndarray] | StreamRows", label: str):
        self.label, self.rows = label, table if isinstance(table, StreamRows) else None
        self.x: dict[str, torch.Tensor] = {}
        if self.rows is None:
            self.load(table)
            self.n = len(self.x["y"])
        else:
            self.n = len(self.rows)

    def load(self, table: dict[str, np.ndarray]) -> None:
        self.x.clear()
        self.x.update(_tensors(table))
        self.x["y"] = torch.from_numpy(table[self.label].astype(np.float32))
        self.x["consent"] = torch.from_numpy(table["consent"].astype(np.float32))

    def steps(self, s: "ModelSettings", seed: int) -> int:
        return s.steps(self.n) if self.rows is None else self.rows.steps(s, seed)

    def label_mean(self) -> float:
        return float(self.x["y"].mean()) if self.rows is None else self.rows.mean(self.label)

    def post_moments(self, columns: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (unbiased) standard deviation of post_event's `columns` over every training row."""
        if self.rows is None:
            post = self.x["post_event"]
            return post[:, columns].mean(0), post[:, columns].std(0)
        t = self.rows.sums(self.label)
        n = t["n"]
        mu = t["post"][columns] / n
        var = (t["post2"][columns] - n * mu ** 2) / max(n - 1, 1.0)
        return torch.tensor(mu, dtype=torch.float32), torch.tensor(np.sqrt(np.maximum(var, 0.0)), dtype=torch.float32)

    def consented_rate(self) -> float:
        """The label mean over the consented users' training rows (ValueError without any)."""
        if self.rows is None:
            y, consent = self.x["y"], self.x["consent"]
            if consent.sum() < 1:
                raise ValueError("signal_loss needs consented users in the training rows")
            return float((y * consent).sum() / consent.sum())
        t = self.rows.sums(self.label)
        if t["consent"] < 1:
            raise ValueError("signal_loss needs consented users in the training rows")
        return float(t["label_consent"] / t["consent"])


def _tensors(table: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(table[k])) for k in ALL_INPUTS + ("post_event",) if k in table}

