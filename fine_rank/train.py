"""Train the fine ranker's CTR and CVR models and score them on the held-out day.

    cfg = Config(ctr_epochs=1)
    metrics = train(cfg, "data/small", "runs/fine")   # writes runs/fine/checkpoint.pt

CTR is fitted on every impression of the training days (label: click); CVR on the clicked
impressions only (label: purchase, or `purchase_observed` for the consent-limited stream),
both with the log-loss. Held-out metrics on the test day sit next to the ceiling that the
simulator's ground truth reaches on the same rows, and include calibration (mean
prediction / mean label), because the service multiplies pCTR x pCVR x price and so needs
calibrated probabilities, not just a good ordering.

The training method is chosen in `Config` (`fit_task` dispatches):

    cvr_teacher = sd | md | lupi | pfd | pfd_md   PFD Table 4: a `Teacher` trained synchronously
                                                  (Eq. 5, Algorithm 1), sharing the embeddings
    cvr_teacher = mtl                             the MTL baseline (one tower per post-event feature)
    ctr_sead / cvr_sead = max | min | curriculum | ogl | dtl | positives_only   SEAD's aux head
    cvr_teacher = signal_loss (+ cvr_label=purchase_observed, cvr_calibrate=aggregates)
                                                  SEAD's signal-loss variant

Whatever the method, the model that is checkpointed and exported is the plain student
`Ranker` (no privileged inputs), so the bundle contract does not change.

Streaming (`Config.stream_chunk_rows` = N > 0; shards from `recstack simulate --shard-rows`):
CTR and CVR read the training days chunk by chunk (`StreamRows`, recstack.shards), each rank
its own slice, batch_size // world_size rows per rank per step, every method as in memory.
What needs every row is done without holding them: label means, consent totals and the
post-event moments (MTL) in one pass over those columns; BatchNorm re-estimation and the
label calibration use a bounded sample (STREAM_SAMPLE_ROWS rows of a seeded shuffled pass).
The held-out day stays in memory. N = 0 (default) is the in-memory path, unchanged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as TF
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from recstack import checkpoint, distributed as D, metrics as M, sead
from recstack.config import ConfigError, to_dict
from recstack.data import Examples, SimData, load
from recstack.features import post_event_features
from recstack.shards import ShardStream, position as shard_position, train_chunks
from recstack.distill import LambdaSchedule, sync_loss

from fine_rank.model import MTLRanker, Ranker, SelfAuxiliary, Teacher, build_teacher

STAGE = "fine"
TASKS = ("ctr", "cvr")
MODEL_INPUTS = ("user_feats", "item_feats", "item_dense", "interacted")  # the ONNX inputs, in order
# columns kept when the examples are materialised: inputs, labels, privileged features (for
# the PFD teachers), ground truth (evaluation only) and consent (signal-loss experiments)
TABLE_COLUMNS = MODEL_INPUTS + (
    "post_event", "click", "purchase", "purchase_observed", "true_pctr", "true_pcvr", "consent", "user_id", "item_id",
)
OPTIMIZERS = ("adam", "adagrad")
CVR_LABELS = ("purchase", "purchase_observed")
SPLITS = ("test", "valid")
# CVR training methods (PFD Table 4, SEAD Table 2): "none" is the plain student; sd, md,
# lupi, pfd, pfd_md train a `Teacher` synchronously (Eq. 5); mtl predicts each post-event
# feature from a shared first layer; signal_loss is SEAD's consent-limited variant
CVR_TEACHERS = ("none", "sd", "md", "lupi", "pfd", "pfd_md", "mtl", "signal_loss")
SEAD_MODES = ("none",) + sead.SELECTORS
CALIBRATIONS = ("none", "labels", "aggregates")


@dataclass
class Config:
    """Fine-ranker training settings; `ctr_*` / `cvr_*` fields configure each model."""

    seed: int = 0  # torch init + shuffling; the CVR model uses seed + 1
    split: str = "test"  # "test": fit days 1..D-1, score day D; "valid": fit 1..D-2, score D-1 (LR sweeps)
    cvr_label: str = "purchase"  # "purchase_observed": only consented users' purchases (signal loss)
    eval_batch_size: int = 8192  # inference batch for held-out scoring (memory only)
    # N > 0: CTR and CVR stream the training days from their Parquet shards, N rows per chunk
    # per rank (recstack.shards), each rank reading only its slice; see `StreamRows`
    stream_chunk_rows: int = 0  # 0: materialised in memory (DDP splits each global batch across ranks)
    # CTR: ~237k training impressions on `small`. The id embeddings overfit fast: on
    # `small` one epoch scores a better next-day AUC and log-loss than two
    ctr_emb_dim: int = 16  # per categorical column; 9 columns -> 144 + 8 dense inputs
    ctr_hidden: tuple[int, ...] = (512, 256, 128)  # shared-bottom widths (PFD: 3 layers)
    ctr_optimizer: str = "adam"  # adam | adagrad (PFD's choice; give it lr ~0.01-0.05)
    ctr_lr: float = 1e-3  # Adam's usual default; stable with BatchNorm
    ctr_weight_decay: float = 0.0  # L2 on all weights (passed to the optimizer)
    ctr_batch_size: int = 512  # ~460 steps per epoch on `small`; BatchNorm is stable at this size
    ctr_epochs: int = 1  # passes over the training impressions
    ctr_max_steps: int = 0  # cap on optimizer steps; 0 = no cap
    ctr_lr_decay: bool = True  # linear decay to 0 over the run (see `fit`: calibration)
    # CVR: ~20x fewer (clicked) rows, 13 % positives; two epochs beat one and three on `small`
    cvr_emb_dim: int = 16  # as ctr_emb_dim
    cvr_hidden: tuple[int, ...] = (512, 256, 128)  # as ctr_hidden
    cvr_optimizer: str = "adam"  # as ctr_optimizer
    cvr_lr: float = 1e-3  # as ctr_lr
    cvr_weight_decay: float = 0.0  # as ctr_weight_decay
    cvr_batch_size: int = 512  # ~27 steps per epoch on `small`'s clicked rows
    cvr_epochs: int = 2  # passes over the clicked impressions
    cvr_max_steps: int = 0  # cap on optimizer steps; 0 = no cap
    cvr_lr_decay: bool = True  # as ctr_lr_decay
    # --- distillation (PFD, CVR) -------------------------------------------------------
    cvr_teacher: str = "none"  # one of CVR_TEACHERS; the exported model is always the student
    cvr_md_hidden: tuple[int, ...] = (1024, 512, 512, 256, 128)  # MD / PFD+MD teacher (paper: 8192..128, 7 layers; CPU-sized)
    distill_lambda: float = 0.5  # λ of Eq. 5 (PFD's default)
    distill_warmup: float = 0.1  # fraction of steps with λ = 0 (Algorithm 1's swap step k)
    mtl_weight: float = 0.1  # weight of each auxiliary MTL loss (PFD picks from 0.01..2, "balanced")
    mtl_hidden: tuple[int, ...] = (256, 128)  # each MTL task tower on the shared first layer (paper: 2 layers)
    # --- SEAD (CTR and CVR) ---------------------------------------------------------------
    ctr_sead: str = "none"  # one of SEAD_MODES: the auxiliary head's label selector (none = no aux head)
    cvr_sead: str = "none"  # as ctr_sead
    sead_weight: float = 1.0  # weight of the auxiliary loss
    sead_sga: bool = False  # SGA ablation: the aux loss does not update the shared bottom / embeddings
    sead_pos_weight: float = 3.0  # curriculum: positives' initial weight, decaying to 1 ...
    sead_curriculum_until: float = 0.5  # ... at this fraction of training
    # --- calibration ------------------------------------------------------------------------
    # A global shift of the exported head's bias after training, fitted on the training rows
    # (the ordering, hence AUC, is unchanged). "labels": mean prediction = the training label
    # mean (a short run, or a distilled student learning from a teacher's soft labels, ends a
    # few % off). "aggregates" (CVR only): = the aggregated conversion rate of the training
    # days (signal loss: the per-example labels undercount conversions, the daily
    # per-category counts do not)
    ctr_calibrate: str = "none"
    # measured on `small`, validation day, seeds 1-3, lr 2e-3 (mean prediction / mean true
    # pCVR): baseline 0.99-1.01 without, 1.005-1.01 with; PFD student 1.10-1.18 without,
    # 1.003-1.008 with (its teacher's soft labels run high on the training rows)
    cvr_calibrate: str = "labels"

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.cvr_label not in CVR_LABELS:
            raise ConfigError(f"cvr_label must be one of {CVR_LABELS}, got {self.cvr_label!r}")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size must be >= 1")
        if self.stream_chunk_rows < 0:
            raise ConfigError(f"stream_chunk_rows must be >= 0 (0: in memory), got {self.stream_chunk_rows}")
        for task in TASKS:
            self.settings(task).validate(task)
        if self.cvr_teacher not in CVR_TEACHERS:
            raise ConfigError(f"cvr_teacher must be one of {CVR_TEACHERS}, got {self.cvr_teacher!r}")
        for task in TASKS:
            if getattr(self, f"{task}_sead") not in SEAD_MODES:
                raise ConfigError(f"{task}_sead must be one of {SEAD_MODES}, got {getattr(self, f'{task}_sead')!r}")
        if self.cvr_teacher != "none" and self.cvr_sead != "none":
            raise ConfigError("cvr_teacher and cvr_sead are separate methods; set one of them")
        if self.cvr_teacher == "signal_loss" and (self.cvr_label != "purchase_observed" or self.cvr_calibrate == "labels"):
            raise ConfigError("cvr_teacher=signal_loss learns from the consent-limited stream and is calibrated to the "
                              "aggregates: set cvr_label=purchase_observed and cvr_calibrate=aggregates (or none)")
        if self.cvr_calibrate not in CALIBRATIONS:
            raise ConfigError(f"cvr_calibrate must be one of {CALIBRATIONS}, got {self.cvr_calibrate!r}")
        if self.ctr_calibrate not in CALIBRATIONS[:2]:
            raise ConfigError(f"ctr_calibrate must be one of {CALIBRATIONS[:2]}, got {self.ctr_calibrate!r}")
        if not 0 <= self.distill_lambda <= 1 or not 0 <= self.distill_warmup < 1:
            raise ConfigError("distill_lambda must be in [0, 1] and distill_warmup in [0, 1)")
        if self.mtl_weight < 0 or self.sead_weight < 0 or not self.cvr_md_hidden or not self.mtl_hidden:
            raise ConfigError("mtl_weight, sead_weight >= 0 and non-empty cvr_md_hidden, mtl_hidden required")
        if self.sead_pos_weight < 1 or not 0 < self.sead_curriculum_until <= 1:
            raise ConfigError("sead_pos_weight >= 1 and 0 < sead_curriculum_until <= 1 required")

    def settings(self, task: str) -> "ModelSettings":
        """The `ctr_*` or `cvr_*` fields as one object."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return ModelSettings(**{f: getattr(self, f"{task}_{f}") for f in ModelSettings.__dataclass_fields__})

    def __post_init__(self) -> None:
        for name in ("ctr_hidden", "cvr_hidden", "cvr_md_hidden", "mtl_hidden"):
            setattr(self, name, tuple(getattr(self, name)))
        self.validate()


