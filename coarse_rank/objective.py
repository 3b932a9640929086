"""The coarse stage aligned with the served objective: rank by log expected GMV, still with one
inner product against precomputed item vectors.

The fine stage orders by pCTR x pCVR x price, so the coarse cut should keep what that product
ranks high:

    log GMV(u, i) = log pCTR(u, i) + log pCVR(u, i) + log price(i)
                  ~ scale * <u, v_i>  +  [log sigmoid(c_i) + log price_i]
                     click logit         item-only term

The click logit stands in for log pCTR (equal up to log(1 + pCTR), small at the click rates
of a feed), and c_i is an item-only click-conditioned CVR logit. The bracket depends on the
item alone, so export folds it into one more item-vector coordinate against a constant 1 on the
user side: serving still computes `item_vectors[cands] @ user_vec` (recstack.serving.coarse),
now of dimension out_dim + 1.

Training (`Config.objective = "gmv"`) keeps PFD's structure (Eq. 5, Algorithm 1): the student's
two heads learn from click (all impressions) and purchase (clicked impressions), and a
two-task DNN teacher (MD, or PFD+MD with the interacted features), trained in the same steps on
the student's shared embeddings, gives soft labels for both: its CTR for the click logit, its
CVR, over every impression, for the CVR head. "ctr" is the paper's click-only student.

    student, teacher = build_student(cfg, vocab), build_teacher(cfg, vocab, student)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recstack.features import Vocab
from recstack.training.distill import LambdaSchedule, soft_label_loss

from coarse_rank import model as M
from coarse_rank.config import Config


class GmvStudent(M.InnerProductStudent):
    """The inner-product student plus an item-only CVR head on the item tower's input features
    (the same embedding tables). `forward` / `score_requests` stay the click logit; the served
    score adds `item_term`, which export folds into the item vectors."""

    def __init__(self, vocab: Vocab, *, cvr_hidden: Sequence[int] = (64,), **kwargs):
        super().__init__(vocab, **kwargs)
        self.cvr_head = M.MLP(self.item_tower.mlp[0].in_features, tuple(cvr_hidden), 1)  # item embeddings + dense

    def cvr_logit(self, item_feats: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """item_feats (B, 5), item_dense (B, 1) -> the item-only P(purchase | click) logits (B,)."""
        return self.cvr_head(self.item_tower.features(item_feats, item_dense)).squeeze(-1)

    def item_term(self, item_feats: torch.Tensor, item_dense: torch.Tensor, log_value: torch.Tensor) -> torch.Tensor:
        """log pCVR_i + log value_i (B,): the item-only part of the served log expected GMV."""
        return F.logsigmoid(self.cvr_logit(item_feats, item_dense)) + log_value


class TwoTaskDNNTeacher(M.DNNTeacher):
    """The MD / PFD+MD teacher with two outputs, click and purchase-given-click logits.
    `forward` returns the click logit (what `predict` and the PFD tables score); `both` both."""

    def __init__(self, embeddings: M.FeatureEmbeddings, sequence: M.BehaviourEncoder, n_interacted: int = 0, *,
                 hidden: Sequence[int] = (512, 256, 128), n_item_dense: int = 1):
        super().__init__(embeddings, sequence, n_interacted, hidden=hidden, n_item_dense=n_item_dense)
        self.mlp = M.MLP(self.mlp[0].in_features, hidden, 2)

    def both(self, *args, **kwargs) -> torch.Tensor:
        """`DNNTeacher.forward`'s inputs -> (B, 2): click logit, CVR logit."""
        return super().forward(*args, **kwargs)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.both(*args, **kwargs)[:, 0]


def build_student(cfg: Config, vocab: Vocab) -> M.InnerProductStudent:
    """The student `cfg.objective` asks for (export rebuilds checkpoints through this too)."""
    if cfg.objective != "gmv":
        return M.build_student(cfg, vocab)
    return GmvStudent(vocab, cvr_hidden=tuple(cfg.cvr_hidden), embed_dim=cfg.embed_dim, d_model=cfg.d_model,
                      n_heads=cfg.n_heads, ff_dim=cfg.ff_dim, hidden=tuple(cfg.hidden), out_dim=cfg.out_dim,
                      scale=cfg.scale, n_item_dense=cfg.n_item_dense)


def build_teacher(cfg: Config, vocab: Vocab, student: M.InnerProductStudent) -> nn.Module | None:
    """`model.build_teacher`, with the DNN teachers (md, pfd_md) made two-task under the gmv
    objective; the others stay click teachers (the CVR head then learns from purchases alone)."""
    teacher = M.build_teacher(cfg, vocab, student)
    if cfg.objective != "gmv" or not isinstance(teacher, M.DNNTeacher):
        return teacher
    return TwoTaskDNNTeacher(teacher.embeddings, teacher.sequence, teacher.n_interacted, hidden=tuple(cfg.teacher_hidden),
                             n_item_dense=cfg.n_item_dense)


