"""The one resumable training loop of every stage: optimiser steps over a stage's batches, in
memory or streamed from the shards, under DDP or in one process, with snapshots for `--resume`.

A stage describes one training phase as a `Loop` (what is trained, the optimiser, how many
steps, how the step losses are smoothed for logging) and runs it with a step-loss function
and a batch source:

    loop = Loop("fine:Ranker(seed=0)", n_rows, model, opt, total, Recent(), scheduler=sched)
    stats = loop.run(step_loss, batches)

`step_loss(batch, step, total)` returns the batch's loss (or a tuple whose first item is the
loss); under torchrun it runs inside DistributedDataParallel over `Loop.ddp_modules`, so the
gradients are averaged over the ranks (recstack.training.distributed.wrap). `batches(resume)` yields
`(batch, position)` pairs from the start, or from where the snapshot `resume` stopped;
`position()` is the part of a snapshot that says where the next batch is. Streamed sources
are built with `streamed_batches` (recstack.data.shards); in-memory ones are the stage's own
shuffled epochs. The loop stops after `total` steps.

A phase is one entry of the run's training state (recstack.training.checkpoint.TrainingState): a
phase that had finished before an interruption is not trained again (its final state is
loaded), a running one continues from its last snapshot, so a resumed run ends bit-identical
to an uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recstack.training import checkpoint, distributed as D
from recstack.config import to_dict
from recstack.data.shards import ShardStream, position as shard_position, train_chunks

Batches = Callable[[Optional[dict]], Iterator[tuple[Any, Callable[[], dict]]]]


# ------------------------------------------------------------------------ logged loss


@dataclass
class Ema:
    """Exponential moving average of the step losses, started by the first one.

    `keep` and `new` are both given (rather than new = 1 - keep) because the logged value
    is part of the training state: its arithmetic must not change between versions.
    `empty` is the value before the first step (snapshots store it as it is).
    """

    key: str  # the snapshot entry holding the value
    keep: float
    new: float
    empty: Optional[float] = None
    value: Optional[float] = None

    def __post_init__(self) -> None:
        self.value = self.empty

    def _started(self) -> bool:
        return self.value is not None and not (self.empty is not None and math.isnan(self.value))

    def add(self, loss: float) -> None:
        self.value = self.keep * self.value + self.new * loss if self._started() else loss

    def state(self) -> Optional[float]:
        return self.value

    def load(self, value: Optional[float]) -> None:
        self.value = value

    def mean(self) -> float:
        return float(self.value) if self.value is not None else float("nan")


@dataclass
class Recent:
    """The last `n` step losses; their mean is the logged loss."""

    key: str = "recent"
    n: int = 50
    value: list = field(default_factory=list)

    def add(self, loss: float) -> None:
        self.value = (self.value + [loss])[-self.n :]

    def state(self) -> list:
        return list(self.value)

    def load(self, value: list) -> None:
        self.value = list(value)

    def mean(self) -> float:
        return float(np.mean(self.value))


# ------------------------------------------------------------------------------ loop


@dataclass
class Loop:
    """One training phase. `run` trains it (or restores it) and returns its stats."""

    name: str  # the phase's name in the training state; a resumed run must use the same
    n_rows: int  # training rows; a snapshot of another row count is refused
    modules: nn.Module  # everything trained: snapshotted, restored, checked in sync across ranks
    optimizer: torch.optim.Optimizer
    total: int  # optimiser steps of the phase
    losses: Ema | Recent  # how the step losses are logged (part of the snapshot)
    scheduler: Any = None  # an LR scheduler stepped after every optimiser step, or None
    streamed: bool = False  # batches come from the shards (a snapshot of the other kind is refused)
    ddp_modules: Optional[nn.Module] = None  # what DDP wraps (default: modules; a frozen teacher stays out)
    state: Optional[Callable[[], dict]] = None  # extra snapshot entries (e.g. a generator's state)
    load_state: Optional[Callable[[dict], None]] = None  # restores them from a snapshot
    summary: Optional[Callable[[int, Any], dict]] = None  # (steps, losses) -> the phase's stats
    before_finish: Optional[Callable[[], None]] = None  # after the last step, before the ranks are compared
    bar: Any = None  # a progress bar shared with other phases (updated, not closed), or None ...
    desc: Optional[str] = None  # ... then the loop's own bar, with this label ...
    show: bool = False  # ... shown when true (on rank 0 only)
    # streaming: the phase's final optimiser state is kept with its model, so that a resumed
    # run restores both for a finished day and the next day continues from them (`Stream`)
    carry_optimizer: bool = False
    step: int = 0

    def run(self, step_loss: Callable[..., Any], batches: Batches) -> dict:
        ph = checkpoint.phase(self.name, self.n_rows)
        if ph.done is not None:  # finished before the interruption: its final state
            self.modules.load_state_dict(ph.done["model"])
            if self.carry_optimizer:
                if "optimizer" not in ph.done:
                    raise checkpoint.CheckpointError(f"{self.name}: the finished phase has no optimizer state to continue from")
                self.optimizer.load_state_dict(ph.done["optimizer"])
            if self.bar is not None:
                self.bar.update(int(ph.done["stats"]["steps"]))
            return dict(ph.done["stats"])
        if ph.resume is not None:
            self._resume(ph.resume)
        step_fn = D.wrap(self.ddp_modules if self.ddp_modules is not None else self.modules, step_loss)
        bar = self._open_bar()
        if self.step < self.total:
            for batch, position in batches(ph.resume):
                self._train_step(step_fn, batch, bar, ph, position)
                if self.step >= self.total:
                    break
        if bar is not self.bar:
            bar.close()
        if self.before_finish is not None:
            self.before_finish()
        D.check_in_sync(self.modules, self.name)
        stats = self.summary(self.step, self.losses) if self.summary else {"steps": self.step, "loss": self.losses.mean()}
        ph.finish(self.modules.state_dict(), stats,
                  {"optimizer": self.optimizer.state_dict()} if self.carry_optimizer else None)
        return stats

    def _resume(self, r: dict) -> None:
        if self.streamed != ("stream" in r):
            raise checkpoint.CheckpointError(
                f"{self.name}: the snapshot was written by a {'streamed' if 'stream' in r else 'in-memory'} run, "
                f"this one is {'streamed' if self.streamed else 'in memory'}")
        self.modules.load_state_dict(r["model"])
        self.optimizer.load_state_dict(r["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(r["scheduler"])
        if self.load_state is not None:
            self.load_state(r)
        self.step = r["step"]
        self.losses.load(r[self.losses.key])

    def _open_bar(self):
        if self.bar is not None:
            self.bar.update(self.step)
            return self.bar
        return tqdm(total=self.total, initial=self.step, desc=self.desc or self.name, unit="step",
                    disable=not (self.show and D.is_main()), leave=False)

    def _train_step(self, step_fn, batch, bar, ph: checkpoint.Phase, position: Callable[[], dict]) -> None:
        out = step_fn(batch, self.step, self.total)
        loss = out[0] if isinstance(out, tuple) else out
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.losses.add(loss.item())
        bar.update(1)
        if self.step % 10 == 0 or self.step == self.total:
            bar.set_postfix(loss=f"{self.losses.mean():.4f}")
        ph.after_step(self.step, lambda: self._snapshot(position))

    def _snapshot(self, position: Callable[[], dict]) -> dict:
        snap = {"model": self.modules.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            snap["scheduler"] = self.scheduler.state_dict()
        if self.state is not None:
            snap.update(self.state())
        snap[self.losses.key] = self.losses.state()
        snap.update(position())
        return snap


# ------------------------------------------------------------------------- streaming


@dataclass
class Stream:
    """Streaming training, the setting of continuously trained production rankers: one pass
    over each day's new impressions, starting from the model and the optimiser state the
    previous day ended with, then scored on the next day (never seen in training).

        stream = Stream(days=(1, 2, ..., 12))
        curve = stream.run(train_day, score)   # train_day(d) -> stats; score(d + 1) -> metrics

    A stage's fit function asks `optimizer(make)` for its optimiser (made on the first day,
    the same object afterwards: Adam's moments carry over), names each day's `Loop` with
    `phase_name`, and sets `Loop.carry_optimizer` (a resumed run then restores a finished
    day's optimiser state along with its model). The learning rate is constant in this mode
    (no per-day decay: tomorrow's pass continues today's). `warm` is False only on the first
    day (priors, e.g. a head's bias at the base rate, are set then and never again).
    """

    days: tuple[int, ...]
    day: Optional[int] = None
    index: int = -1
    _optimizer: Optional[torch.optim.Optimizer] = None

    def __post_init__(self) -> None:
        self.days = tuple(int(d) for d in self.days)
        if len(self.days) < 2 or list(self.days) != sorted(set(self.days)):
            raise ValueError(f"Stream.days must be >= 2 increasing days (train on each, score on the next), got {self.days}")

    @property
    def warm(self) -> bool:
        return self.index > 0

    def optimizer(self, make: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = make()
        return self._optimizer

    def phase_name(self, name: str) -> str:
        return f"{name}@day{self.day}"

    def run(self, train_day: Callable[[int], dict], score: Callable[[int], dict]) -> list[dict]:
        """Train day d (one pass), score day d + 1, for every day but the last; -> one entry per
        day: {"day", "eval_day", "train": train_day's stats, **score's metrics}."""
        curve = []
        for i, d in enumerate(self.days[:-1]):
            self.index, self.day = i, d
            stats = train_day(d)
            curve.append({"day": d, "eval_day": self.days[i + 1], "train": stats, **score(self.days[i + 1])})
        return curve


def streamed_batches(st: ShardStream, epochs: Optional[int], resume: Optional[dict],
                     chunk_batches: Callable[[Any, int], Iterator[tuple[int, Any]]],
                     idle: Callable[[int], dict], load: Optional[Callable[[Any], None]] = None
                     ) -> Iterator[tuple[Any, Callable[[], dict]]]:
    """The batches of `st`'s chunks, epoch after epoch (`epochs`: None = until the loop stops),
    from the snapshot `resume`'s stream position when given.

    `load(chunk)` prepares each chunk's rows; `chunk_batches(chunk, skip)` yields `(k, batch)`
    from the chunk's batch `skip` on, k = the chunk's batches done once this one is (a
    snapshot then resumes at the next); `idle(epoch)` gives the in-memory position entries a
    streamed snapshot still carries (so that every snapshot of a stage has the same keys).
    """
    at = resume["stream"] if resume is not None else None
    for epoch, cursor, chunk, skip in train_chunks(st, epochs, at):
        if load is not None:
            load(chunk)
        for k, batch in chunk_batches(chunk, skip):
            yield batch, lambda: {**idle(epoch), "stream": shard_position(cursor, k)}


# ------------------------------------------------------------------------ the run


def training_state(out_dir: str | Path, stage: str, cfg: Any, every: int, resume: bool) -> checkpoint.TrainingState:
    """The run's training state (`out_dir/train_state.pt`): snapshots every `every` steps,
    resumed from when `resume`; only rank 0 writes."""
    return checkpoint.TrainingState(Path(out_dir) / checkpoint.STATE_FILE, stage, to_dict(cfg), every, resume,
                                    write=D.is_main())


def save_model(out_dir: str | Path, stage: str, cfg: Any, model: dict, metrics: dict, data_dir: str | Path,
               vocab, extra: dict | None = None) -> Path:
    """Write `out_dir/checkpoint.pt`: what export and serving rebuild the model from (`model`),
    and `extra` state training needs to continue from it (e.g. the coarse teacher), never exported."""
    return checkpoint.save(Path(out_dir) / "checkpoint.pt", {
        "stage": stage,
        "config": to_dict(cfg),
        "model": model,
        "metrics": metrics,
        "data_dir": str(Path(data_dir).resolve()),
        "vocab": vocab.to_dict(),
        **(extra or {}),
    })
