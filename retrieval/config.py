"""The retrieval stage's settings: one dataclass, every field settable with `--set key=value`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from recstack.config import ConfigError, from_dict
from recstack.features import EVENT_KINDS
from recstack.item_stats import SOURCES as STATS_SOURCES

SPLITS = ("test", "valid")
POSITIVE_SOURCES = ("impressions", "log")


@dataclass
class Config:
    # --- model ---------------------------------------------------------------------
    # The user id gets no embedding by default: the behaviour sequence already carries the
    # user, and on next-day evaluation an id table memorises the training days' intents
    # (small preset, 6 epochs: test recall@50 0.542 without it vs 0.507 with an 8-d one).
    user_dims: tuple[int, ...] = (0, 4, 2, 4)  # embedding dims of user_feats: user id, age bucket, gender, activity (0 = unused)
    # Small item-id table: most items have 0-2 training clicks; their attributes generalise, their ids overfit.
    item_dims: tuple[int, ...] = (8, 16, 16, 16, 4)  # item id, category, shop, brand, price bucket; shared by item tower and sequence
    seq_heads: int = 2  # learned weightings of the behaviour sequence (recency-led, mean-led at init)
    user_hidden: tuple[int, ...] = (128,)  # user-tower MLP hidden sizes
    item_hidden: tuple[int, ...] = (128,)  # item-tower MLP hidden sizes
    dim: int = 64  # D: embedding size in the index; 64 floats = 256 B per item
    # The item tower also reads the item's statistics (recstack.item_stats: impressions and
    # event kinds per day over the last 1 / 7 whole days), each positive those of its own day;
    # the exported item vectors fold in the serving day's table, so serving reads nothing new.
    # Off: on small's validation day they cost recall at every K (@50 0.4574 -> 0.4492 with every
    # source, 0.4557 with clicks alone; 3 seeds; docs/results/retrieval/recall.md)
    item_stats: bool = False
    # which sources' fields (both windows each) the tower reads: impression and the event kinds
    item_stats_sources: tuple[str, ...] = STATS_SOURCES
    # --- loss ----------------------------------------------------------------------
    temperature: float = 0.05  # logits = cosine / T; unit vectors need a small T to reach confident softmaxes
    learn_temperature: bool = False  # fixed T is more stable on tiny data; learnable T is clamped to [0.01, 1]
    logq_correction: bool = True  # subtract log(sampling prob.) from logits; False = plain in-batch softmax (ablation)
    # Strength alpha of the correction: logits - alpha * log Q. 1 is the classic correction (an
    # unbiased softmax over the corpus); below 1 part of the sampling bias towards popular
    # items is kept. Measured on small's validation day (recall@50): 0 -> 0.158, 0.5 -> 0.410,
    # 1 -> 0.448 (impressions); with log positives 1 -> 0.459 and, over-corrected, 1.5 -> 0.454,
    # 2 -> 0.451: the classic correction is the best setting there
    logq_alpha: float = 1.0
    logq_smoothing: float = 1.0  # add-k count smoothing in the click-frequency estimate of the sampling probability
    # Uniform negatives from the whole corpus (mixed negative sampling, Yang et al. 2020).
    # Without them an item never clicked in training is never a negative, so nothing stops
    # the long tail from drifting into every user's top K over the full corpus (small
    # preset, 5 epochs: recall@50 0.49 with 0, 0.54 with 512; tiny: 0.17 vs 0.49).
    num_uniform_negatives: int = 512
    # --- positives (retrieval/positives.py) -----------------------------------------
    # "impressions": the fit days' clicked impressions; "log": the behaviour log's events of
    # positive_kinds before the evaluation day, history days included (small, validation day,
    # 3 epochs: recall@50 0.459, @500 0.664; impressions, 4 epochs: 0.448, 0.590)
    positives: str = "log"
    # event kinds the "log" source keeps (click, purchase, view, favourite, cart); clicks alone
    # predict next-day clicks best (validation day recall@50: 0.457 clicks, 0.448 with
    # purchases, carts and favourites, 0.437 with views too)
    positive_kinds: tuple[str, ...] = ("click",)
    # a "log" positive is seen at its session's start: the first of the user's events with no gap
    # over this many seconds (0: at the event's own time, after the session's earlier clicks)
    session_gap_s: float = 1800.0
    # --- optimisation --------------------------------------------------------------
    lr: float = 3e-3  # Adam; embeddings are sparse-ish, a larger LR than for dense nets pays off
    weight_decay: float = 0.0  # decoupled (AdamW); 0 leaves rarely seen ids alone
    sparse_embeddings: bool = False  # only the looked-up rows get gradients (recstack.training.sparse): ~5x faster steps with 1e6-item tables; needs weight_decay 0, not under torchrun
    batch_size: int = 256  # also the number of in-batch negatives per positive
    epochs: int = 3  # passes over the positives; next-day recall on small's validation day peaks at 3-4, falls after 5
    max_steps: Optional[int] = None  # hard cap on optimiser steps (None = epochs decide)
    seed: int = 0
    # "test": fit days 1..D-1, evaluate day D; "valid": fit 1..D-2, evaluate D-1 (what option
    # choices are made on: the test day is never looked at to choose)
    split: str = "test"
    # --- evaluation and index ------------------------------------------------------
    eval_k: tuple[int, ...] = (50, 100, 500)  # recall@K cut-offs; Ks larger than the corpus are skipped
    eval_every_epoch: bool = False  # also evaluate after each epoch (metrics["epoch_curve"]; in-memory training only)
    eval_batch_size: int = 2048  # requests per forward pass in evaluation / export
    # faiss.index_factory string, e.g. "Flat" (exact), "IVF4096,Flat", "IVF4096,PQ32", "HNSW32";
    # "auto" = by corpus size (retrieval/index.py: exact up to 2e5 items, IVF-Flat above,
    # at the point of the large-corpus recall/latency curve with recall@1000 >= 0.95)
    index_factory: str = "auto"
    nprobe: Optional[int] = None  # IVF lists probed per query (None = the default for the index; ignored by non-IVF)
    ef_search: Optional[int] = None  # HNSW search breadth, >= k (None = the default; ignored by non-HNSW)
    ann_eval_queries: int = 1000  # test-day requests used to measure the index's recall vs exact search at export
    # N > 0: the training clicks are streamed from the Parquet shards, N clicked rows per chunk
    # per rank (recstack.data.shards), each rank reading only its slice; logQ's click counts come
    # from one exact counting pass over the item_id column
    stream_chunk_rows: int = 0  # 0: materialised in memory (DDP splits each global batch across ranks)

    def validate(self) -> None:
        if min(self.user_dims + self.item_dims) < 0:
            raise ConfigError("embedding dims must be >= 0")
        if sum(self.user_dims) == 0 or sum(self.item_dims) == 0:
            raise ConfigError("user_dims and item_dims each need at least one column with dim > 0")
        if len(self.user_dims) != 4:
            raise ConfigError(f"user_dims needs 4 entries (user, age_bucket, gender, activity), got {self.user_dims}")
        if len(self.item_dims) != 5:
            raise ConfigError(f"item_dims needs 5 entries (item, category, shop, brand, price_bucket), got {self.item_dims}")
        for name in ("seq_heads", "dim", "batch_size", "epochs", "eval_batch_size", "nprobe", "ef_search", "ann_eval_queries"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (in-batch negatives)")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.num_uniform_negatives < 0:
            raise ConfigError("num_uniform_negatives must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be >= 1 or None")
        if not self.eval_k or min(self.eval_k) < 1:
            raise ConfigError(f"eval_k must be a non-empty list of positive ints, got {self.eval_k}")
        if not 0.0 <= self.logq_alpha <= 1.0:
            raise ConfigError(f"logq_alpha must be in [0, 1], got {self.logq_alpha}")
        if self.positives not in POSITIVE_SOURCES:
            raise ConfigError(f"positives must be one of {POSITIVE_SOURCES}, got {self.positives!r}")
        bad = [k for k in self.positive_kinds if k not in EVENT_KINDS]
        if not self.positive_kinds or bad:
            raise ConfigError(f"positive_kinds must be a non-empty subset of {EVENT_KINDS}, got {self.positive_kinds}")
        if self.positives == "log" and self.stream_chunk_rows > 0:
            raise ConfigError("positives=log is built in memory; it cannot be combined with stream_chunk_rows > 0")
        if self.eval_every_epoch and self.stream_chunk_rows > 0:
            raise ConfigError("eval_every_epoch is for in-memory training; it cannot be combined with stream_chunk_rows > 0")
        bad = [s for s in self.item_stats_sources if s not in STATS_SOURCES]
        if not self.item_stats_sources or bad:
            raise ConfigError(f"item_stats_sources must be a non-empty subset of {STATS_SOURCES}, got {self.item_stats_sources}")
        if self.session_gap_s < 0:
            raise ConfigError(f"session_gap_s must be >= 0, got {self.session_gap_s}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.stream_chunk_rows < 0:
            raise ConfigError(f"stream_chunk_rows must be >= 0 (0: in memory), got {self.stream_chunk_rows}")



# what a checkpoint written before a field existed was trained with (not today's default)
_BEFORE_FIELDS = {"item_stats": False}


def checkpoint_config(d: dict) -> Config:
    """A checkpoint's config dict -> Config; one from before an option existed rebuilds the
    model it holds, whatever the default is today."""
    return from_dict(Config, {**_BEFORE_FIELDS, **d})