@dataclass(frozen=True)
class ModelSettings:
    """Settings of one model (CTR or CVR); see the matching fields of `Config`."""

    emb_dim: int
    hidden: tuple[int, ...]
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    max_steps: int
    lr_decay: bool

    def validate(self, task: str) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{task}_optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.emb_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"{task}_emb_dim and {task}_hidden must be positive")
        # BatchNorm needs at least two rows per training batch
        if self.batch_size < 2 or self.epochs < 1 or self.max_steps < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"{task}: batch_size >= 2, epochs >= 1, max_steps >= 0, lr > 0, weight_decay >= 0 required")

    def steps(self, n_rows: int) -> int:
        per_epoch = math.ceil(n_rows / self.batch_size)
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


# ---------------------------------------------------------------------------- data


def materialise(examples: Examples, chunk: int = 16384) -> dict[str, np.ndarray]:
    """Examples -> dict of numpy columns (TABLE_COLUMNS), built once.

    The behaviour-sequence gathers behind the interacted features dominate batch building,
    and the fine ranker only needs their (B, 7) result, so it is computed once per row
    rather than once per row per epoch.
    """
    n = len(examples)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in TABLE_COLUMNS}
    for s in range(0, n, chunk):
        b = examples.batch(np.arange(s, min(s + chunk, n)))
        for k in TABLE_COLUMNS:
            parts[k].append(b[k])
    if n == 0:
        raise ValueError("no examples to materialise")
    return {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}


