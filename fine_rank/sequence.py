"""Target attention over the user's behaviour sequence for the fine rankers (pure nn.Module).

DIN-style: the candidate item attends over the user's last SEQ_LEN behaviours, so the same
history says something different about each candidate (a user who clicked three phone cases
gets a high weight on them when the candidate is a phone case, none when it is a shoe).

    att = TargetAttention(emb_dim=16)
    pooled = att(cand (B, E), seq (S, L, E), seq_extras (S, L, 3), valid (S, L))   # (B, att.out_dim)

E = 3 * emb_dim: a slot's item, category and shop embeddings, looked up in the ranker's own
item tables (shared with the candidate's item features). S is B (one sequence per row, in
training) or 1 (one request's candidates, as served): the sequence side (its keys, its mean)
is then computed once per request, and only the query and the (B, L) scores per candidate.

Scores are scaled dot products between a projection of the candidate and a projection of
each slot's embeddings with its extras (log hours since, log dwell, is_purchase: recency and
type move the weight), softmax over the non-empty slots. DIN drops the softmax to keep the
intensity of a user's interest, which a softmax-weighted average loses (with no slot like the
candidate the weights still sum to 1). Here the intensity is kept as outputs of its own: the
best slot's score and the log-mean-exp of the scores (how strongly, and how broadly, the
history matches this candidate: dot products the MLP above would have to learn to compute),
and the share of non-empty slots. An empty sequence gives zeros (no NaN: the masked softmax is
multiplied by the mask).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from recstack import features as FE

SEQUENCES = ("none", "din")  # the fine rankers' `sequence` option
SEQ_ITEM_FIELDS = (0, 1, 2)  # item, category, shop columns of item_feats / seq_items
N_SEQ_EXTRAS = len(FE.SEQ_EXTRA_FIELDS)
_MASKED = -1e4  # a masked slot's score: exp() of it is 0 in float32, and it is finite


class TargetAttention(nn.Module):
    """The candidate's embeddings attend over the sequence slots': attention-pooled and
    mean-pooled slot vectors (embeddings + extras) and the share of non-empty slots."""

    def __init__(self, emb_dim: int, attention_dim: int = 32, seq_len: int = FE.SEQ_LEN):
        super().__init__()
        if attention_dim < 1:
            raise ValueError(f"attention_dim must be >= 1, got {attention_dim}")
        self.slot_dim = len(SEQ_ITEM_FIELDS) * emb_dim + N_SEQ_EXTRAS  # a slot's value vector
        self.query = nn.Linear(len(SEQ_ITEM_FIELDS) * emb_dim, attention_dim, bias=False)
        self.key = nn.Linear(self.slot_dim, attention_dim)
        self.scale = 1.0 / math.sqrt(attention_dim)
        self.log_len = math.log1p(seq_len)

    @property
    def out_dim(self) -> int:
        return 2 * self.slot_dim + 3

    def forward(self, cand: torch.Tensor, seq: torch.Tensor, seq_extras: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """cand (B, E), seq (S, L, E), seq_extras (S, L, 3), valid (S, L) bool, S in {1, B}
        -> (B, 2 * (E + 3) + 3): attention-pooled slots, best score, log-mean-exp of the scores,
        mean-pooled slots, log1p(slots) / log1p(L)."""
        mask = valid.to(seq.dtype)  # (S, L)
        values = torch.cat([seq, seq_extras], dim=-1) * mask.unsqueeze(-1)  # (S, L, E + 3)
        keys = self.key(values)  # (S, L, A): the request's side, once per sequence
        q = self.query(cand).unsqueeze(1)  # (B, 1, A)
        scores = torch.matmul(q, keys.transpose(1, 2)).squeeze(1) * self.scale  # (B, L) (S broadcast)
        scores = torch.where(valid, scores, torch.full_like(scores, _MASKED))
        weights = torch.softmax(scores, dim=-1) * mask  # (B, L); all 0 for an empty sequence
        attended = torch.matmul(weights.unsqueeze(1), values).squeeze(1)  # (B, E + 3)
        n = mask.sum(-1, keepdim=True)  # (S, 1)
        some = (n > 0).to(seq.dtype)  # (S, 1): an empty sequence matches nothing
        best = scores.amax(-1, keepdim=True) * some  # (B, 1)
        broad = (torch.logsumexp(scores, -1, keepdim=True) - torch.log(n.clamp_min(1.0))) * some  # (B, 1)
        mean = values.sum(1) / n.clamp_min(1.0)  # (S, E + 3)
        length = torch.log1p(n) / self.log_len  # (S, 1)
        per_request = torch.cat([mean, length], dim=-1).expand(cand.shape[0], -1)  # (B, E + 4)
        return torch.cat([attended, best, broad, per_request], dim=-1)
