"""torch.distributed for the trainers: join torchrun's process group, split each batch across
ranks, wrap the trained modules in DistributedDataParallel, reduce metrics.

    torchrun --nproc-per-node 2 -m recstack.cli train fine --data DIR --out RUNS

One process (no torchrun environment, or WORLD_SIZE=1) creates no process group, and every
helper here is then the identity: the trainers run exactly the code they run without this
module, so single-process results are bit-identical to a build without DDP.

How the work is split. Every rank draws the same seeded batch order; a step's *global*
batch (`batch_size` rows, as in one process) is cut into `world_size` equal shares and each
rank trains on its share (`shard`). So every rank runs the same number of steps (a rank that
skipped one would leave the others waiting in DDP's all-reduce forever), and `batch_size`,
the LR schedule, warm-up and max_steps mean the same thing at any world size: DDP averages
the per-rank gradients of per-rank mean losses, which is the gradient of the global batch's
mean loss. A global batch not divisible by the world size loses its last `len % world_size`
rows (at most world_size - 1 rows, only in an epoch's last, ragged batch: `recstack train`
refuses batch sizes that are not multiples of the world size).
"""
from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from recstack.config import ConfigError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A broken torchrun environment or ranks that disagree."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; `World()` is the single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: str = "cpu", timeout_s: float = 1800.0, init_method: str | None = None) -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo for `device="cpu"`, NCCL for "cuda".

    `init_method` (or the environment variable RECSTACK_DIST_INIT_METHOD), e.g.
    "file:///shared/rendezvous", replaces MASTER_ADDR / MASTER_PORT by a rendezvous file on a
    shared filesystem (no TCP store: the tests use it to stay off the network). Without
    WORLD_SIZE, or with WORLD_SIZE=1, nothing is initialised. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    init_method = init_method or os.environ.get("RECSTACK_DIST_INIT_METHOD") or None
    needed = ENV_VARS if init_method is None else ENV_VARS[:3]
    missing = [v for v in needed if not os.environ.get(v)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start the job with torchrun")
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    if device not in ("cpu", "cuda"):
        raise DistributedError(f"device must be 'cpu' or 'cuda', got {device!r}")
    backend = "gloo" if device == "cpu" else "nccl"
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise DistributedError("device='cuda' (NCCL) but no CUDA device is visible")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=int(os.environ["RANK"]), world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def world() -> World:
    """The current process group as a `World` (the single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 str(dist.get_backend()))


def is_distributed() -> bool:
    return world().distributed


def rank() -> int:
    return world().rank


def world_size() -> int:
    return world().size


def is_main() -> bool:
    """Rank 0 (or the single process): the one that logs, shows progress bars and writes files."""
    return world().rank == 0


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ---------------------------------------------------------------------- partitioning


def shard_bounds(n: int, w: World | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous equal share of n rows (n // size each)."""
    w = w or world()
    per = n // w.size
    return w.rank * per, (w.rank + 1) * per


def shard(rows, contiguous: bool = False, w: World | None = None):
    """This rank's equal share of one global batch `rows` (array or 1-d tensor).

    interleaved (default): rows[rank::size]; contiguous: the rank-th block (keeps runs of
    rows together, e.g. a session's impressions, which share one user-tower row). Both drop
    the last len(rows) % size rows so that every share has the same length. The identity in
    one process.
    """
    w = w or world()
    if not w.distributed:
        return rows
    usable = len(rows) - len(rows) % w.size
    if contiguous:
        lo, hi = shard_bounds(usable, w)
        return rows[lo:hi]
    return rows[:usable][w.rank :: w.size]


def check_divisible(**sizes: int) -> None:
    """Refuse batch sizes that do not split into equal shares at this world size (the
    shares would silently drop rows from every batch); no-op in one process."""
    w = world()
    for name, value in sizes.items():
        if w.distributed and value % w.size:
            raise ConfigError(f"{name} ({value}) must be a multiple of the world size ({w.size}) under torchrun: "
                             f"every rank takes an equal share of each batch")


def partition(n: int, seed: int, w: World | None = None) -> np.ndarray:
    """This rank's rows of a seeded permutation of range(n): the same permutation on every
    rank, interleaved shares of equal length (n // size). One process: the whole permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    return shard(perm, w=w)


# ---------------------------------------------------------------------------- DDP


class StepLoss(nn.Module):
    """Wraps a loss closure so that it can run inside DistributedDataParallel.

    The trainers compute a step's loss from several sub-modules (towers, teacher, heads)
    rather than one `forward`; DDP only synchronises gradients of a forward that goes
    through it. `modules` holds every trained module (a Parameter shared by two of them,
    e.g. the embeddings of a Share&Sync teacher and its student, is registered and
    reduced once); `fn(*args)` computes the loss with them.
    """

    def __init__(self, modules: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.modules_ = modules
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def wrap(modules: nn.Module, fn: Callable[..., Any], **ddp_kwargs) -> Callable[..., Any]:
    """`fn` itself in one process; a DDP-wrapped `StepLoss(modules, fn)` under torchrun.

    BatchNorm stays per rank (each rank normalises its share of the batch) and DDP
    broadcasts rank 0's buffers at every forward; see the stage docs for why not SyncBN.
    """
    if not is_distributed():
        return fn
    if not any(p.requires_grad for p in modules.parameters()):
        raise DistributedError("nothing to train: no parameter requires a gradient")
    return nn.parallel.DistributedDataParallel(StepLoss(modules, fn), **ddp_kwargs)


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers (BatchNorm statistics) to every rank."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def check_in_sync(module: nn.Module, what: str = "model") -> None:
    """Raise DistributedError unless every rank holds bit-identical parameters and buffers."""
    if not is_distributed():
        return
    digest = state_digest(module.state_dict())
    got: list[str] = [""] * world_size()
    dist.all_gather_object(got, digest)
    if len(set(got)) != 1:
        raise DistributedError(f"{what}: parameters differ across ranks after training (digests {got})")


def state_digest(state: dict) -> str:
    """sha256 over a state dict's tensors (names and bytes), in key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if isinstance(v, torch.Tensor):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------ reductions


def all_reduce(value: float | torch.Tensor, op: str = "sum") -> float | torch.Tensor:
    """Sum / mean / min / max of `value` over ranks (float64); the value itself in one process."""
    if not is_distributed():
        return value
    t = torch.as_tensor(value, dtype=torch.float64).clone()
    ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    dist.all_reduce(t, ops[op])
    if op == "mean":
        t /= world_size()
    return float(t) if not isinstance(value, torch.Tensor) else t


def any_true(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a collective decision to skip a step)."""
    if not is_distributed():
        return bool(flag)
    return all_reduce(1.0 if flag else 0.0, "max") > 0


def gather_rows(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Concatenate every rank's `arrays` in rank order (rows of a contiguous partition
    come back in their original order); the input itself in one process."""
    if not is_distributed():
        return arrays
    parts: list[dict | None] = [None] * world_size()
    dist.all_gather_object(parts, {k: np.asarray(v) for k, v in arrays.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in arrays}


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N_r, ...) tensor along dim 0, gradients flowing back to
    the rank that computed each row (torch.distributed.nn); `t` itself in one process."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N, ...) tensor along dim 0 in rank order, without
    gradients (e.g. the item ids of every rank's share of a batch; N must be the same on
    every rank); `t` itself in one process."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)
