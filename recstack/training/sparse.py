"""Sparse embedding gradients for large id tables.

With dense gradients every step of a model with a 1e6-row item table allocates, fills and
applies a gradient the size of the whole table, although a batch touches a few thousand rows;
the optimiser then reads and writes every row's state. On `large` (1e6 items) that is ~95 % of
a coarse step's time. `enable(model)` switches every `nn.Embedding` of a model to sparse
gradients (only the looked-up rows), and `optimizer(...)` builds an optimiser that accepts them:

- Adagrad: torch's own, which updates only the rows present in a sparse gradient. A row absent
  from a batch gets a zero update under dense Adagrad too, so the two are the same method
  (weight decay must be 0: with it a dense step would also shrink the absent rows).
- Adam / AdamW: `LazyAdam`: dense parameters take torch's Adam step; a sparse gradient updates
  only its rows' moments and values (the "lazy" Adam of large-scale recommenders, e.g.
  TensorFlow Addons' LazyAdam). Unlike dense Adam, a row's momentum does not keep moving it on
  steps where the row is absent; its bias correction uses the global step count.

Under DDP the gradients of sparse tables would need a sparse all-reduce; the stages refuse
the setting there instead (`check_supported`).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from recstack.config import ConfigError
from recstack.training import distributed as D

OPTIMIZERS = ("adam", "adamw", "adagrad")


class SparseSettingError(ConfigError):
    """The sparse-gradient setting cannot be used as asked (one line: what and why)."""


def enable(model: nn.Module) -> int:
    """Make every nn.Embedding under `model` produce sparse gradients; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.sparse = True
            n += 1
    return n


def check_supported(weight_decay: float) -> None:
    if weight_decay != 0:
        raise SparseSettingError(f"sparse_embeddings needs weight_decay = 0, got {weight_decay} "
                                 "(a dense step would also decay the rows a batch does not touch)")
    if D.is_distributed():
        raise SparseSettingError("sparse_embeddings is not supported under torchrun (DDP all-reduces dense gradients)")


def optimizer(kind: str, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimiser of `kind` (one of OPTIMIZERS) that accepts sparse gradients."""
    check_supported(weight_decay)
    params = list(params)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if kind in ("adam", "adamw"):
        return LazyAdam(params, lr=lr)
    raise SparseSettingError(f"optimizer must be one of {OPTIMIZERS} with sparse_embeddings, got {kind!r}")


class LazyAdam(torch.optim.Optimizer):
    """Adam whose sparse gradients update only the rows they touch (no weight decay)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps <= 0:
            raise SparseSettingError(f"LazyAdam: lr > 0, 0 <= betas < 1, eps > 0 required, got {lr}, {betas}, {eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                # torch's Adam: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps), rewritten as
                # p -= lr * sqrt(bc2) / bc1 * m / (sqrt(v) + eps * sqrt(bc2))
                bc2_sqrt = math.sqrt(1 - beta2 ** t)
                step_size = group["lr"] * bc2_sqrt / (1 - beta1 ** t)
                eps = group["eps"] * bc2_sqrt
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.grad.is_sparse:
                    _sparse_rows(p, p.grad.coalesce(), m, v, beta1, beta2, step_size, eps)
                else:
                    g = p.grad
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    p.addcdiv_(m, v.sqrt().add_(eps), value=-step_size)
        return loss


def _sparse_rows(p, grad, m, v, beta1, beta2, step_size, eps) -> None:
    """The dense update restricted to the rows of a coalesced sparse gradient."""
    rows = grad.indices()[0]
    g = grad.values()
    if rows.numel() == 0:
        return
    m_rows = m.index_select(0, rows).lerp_(g, 1 - beta1)
    v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m.index_copy_(0, rows, m_rows)
    v.index_copy_(0, rows, v_rows)
    p.index_add_(0, rows, m_rows.div_(v_rows.sqrt_().add_(eps)).mul_(-step_size))
