"""Self-Auxiliary Distillation (SEAD, RecSys '24): label selectors and the auxiliary-head loss.
Pure functions of tensors, usable by any ranker with a shared bottom and two heads.

    target, weight = aux_targets("max", y, main_logits, progress)   # f(y, y'), y' detached
    loss, parts = sead_loss(main_logits, aux_logits, y, "max", progress=step / total)
    loss.backward()      # the main head learns from y only; the aux head from f(y, y')

The main head trains on the ground truth y and is the serving (calibrated) head; it is also
the teacher: its soft label y' = sigmoid(main_logits) feeds the distillation branch with no
gradient back into the main head. The scratch branch carries y. A selector f merges them
into the auxiliary head's target:

    max         max(y, y')    keep the positives, distil the negatives (SEAD's choice)
    min         min(y, y')    the reverse (keeps the negatives, distils the positives)
    curriculum  max(y, y') with positives up-weighted early, the weight decaying to 1
    ogl         y             ablation "original labels" (the aux head is a second main head)
    dtl         y'            ablation "distillation labels" only
    positives_only  y on positive rows only (weight 0 on negatives)

Ablations that are not label choices live with the caller: SGA (stop the aux gradient into
the shared parts: feed the aux head `hidden.detach()`, see `aux_input`) and LR (no aux head,
doubled learning rate).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SELECTORS = ("max", "min", "curriculum", "ogl", "dtl", "positives_only")


def select(selector: str, y: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
    """f(y, y') for the label-only selectors; y, y_soft (B,) in [0, 1] -> (B,) targets (detached)."""
    y_soft = y_soft.detach()
    if selector in ("max", "curriculum"):
        return torch.maximum(y, y_soft)
    if selector == "min":
        return torch.minimum(y, y_soft)
    if selector in ("ogl", "positives_only"):
        return y
    if selector == "dtl":
        return y_soft
    raise ValueError(f"unknown selector {selector!r}; choose one of {SELECTORS}")


def curriculum_weight(y: torch.Tensor, progress: float, pos_weight: float = 3.0, until: float = 0.5) -> torch.Tensor:
    """Per-row weights (B,): positives weigh `pos_weight` at the start, decaying linearly to 1
    at `progress == until` (fraction of training); negatives weigh 1 throughout."""
    if pos_weight < 1 or not 0 < until <= 1:
        raise ValueError("curriculum needs pos_weight >= 1 and 0 < until <= 1")
    w_pos = 1.0 + (pos_weight - 1.0) * max(0.0, 1.0 - float(progress) / until)
    return torch.where(y > 0.5, torch.full_like(y, w_pos), torch.ones_like(y))


def aux_targets(selector: str, y: torch.Tensor, main_logits: torch.Tensor, progress: float = 0.0,
                pos_weight: float = 3.0, until: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (target (B,), weight (B,)) of the auxiliary head. `main_logits` are detached here:
    the distillation branch never sends gradient into the teacher (the main head)."""
    y_soft = torch.sigmoid(main_logits.detach())
    target = select(selector, y, y_soft)
    if selector == "curriculum":
        weight = curriculum_weight(y, progress, pos_weight, until)
    elif selector == "positives_only":
        weight = (y > 0.5).to(y.dtype)
    else:
        weight = torch.ones_like(y)
    return target, weight


def aux_input(hidden: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
    """The shared-bottom output as the aux head sees it; SGA detaches it, so the auxiliary
    loss updates the aux head only and leaves embeddings and bottom to the main loss."""
    return hidden.detach() if stop_gradient else hidden


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(w * BCE) / sum(w) (0 when every weight is 0)."""
    per_row = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (weight * per_row).sum() / weight.sum().clamp_min(1e-12)


def sead_loss(main_logits: torch.Tensor, aux_logits: torch.Tensor, y: torch.Tensor, selector: str,
              progress: float = 0.0, aux_weight: float = 1.0, pos_weight: float = 3.0,
              until: float = 0.5) -> tuple[torch.Tensor, dict]:
    """L = BCE(main, y) + aux_weight * BCE_w(aux, f(y, y')). (B,), (B,), (B,) -> scalar, parts.

    The main head's gradient comes from the ground truth alone, which keeps its mean
    prediction at the label mean (calibration); y' is detached.
    """
    l_main = F.binary_cross_entropy_with_logits(main_logits, y)
    target, weight = aux_targets(selector, y, main_logits, progress, pos_weight, until)
    l_aux = weighted_bce(aux_logits, target, weight)
    return l_main + aux_weight * l_aux, {"main": l_main.detach(), "aux": l_aux.detach(),
                                         "aux_target_mean": target.mean().detach()}
