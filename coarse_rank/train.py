"""Train the coarse ranker's inner-product student on clicks, optionally distilled from a
teacher that sees the privileged (interacted) features (PFD Eq. 5, Algorithm 1).

    from coarse_rank.train import Config, train
    metrics = train(Config(max_steps=200, teacher="pfd_md"), "data/small", "runs/coarse")

Teachers (`Config.teacher`): baseline (none), sd (the student's architecture, no privileged
features: soft labels alone), lupi (privileged features only), md (3-layer DNN on the regular
features), pfd (inner product with the interacted features at the user side), pfd_md (DNN
on regular + interacted features). Training manners (`Config.manner`, PFD Table 7):
ind_async (teacher trained first, then the student), ind_sync, share_sync (the teacher
uses the student's embeddings and behaviour encoder), share_star_sync (all shared but the
user id embedding). Only the student is saved and exported.

Held-out evaluation is next-day: fit on the days before the evaluation day, report AUC on
the evaluation day beside the ground-truth ceiling (the simulator's true pCTR scored
against the same clicks), which no model can beat in expectation.

Streaming (`Config.stream_chunk_rows` = N > 0, for worlds whose training days do not fit in
memory; written with `recstack simulate --shard-rows`): the training days are read from
their Parquet shards N rows per chunk per rank (recstack.shards.ShardStream, whole sessions
shuffled), each rank reading only its slice and training on batch_size // world_size rows
per step, so a step still sees a global batch of batch_size rows; a batch never spans two
chunks (with N a multiple of batch_size // world_size the step count equals the in-memory
one). The evaluation day stays in memory; `train_fraction` < 1 and the per-impression
`Fitted.train_ids` are in-memory only. N = 0 (default) is the in-memory path, unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from recstack import checkpoint, distributed as D, metrics
from recstack.config import ConfigError, to_dict
from recstack.data import Examples, SimData, load, to_torch
from recstack.features import Vocab
from recstack.shards import ShardStream, position as shard_position, train_chunks

from recstack.distill import LambdaSchedule, student_loss, sync_loss
from recstack.features import INTERACTED_FIELDS

from coarse_rank.model import (BehaviourEncoder, DNNTeacher, FeatureEmbeddings, InnerProductStudent,
                               InnerProductTeacher, LUPITeacher)

STAGE = "coarse"
TEACHERS = ("baseline", "sd", "lupi", "md", "pfd", "pfd_md")
MANNERS = ("ind_async", "ind_sync", "share_sync", "share_star_sync")
MODEL_INPUTS = ("user_feats", "seq_items", "seq_extras", "item_feats", "item_dense")
OPTIMIZERS = ("adagrad", "adam")
SPLITS = ("test", "valid")


@dataclass
class Config:
    # --- model (PFD §5) ---
    embed_dim: int = 16  # per categorical field; 9 fields, so the towers see 64 (user) / 80 (item) embedding dims
    d_model: int = 128  # attention width: 4 heads x subspace 32, as in the paper
    n_heads: int = 4  # attention heads (paper: 4)
    ff_dim: int = 256  # hidden width of the attention layer's feed-forward network
    hidden: tuple[int, ...] = (512, 256)  # tower MLP widths before the output layer (paper: 512 -> 256 -> 128)
    out_dim: int = 128  # user / item vector size (paper: 128); the serving contract assumes 128
    scale: float = 5.0  # logit = scale * <u, v>; compensates for l2 normalisation (paper: 5)
    # --- optimisation ---
    optimizer: str = "adagrad"  # "adagrad" (paper) or "adam"
    lr: float = 0.05  # peak learning rate after warm-up; the paper's 0.01 is for 1e9 examples, ours are ~1e5
    warmup_steps: int = 50  # linear LR warm-up from ~0 to lr over these steps (paper: 1e6 of its steps)
    weight_decay: float = 0.0  # L2 penalty passed to the optimizer (0: none, as in the paper)
    batch_size: int = 512  # impressions per step (paper: 1024; smaller = more updates on a CPU budget)
    epochs: int = 1  # passes over the training days (paper: 1)
    max_steps: int = 500  # cap on optimizer steps (0 = no cap): ~1 epoch of `small` (~463 steps), keeps larger worlds at ~1-2 min
    seed: int = 0  # seeds parameter init and the shuffling order
    length_buckets: int = 4  # speed-up only (exact): encode sequences in groups of similar length, see UserTower.encode_sequence
    # --- distillation (PFD Eq. 5, Algorithm 1) ---
    teacher: str = "pfd_md"  # one of TEACHERS ("baseline" = none); pfd_md is the default: it beats the baseline on medium's validation day, within noise of md/sd (docs/results/coarse)
    manner: str = "share_sync"  # one of MANNERS (PFD Table 7); the paper's main runs share common input components
    lam: float = 0.5  # λ of Eq. 5: student loss = (1-λ) L_s + λ L_d (paper: 0.5)
    swap_step: int = 100  # λ = 0 before this step (the teacher's soft labels are noise early); ~20% of one `small` epoch (paper: 1e6 of ~1e6+ steps)
    teacher_hidden: tuple[int, ...] = (512, 256, 128)  # MD / PFD+MD / LUPI teacher DNN widths (paper: 3 layers 512-256-128)
    train_fraction: float = 1.0  # share of training sessions used (seeded); the sample-efficiency curve sets it below 1
    # --- data / evaluation ---
    split: str = "test"  # "test": fit days 1..D-1, evaluate day D; "valid": fit 1..D-2, evaluate D-1 (LR sweeps)
    eval_max_rows: int = 50_000  # evaluate on at most this many impressions of the evaluation day (seeded sample)
    eval_batch_size: int = 2048  # rows per forward pass at evaluation
    # N > 0: the training days are streamed from their Parquet shards, N rows per chunk per
    # rank (recstack.shards.ShardStream, sessions kept together), each rank reading only its slice
    stream_chunk_rows: int = 0  # 0: loaded in memory (DDP splits each global batch across ranks)

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.teacher not in TEACHERS:
            raise ConfigError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.manner not in MANNERS:
            raise ConfigError(f"manner must be one of {MANNERS}, got {self.manner!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam must be in [0, 1], got {self.lam}")
        if self.swap_step < 0:
            raise ConfigError(f"swap_step must be >= 0, got {self.swap_step}")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if any(w <= 0 for w in self.teacher_hidden):
            raise ConfigError(f"teacher_hidden widths must be positive, got {self.teacher_hidden}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("embed_dim", "d_model", "n_heads", "ff_dim", "out_dim", "batch_size", "epochs", "eval_max_rows",
                     "eval_batch_size", "length_buckets"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (BatchNorm needs two rows to normalise over)")
        if any(w <= 0 for w in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden}")
        if self.lr <= 0 or self.scale <= 0:
            raise ConfigError("lr and scale must be positive")
        if self.warmup_steps < 0 or self.max_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps, max_steps and weight_decay must be >= 0")
        if self.stream_chunk_rows < 0:
            raise ConfigError(f"stream_chunk_rows must be >= 0 (0: in memory), got {self.stream_chunk_rows}")
        if self.stream_chunk_rows and self.train_fraction < 1.0:
            raise ConfigError("train_fraction < 1 samples sessions of the in-memory training days; it is not available "
                              "with stream_chunk_rows > 0")


def build_student(cfg: Config, vocab: Vocab) -> InnerProductStudent:
    """The student as `cfg` describes it (also used by export to rebuild from a checkpoint)."""
    return InnerProductStudent(
        vocab, embed_dim=cfg.embed_dim, d_model=cfg.d_model, n_heads=cfg.n_heads, ff_dim=cfg.ff_dim,
        hidden=tuple(cfg.hidden), out_dim=cfg.out_dim, scale=cfg.scale,
    )


def build_teacher(cfg: Config, vocab: Vocab, student: InnerProductStudent) -> nn.Module | None:
    """The teacher `cfg.teacher` describes, wired to the student per `cfg.manner`:
    share_* manners hand it the student's embedding tables and behaviour encoder (the same
    Parameters; share_star_sync gives it a fresh user id table), ind_* manners fresh ones."""
    if cfg.teacher == "baseline":
        return None
    n_x = len(INTERACTED_FIELDS)
    if cfg.teacher == "lupi":
        return LUPITeacher(n_x, hidden=tuple(cfg.teacher_hidden))
    if cfg.manner == "share_sync":
        emb, seq = student.embeddings, student.sequence
    elif cfg.manner == "share_star_sync":
        emb, seq = student.embeddings.sharing(except_user_fields=(0,), vocab=vocab), student.sequence
    else:
        emb = FeatureEmbeddings(vocab, cfg.embed_dim)
        seq = BehaviourEncoder(emb.item_dim, 3, cfg.d_model, cfg.n_heads, cfg.ff_dim)
    privileged = n_x if cfg.teacher in ("pfd", "pfd_md") else 0
    if cfg.teacher in ("sd", "pfd"):
        return InnerProductTeacher(emb, seq, privileged, hidden=tuple(cfg.hidden), out_dim=cfg.out_dim, scale=cfg.scale)
    return DNNTeacher(emb, seq, privileged, hidden=tuple(cfg.teacher_hidden))


def shares_sequence(cfg: Config) -> bool:
    """Whether the teacher reuses the student's pooled behaviour sequence (computed once per step)."""
    return cfg.teacher not in ("baseline", "lupi") and cfg.manner in ("share_sync", "share_star_sync")


