"""The fine rankers' training methods (`fit_task` dispatches): the plain log-loss, PFD's
synchronous distillation and MTL baseline, SEAD and its signal-loss variant, each a step loss
run by the shared training loop (`optimise`), then precise BatchNorm statistics and the
optional calibration shift."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as TF

from recstack.training import distributed as D, sead, sparse
from recstack.training.distill import LambdaSchedule, student_loss, sync_loss
from recstack.training.loop import Batches, Loop, Recent, Stream, streamed_batches

from fine_rank.config import Config, ModelSettings
from fine_rank.data import Source
from fine_rank.inputs import materialise, row_inputs
from fine_rank.model import MTLRanker, Ranker, SelfAuxiliary, SignalTeacher, Teacher


def make_optimizer(model: torch.nn.Module, s: ModelSettings) -> torch.optim.Optimizer:
    # model.parameters() de-duplicates shared tensors (a teacher sharing the student's embeddings)
    if s.sparse_embeddings:
        sparse.enable(model)
        return sparse.optimizer(s.optimizer, model.parameters(), s.lr, s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


def build_model(vocab, s: ModelSettings, seed: int) -> Ranker:
    torch.manual_seed(seed)
    return Ranker.build(vocab, s.emb_dim, s.hidden, s.sequence, s.attention_dim, s.n_item_dense)


StepLoss = Callable[[torch.Tensor, int, int], "tuple[torch.Tensor, dict]"]


def optimise(model: torch.nn.Module, src: Source, step_loss: StepLoss, forward: Callable[[torch.Tensor], object],
             s: ModelSettings, seed: int, bar=None, stream: Stream | None = None) -> dict:
    """Train every method on the shared loop: shuffled mini-batches, linear LR decay, then
    precise BatchNorm statistics.

    `model` holds every trained module (student, teacher, extra heads); `step_loss(idx, step,
    total)` returns the loss of the rows `idx` and detached parts for logging; `forward(idx)`
    runs every BatchNorm-carrying module on rows `idx` (for the BN refresh).

    Under torchrun each rank trains on an interleaved share of every (global) batch through
    DDP (recstack.training.distributed). Inside `train()` the loop is one resumable phase of the run
    (recstack.training.checkpoint.TrainingState).

    Streamed (`src.rows`, cfg.stream_chunk_rows > 0): the rank's slice of the shards, chunk
    after chunk loaded into `src.x`; `idx` indexes the chunk, in batches of batch_size //
    world_size rows (the chunk's rows are already shuffled), so a step still sees a global
    batch of batch_size rows. BatchNorm is re-estimated on the bounded sample
    (`StreamRows.sample_table`).

    `stream` (recstack.training.loop.Stream): `src` is one day; one pass over it (epochs is
    ignored, max_steps still caps), the optimiser the previous day left (its moments carry
    over), a constant LR, and the day in the phase's name.
    """
    n = src.n
    if n < 2:
        raise ValueError(f"need at least 2 training rows, got {n}")
    world = D.world()
    if stream is not None:
        opt = stream.optimizer(lambda: make_optimizer(model, s))
        total = src.steps(dataclasses.replace(s, epochs=1), seed)
        sched = None
    else:
        opt = make_optimizer(model, s)
        total = src.steps(s, seed)
        # decay to 0: the last iterates stop jittering the output bias (which would show up as
        # a calibration error of several %) and BatchNorm statistics catch up with the weights
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total) if s.lr_decay else 1.0)
    gen = torch.Generator().manual_seed(seed if stream is None else seed * 1000 + stream.day)
    t0 = time.perf_counter()

    def refresh() -> None:
        if src.rows is None:
            refresh_batchnorm(model, forward, n, s.batch_size, gen)
            return
        sample = src.rows.sample_table(seed)
        src.load(sample)  # the same rows on every rank: identical BatchNorm statistics
        refresh_batchnorm(model, forward, len(sample["click"]), s.batch_size, gen)
        src.x.clear()

    def summary(steps: int, losses: Recent) -> dict:
        stats = {"n_train": int(n), "steps": steps, "train_loss_last50": D.all_reduce(losses.mean(), "mean"),
                 "train_seconds": time.perf_counter() - t0}
        if world.distributed:
            stats["world_size"] = world.size
        if src.rows is not None:
            stats["stream_chunk_rows"] = src.rows.chunk_rows
        return stats

    name = f"fine:{type(model).__name__}(seed={seed})"
    loop = Loop(name if stream is None else stream.phase_name(name), n, model, opt, total, Recent(), scheduler=sched,
                streamed=src.rows is not None, state=lambda: {"generator": gen.get_state()},
                load_state=lambda r: gen.set_state(r["generator"]), summary=summary, before_finish=refresh, bar=bar,
                carry_optimizer=stream is not None)
    model.train()
    stats = loop.run(step_loss, source_batches(src, s, seed, gen))
    model.eval()
    return stats


def source_batches(src: Source, s: ModelSettings, seed: int, gen: torch.Generator) -> Batches:
    """The loop's batches: row indices into `src.x`. In memory, each epoch a permutation drawn
    from `gen`, cut into batches of batch_size rows, each rank an interleaved share; streamed,
    batches of batch_size // world_size rows of this rank's chunks. A batch of fewer than two
    rows per rank is left out (BatchNorm cannot normalise a single row; decided alike on
    every rank)."""
    world = D.world()
    if src.rows is not None:
        local = s.batch_size // world.size

        def chunk_batches(chunk, skip: int):
            m = len(src.x["y"])
            for k, lo in enumerate(range(skip * local, m, local), skip + 1):
                idx = torch.arange(lo, min(lo + local, m))
                if len(idx) >= 2:
                    yield k, idx

        return lambda resume: streamed_batches(src.rows.stream(seed), None, resume, chunk_batches,
                                               lambda epoch: {"perm": None, "next": 0},
                                               lambda chunk: src.load(materialise(chunk, item_stats=src.rows.item_stats)))

    def epochs(resume):
        perm, first = (resume["perm"], resume["next"]) if resume is not None else (None, 0)
        while True:
            if perm is None:
                perm, first = torch.randperm(src.n, generator=gen), 0
            for start in range(first, src.n, s.batch_size):
                idx = perm[start : start + s.batch_size]
                if len(idx) // world.size >= 2:
                    yield D.shard(idx, w=world), lambda: {"perm": perm, "next": start + s.batch_size}
            perm = None

    return epochs


def fit(model: Ranker, table: dict[str, np.ndarray], label: str, s: ModelSettings, seed: int, bar=None,
        stream: Stream | None = None) -> dict:
    """Minimise the log-loss of `model.logits` against `table[label]`; returns training stats.
    (`table`: a materialised table or a `StreamRows`, here and in every fit_* below; `stream`:
    the table is one day of a `Stream`, and a warm day keeps the head's bias as it is.)"""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    if stream is None or not stream.warm:
        model.head.set_prior(y_mean)

    def fwd(idx):
        return model.logits(*row_inputs(x, idx))

    def step_loss(idx, step, total):
        loss = TF.binary_cross_entropy_with_logits(fwd(idx), x["y"][idx])
        return loss, {"loss": loss.detach()}

    stats = optimise(model, src, step_loss, fwd, s, seed, bar, stream)
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
        xs = row_inputs(x, idx)
        return student.logits(*xs), teacher.logits(*xs, x["post_event"][idx])

    def step_loss(idx, step, total):
        s_logits, t_logits = fwd(idx)
        return sync_loss(s_logits, t_logits, x["y"][idx], schedule(step))

    stats = optimise(both, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean, "swap_step": schedule.swap_step}


def fit_distilled_async(student: Ranker, teacher: Teacher, table: dict[str, np.ndarray], label: str,
                        s: ModelSettings, seed: int, lam: float, bar=None) -> dict:
    """PFD's Ind&Async manner (Table 8): the teacher (input components of its own) learns y
    to the end first, with the student's settings; then it is frozen and the student learns
    from (1-λ)·y + λ·teacher from step 0 (a trained teacher's soft labels need no warm-up)."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    for m in (student, teacher):
        m.head.set_prior(y_mean)

    def t_fwd(idx):
        return teacher.logits(*row_inputs(x, idx), x["post_event"][idx])

    def t_loss(idx, step, total):
        loss = TF.binary_cross_entropy_with_logits(t_fwd(idx), x["y"][idx])
        return loss, {"teacher": loss.detach()}

    t_stats = optimise(teacher, src, t_loss, t_fwd, s, seed, bar)
    teacher.eval()
    teacher.requires_grad_(False)

    def s_fwd(idx):
        return student.logits(*row_inputs(x, idx))

    def s_loss(idx, step, total):
        with torch.no_grad():
            t_logits = t_fwd(idx)
        return student_loss(s_fwd(idx), x["y"][idx], t_logits, lam)

    stats = optimise(student, src, s_loss, s_fwd, s, seed, bar)
    stats["train_seconds"] += t_stats["train_seconds"]
    return {**stats, "teacher_steps": t_stats["steps"], "train_positive_rate": y_mean, "swap_step": 0}


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
        return mtl.both(*row_inputs(x, idx))

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
             selector: str, cfg: "Config", bar=None, stream: Stream | None = None) -> dict:
    """SEAD: main head on y (serving, calibrated), aux tower's branches and merge on f(y, y')
    (recstack.training.sead). The curriculum's progress runs over each call (one day when
    streamed)."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    if stream is None or not stream.warm:
        model.main.head.set_prior(y_mean)
        model.aux.set_prior(y_mean)

    def fwd(idx):
        return model.both(*row_inputs(x, idx), stop_aux_gradient=cfg.sead_sga)

    def step_loss(idx, step, total):
        main, zs, zd = fwd(idx)
        return sead.sead_loss(main, zs, zd, x["y"][idx], selector, progress=step / total, aux_weight=cfg.sead_weight,
                              pos_weight=cfg.sead_pos_weight, until=cfg.sead_curriculum_until)

    stats = optimise(model, src, step_loss, fwd, s, seed, bar, stream)
    return {**stats, "train_positive_rate": y_mean}


