"""The coarse objective: the student's log-loss, distilled from a teacher per PFD Eq. 5 /
Algorithm 1, and the optimiser with the paper's LR warm-up."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recstack.training import sparse
from recstack.training.distill import LambdaSchedule, student_loss, sync_loss

from coarse_rank.config import Config
from coarse_rank.model import InnerProductStudent, student_click_logit


def shares_sequence(cfg: Config) -> bool:
    """Whether the teacher reuses the student's pooled behaviour sequence (computed once per step)."""
    return cfg.teacher not in ("baseline", "lupi") and cfg.manner in ("share_sync", "share_star_sync")


def lr_factor(cfg: Config, step: int, total: int) -> float:
    """The LR multiplier of optimiser step `step` (0-based) of `total`: a linear rise over
    `warmup_steps`, then 1 (the paper's constant LR) or, with `lr_schedule="linear"`, a linear
    fall that reaches 0 after the last step."""
    warm = max(cfg.warmup_steps, 1)
    rise = min(1.0, (step + 1) / warm)
    if cfg.lr_schedule == "constant":
        return rise
    return min(rise, max(0.0, (total - step) / max(1, total - warm + 1)))


def make_optimizer(cfg: Config, params, total: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer plus the LR schedule of `total` steps (`lr_factor`): the paper's warm-up, then
    a constant LR, or a linear decay to 0."""
    params = list(params)
    if cfg.sparse_embeddings:
        opt = sparse.optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    elif cfg.optimizer == "adagrad":
        opt = torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step, total))
    return opt, sched



def oracle_logit(prob) -> torch.Tensor:
    """A true probability (N,) numpy -> its logit as a teacher's (clipped away from 0 and 1)."""
    p = torch.from_numpy(prob).double().clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p)).float()


class DistillationStep:
    """The loss of one step on a request batch `(batch, inputs)` (see `train.request_batches`).

    student only: L_s. teacher only: L_t. Both: Eq. 5 with λ = schedule(step), the teacher
    trained alongside (sync_loss) or, when it is not in train mode, a fixed, already trained
    one (student_loss: no L_t, no gradient into it). A teacher sharing the student's behaviour
    encoder reuses the student's pooled sequence (computed once per step).
    """

    def __init__(self, cfg: Config, student: InnerProductStudent | None, teacher: nn.Module | None,
                 schedule: LambdaSchedule):
        self.cfg, self.student, self.teacher, self.schedule = cfg, student, teacher, schedule
        self.share = student is not None and teacher is not None and shares_sequence(cfg)
        self.oracle = cfg.teacher == "oracle"

    def __call__(self, batch: tuple[dict, dict], step: int, total: int) -> torch.Tensor:
        batch, inputs = batch
        student, teacher, schedule, cfg = self.student, self.teacher, self.schedule, self.cfg
        y = torch.from_numpy(batch["click"])
        pooled = None
        if student is not None:
            pooled, s_logit = student_click_logit(student, inputs, cfg.length_buckets)
        if teacher is not None:
            t_in = dict(inputs, interacted=torch.from_numpy(batch["interacted"]), pooled=pooled if self.share else None,
                        length_buckets=cfg.length_buckets)
            if teacher.training:
                t_logit = teacher(**t_in)
            else:
                with torch.no_grad():
                    t_logit = teacher(**t_in)
        if student is None:
            return F.binary_cross_entropy_with_logits(t_logit, y)
        if self.oracle:  # the simulator's true pCTR as the soft label, through the same Eq. 5 (no warm-up: it is never noise)
            return student_loss(s_logit, y, oracle_logit(batch["true_pctr"]), schedule.lam)[0]  # right from step 0
        if teacher is None:
            return F.binary_cross_entropy_with_logits(s_logit, y)
        if teacher.training:
            return sync_loss(s_logit, t_logit, y, schedule(step))[0]
        return student_loss(s_logit, y, t_logit, schedule(step))[0]
