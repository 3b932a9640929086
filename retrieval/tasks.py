"""The retrieval objective: in-batch sampled softmax with logQ correction, and the step loss
the training loop runs (one process, or a share of each global batch per DDP rank).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recstack.training import distributed as D

from retrieval.inputs import USER_INPUTS
from retrieval.model import TwoTower


def sampled_softmax_loss(
    user_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    pos_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_log_q: torch.Tensor,
    temperature: torch.Tensor | float,
    offset: int = 0,
) -> torch.Tensor:
    """Sampled softmax over in-batch (+ extra) candidates with logQ correction.

    user_emb (B, D); cand_emb (M, D), M >= B, where candidate i < B is row i's positive and
    the rest are extra negatives; pos_ids (B,) and cand_ids (M,) item ids; cand_log_q (M,)
    log of each candidate's expected number of occurrences among the candidates (a
    constant vector gives the plain in-batch softmax). -> scalar mean cross-entropy.

    A candidate that is the same item as row i's positive, other than column i itself,
    is masked: it is not a negative for that row (accidental hit).

    offset: the user rows are rows offset..offset+B-1 of a larger batch whose positives
    all lead the candidates (row i's positive is candidate offset + i): one rank's share
    under DDP, scored against every rank's candidates.
    """
    b = user_emb.shape[0]
    logits = user_emb @ cand_emb.T / temperature - cand_log_q[None, :]  # (B, M)
    same = cand_ids[None, :] == pos_ids[:, None]  # (B, M)
    same[:, offset : offset + b] &= ~torch.eye(b, dtype=torch.bool, device=same.device)
    logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(offset, offset + b, device=logits.device))


class SampledSoftmaxLoss(nn.Module):
    """Holds the (optionally learnable) temperature; training only, never exported."""

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        log_t = torch.tensor(math.log(temperature), dtype=torch.float32)
        if learnable:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(0.01, 1.0)

    def forward(self, user_emb, cand_emb, pos_ids, cand_ids, cand_log_q, offset: int = 0) -> torch.Tensor:
        """Shapes as `sampled_softmax_loss`; returns a scalar."""
        return sampled_softmax_loss(user_emb, cand_emb, pos_ids, cand_ids, cand_log_q, self.temperature, offset)


def sampling_log_q(click_counts: np.ndarray, batch_size: int, num_uniform: int, smoothing: float) -> np.ndarray:
    """log of each item's expected occurrences among one batch's candidates, (n_items,) float32.

    In-batch candidates are the batch's positives, drawn ~ click frequency p_i, so item i
    appears batch_size * p_i times on average; uniform negatives add num_uniform / n_items.
    p_i is the add-`smoothing` estimate from training clicks.
    """
    counts = np.asarray(click_counts, dtype=np.float64)
    n = len(counts)
    p = (counts + smoothing) / (counts.sum() + smoothing * n)
    expected = batch_size * p + num_uniform / n
    return np.log(np.maximum(expected, 1e-30)).astype(np.float32)


def logq_vector(click_counts: np.ndarray, batch_size: int, num_uniform: int, smoothing: float,
                alpha: float = 1.0, enabled: bool = True) -> np.ndarray:
    """What each candidate's logit is corrected by, (n_items,) float32: alpha * `sampling_log_q`
    (alpha = 1: the classic correction), or zeros when the correction is off."""
    if not enabled or alpha == 0.0:
        return np.zeros(len(click_counts), dtype=np.float32)
    return (alpha * sampling_log_q(click_counts, batch_size, num_uniform, smoothing)).astype(np.float32)


class InBatchSoftmaxStep:
    """The loss of one training step on rows `rows` of `self.rows` (the training clicks as model
    inputs, or the current chunk's when streamed), against the batch's positives and
    `num_uniform` uniform negatives drawn from `rng` (one draw per step, the same on every rank).

    One process scores the whole batch. Under torchrun each rank takes a contiguous share of
    the batch's positives and uniform negatives and the candidate embeddings are all-gathered
    (with gradients): every user row is scored against the whole global batch's candidates, so
    the loss, its logQ correction and the step count are those of one process. Streamed, a
    rank's rows are its own share of the global batch, scored against every rank's positives.
    """

    def __init__(self, model: TwoTower, loss_fn: SampledSoftmaxLoss, corpus: dict[str, np.ndarray],
                 log_q_items: torch.Tensor, rng: np.random.Generator, num_uniform: int, streamed: bool,
                 stats: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        """stats: (days, items) -> item statistics (retrieval.inputs.row_stats), when the item
        tower reads them: a uniform negative then gets those of the day of a positive of its
        batch (negative k: positive k mod B), so negatives and positives come from the same days."""
        self.model, self.loss_fn, self.corpus, self.log_q_items = model, loss_fn, corpus, log_q_items
        self.rng, self.num_uniform, self.streamed, self.stats = rng, num_uniform, streamed, stats
        self.rows: dict[str, np.ndarray] = {}
        self.world = D.world()

    def __call__(self, rows: np.ndarray, step: int, total: int) -> torch.Tensor:
        n_items = len(self.corpus["item_feats"])
        neg = self.rng.integers(0, n_items, size=self.num_uniform) if self.num_uniform else None
        if not self.world.distributed:
            return self.local(rows, neg)
        return self.streamed_share(rows, neg) if self.streamed else self.shared(rows, neg)

    def _candidates(self, rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        """Item embeddings of the positives of `rows` followed by the negatives `neg`."""
        item_feats, item_dense = self.rows["item_feats"][rows], self.rows["item_dense"][rows]
        if neg is not None:
            neg_dense = self.corpus["item_dense"][neg]
            if self.stats is not None:
                days = self.rows["day"][rows][np.arange(len(neg)) % len(rows)]
                neg_dense = np.concatenate([neg_dense, self.stats(days, neg)], axis=1)
            item_feats = np.concatenate([item_feats, self.corpus["item_feats"][neg]])
            item_dense = np.concatenate([item_dense, neg_dense])
        return self.model.item_tower(torch.from_numpy(item_feats), torch.from_numpy(item_dense))

    def _users(self, rows: np.ndarray) -> torch.Tensor:
        return self.model.user_tower(*(torch.from_numpy(self.rows[k][rows]) for k in USER_INPUTS))

    def local(self, rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        pos_ids = self.rows["item_id"][rows]
        user_emb = self._users(rows)
        cand_ids = pos_ids if neg is None else np.concatenate([pos_ids, neg])
        cand_emb = self._candidates(rows, neg)
        cand_ids_t = torch.from_numpy(cand_ids)
        return self.loss_fn(user_emb, cand_emb, torch.from_numpy(pos_ids), cand_ids_t, self.log_q_items[cand_ids_t])

    def _own(self, mine: np.ndarray, neg: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """User embeddings of this rank's rows, and item embeddings of their positives followed
        by this rank's share of the uniform negatives."""
        if neg is not None:
            nlo, nhi = D.shard_bounds(len(neg), self.world)
            neg = neg[nlo:nhi]
        return self._users(mine), self._candidates(mine, neg)

    def shared(self, rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        """This rank's share of the user rows against the global batch's candidates, in the
        single-process order (positives, then uniform negatives)."""
        lo, hi = D.shard_bounds(len(rows), self.world)
        user_emb, emb = self._own(rows[lo:hi], neg)  # (B/W, D), (B/W + K/W, D)
        cand_emb = D.all_gather_with_grad(emb[: hi - lo])  # (B, D)
        pos_ids = self.rows["item_id"][rows]
        cand_ids = pos_ids
        if neg is not None:
            cand_emb = torch.cat([cand_emb, D.all_gather_with_grad(emb[hi - lo :])])  # (B + K, D)
            cand_ids = np.concatenate([pos_ids, neg])
        cand_ids_t = torch.from_numpy(cand_ids)
        return self.loss_fn(user_emb, cand_emb, torch.from_numpy(pos_ids[lo:hi]), cand_ids_t,
                            self.log_q_items[cand_ids_t], lo)

    def streamed_share(self, rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        """Streamed under DDP: this rank's own rows (a share of the global batch) against every
        rank's positives (all-gathered in rank order) and the shared uniform negatives."""
        b = len(rows)
        user_emb, emb = self._own(rows, neg)
        pos_ids = torch.from_numpy(np.ascontiguousarray(self.rows["item_id"][rows]))
        cand_emb = D.all_gather_with_grad(emb[:b])  # (B, D)
        cand_ids_t = D.all_gather_tensor(pos_ids)
        if neg is not None:
            cand_emb = torch.cat([cand_emb, D.all_gather_with_grad(emb[b:])])  # (B + K, D)
            cand_ids_t = torch.cat([cand_ids_t, torch.from_numpy(neg)])
        return self.loss_fn(user_emb, cand_emb, pos_ids, cand_ids_t, self.log_q_items[cand_ids_t], self.world.rank * b)
