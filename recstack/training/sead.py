"""Self-Auxiliary Distillation (SEAD, RecSys '24): the auxiliary head's label selectors, its
bilateral-branch merge and its loss. Pure functions of tensors, usable by any ranker with a
shared bottom, a main head and an auxiliary tower of two branches.

    loss, parts = sead_loss(main_logits, scratch_logits, distill_logits, y, "max", progress)
    loss.backward()     # the main head learns from y only; the aux tower from f(y, y')

The main head trains on the ground truth y and is the serving (calibrated) head; it is also
the teacher: its soft label y' = sigmoid(main_logits) is detached everywhere, so no auxiliary
loss reaches the main head. The auxiliary head is a bilateral-branch network (BBN): a
distillation branch learning from y', a scratch branch learning from y, each with its own
weights, merged BBN-style into the auxiliary logit z = a * z_scratch + (1 - a) * z_distill,
which learns from the selector's label f(y, y'):

    L_aux = BCE_w(z, f(y, y')) + a * BCE_w(z_scratch, y) + (1 - a) * BCE_w(z_distill, y')

    selector        f(y, y')      a (scratch share)        row weights w
    max             max(y, y')    1/2                      1  (keep the positives, distil the negatives)
    min             min(y, y')    1/2                      1  (the reverse)
    curriculum      max(y, y')    1 - progress^2 (BBN)     positives x pos_weight early, decaying to 1
    positives_only  max(y, y')    1/2                      y  (negatives carry no auxiliary loss)
    ogl             y             1  (scratch branch only: z = z_scratch, L_aux = BCE(z, y))
    dtl             y'            0  (distillation branch only: z = z_distill, L_aux = BCE(z, y'))

BBN's cumulative learning moves the weight from the branch that learns the plain data to the
re-balancing one as a = 1 - (T / T_max)^2; here the scratch branch (ground truth, where the
positives carry the signal) leads early and distillation takes over. Ablations that are not
label choices live with the caller: SGA (the auxiliary loss does not reach the shared parts:
the tower gets `aux_input(hidden, True)`) and LR x2 (no auxiliary tower, doubled LR).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SELECTORS = ("max", "min", "curriculum", "ogl", "dtl", "positives_only")
SINGLE_BRANCH = {"ogl": "scratch", "dtl": "distill"}


def select(selector: str, y: torch.Tensor, y_soft: torch.Tensor) -> torch.Tensor:
    """f(y, y'); y, y_soft (B,) in [0, 1] -> (B,) targets (detached)."""
    y_soft = y_soft.detach()
    if selector in ("max", "curriculum", "positives_only"):
        return torch.maximum(y, y_soft)
    if selector == "min":
        return torch.minimum(y, y_soft)
    if selector == "ogl":
        return y
    if selector == "dtl":
        return y_soft
    raise ValueError(f"unknown selector {selector!r}; choose one of {SELECTORS}")


def scratch_share(selector: str, progress: float) -> float:
    """a: the scratch branch's share of the merged auxiliary logit at `progress` (0..1 of training)."""
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; choose one of {SELECTORS}")
    if selector == "ogl":
        return 1.0
    if selector == "dtl":
        return 0.0
    if selector == "curriculum":
        return 1.0 - min(max(float(progress), 0.0), 1.0) ** 2
    return 0.5


def curriculum_weight(y: torch.Tensor, progress: float, pos_weight: float = 3.0, until: float = 0.5) -> torch.Tensor:
    """Per-row weights (B,): positives weigh `pos_weight` at the start, decaying linearly to 1
    at `progress == until` (fraction of training); negatives weigh 1 throughout."""
    if pos_weight < 1 or not 0 < until <= 1:
        raise ValueError("curriculum needs pos_weight >= 1 and 0 < until <= 1")
    w_pos = 1.0 + (pos_weight - 1.0) * max(0.0, 1.0 - float(progress) / until)
    return torch.where(y > 0.5, torch.full_like(y, w_pos), torch.ones_like(y))


def row_weights(selector: str, y: torch.Tensor, progress: float, pos_weight: float = 3.0,
                until: float = 0.5) -> torch.Tensor:
    if selector == "curriculum":
        return curriculum_weight(y, progress, pos_weight, until)
    if selector == "positives_only":
        return (y > 0.5).to(y.dtype)
    return torch.ones_like(y)


def merge(selector: str, scratch_logits: torch.Tensor, distill_logits: torch.Tensor, progress: float) -> torch.Tensor:
    """The auxiliary head's logit (B,): a * z_scratch + (1 - a) * z_distill (one branch for OGL / DTL)."""
    if selector in SINGLE_BRANCH:
        return scratch_logits if SINGLE_BRANCH[selector] == "scratch" else distill_logits
    a = scratch_share(selector, progress)
    return a * scratch_logits + (1.0 - a) * distill_logits


def aux_input(hidden: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
    """The shared-bottom output as the aux tower sees it; SGA detaches it, so the auxiliary
    loss updates the aux tower only and leaves embeddings and bottom to the main loss."""
    return hidden.detach() if stop_gradient else hidden


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(w * BCE) / sum(w) (0 when every weight is 0)."""
    per_row = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (weight * per_row).sum() / weight.sum().clamp_min(1e-12)


def aux_loss(selector: str, scratch_logits: torch.Tensor, distill_logits: torch.Tensor, y: torch.Tensor,
             main_logits: torch.Tensor, progress: float = 0.0, pos_weight: float = 3.0,
             until: float = 0.5) -> tuple[torch.Tensor, dict]:
    """L_aux of the module docstring; (B,) each -> scalar, parts. `main_logits` are detached."""
    y_soft = torch.sigmoid(main_logits.detach())
    target = select(selector, y, y_soft)
    w = row_weights(selector, y, progress, pos_weight, until)
    z = merge(selector, scratch_logits, distill_logits, progress)
    loss = weighted_bce(z, target, w)
    if selector not in SINGLE_BRANCH:
        a = scratch_share(selector, progress)
        loss = loss + a * weighted_bce(scratch_logits, y, w) + (1.0 - a) * weighted_bce(distill_logits, y_soft, w)
    return loss, {"aux_target_mean": target.mean().detach()}


def sead_loss(main_logits: torch.Tensor, scratch_logits: torch.Tensor, distill_logits: torch.Tensor,
              y: torch.Tensor, selector: str, progress: float = 0.0, aux_weight: float = 1.0,
              pos_weight: float = 3.0, until: float = 0.5) -> tuple[torch.Tensor, dict]:
    """L = BCE(main, y) + aux_weight * L_aux. (B,) each -> scalar, parts.

    The main head's gradient comes from the ground truth alone, which keeps its mean
    prediction at the label mean (calibration); y' is detached in every auxiliary term.
    """
    l_main = F.binary_cross_entropy_with_logits(main_logits, y)
    l_aux, parts = aux_loss(selector, scratch_logits, distill_logits, y, main_logits, progress, pos_weight, until)
    return l_main + aux_weight * l_aux, {"main": l_main.detach(), "aux": l_aux.detach(), **parts}
