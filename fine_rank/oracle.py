"""The oracle bound of CVR distillation: the student learns from the simulator's true pCVR of
each clicked impression as its soft label (PFD Eq. 5 with the truth as the teacher), so no
teacher can do better. A row of the CVR table, never a deployable method (the truth is not
known in production)."""
from __future__ import annotations

import numpy as np
import torch

from recstack.training.distill import student_loss

from fine_rank.config import ModelSettings
from fine_rank.data import Source, StreamRows
from fine_rank.inputs import row_inputs
from fine_rank.model import Ranker
from fine_rank.tasks import optimise

TRUTH_COLUMN = {"cvr": "true_pcvr", "ctr": "true_pctr"}


def truth_logits(prob: np.ndarray) -> torch.Tensor:
    """True probabilities (N,) -> their logits (float32), clipped away from 0 and 1."""
    p = np.clip(np.asarray(prob, dtype=np.float64), 1e-6, 1 - 1e-6)
    return torch.from_numpy(np.log(p / (1 - p)).astype(np.float32))


def fit_oracle(student: Ranker, table: dict[str, np.ndarray], label: str, truth: str, s: ModelSettings, seed: int,
               lam: float, bar=None) -> dict:
    """(1-λ)·log-loss(y) + λ·cross-entropy(true probability `table[truth]`), from step 0 (the
    truth is never noise, so no warm-up). Needs a materialised table."""
    if isinstance(table, StreamRows):
        raise ValueError("cvr_teacher=oracle: needs a materialised table (stream_chunk_rows=0)")
    if truth not in table:
        raise ValueError(f"cvr_teacher=oracle: the table has no {truth!r} column")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"distill_lambda must be in [0, 1], got {lam}")
    src = Source(table, label)
    x = src.x
    soft = truth_logits(table[truth])
    y_mean = src.label_mean()
    student.head.set_prior(y_mean)

    def fwd(idx):
        return student.logits(*row_inputs(x, idx))

    def step_loss(idx, step, total):
        return student_loss(fwd(idx), x["y"][idx], soft[idx], lam)

    stats = optimise(student, src, step_loss, fwd, s, seed, bar)
    return {**stats, "train_positive_rate": y_mean}