def _bce_on(logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Log-loss over the selected rows; 0 (with a gradient path) when none is selected."""
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[rows], labels[rows])


class GmvStep:
    """The loss of one step under the gmv objective (the loop's step, as `tasks.DistillationStep`).

    Student: click log-loss on every impression plus purchase log-loss on the clicked ones, each
    mixed with the teacher's soft label by Eq. 5's λ (the CVR soft label on every impression: the
    teacher's P(purchase | click) is defined whether or not this one was clicked). Teacher (in
    train mode): click log-loss plus purchase-given-click log-loss, its soft labels detached.
    A click-only teacher (sd, lupi, pfd) distils the click logit alone. With `targets`
    (`coarse_rank.fine_distill.FineTargets`, cfg.fine_distill > 0) the student also learns the
    fine ranker's order over retrieved candidates, weighted by cfg.fine_distill.
    """

    def __init__(self, cfg: Config, student: GmvStudent | None, teacher: TwoTaskDNNTeacher | None,
                 schedule: LambdaSchedule, targets=None):
        self.cfg, self.student, self.teacher, self.schedule = cfg, student, teacher, schedule
        self.share = student is not None and teacher is not None and cfg.manner in ("share_sync", "share_star_sync")
        self.targets = targets if student is not None and cfg.fine_distill > 0 else None

    def __call__(self, batch: tuple[dict, dict], step: int, total: int) -> torch.Tensor:
        loss = self._impressions(batch, step)
        if self.targets is not None:
            loss = loss + self.cfg.fine_distill * self.targets.pair_loss(self.student, self.cfg, step)
        return loss

    def _impressions(self, batch: tuple[dict, dict], step: int) -> torch.Tensor:
        batch, inputs = batch
        cfg, student, teacher = self.cfg, self.student, self.teacher
        click = torch.from_numpy(batch["click"])
        purchase = torch.from_numpy(batch["purchase"])
        clicked = click > 0
        loss = torch.zeros(())
        pooled = None
        if student is not None:
            pooled, s_ctr = M.student_click_logit(student, inputs, cfg.length_buckets)
            s_cvr = student.cvr_logit(inputs["item_feats"], inputs["item_dense"])
            hard = F.binary_cross_entropy_with_logits(s_ctr, click) + _bce_on(s_cvr, purchase, clicked)
        if teacher is not None:
            t_in = dict(inputs, interacted=torch.from_numpy(batch["interacted"]), pooled=pooled if self.share else None,
                        length_buckets=cfg.length_buckets)
            two = isinstance(teacher, TwoTaskDNNTeacher)
            with torch.set_grad_enabled(teacher.training):
                t = teacher.both(**t_in) if two else teacher(**t_in)[:, None]  # (B, 2) or (B, 1)
            if teacher.training:
                loss = loss + F.binary_cross_entropy_with_logits(t[:, 0], click)
                if two:
                    loss = loss + _bce_on(t[:, 1], purchase, clicked)
        if student is None:
            return loss
        if teacher is None:
            return loss + hard
        lam = self.schedule(step)
        if t.shape[1] == 2:
            soft = soft_label_loss(s_ctr, torch.sigmoid(t[:, 0])) + soft_label_loss(s_cvr, torch.sigmoid(t[:, 1]))
            return loss + (1.0 - lam) * hard + lam * soft
        cvr_hard = _bce_on(s_cvr, purchase, clicked)  # no CVR soft label: the CVR head keeps its hard loss whole
        return loss + (1.0 - lam) * (hard - cvr_hard) + lam * soft_label_loss(s_ctr, torch.sigmoid(t[:, 0])) + cvr_hard


@torch.no_grad()
def item_terms(model: GmvStudent, item_feats: np.ndarray, item_dense: np.ndarray, values: np.ndarray,
               chunk: int = 8192) -> np.ndarray:
    """log pCVR_i + log value_i for every row given, float64 (I,); values must be > 0."""
    model.eval()
    out = []
    for s in range(0, len(values), chunk):
        sl = slice(s, s + chunk)
        log_v = torch.from_numpy(np.log(np.asarray(values[sl], np.float64))).float()
        out.append(model.item_term(torch.from_numpy(item_feats[sl]), torch.from_numpy(item_dense[sl]), log_v).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def centred_item_terms(model: GmvStudent, items, stats: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The served score's item-only part for the whole corpus (`recstack.features.ItemTable`;
    `stats`: the item statistics table the model reads, (I, S)), minus its mean: (terms (I,)
    float64, the mean). A constant shift ranks alike and keeps the coordinate near the others'
    scale (the int8 codes have one scale per row)."""
    ids = np.arange(items.n)
    terms = item_terms(model, items.feats(ids), np.ascontiguousarray(items.dense(ids, stats)), items.price)
    mean = float(terms.mean()) if len(terms) else 0.0
    return terms - mean, mean


class UserVectorWithOne(nn.Module):
    """The user tower with a constant 1 appended: (..., out_dim + 1), the coordinate that meets
    the item term in the served inner product."""

    def __init__(self, user_tower: nn.Module):
        super().__init__()
        self.user_tower = user_tower

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor) -> torch.Tensor:
        u = self.user_tower(user_feats, seq_items, seq_extras)
        return torch.cat([u, torch.ones_like(u[:, :1])], dim=-1)
