"""Distillation objectives, written once for the coarse and the fine ranker (PFD, Eq. 5 and
Algorithm 1). Pure functions of logits: the rankers decide what teacher and student are.

    lam = LambdaSchedule(lam=0.5, swap_step=k)(step)        # 0 before the swap step (warm-up)
    loss, parts = sync_loss(student_logits, teacher_logits, labels, lam)
    loss.backward()                                          # teacher gets no gradient from L_d

Eq. 5:  min_{Ws,Wt} (1-λ)·L_s(y, f_s(X)) + λ·L_d(f_t(X, X*), f_s(X)) + L_t(y, f_t(X, X*)),
with L_d the cross-entropy between the student and the teacher's sigmoid output, and the
teacher's soft label detached so that ∂L_d/∂W_t = 0 (Algorithm 1: the teacher must not
co-adapt with the student).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LambdaSchedule:
    """λ = 0 until `swap_step`, then `lam` (PFD's warm-up: an untrained teacher's soft labels are noise)."""

    lam: float = 0.5
    swap_step: int = 0

    def __post_init__(self):
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {self.lam}")
        if self.swap_step < 0:
            raise ValueError(f"swap_step must be >= 0, got {self.swap_step}")

    def __call__(self, step: int) -> float:
        return self.lam if step >= self.swap_step else 0.0


def soft_label_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student (logits, (B,)) against probabilities in [0, 1] ((B,)), mean over B.

    The targets are detached here, so a teacher's output can be passed as is.
    """
    return F.binary_cross_entropy_with_logits(student_logits, soft_targets.detach())


def student_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
    """(1-λ)·L_s + λ·L_d for the student. (B,), (B,), (B,) -> scalar, parts."""
    l_s = F.binary_cross_entropy_with_logits(student_logits, labels)
    l_d = soft_label_loss(student_logits, torch.sigmoid(teacher_logits))
    return (1.0 - lam) * l_s + lam * l_d, {"student_hard": l_s.detach(), "distill": l_d.detach()}


def sync_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, lam: float) -> tuple[torch.Tensor, dict]:
    """Eq. 5 for one synchronous step: student loss + teacher log-loss L_t.

    The teacher's parameters receive gradient only from L_t (its soft label is detached in L_d).
    Returns the scalar to backpropagate and detached parts for logging.
    """
    s_loss, parts = student_loss(student_logits, labels, teacher_logits, lam)
    l_t = F.binary_cross_entropy_with_logits(teacher_logits, labels)
    parts["teacher"] = l_t.detach()
    parts["lambda"] = torch.tensor(lam)
    return s_loss + l_t, parts
