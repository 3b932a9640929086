"""The fine ranker rewritten for serving: the same function as `fine_rank.model.Ranker`, with
less work per candidate and activation blocks that quantise well.

    served = ServingRanker(ranker)          # a trained Ranker in eval mode; shares its tables
    p = served(user_feats, item_feats, item_dense, interacted[, seq_items, seq_extras])

Three rewrites, each exact in real arithmetic (the export checks float32 parity with the Ranker):

- Each BatchNorm is folded into the Linear before it (eval mode: a per-channel scale and shift),
  so a layer is one matrix product and a bias.
- The input layer is split by the input's blocks: `in_user` (the user's embeddings), `in_item`
  (the candidate's embeddings and, with a sequence, its target-attention vector) and `in_dense`
  (item_dense and the interacted counts). Their outputs are summed, so the user block can come as
  ONE row per request (user_feats (1, 4)) and is multiplied once, not once per candidate; the graph
  broadcasts it over the candidates (and still takes one user row per candidate, for offline scoring).
- Because the blocks are separate products, int8 dynamic quantisation gives each its own
  activation scale: the candidate's embeddings are no longer quantised under one scale with raw
  counts and prices (`in_dense`, 13 columns, stays float32 by construction; see
  fine_rank.export.quantise_int8).
"""
from __future__ import annotations

import torch
from torch import nn

from fine_rank.model import N_INTERACTED, Ranker

# the node-name parts of the input layer's blocks in the exported graph (".../{task}/in_item/MatMul")
INPUT_BLOCKS = ("in_user", "in_item", "in_dense")


class _Affine(nn.Module):
    """x (N, I) -> x @ weight (I, O) [+ bias (O,)]: one MatMul (and one Add) in the graph."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y


def _folded(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear (no bias) then BatchNorm in eval mode -> (weight (O, I), bias (O,)) of one affine map."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if linear.bias is not None:
        bias = bias + linear.bias * scale
    return linear.weight * scale[:, None], bias


class ServingRanker(nn.Module):
    """A trained `Ranker` (eval mode) as served: folded BatchNorms, a block-split input layer."""

    def __init__(self, ranker: Ranker):
        super().__init__()
        if ranker.training:
            raise ValueError("ServingRanker folds the BatchNorm running statistics: pass a model in eval mode")
        emb = ranker.embeddings
        self.embeddings, self.sequence, self.head = emb, ranker.sequence, ranker.head
        blocks = list(ranker.bottom.layers)
        maps, slopes = [], []
        for i in range(0, len(blocks), 3):
            linear, bn, act = blocks[i : i + 3]
            maps.append(_folded(linear, bn))
            slopes.append(float(act.negative_slope))
        w0, b0 = maps[0]
        n_user, n_item = len(emb.user) * emb.dim, len(emb.item) * emb.dim
        n_dense = ranker.n_item_dense + N_INTERACTED
        dense_at = n_user + n_item  # regular_inputs: user emb, item emb, item_dense, interacted[, sequence]
        self.in_user = _Affine(w0[:, :n_user])
        self.in_item = _Affine(torch.cat([w0[:, n_user:dense_at], w0[:, dense_at + n_dense :]], dim=1), b0)
        self.in_dense = _Affine(w0[:, dense_at : dense_at + n_dense])
        self.layers = nn.ModuleList(_Affine(w, b) for w, b in maps[1:])
        self.slopes = slopes

    def forward(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
        """As `Ranker.forward` -> probability (B,); user_feats may be (1, 4), one request's user."""
        emb = self.embeddings
        user = torch.cat([table(user_feats[:, j]) for j, table in enumerate(emb.user.values())], dim=-1)  # (U, 4E)
        item = [emb.item_fields(item_feats, fields=range(len(emb.item)))]  # (B, 5E)
        if self.sequence is not None:
            if seq_items is None or seq_extras is None:
                raise ValueError("this ranker reads the behaviour sequence: seq_items and seq_extras are required")
            item.append(self.sequence(emb.item_fields(item_feats), emb.item_fields(seq_items), seq_extras,
                                      seq_items[..., 0] > 0))
        h = self.in_item(torch.cat(item, dim=-1)) + self.in_dense(torch.cat([item_dense, interacted], dim=-1))
        h = nn.functional.leaky_relu(h + self.in_user(user), self.slopes[0])
        for layer, slope in zip(self.layers, self.slopes[1:]):
            h = nn.functional.leaky_relu(layer(h), slope)
        return torch.sigmoid(self.head(h))


class ServingBoth(nn.Module):
    """The CTR and CVR serving rankers side by side: the fine inputs -> (pctr (B,), pcvr (B,))."""

    def __init__(self, ctr: Ranker, cvr: Ranker):
        super().__init__()
        self.ctr, self.cvr = ServingRanker(ctr), ServingRanker(cvr)

    def forward(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None):
        x = (user_feats, item_feats, item_dense, interacted, seq_items, seq_extras)
        return self.ctr(*x), self.cvr(*x)


__all__ = ["INPUT_BLOCKS", "ServingBoth", "ServingRanker"]
