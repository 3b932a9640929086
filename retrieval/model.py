"""Two-tower retrieval model: user tower and item tower meeting in an inner product.

Both towers end in an l2-normalised D-vector, so the inner product is a cosine: the same
number in training (scaled by a temperature there only), in the FAISS index
(METRIC_INNER_PRODUCT) and at serving. Pure modules: no I/O, no losses.

Inputs follow docs/ARCHITECTURE.md: ids are raw id + 1 and 0 means padding / unknown.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recstack.features import Vocab
from recstack.item_stats import FIELDS as STATS_FIELDS, SOURCES as STATS_SOURCES, WINDOWS

if TYPE_CHECKING:
    from retrieval.config import Config

# Masked-out behaviour slots get this score before the softmax. Finite (not -inf) so an
# all-empty sequence yields a uniform softmax that the mask then zeroes, never NaN.
_MASKED_SCORE = -1e4


class FieldEmbedding(nn.Module):
    """One embedding table per categorical column, concatenated.

    Row 0 (padding / unknown) is zero and receives no gradient, so an empty behaviour
    slot or an unknown user contributes nothing by construction. A column with dim 0 is
    ignored (no table), which is how a config drops a feature.
    """

    def __init__(self, sizes: Sequence[int], dims: Sequence[int], init_std: float = 0.05):
        super().__init__()
        if len(sizes) != len(dims):
            raise ValueError(f"{len(sizes)} table sizes but {len(dims)} dims")
        self.columns = [c for c, d in enumerate(dims) if d > 0]
        if not self.columns:
            raise ValueError("every column has dim 0: nothing to embed")
        self.tables = nn.ModuleList(nn.Embedding(sizes[c], dims[c], padding_idx=0) for c in self.columns)
        self.out_dim = int(sum(dims[c] for c in self.columns))
        # Small init: ids never seen in training (the long tail, new items) keep near-zero
        # vectors, so their tower output is driven by their attributes, not by noise.
        for t in self.tables:
            nn.init.normal_(t.weight, std=init_std)
            with torch.no_grad():
                t.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., C) int64 -> (..., out_dim) float32."""
        return torch.cat([table(ids[..., c]) for c, table in zip(self.columns, self.tables)], dim=-1)


class MLP(nn.Sequential):
    """Linear-ReLU stack with a linear output layer."""

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int):
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(in_dim, h), nn.ReLU()]
            in_dim = h
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