def fit_signal_loss(student: Ranker, teacher: SignalTeacher, table: dict[str, np.ndarray], label: str,
                    s: ModelSettings, seed: int, warmup: float, bar=None, stream: Stream | None = None) -> dict:
    """SEAD's signal-loss variant (Table 2): two towers with nothing shared. Teacher: main head
    on the consented (unbiased) rows, auxiliary head on every row of the biased stream `label`,
    one bottom under both; student (its own embeddings and bottom): max(y, y') with y' the
    teacher main head's soft label (detached), after `warmup` of the steps (y before; streamed,
    of the first day's steps only). The caller calibrates the student to the aggregates."""
    src = Source(table, label)
    x = src.x
    y_mean = src.label_mean()
    unbiased_rate = src.consented_rate()
    if stream is None or not stream.warm:
        teacher.main.head.set_prior(unbiased_rate)
        teacher.set_aux_prior(y_mean)
        student.head.set_prior(unbiased_rate)
    swap = int(warmup * src.steps(s if stream is None else dataclasses.replace(s, epochs=1), seed))
    if stream is not None and stream.warm:
        swap = 0
    both = torch.nn.ModuleDict({"student": student, "teacher": teacher})

    def fwd(idx):
        xs = row_inputs(x, idx)
        return (*teacher.both(*xs), student.logits(*xs))

    def step_loss(idx, step, total):
        t_main, t_aux, s_logits = fwd(idx)
        yb, c = x["y"][idx], x["consent"][idx]
        l_main = sead.weighted_bce(t_main, yb, c)  # consented rows only
        l_aux = TF.binary_cross_entropy_with_logits(t_aux, yb)
        target = sead.select("max", yb, torch.sigmoid(t_main)) if step >= swap else yb
        l_student = TF.binary_cross_entropy_with_logits(s_logits, target)
        return l_main + l_aux + l_student, {"teacher_main": l_main.detach(), "student": l_student.detach()}

    stats = optimise(both, src, step_loss, fwd, s, seed, bar, stream)
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