def clicked(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with a click: the CVR population (purchase is only defined after a click)."""
    keep = table["click"] > 0.5
    return {k: v[keep] for k, v in table.items()}


def split_days(data: SimData, split: str) -> tuple[list[int], int]:
    """-> (days to fit on, day to score)."""
    if split == "test":
        return data.train_days, data.test_day
    if split == "valid":
        return data.fit_days, data.valid_day
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------- streamed training rows

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

    def __init__(self, data: SimData, days: list[int], chunk_rows: int, clicked_only: bool = False):
        self.data, self.days, self.chunk_rows, self.clicked_only = data, list(days), int(chunk_rows), clicked_only
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
                parts.append(materialise(ex))
                got += len(ex)
                if got >= STREAM_SAMPLE_ROWS:
                    break
            self._sample[seed] = {k: np.concatenate([p[k] for p in parts])[:STREAM_SAMPLE_ROWS] for k in TABLE_COLUMNS}
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


# ------------------------------------------------------------------------- training


def make_optimizer(model: torch.nn.Module, s: ModelSettings) -> torch.optim.Optimizer:
    # model.parameters() de-duplicates shared tensors (a teacher sharing the student's embeddings)
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


def build_model(vocab, s: ModelSettings, seed: int) -> Ranker:
    torch.manual_seed(seed)
    return Ranker.build(vocab, s.emb_dim, s.hidden)


StepLoss = Callable[[torch.Tensor, int, int], "tuple[torch.Tensor, dict]"]


def optimise(model: torch.nn.Module, src: "Source", step_loss: StepLoss, forward: Callable[[torch.Tensor], object],
             s: ModelSettings, seed: int, bar=None) -> dict:
    """The training loop shared by every method: shuffled mini-batches, linear LR decay, then
    precise BatchNorm statistics.

    `model` holds every trained module (student, teacher, extra heads); `step_loss(idx, step,
    total)` returns the loss of the rows `idx` and detached parts for logging; `forward(idx)`
    runs every BatchNorm-carrying module on rows `idx` (for the BN refresh).

    Under torchrun each rank trains on an interleaved share of every (global) batch through
    DDP (recstack.distributed). Inside `train()` the loop is one resumable phase of the run
    (recstack.checkpoint.TrainingState): snapshots every `checkpoint_every` steps, and a
    resumed phase continues from its snapshot (or is skipped when it had finished).

    Streamed (`src.rows`, cfg.stream_chunk_rows > 0): the rank's slice of the shards, chunk
    after chunk loaded into `src.x`; `idx` indexes the chunk, in batches of batch_size //
    world_size rows (the chunk's rows are already shuffled), so a step still sees a global
    batch of batch_size rows; a snapshot stores the chunk's cursor and the batches done in
    it. BatchNorm is re-estimated on the bounded sample (`StreamRows.sample_table`).
    """
    n = src.n
    if n < 2:
        raise ValueError(f"need at least 2 training rows, got {n}")
    ph = checkpoint.phase(f"fine:{type(model).__name__}(seed={seed})", n)
    if ph.done is not None:  # finished before the interruption: its final (BN-refreshed) state
        model.load_state_dict(ph.done["model"])
        model.eval()
        if bar is not None:
            bar.update(int(ph.done["stats"]["steps"]))
        return dict(ph.done["stats"])
    world = D.world()
    opt = make_optimizer(model, s)
    total = src.steps(s, seed)
    # decay to 0: the last iterates stop jittering the output bias (which would show up as
    # a calibration error of several %) and BatchNorm statistics catch up with the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total) if s.lr_decay else 1.0)
    gen = torch.Generator().manual_seed(seed)
    step, recent = 0, []
    perm, first = None, 0  # the epoch's batch order and the next batch's offset in it
    if ph.resume is not None:
        r = ph.resume
        model.load_state_dict(r["model"])
        opt.load_state_dict(r["optimizer"])
        sched.load_state_dict(r["scheduler"])
        gen.set_state(r["generator"])
        step, recent, perm, first = r["step"], list(r["recent"]), r["perm"], r["next"]
        if (src.rows is not None) != ("stream" in r):
            raise checkpoint.CheckpointError(f"{ph.name}: the snapshot was written by a "
                                             f"{'streamed' if 'stream' in r else 'in-memory'} run, this one is "
                                             f"{'streamed' if src.rows is not None else 'in memory'}")
        if bar is not None:
            bar.update(step)
    step_fn = D.wrap(model, step_loss)
    model.train()
    t0 = time.perf_counter()

    def train_step(idx: torch.Tensor, snapshot_extra: Callable[[], dict]) -> None:
        nonlocal step, recent
        loss, _ = step_fn(idx, step, total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        recent = (recent + [loss.item()])[-50:]
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(recent):.4f}")
        ph.after_step(step, lambda: {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "recent": list(recent), **snapshot_extra()})

    if src.rows is not None:
        local = s.batch_size // world.size
        resume_at = ph.resume["stream"] if ph.resume is not None else None
        if step < total:
            for _, cursor, chunk, skip in train_chunks(src.rows.stream(seed), None, resume_at):
                src.load(materialise(chunk))
                m = len(src.x["y"])
                for k, lo in enumerate(range(skip * local, m, local), skip + 1):
                    idx = torch.arange(lo, min(lo + local, m))
                    if len(idx) < 2:  # BatchNorm cannot normalise a single row (every rank's chunks are alike)
                        continue
                    train_step(idx, lambda: {"perm": None, "next": 0, "stream": shard_position(cursor, k)})
                    if step >= total:
                        break
                if step >= total:
                    break
        sample = src.rows.sample_table(seed)
        src.load(sample)  # the same rows on every rank: identical BatchNorm statistics
        refresh_batchnorm(model, forward, len(sample["click"]), s.batch_size, gen)
        src.x.clear()
    while src.rows is None and step < total:
        if perm is None:
            perm, first = torch.randperm(n, generator=gen), 0
        for start in range(first, n, s.batch_size):
            idx = perm[start : start + s.batch_size]
            if len(idx) // world.size < 2:  # BatchNorm cannot normalise a single row (decided alike on every rank)
                continue
            train_step(D.shard(idx, w=world), lambda: {"perm": perm, "next": start + s.batch_size})
            if step >= total:
                break
        perm = None
    if src.rows is None:
        refresh_batchnorm(model, forward, n, s.batch_size, gen)
    D.check_in_sync(model, f"fine {type(model).__name__}")
    stats = {"n_train": int(n), "steps": step, "train_loss_last50": D.all_reduce(float(np.mean(recent)), "mean"),
             "train_seconds": time.perf_counter() - t0}
    if world.distributed:
        stats["world_size"] = world.size
    if src.rows is not None:
        stats["stream_chunk_rows"] = src.rows.chunk_rows
    ph.finish(model.state_dict(), stats)
    return stats


def _tensors(table: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(table[k])) for k in MODEL_INPUTS + ("post_event",)}


def fit(model: Ranker, table: dict[str, np.ndarray], label: str, s: ModelSettings, seed: int, bar=None) -> dict:
    """Minimise the log-loss of `model.logits` against `table[label]`; returns training stats.
    (`table`: a materialised table or a `StreamRows`, here and in every fit_* below.)"""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    model.head.set_prior(y_mean)

    def fwd(idx):
        return model.logits(*(x[k][idx] for k in MODEL_INPUTS))

    def step_loss(idx, step, total):
        loss = TF.binary_cross_entropy_with_logits(fwd(idx), x["y"][idx])
        return loss, {"loss": loss.detach()}

    stats = optimise(model, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean}


def fit_distilled(student: Ranker, teacher: Teacher, table: dict[str, np.ndarray], label: str, s: ModelSettings,
                  seed: int, lam: float, warmup: float, bar=None) -> dict:
    """PFD Eq. 5 / Algorithm 1, synchronous: the student learns from (1-λ)·y + λ·teacher, the
    teacher from y alone (its soft label is detached in L_d); λ = 0 for the first `warmup`
    fraction of steps."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    for m in (student, teacher):
        m.head.set_prior(y_mean)
    schedule = LambdaSchedule(lam, swap_step=int(warmup * src.steps(s, seed)))
    both = torch.nn.ModuleDict({"student": student, "teacher": teacher})

    def fwd(idx):
        xs = [x[k][idx] for k in MODEL_INPUTS]
        return student.logits(*xs), teacher.logits(*xs, x["post_event"][idx])

    def step_loss(idx, step, total):
        s_logits, t_logits = fwd(idx)
        return sync_loss(s_logits, t_logits, x["y"][idx], schedule(step))

    stats = optimise(both, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean, "swap_step": schedule.swap_step}


def fit_mtl(mtl: MTLRanker, table: dict[str, np.ndarray], label: str, s: ModelSettings, seed: int,
            weight: float, bar=None) -> dict:
    """PFD's MTL baseline: main log-loss + weight x (MSE on the standardised continuous
    post-event columns, log-loss on the binary ones)."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    continuous, binary = [0, 1], [2, 3]  # log dwell, log comments | chatted, cart
    mu, sd = src.post_moments(continuous)
    sd = sd.clamp_min(1e-6)
    mtl.student.head.set_prior(y_mean)
    binary_means = src.post_moments(binary)[0]
    for i, j in enumerate(binary):
        mtl.towers[j][1].set_prior(float(x["post_event"][:, j].mean()) if src.rows is None else float(binary_means[i]))

    def fwd(idx):
        return mtl.both(*(x[k][idx] for k in MODEL_INPUTS))

    def step_loss(idx, step, total):
        main, aux = fwd(idx)
        p = x["post_event"][idx]
        l_main = TF.binary_cross_entropy_with_logits(main, x["y"][idx])
        l_reg = TF.mse_loss(aux[:, continuous], (p[:, continuous] - mu) / sd, reduction="none").mean(0).sum()
        l_bin = TF.binary_cross_entropy_with_logits(aux[:, binary], p[:, binary], reduction="none").mean(0).sum()
        return l_main + weight * (l_reg + l_bin), {"main": l_main.detach()}

    stats = optimise(mtl, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean}


def fit_sead(model: SelfAuxiliary, table: dict[str, np.ndarray], label: str, s: ModelSettings, seed: int,
             selector: str, cfg: "Config", bar=None) -> dict:
    """SEAD: main head on y (serving, calibrated), aux head on f(y, y') (recstack.sead)."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    model.main.head.set_prior(y_mean)
    model.aux.set_prior(y_mean)

    def fwd(idx):
        return model.both(*(x[k][idx] for k in MODEL_INPUTS), stop_aux_gradient=cfg.sead_sga)

    def step_loss(idx, step, total):
        main, aux = fwd(idx)
        return sead.sead_loss(main, aux, x["y"][idx], selector, progress=step / total, aux_weight=cfg.sead_weight,
                              pos_weight=cfg.sead_pos_weight, until=cfg.sead_curriculum_until)

    stats = optimise(model, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean}


def fit_signal_loss(student: Ranker, teacher: SelfAuxiliary, table: dict[str, np.ndarray], label: str,
                    s: ModelSettings, seed: int, warmup: float, bar=None) -> dict:
    """SEAD's signal-loss variant (Table 2). Teacher: main head on the consented (unbiased)
    rows, aux head on every row of the biased stream `label`; student: max(y, y') with y'
    the teacher main head's soft label (detached), after `warmup` of the steps (y before).
    The student shares the teacher's embeddings."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    unbiased_rate = src.consented_rate()
    teacher.main.head.set_prior(unbiased_rate)
    teacher.aux.set_prior(y_mean)
    student.head.set_prior(unbiased_rate)
    swap = int(warmup * src.steps(s, seed))
    both = torch.nn.ModuleDict({"student": student, "teacher": teacher})

    def fwd(idx):
        xs = [x[k][idx] for k in MODEL_INPUTS]
        return (*teacher.both(*xs), student.logits(*xs))

    def step_loss(idx, step, total):
        t_main, t_aux, s_logits = fwd(idx)
        yb, c = x["y"][idx], x["consent"][idx]
        l_main = sead.weighted_bce(t_main, yb, c)  # consented rows only
        l_aux = TF.binary_cross_entropy_with_logits(t_aux, yb)
        target = sead.select("max", yb, torch.sigmoid(t_main)) if step >= swap else yb
        l_student = TF.binary_cross_entropy_with_logits(s_logits, target)
        return l_main + l_aux + l_student, {"teacher_main": l_main.detach(), "student": l_student.detach()}

    stats = optimise(both, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean, "consented_positive_rate": unbiased_rate, "swap_step": swap}


@torch.no_grad()
def refresh_batchnorm(model: torch.nn.Module, forward: Callable[[torch.Tensor], object], n_rows: int, batch_size: int,
                      gen: torch.Generator, max_rows: int = 65536) -> None:
    """Re-estimate BatchNorm running statistics with the final weights ("precise BN").

    `forward(rows)` runs the model on the training rows `rows` (a (B,) index tensor); up to
    `max_rows` random rows are used. Leaves the model in eval mode.

    The running averages collected during training mix statistics of earlier weights; in
    the deeper layers they drift by several % from those of the final model, and the
    serving (eval-mode) output is then miscalibrated by as much even on training rows.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        model.eval()
        return
    rows = torch.randperm(n_rows, generator=gen)[:max_rows]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        if len(idx) >= 2:
            forward(idx)
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.eval()


@torch.no_grad()
def predict(model: Ranker, table: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """-> (N,) float32 probabilities from the serving forward (eval mode)."""
    model.eval()
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        out[sl] = model(*(torch.from_numpy(table[k][sl]) for k in MODEL_INPUTS)).numpy()
    return out


@torch.no_grad()
def predict_with(fn: Callable[..., torch.Tensor], table: dict[str, np.ndarray], batch_size: int = 8192,
                 privileged: bool = False) -> np.ndarray:
    """-> (N,) probabilities of sigmoid(fn(*serving inputs[, post_event])) (models in eval mode)."""
    keys = MODEL_INPUTS + (("post_event",) if privileged else ())
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        out[s : s + batch_size] = torch.sigmoid(fn(*(torch.from_numpy(table[k][s : s + batch_size]) for k in keys))).numpy()
    return out


# ---------------------------------------------------------------- aggregated conversions


def aggregates(data: SimData, days: list[int] | int) -> dict[str, np.ndarray]:
    """The daily per-category conversion counts (SKAdNetwork-like) of `days`:
    columns day, category, clicks, conversions (all users, consent or not)."""
    days = [days] if isinstance(days, int) else list(days)
    t = pq.read_table(data.root / "aggregates.parquet").to_pydict()
    keep = np.isin(np.asarray(t["day"]), days)
    return {k: np.asarray(t[k])[keep] for k in ("day", "category", "clicks", "conversions")}


def aggregate_rate(agg: dict[str, np.ndarray]) -> float:
    """Aggregated conversions / clicks."""
    return float(agg["conversions"].sum() / max(agg["clicks"].sum(), 1))


def calibrate_to_rate(model: Ranker, table: dict[str, np.ndarray], rate: float, batch_size: int = 8192) -> float:
    """Shift the head bias so that the mean prediction on `table` equals `rate`; -> the shift.

    A global logit shift keeps the ordering (AUC) and is part of the exported graph.
    """
    model.eval()
    z = np.log(predict(model, table, batch_size).astype(np.float64))
    z = z - np.log1p(-np.exp(z))  # logit
    lo, hi = -20.0, 20.0
    for _ in range(80):  # mean(sigmoid(z + b)) is increasing in b
        mid = (lo + hi) / 2
        if np.mean(1 / (1 + np.exp(-(z + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    shift = (lo + hi) / 2
    with torch.no_grad():
        model.head.linear.bias += shift
    return float(shift)


def aggregate_metrics(table: dict[str, np.ndarray], probs: np.ndarray, agg: dict[str, np.ndarray]) -> dict:
    """Scores against the aggregated labels of the same day(s).

    auc: the per-(day, category) mean prediction scored against the aggregated counts (each
    aggregate = `conversions` positives and `clicks - conversions` negatives, all with the
    cell's score); calibration: mean prediction / aggregated conversion rate.
    """
    cat = table["item_feats"][:, 1] - 1  # model ids are raw + 1
    # one cell per (day, category); rows carry no day column, so `agg` must hold one day
    if len(np.unique(agg["day"])) != 1:
        raise ValueError("aggregate_metrics scores one day at a time")
    n_cat = int(max(cat.max(), agg["category"].max())) + 1
    sums = np.bincount(cat, weights=probs, minlength=n_cat)
    counts = np.bincount(cat, minlength=n_cat)
    clicks = np.zeros(n_cat)
    conv = np.zeros(n_cat)
    clicks[agg["category"]] = agg["clicks"]
    conv[agg["category"]] = agg["conversions"]
    cells = (counts > 0) & (clicks > 0)
    score = sums[cells] / counts[cells]
    pos, neg = conv[cells], clicks[cells] - conv[cells]
    labels = np.r_[np.ones(cells.sum()), np.zeros(cells.sum())]
    auc = float(roc_auc_score(labels, np.r_[score, score], sample_weight=np.r_[pos, neg])) if pos.sum() and neg.sum() else float("nan")
    return {"auc_aggregated": auc, "calibration_aggregated": float(np.mean(probs) / max(aggregate_rate(agg), 1e-12)),
            "aggregated_rate": aggregate_rate(agg)}


# -------------------------------------------------------------------------- methods


@dataclass
class TaskResult:
    """A trained task: the serving student, its training stats, and the extra heads that
    the reports score (teacher, auxiliary head) as functions of a table -> (N,) probs."""

    model: Ranker
    stats: dict
    extras: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]]


def label_for(task: str, cfg: Config) -> str:
    return "click" if task == "ctr" else cfg.cvr_label


def fit_task(task: str, cfg: Config, vocab, table: "dict[str, np.ndarray] | StreamRows", seed: int, *, bar=None,
             aggregate_rate: float | None = None) -> TaskResult:
    """Train `task` ("ctr" or "cvr") with the method `cfg` selects on `table` (the task's
    population: a materialised table, or a `StreamRows`); -> the eval-mode student and its
    extras. `aggregate_rate` is required when cfg.cvr_calibrate == "aggregates" (CVR).
    Streamed, the calibration shift is fitted on the bounded sample (StreamRows.sample_table)
    to the label mean of every training row."""
    s = cfg.settings(task)
    label = label_for(task, cfg)
    student = build_model(vocab, s, seed)  # the same initial student for every method of a seed
    extras: dict[str, Callable] = {}
    bs = cfg.eval_batch_size
    method = cfg.cvr_teacher if task == "cvr" else "none"
    selector = getattr(cfg, f"{task}_sead")
    if method in ("sd", "md", "lupi", "pfd", "pfd_md"):
        teacher = build_teacher(method, student, s.hidden, cfg.cvr_md_hidden)
        stats = fit_distilled(student, teacher, table, label, s, seed, cfg.distill_lambda, cfg.distill_warmup, bar)
        teacher.eval()
        extras["teacher"] = lambda t, m=teacher: predict_with(m.logits, t, bs, privileged=True)
    elif method == "mtl":
        mtl = MTLRanker(student, aux_hidden=cfg.mtl_hidden)
        stats = fit_mtl(mtl, table, label, s, seed, cfg.mtl_weight, bar)
    elif method == "signal_loss":
        teacher = SelfAuxiliary(Ranker(student.embeddings, s.hidden))
        stats = fit_signal_loss(student, teacher, table, label, s, seed, cfg.distill_warmup, bar)
        teacher.eval()
        extras["teacher"] = lambda t, m=teacher: predict_with(m.main.logits, t, bs)
        extras["teacher_aux"] = lambda t, m=teacher: predict_with(lambda *xs: m.both(*xs)[1], t, bs)
    elif selector != "none":
        wrapped = SelfAuxiliary(student)
        stats = fit_sead(wrapped, table, label, s, seed, selector, cfg, bar)
        wrapped.eval()
        extras["aux"] = lambda t, m=wrapped: predict_with(lambda *xs: m.both(*xs)[1], t, bs)
    else:
        stats = fit(student, table, label, s, seed, bar)
    student.eval()
    calibrate = getattr(cfg, f"{task}_calibrate")
    if calibrate != "none":
        if calibrate == "aggregates":
            if aggregate_rate is None:
                raise ValueError("cvr_calibrate=aggregates needs the training days' aggregated conversion rate")
            target = aggregate_rate
        else:
            target = float(np.mean(table[label])) if not isinstance(table, StreamRows) else table.mean(label)
        rows = table.sample_table(seed) if isinstance(table, StreamRows) else table
        stats["calibration_shift"] = calibrate_to_rate(student, rows, target, bs)
        stats["calibrated_to"] = target
    stats["method"] = method if method != "none" else (f"sead_{selector}" if selector != "none" else "baseline")
    return TaskResult(student, stats, extras)


def evaluate(labels: np.ndarray, probs: np.ndarray, truth: np.ndarray) -> dict:
    """Held-out metrics of `probs`, each next to the ground truth's value on the same rows."""
    labels = np.asarray(labels, dtype=np.float64)
    return {
        "n": int(len(labels)),
        "auc": M.auc(labels, probs),
        "auc_truth": M.auc(labels, truth),
        "logloss": M.logloss(labels, probs),
        "logloss_truth": M.logloss(labels, truth),
        "calibration": M.calibration(labels, probs),
        # the truth's own ratio shows how far sampling noise alone moves the label mean
        "calibration_truth": M.calibration(labels, truth),
        # mean prediction / mean true probability: the model's own bias, free of label noise
        "calibration_vs_truth": float(np.mean(probs) / max(np.mean(truth), 1e-12)),
        "mean_pred": float(np.mean(probs)),
        "mean_label": float(np.mean(labels)),
    }


def format_metrics(m: dict) -> str:
    lines = [f"fine ranker, held-out day {m['eval_day']} (fit on days {m['train_days']}):"]
    for task in TASKS:
        e = m[task]
        lines.append(
            f"  {task.upper()} [{e['label']}{'' if e['train_label'] == e['label'] else ', trained on ' + e['train_label']}, "
            f"n={e['n']}]  AUC {e['auc']:.4f} (truth {e['auc_truth']:.4f})  "
            f"log-loss {e['logloss']:.4f} (truth {e['logloss_truth']:.4f})  "
            f"calibration {e['calibration']:.3f} (truth {e['calibration_truth']:.3f}; "
            f"vs truth {e['calibration_vs_truth']:.3f})  "
            f"[{e['train']['method']}, {e['train']['steps']} steps, {e['train']['train_seconds']:.1f}s]"
        )
        for extra in ("teacher", "teacher_aux", "aux"):
            if extra in e:
                lines.append(f"    {extra}: AUC {e[extra]['auc']:.4f}  calibration {e[extra]['calibration']:.3f}")
        if "vs_aggregates" in e:
            a = e["vs_aggregates"]
            lines.append(f"    vs aggregates: AUC {a['auc_aggregated']:.4f}  calibration {a['calibration_aggregated']:.3f}")
    return "\n".join(lines)


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True, resume: bool = False,
          checkpoint_every: int = 0) -> dict:
    """Fit CTR and CVR, score them on the held-out day, save `out_dir/checkpoint.pt`; -> metrics.

    checkpoint_every: write the training state to `out_dir/train_state.pt` every that many
    optimiser steps (0: never); resume: continue from that file when it exists (a run that
    ends bit-identical to an uninterrupted one). Under torchrun every rank trains, rank 0
    scores the held-out day, prints and writes; the other ranks return the training stats.
    """
    cfg.validate()
    D.check_divisible(ctr_batch_size=cfg.ctr_batch_size, cvr_batch_size=cfg.cvr_batch_size)
    t_start = time.perf_counter()
    main = D.is_main()
    data = load(data_dir)
    fit_days, eval_day = split_days(data, cfg.split)
    eval_table = materialise(data.examples(eval_day))  # the held-out day stays in memory, streamed or not
    if cfg.stream_chunk_rows:
        tables = {"ctr": (StreamRows(data, fit_days, cfg.stream_chunk_rows), eval_table),
                  "cvr": (StreamRows(data, fit_days, cfg.stream_chunk_rows, clicked_only=True), clicked(eval_table))}
    else:
        train_table = materialise(data.examples(fit_days))
        tables = {"ctr": (train_table, eval_table), "cvr": (clicked(train_table), clicked(eval_table))}
    labels = {task: label_for(task, cfg) for task in TASKS}
    truths = {"ctr": "true_pctr", "cvr": "true_pcvr"}
    settings = {task: cfg.settings(task) for task in TASKS}
    seeds = {"ctr": cfg.seed, "cvr": cfg.seed + 1}
    t_data = time.perf_counter() - t_start

    agg_rate = aggregate_rate(aggregates(data, fit_days))
    total_steps = sum(settings[t].steps(len(tables[t][0]["click"])) if not cfg.stream_chunk_rows
                      else tables[t][0].steps(settings[t], seeds[t]) for t in TASKS)
    models: dict[str, Ranker] = {}
    metrics: dict = {"eval_day": eval_day, "train_days": list(fit_days), "split": cfg.split, "data_seconds": t_data}
    state = checkpoint.TrainingState(Path(out_dir) / checkpoint.STATE_FILE, STAGE, to_dict(cfg), checkpoint_every,
                                     resume, write=main)
    with state, tqdm(total=total_steps, desc="fine", disable=not (progress and main), unit="step") as bar:
        for task in TASKS:
            fit_rows, eval_rows = tables[task]
            bar.set_description(f"fine {task}")
            result = fit_task(task, cfg, data.vocab, fit_rows, seeds[task], bar=bar, aggregate_rate=agg_rate)
            models[task] = result.model
            if not main:
                metrics[task] = {"train": result.stats}
                continue
            probs = predict(result.model, eval_rows, cfg.eval_batch_size)
            # CVR is always scored against real purchases: under signal loss the training
            # label undercounts them, and the service needs the true conversion probability
            eval_label = "click" if task == "ctr" else "purchase"
            m = evaluate(eval_rows[eval_label], probs, eval_rows[truths[task]])
            m["label"] = eval_label
            m["train_label"] = labels[task]
            m["train"] = result.stats
            if labels[task] != eval_label:
                m["vs_train_label"] = evaluate(eval_rows[labels[task]], probs, eval_rows[truths[task]])
            if task == "cvr":
                m["vs_aggregates"] = aggregate_metrics(eval_rows, probs, aggregates(data, eval_day))
            for name, extra in result.extras.items():
                m[name] = evaluate(eval_rows[eval_label], extra(eval_rows), eval_rows[truths[task]])
            metrics[task] = m
    metrics["wall_seconds"] = time.perf_counter() - t_start
    if state.resumed:
        metrics["resumed"] = True
    if main:
        if progress:
            print(format_metrics(metrics))
        checkpoint.save(
            Path(out_dir) / "checkpoint.pt",
            {
                "stage": STAGE,
                "config": to_dict(cfg),
                "model": {task: models[task].state_dict() for task in TASKS},
                "metrics": metrics,
                "data_dir": str(Path(data_dir).resolve()),
                "vocab": data.vocab.to_dict(),
            },
        )
    D.barrier()
    return metrics