class SequencePooling(nn.Module):
    """Pools the behaviour sequence with a few learned weightings of its behaviours.

    Each head scores a behaviour by a linear function of its extras (age, dwell, purchase
    flag) and takes a softmax over the non-empty slots; the pooled vector is the weighted
    mean of [item-attribute embedding, extras]. Head 0 starts as a recency weighting
    (short-term intent), head 1 as a plain mean (long-term taste); both are learned.
    Pooling before any per-behaviour transform keeps the cost at O(B·L·E), which matters
    on CPU. Empty slots get weight exactly 0; an all-empty sequence pools to 0.
    """

    def __init__(self, item_dim: int, n_extras: int, heads: int = 2):
        super().__init__()
        self.score = nn.Linear(n_extras, heads)
        with torch.no_grad():
            self.score.weight.zero_()
            self.score.bias.zero_()
            self.score.weight[0, 0] = -1.0  # x log1p(hours since): weight ~ 1 / (1 + hours)
        self.out_dim = heads * (item_dim + n_extras)

    def forward(self, seq_emb: torch.Tensor, seq_extras: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """seq_emb (B, L, E), seq_extras (B, L, X), mask (B, L) bool (True = behaviour present) -> (B, heads * (E + X))."""
        s = self.score(seq_extras).masked_fill(~mask.unsqueeze(-1), _MASKED_SCORE)  # (B, L, H)
        w = torch.softmax(s, dim=1) * mask.unsqueeze(-1).to(s.dtype)  # (B, L, H); exactly 0 on empty slots
        x = torch.cat([seq_emb, seq_extras], dim=-1)  # (B, L, E + X)
        return torch.bmm(w.transpose(1, 2), x).flatten(1)  # (B, H * (E + X))


class UserTower(nn.Module):
    """user_feats + behaviour sequence -> l2-normalised user embedding.

    `item_embedding` embeds the sequence's item columns; the two-tower model passes the
    item tower's table so that behaviours and candidates live in one id space.
    """

    def __init__(
        self,
        user_sizes: Sequence[int],
        user_dims: Sequence[int],
        item_embedding: FieldEmbedding,
        n_extras: int,
        seq_heads: int,
        hidden: Sequence[int],
        dim: int,
    ):
        super().__init__()
        self.user_embedding = FieldEmbedding(user_sizes, user_dims)
        self.item_embedding = item_embedding
        self.sequence = SequencePooling(item_embedding.out_dim, n_extras, seq_heads)
        # +1: log1p(sequence length), which also tells the MLP "no history" (cold start)
        self.mlp = MLP(self.user_embedding.out_dim + self.sequence.out_dim + 1, hidden, dim)

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor) -> torch.Tensor:
        """user_feats (B, 4) int64, seq_items (B, L, 5) int64, seq_extras (B, L, 3) float32 -> user_emb (B, D), unit norm."""
        mask = seq_items[..., 0] > 0  # (B, L)
        pooled = self.sequence(self.item_embedding(seq_items), seq_extras, mask)  # (B, P)
        length = torch.log1p(mask.sum(dim=1, keepdim=True).to(pooled.dtype))  # (B, 1)
        x = torch.cat([self.user_embedding(user_feats), pooled, length], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class ItemTower(nn.Module):
    """item_feats + item_dense -> l2-normalised item embedding."""

    def __init__(self, item_embedding: FieldEmbedding, n_dense: int, hidden: Sequence[int], dim: int):
        super().__init__()
        self.item_embedding = item_embedding
        self.n_dense = int(n_dense)  # the price, then the item statistics when the tower reads them
        self.mlp = MLP(item_embedding.out_dim + n_dense, hidden, dim)

    def forward(self, item_feats: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """item_feats (B, 5) int64, item_dense (B, n_dense) float32 -> item_emb (B, D), unit norm."""
        x = torch.cat([self.item_embedding(item_feats), item_dense], dim=-1)
        return F.normalize(self.mlp(x), dim=-1)


class TwoTower(nn.Module):
    """The retrieval model: a UserTower and an ItemTower sharing the item-attribute embeddings.

    score(user, item) = <user_emb, item_emb>, the metric of the FAISS index. The item
    embedding table is shared (one set of parameters, referenced by both towers) so that an
    item's behaviour-side and candidate-side representations are learned together.
    """

    def __init__(
        self,
        vocab: Vocab,
        *,
        user_dims: Sequence[int] = (0, 4, 2, 4),
        item_dims: Sequence[int] = (8, 16, 16, 16, 4),
        seq_heads: int = 2,
        user_hidden: Sequence[int] = (128,),
        item_hidden: Sequence[int] = (128,),
        dim: int = 64,
        n_extras: int = 3,
        n_dense: int = 1,
    ):
        super().__init__()
        self.dim = dim
        item_embedding = FieldEmbedding(vocab.item_sizes(), item_dims)
        self.user_tower = UserTower(vocab.user_sizes(), user_dims, item_embedding, n_extras, seq_heads, user_hidden, dim)
        self.item_tower = ItemTower(item_embedding, n_dense, item_hidden, dim)

    def forward(
        self,
        user_feats: torch.Tensor,
        seq_items: torch.Tensor,
        seq_extras: torch.Tensor,
        item_feats: torch.Tensor,
        item_dense: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """User side (B, 4), (B, L, 5), (B, L, 3); item side (M, 5), (M, n_dense) -> (user_emb (B, D), item_emb (M, D))."""
        return self.user_tower(user_feats, seq_items, seq_extras), self.item_tower(item_feats, item_dense)


def stats_columns(cfg: "Config") -> list[int]:
    """The columns of recstack.item_stats.FIELDS the item tower reads: both windows of each of
    cfg.item_stats_sources."""
    want = {f"{src}s_per_day_{name}" for name, _ in WINDOWS for src in cfg.item_stats_sources}
    assert set(want) <= set(STATS_FIELDS) and len(STATS_SOURCES) * len(WINDOWS) == len(STATS_FIELDS)
    return [i for i, f in enumerate(STATS_FIELDS) if f in want]


def build_model(cfg: "Config", vocab: Vocab) -> TwoTower:
    """The two towers as `cfg` describes them (training, and export rebuilding a checkpoint)."""
    return TwoTower(
        vocab, user_dims=cfg.user_dims, item_dims=cfg.item_dims, seq_heads=cfg.seq_heads,
        user_hidden=cfg.user_hidden, item_hidden=cfg.item_hidden, dim=cfg.dim,
        n_dense=1 + (len(stats_columns(cfg)) if cfg.item_stats else 0),
    )