def make_optimizer(cfg: Config, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer plus the paper's schedule: LR rises linearly over `warmup_steps`, then stays fixed."""
    params = list(params)
    if cfg.optimizer == "adagrad":
        opt = torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    return opt, sched


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The student's per-row inputs (for `forward`) from a `recstack.data` batch."""
    return to_torch({k: batch[k] for k in MODEL_INPUTS})


def request_inputs(batch: dict[str, np.ndarray], ts: np.ndarray) -> dict[str, torch.Tensor]:
    """The inputs of `InnerProductStudent.score_requests` from a per-row batch.

    Impressions of one request (same user, same time) have identical user-side inputs, so
    they share one user-tower row: with ~10 impressions per request this cuts the dominant
    cost (the attention layer) ~10x. Sequences are cut after the last slot any row uses;
    empty slots do not change the output, so this is exact.
    """
    key = np.stack([batch["user_id"], np.ascontiguousarray(ts, dtype=np.float64).view(np.int64)], axis=1)
    _, first, index = np.unique(key, axis=0, return_index=True, return_inverse=True)
    seq_items = batch["seq_items"][first]  # (R, L, 5)
    used = np.flatnonzero((seq_items[..., 0] > 0).any(axis=0))
    length = int(used[-1]) + 1 if len(used) else 1
    return to_torch({
        "user_feats": batch["user_feats"][first],
        "seq_items": seq_items[:, :length],
        "seq_extras": batch["seq_extras"][first, :length],
        "request_index": index.reshape(-1).astype(np.int64),
        "item_feats": batch["item_feats"],
        "item_dense": batch["item_dense"],
    })


def request_batches(examples: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0, start: int = 0,
                    shard: bool = False) -> Iterator[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    """Yield (per-row batch, `score_requests` inputs) with the impressions of a session kept
    together, so each user-tower row is shared by as many impressions as possible.

    With `shuffle`, sessions (not impressions) are visited in a seeded random order; without,
    rows come in their stored order (a session's impressions are stored together).
    `start` skips the first batches (a resumed epoch); `shard` keeps this rank's contiguous
    share of every batch under torchrun (recstack.distributed.shard; sessions stay together).
    """
    order = np.arange(len(examples))
    if shuffle and len(order):
        _, inv = np.unique(examples.imps["session_id"], return_inverse=True)
        rank = np.random.default_rng(seed).permutation(inv.max() + 1)[inv]
        order = np.argsort(rank, kind="stable")
    for s in range(start * batch_size, len(order), batch_size):
        rows = order[s : s + batch_size]
        if shard:
            rows = D.shard(rows, contiguous=True)
        batch = examples.batch(rows)
        yield batch, request_inputs(batch, examples.imps["ts"][rows])


@torch.no_grad()
def predict(model: nn.Module, examples: Examples, batch_size: int = 2048, length_buckets: int = 4) -> dict[str, np.ndarray]:
    """Logits (N,) for every row of `examples` with the rows' click, true_pctr, user_id and
    item_id (same row order as `examples`). `model` is the student or a teacher (teachers
    also get the interacted features)."""
    was_training = model.training
    model.eval()
    out = {"logit": [], "click": [], "true_pctr": [], "user_id": [], "item_id": []}
    for batch, inputs in request_batches(examples, batch_size):
        if isinstance(model, InnerProductStudent):
            logit = model.score_requests(**inputs, length_buckets=length_buckets)
        else:
            logit = model(**inputs, interacted=torch.from_numpy(batch["interacted"]), length_buckets=length_buckets)
        out["logit"].append(logit.numpy())
        for k in ("click", "true_pctr", "user_id", "item_id"):
            out[k].append(batch[k])
    model.train(was_training)
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in out.items()}


def scores(p: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC / log-loss / calibration of `predict`'s output, beside the ground-truth ceiling."""
    prob = 1.0 / (1.0 + np.exp(-p["logit"].astype(np.float64)))
    return {
        "auc": metrics.auc(p["click"], p["logit"]),
        "ceiling_auc": metrics.auc(p["click"], p["true_pctr"]),
        "logloss": metrics.logloss(p["click"], prob),
        "calibration": metrics.calibration(p["click"], prob),
        "ctr": float(np.mean(p["click"])) if len(p["click"]) else float("nan"),
        "n_eval": int(len(p["click"])),
    }

def evaluate(model: InnerProductStudent, examples: Examples, batch_size: int = 2048, length_buckets: int = 4) -> dict[str, float]:
    """Student AUC / log-loss / calibration on `examples`, and the ground-truth ceiling AUC
    (the simulator's true pCTR scored against the same clicks)."""
    return scores(predict(model, examples, batch_size, length_buckets))


def _sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def sample_sessions(examples: Examples, fraction: float, seed: int) -> Examples:
    """A seeded share of the sessions of `examples` (whole sessions, so requests stay intact)."""
    if fraction >= 1.0:
        return examples
    sessions = np.unique(examples.imps["session_id"])
    keep = np.random.default_rng(10_007 + seed).random(len(sessions)) < fraction
    return examples.subset(np.flatnonzero(np.isin(examples.imps["session_id"], sessions[keep])))


@dataclass
class Fitted:
    """What `fit` returns: the trained models, their held-out predictions and metrics."""

    student: InnerProductStudent
    teacher: nn.Module | None
    result: dict
    student_pred: dict
    teacher_pred: dict | None
    train_ids: dict  # user_id / item_id of every training impression (for id-frequency buckets); {} when streamed


def _steps(cfg: Config, n_rows: int, per_epoch: int | None = None) -> int:
    if per_epoch is None:
        per_epoch = n_rows // cfg.batch_size + (n_rows % cfg.batch_size >= 2)
    total = cfg.epochs * per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def stream_source(cfg: Config, data: SimData, fit_days: list[int]) -> ShardStream:
    """The streamed training rows of `fit` (cfg.stream_chunk_rows > 0): this rank's slice of
    the shards of `fit_days`, whole sessions shuffled (a request's impressions stay together,
    so they share a user-tower row), `stream_chunk_rows` rows per chunk."""
    w = D.world()
    return ShardStream(data, fit_days, chunk_rows=cfg.stream_chunk_rows, seed=cfg.seed, rank=w.rank, world_size=w.size,
                       sessions=True)


def _loop(cfg: Config, train_ex: Examples | ShardStream, student: InnerProductStudent | None, teacher: nn.Module | None,
          params, schedule: LambdaSchedule, desc: str, progress: bool) -> tuple[int, float]:
    """One training run over `train_ex`. student only: L_s. teacher only: L_t. Both: Eq. 5
    (a teacher not in train mode is a fixed, already trained one: no L_t, no gradient).
    Returns (steps, smoothed loss).

    Under torchrun each rank trains on a contiguous share of every (global) batch, through
    DDP over the trained modules (student and/or teacher in one wrapper, so the Parameters a
    Share&Sync teacher shares with the student are reduced once). Inside `train()` the loop
    is a resumable phase (recstack.checkpoint.TrainingState).

    `train_ex` a ShardStream (cfg.stream_chunk_rows > 0): each rank trains on batches of
    batch_size // world_size rows of its own streamed slice (so a step still sees a global
    batch of batch_size rows), chunk after chunk; a snapshot stores the chunk's cursor and
    the batches of the chunk done.
    """
    streamed = isinstance(train_ex, ShardStream)
    n_rows = train_ex.total_rows if streamed else len(train_ex)
    trained = nn.ModuleDict({k: m for k, m in (("student", student), ("teacher", teacher)) if m is not None})
    ph = checkpoint.phase(f"coarse:{desc}", n_rows)
    if ph.done is not None:  # finished before the interruption
        trained.load_state_dict(ph.done["model"])
        return int(ph.done["stats"]["steps"]), float(ph.done["stats"]["loss"])
    world = D.world()
    opt, sched = make_optimizer(cfg, params)
    local_batch = cfg.batch_size // world.size
    total = _steps(cfg, n_rows, train_ex.batches_per_epoch(local_batch, min_rows=2) if streamed else None)
    share = student is not None and teacher is not None and shares_sequence(cfg)
    step, loss_ema, epoch0, pos = 0, None, 0, 0  # pos: batches of the epoch consumed (skipped ones too)
    if ph.resume is not None:
        r = ph.resume
        trained.load_state_dict(r["model"])
        opt.load_state_dict(r["optimizer"])
        sched.load_state_dict(r["scheduler"])
        step, loss_ema, epoch0, pos = r["step"], r["loss_ema"], r["epoch"], r["pos"]
        if streamed != ("stream" in r):
            raise checkpoint.CheckpointError(f"coarse:{desc}: the snapshot was written by a "
                                             f"{'streamed' if 'stream' in r else 'in-memory'} run, this one is "
                                             f"{'streamed' if streamed else 'in memory'}")

    def step_loss(inputs: dict, batch: dict, step: int) -> torch.Tensor:
        y = torch.from_numpy(batch["click"])
        pooled = None
        if student is not None:
            tower = student.user_tower
            pooled = tower.encode_sequence(inputs["seq_items"], inputs["seq_extras"], cfg.length_buckets)  # (R, d_model)
            u = tower.head(inputs["user_feats"], pooled).index_select(0, inputs["request_index"])  # (B, out)
            v = student.item_tower(inputs["item_feats"], inputs["item_dense"])  # (B, out)
            s_logit = student.scale * (u * v).sum(dim=-1)
        if teacher is not None:
            t_in = dict(inputs, interacted=torch.from_numpy(batch["interacted"]), pooled=pooled if share else None,
                        length_buckets=cfg.length_buckets)
            if teacher.training:
                t_logit = teacher(**t_in)
            else:
                with torch.no_grad():
                    t_logit = teacher(**t_in)
        if student is None:
            return F.binary_cross_entropy_with_logits(t_logit, y)
        if teacher is None:
            return F.binary_cross_entropy_with_logits(s_logit, y)
        if teacher.training:
            return sync_loss(s_logit, t_logit, y, schedule(step))[0]
        return student_loss(s_logit, y, t_logit, schedule(step))[0]

    # only the modules that learn here (a frozen Ind&Async teacher is not wrapped)
    step_fn = D.wrap(nn.ModuleList([m for m in trained.values() if m.training]), step_loss)
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", disable=not (progress and D.is_main()), leave=False)

    def train_step(batch: dict, inputs: dict, snapshot_extra: Callable[[], dict]) -> None:
        nonlocal step, loss_ema
        loss = step_fn(inputs, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
        ph.after_step(step, lambda: {"model": trained.state_dict(), "optimizer": opt.state_dict(),
                                     "scheduler": sched.state_dict(), "loss_ema": loss_ema, **snapshot_extra()})

    if streamed:
        if step < total:
            for epoch, cursor, chunk, skip in train_chunks(train_ex, cfg.epochs, ph.resume["stream"] if ph.resume else None):
                for k, (batch, inputs) in enumerate(request_batches(chunk, local_batch, start=skip), skip + 1):
                    if D.any_true(len(inputs["user_feats"]) < 2):  # BatchNorm cannot normalise a single row
                        continue
                    train_step(batch, inputs, lambda: {"epoch": epoch, "pos": 0, "stream": shard_position(cursor, k)})
                    if step >= total:
                        break
                if step >= total:
                    break
    else:
        for epoch in range(epoch0, cfg.epochs):
            if step >= total:
                break
            start = pos if epoch == epoch0 else 0
            batches = request_batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed * 1009 + epoch, start=start,
                                      shard=world.distributed)
            for pos, (batch, inputs) in enumerate(batches, start + 1):
                if D.any_true(len(inputs["user_feats"]) < 2):  # BatchNorm cannot normalise a single row
                    continue
                train_step(batch, inputs, lambda: {"epoch": epoch, "pos": pos})
                if step >= total:
                    break
    bar.close()
    D.broadcast_state(trained)  # BatchNorm statistics are per rank: serve rank 0's everywhere
    D.check_in_sync(trained, f"coarse {desc}")
    loss_out = float(loss_ema) if loss_ema is not None else float("nan")
    ph.finish(trained.state_dict(), {"steps": step, "loss": loss_out})
    return step, loss_out


def _predict_all(model: nn.Module, examples: Examples, batch_size: int, length_buckets: int) -> dict[str, np.ndarray]:
    """`predict` on every row; under torchrun each rank scores a contiguous share of the rows
    (whole requests stay on one rank) and the shares are gathered in order."""
    if not D.is_distributed():
        return predict(model, examples, batch_size, length_buckets)
    lo, hi = D.shard_bounds(len(examples))
    if D.rank() == D.world_size() - 1:
        hi = len(examples)  # the last rank also takes the remainder
    return D.gather_rows(predict(model, examples.subset(np.arange(lo, hi)), batch_size, length_buckets))


def fit(cfg: Config, data: SimData, fit_days: list[int], eval_day: int, *, progress: bool = False,
        eval_teacher: bool = True) -> Fitted:
    """Train student (and teacher) on `fit_days` (a `cfg.train_fraction` share of their
    sessions), evaluate on `eval_day`. `result["train_seconds"]` is the wall time of all
    training (teacher and student, both phases for ind_async), without evaluation."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    if not fit_days:
        raise ConfigError("no training days")
    # the evaluation day stays in memory (a seeded sample of eval_max_rows rows of it)
    if cfg.stream_chunk_rows:
        train_ex = stream_source(cfg, data, fit_days)
    else:
        train_ex = sample_sessions(data.examples(fit_days), cfg.train_fraction, cfg.seed)
    eval_ex = data.examples(eval_day)
    eval_ex = eval_ex.subset(_sample_rows(len(eval_ex), cfg.eval_max_rows, cfg.seed))

    student = build_student(cfg, data.vocab)
    teacher = build_teacher(cfg, data.vocab, student)
    t0, c0 = time.perf_counter(), time.process_time()
    if teacher is not None and cfg.manner == "ind_async":
        # Ind&Async: the teacher is trained to completion first, then frozen; the student
        # learns from it from step 0 (its soft labels are no longer noise, so no warm-up swap).
        teacher.train()
        _loop(cfg, train_ex, None, teacher, teacher.parameters(), LambdaSchedule(cfg.lam, 0), "coarse teacher", progress)
        teacher.eval()
        student.train()
        step, loss = _loop(cfg, train_ex, student, teacher, student.parameters(), LambdaSchedule(cfg.lam, 0),
                           "coarse student", progress)
    else:
        both = nn.ModuleList([student] + ([teacher] if teacher is not None else []))
        both.train()
        # parameters() of the list yields a Parameter shared by student and teacher once
        step, loss = _loop(cfg, train_ex, student, teacher, both.parameters(), LambdaSchedule(cfg.lam, cfg.swap_step),
                           f"coarse {cfg.teacher}", progress)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    s_pred = _predict_all(student, eval_ex, cfg.eval_batch_size, cfg.length_buckets)
    result = scores(s_pred)
    t_pred = None
    if teacher is not None and eval_teacher:
        t_pred = _predict_all(teacher, eval_ex, cfg.eval_batch_size, cfg.length_buckets)
        t_scores = scores(t_pred)
        result.update({"teacher_auc": t_scores["auc"], "teacher_logloss": t_scores["logloss"],
                       "teacher_calibration": t_scores["calibration"]})
    result.update({
        "teacher": cfg.teacher,
        "manner": cfg.manner,
        "steps": step,
        "train_examples": train_ex.total_rows if cfg.stream_chunk_rows else len(train_ex),
        "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2),  # CPU time: robust to other processes on a shared machine
        "final_train_loss": loss,  # smoothed backpropagated loss: Eq. 5 (student + teacher terms) when distilling
        "eval_day": int(eval_day),
        "fit_days": [int(d) for d in fit_days],
    })
    if cfg.stream_chunk_rows:
        result["stream_chunk_rows"] = cfg.stream_chunk_rows
        ids = {}  # one id per training impression would not fit in memory at the scale streaming is for
    else:
        ids = {"user_id": train_ex.imps["user_id"], "item_id": train_ex.imps["item_id"]}
    return Fitted(student, teacher, result, s_pred, t_pred, ids)


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True, resume: bool = False,
          checkpoint_every: int = 0) -> dict:
    """Fit the student (distilled from `cfg.teacher` if set), evaluate next-day, save
    `out_dir/checkpoint.pt` (student only: the serving model); returns the metrics.

    checkpoint_every: write the training state to `out_dir/train_state.pt` every that many
    optimiser steps (0: never); resume: continue from that file when it exists. Under
    torchrun every rank trains and scores a share of the evaluation rows; rank 0 prints and
    writes.
    """
    cfg.validate()
    data = load(data_dir)
    fit_days, eval_day = (data.train_days, data.test_day) if cfg.split == "test" else (data.fit_days, data.valid_day)
    if not fit_days:
        raise ConfigError(f"split={cfg.split!r} leaves no training days in a {data.n_days}-day world")
    D.check_divisible(batch_size=cfg.batch_size)
    main = D.is_main()
    state = checkpoint.TrainingState(Path(out_dir) / checkpoint.STATE_FILE, STAGE, to_dict(cfg), checkpoint_every,
                                     resume, write=main)
    with state:
        fitted = fit(cfg, data, fit_days, eval_day, progress=progress)
    result = fitted.result
    if state.resumed:
        result["resumed"] = True
    if D.is_distributed():
        result["world_size"] = D.world_size()
    if main:
        teacher_note = f"  teacher {cfg.teacher} AUC {result['teacher_auc']:.4f}" if "teacher_auc" in result else ""
        print(
            f"coarse student  day {eval_day}: AUC {result['auc']:.4f}  (ground-truth ceiling {result['ceiling_auc']:.4f})  "
            f"logloss {result['logloss']:.4f}  calibration {result['calibration']:.3f}{teacher_note}  "
            f"[{result['steps']} steps, {result['train_seconds']:.1f}s, {result['n_eval']} eval rows]"
        )
        out_dir = Path(out_dir)
        checkpoint.save(out_dir / "checkpoint.pt", {
            "stage": STAGE,
            "config": to_dict(cfg),
            "model": fitted.student.state_dict(),
            "metrics": result,
            "data_dir": str(Path(data_dir).resolve()),
            "vocab": data.vocab.to_dict(),
        })
    D.barrier()
    return result


def load_student(path: str | Path) -> tuple[InnerProductStudent, Config, dict]:
    """Rebuild the trained student (eval mode) from a coarse checkpoint: (model, config, checkpoint)."""
    from recstack.config import from_dict

    ckpt = checkpoint.load(path, stage=STAGE)
    cfg = from_dict(Config, ckpt["config"])
    model = build_student(cfg, Vocab.from_dict(ckpt["vocab"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


if __name__ == "__main__":  # thin CLI for local runs; `recstack train coarse` is the real entry point
    import argparse

    from recstack.config import apply_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    train(apply_overrides(Config(), args.overrides), args.data, args.out)
