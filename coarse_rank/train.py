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
their Parquet shards N rows per chunk per rank (recstack.data.shards.ShardStream, whole sessions
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
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from recstack.training import distributed as D, sparse
from recstack.evaluation import metrics
from recstack.config import ConfigError
from recstack.data import Examples, SimData, load
from recstack.training.distill import LambdaSchedule
from recstack.data.shards import ShardStream
from recstack.training.loop import Batches, Ema, Loop, save_model, streamed_batches, training_state

from coarse_rank.config import MANNERS, OPTIMIZERS, SPLITS, TEACHERS, Config  # noqa: F401  (re-exported)
from coarse_rank.fine_distill import FineTargets
from coarse_rank.inputs import MODEL_INPUTS, STAGE, load_student, model_inputs, request_inputs  # noqa: F401
from coarse_rank.model import InnerProductStudent  # noqa: F401
from coarse_rank.objective import GmvStep, build_student, build_teacher  # noqa: F401
from coarse_rank.tasks import DistillationStep, make_optimizer, shares_sequence  # noqa: F401


def request_batches(examples: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0, start: int = 0,
                    shard: bool = False) -> Iterator[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    """Yield (per-row batch, `score_requests` inputs) with the impressions of a session kept
    together, so each user-tower row is shared by as many impressions as possible.

    With `shuffle`, sessions (not impressions) are visited in a seeded random order; without,
    rows come in their stored order (a session's impressions are stored together).
    `start` skips the first batches (a resumed epoch); `shard` keeps this rank's contiguous
    share of every batch under torchrun (recstack.training.distributed.shard; sessions stay together).
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
    # a real log has no true pCTR (docs/DATA.md): the ceiling is then NaN and reported as skipped
    truth = len(p["true_pctr"]) and np.isfinite(p["true_pctr"]).all()
    return {
        "auc": metrics.auc(p["click"], p["logit"]),
        "ceiling_auc": metrics.auc(p["click"], p["true_pctr"]) if truth else float("nan"),
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
    """A seeded sample of k of n rows (all of them when k is 0 or at least n)."""
    if k == 0 or n <= k:
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
    optimizer_state: dict | None = None  # the last phase's optimiser, for a warm start to continue from


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
                       sessions=True, item_stats=cfg.item_stats)


def training_batches(cfg: Config, train_ex: Examples | ShardStream, local_batch: int) -> Batches:
    """The loop's request batches (`request_batches`), steps with a single row left out
    (BatchNorm cannot normalise it; decided alike on every rank). In memory, each epoch the
    sessions in a seeded order, every rank a contiguous share of each global batch; streamed,
    batches of `local_batch` rows of this rank's chunks."""
    if isinstance(train_ex, ShardStream):
        def chunk_batches(chunk: Examples, skip: int):
            for k, (batch, inputs) in enumerate(request_batches(chunk, local_batch, start=skip), skip + 1):
                if D.any_true(len(inputs["user_feats"]) < 2):
                    continue
                yield k, (batch, inputs)

        return lambda resume: streamed_batches(train_ex, cfg.epochs, resume, chunk_batches,
                                               lambda epoch: {"epoch": epoch, "pos": 0})
    distributed = D.world().distributed

    def epochs(resume: Optional[dict]):
        epoch0, pos0 = (resume["epoch"], resume["pos"]) if resume is not None else (0, 0)
        for epoch in range(epoch0, cfg.epochs):
            start = pos0 if epoch == epoch0 else 0
            batches = request_batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed * 1009 + epoch, start=start,
                                      shard=distributed)
            for pos, (batch, inputs) in enumerate(batches, start + 1):  # pos: batches of the epoch consumed
                if D.any_true(len(inputs["user_feats"]) < 2):
                    continue
                yield (batch, inputs), lambda: {"epoch": epoch, "pos": pos}

    return epochs


def _loop(cfg: Config, train_ex: Examples | ShardStream, student: InnerProductStudent | None, teacher: nn.Module | None,
          params, schedule: LambdaSchedule, desc: str, progress: bool, targets=None) -> tuple[int, float, dict]:
    """One training run over `train_ex` (`DistillationStep`: L_s, L_t or Eq. 5) on the shared
    loop; returns (steps, smoothed loss, the optimiser's final state).

    Under torchrun each rank trains on a contiguous share of every (global) batch, through
    DDP over the trained modules (student and/or teacher in one wrapper, so the Parameters a
    Share&Sync teacher shares with the student are reduced once; a frozen Ind&Async teacher
    is not wrapped). Inside `train()` the loop is a resumable phase
    (recstack.training.checkpoint.TrainingState). `train_ex` a ShardStream (cfg.stream_chunk_rows > 0):
    each rank trains on batches of batch_size // world_size rows of its own streamed slice.
    """
    streamed = isinstance(train_ex, ShardStream)
    n_rows = train_ex.total_rows if streamed else len(train_ex)
    trained = nn.ModuleDict({k: m for k, m in (("student", student), ("teacher", teacher)) if m is not None})
    local_batch = cfg.batch_size // D.world_size()
    if cfg.sparse_embeddings:
        sparse.enable(trained)
    total = _steps(cfg, n_rows, train_ex.batches_per_epoch(local_batch, min_rows=2) if streamed else None)
    opt, sched = make_optimizer(cfg, params, total)
    loop = Loop(f"coarse:{desc}", n_rows, trained, opt, total, Ema("loss_ema", 0.98, 0.02), scheduler=sched,
                streamed=streamed, ddp_modules=nn.ModuleList([m for m in trained.values() if m.training]),
                # BatchNorm statistics are per rank: serve rank 0's everywhere
                before_finish=lambda: D.broadcast_state(trained), desc=desc, show=progress)
    step = (GmvStep(cfg, student, teacher, schedule, targets) if cfg.objective == "gmv"
            else DistillationStep(cfg, student, teacher, schedule))
    stats = loop.run(step, training_batches(cfg, train_ex, local_batch))
    return int(stats["steps"]), float(stats["loss"]), opt.state_dict()


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
        train_ex = sample_sessions(data.examples(fit_days, item_stats=cfg.item_stats), cfg.train_fraction, cfg.seed)
    eval_ex = data.examples(eval_day, item_stats=cfg.item_stats)
    eval_ex = eval_ex.subset(_sample_rows(len(eval_ex), cfg.eval_max_rows, cfg.seed))

    # the fine ranker's order over retrieved candidates (coarse_rank.fine_distill), checked before training
    targets = (FineTargets.load(cfg.fine_targets, data, cfg.fine_distill_top, fit_days, cfg.item_stats)
               if cfg.fine_distill > 0 else None)
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
        step, loss, opt_state = _loop(cfg, train_ex, student, teacher, student.parameters(), LambdaSchedule(cfg.lam, 0),
                                      "coarse student", progress, targets)
    else:
        both = nn.ModuleList([student] + ([teacher] if teacher is not None else []))
        both.train()
        # parameters() of the list yields a Parameter shared by student and teacher once
        step, loss, opt_state = _loop(cfg, train_ex, student, teacher, both.parameters(),
                                      LambdaSchedule(cfg.lam, cfg.swap_step), f"coarse {cfg.teacher}", progress, targets)
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
        "objective": cfg.objective,
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
    return Fitted(student, teacher, result, s_pred, t_pred, ids, opt_state)


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True, resume: bool = False,
          checkpoint_every: int = 0) -> dict:
    """Fit the student (distilled from `cfg.teacher` if set), evaluate next-day, save
    `out_dir/checkpoint.pt` (the student, the serving model, and the teacher's state for a warm
    start: only the student is exported); returns the metrics.

    checkpoint_every: write the training state to `out_dir/train_state.pt` every that many
    optimiser steps (0: never); resume: continue from that file when it exists. Under
    torchrun every rank trains and scores a share of the evaluation rows; rank 0 prints and
    writes.
    """
    cfg.validate()
    data = load(data_dir)
    fit_days, eval_day = data.split_days(cfg.split)
    if not fit_days:
        raise ConfigError(f"split={cfg.split!r} leaves no training days in a {data.n_days}-day world")
    D.check_divisible(batch_size=cfg.batch_size)
    with training_state(out_dir, STAGE, cfg, checkpoint_every, resume) as state:
        fitted = fit(cfg, data, fit_days, eval_day, progress=progress)
    result = fitted.result
    if state.resumed:
        result["resumed"] = True
    if D.is_distributed():
        result["world_size"] = D.world_size()
    if D.is_main():
        teacher_note = f"  teacher {cfg.teacher} AUC {result['teacher_auc']:.4f}" if "teacher_auc" in result else ""
        ceiling = (f"ground-truth ceiling {result['ceiling_auc']:.4f}" if np.isfinite(result["ceiling_auc"])
                   else "ground-truth ceiling skipped: the data has no true_pctr")
        print(
            f"coarse student  day {eval_day}: AUC {result['auc']:.4f}  ({ceiling})  "
            f"logloss {result['logloss']:.4f}  calibration {result['calibration']:.3f}{teacher_note}  "
            f"[{result['steps']} steps, {result['train_seconds']:.1f}s, {result['n_eval']} eval rows]"
        )
        # the teacher and the optimiser ride along (never exported): a warm start keeps distilling
        # from the teacher and continues Adagrad's accumulators (fresh ones would make its first
        # steps full-size sign steps on a trained model)
        extra = {"optimizer": fitted.optimizer_state}
        if fitted.teacher is not None:
            extra["teacher"] = fitted.teacher.state_dict()
        save_model(out_dir, STAGE, cfg, fitted.student.state_dict(), result, data_dir, data.vocab, extra)
    D.barrier()
    return result


if __name__ == "__main__":  # thin CLI for local runs; `recstack train coarse` is the real entry point
    import argparse

    from recstack.config import apply_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    train(apply_overrides(Config(), args.overrides), args.data, args.out)
