"""Fine-ranker models: CTR and CVR rankers over regular features (pure nn.Modules, no I/O).

    embeddings = FeatureEmbeddings(vocab.user_sizes(), vocab.item_sizes(), dim=16)
    ranker = Ranker(embeddings, hidden=(512, 256, 128))
    prob = ranker(user_feats, item_feats, item_dense, interacted)        # (B,) serving / ONNX
    logit = ranker.logits(user_feats, item_feats, item_dense, interacted)  # (B,) training
    # with the behaviour sequence (fine_rank.sequence.TargetAttention, `sequence="din"`):
    ranker = Ranker.build(vocab, 16, (512, 256, 128), sequence="din")
    prob = ranker(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras)

A ranker is embeddings -> `SharedBottom` MLP -> main `Head`. The roles are separate modules
so that the distillation variants compose them instead of re-implementing them: a PFD
teacher reuses the same `FeatureEmbeddings` (shared embeddings, PFD Algorithm 1) with a
wider input, and SEAD adds an `AuxTower` (own tower, two branches) on the same
`SharedBottom` while the main head stays the (calibrated) serving head.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from recstack import features as FE
from recstack.training import sead

from fine_rank.config import N_ITEM_DENSE
from fine_rank.sequence import SEQ_ITEM_FIELDS, SEQUENCES, TargetAttention
N_INTERACTED = len(FE.INTERACTED_FIELDS)
# small initial id vectors: with N(0, 1) (the nn.Embedding default) an unseen or rarely
# seen id starts as a large random signal that the MLP fits, and the model overfits ids
EMBEDDING_INIT_STD = 0.05


class FeatureEmbeddings(nn.Module):
    """One embedding table per categorical column of `user_feats` and `item_feats`.

    Row 0 of every table is padding / unknown (cold-start user, unknown item) and stays 0.
    """

    def __init__(self, user_sizes: Sequence[int], item_sizes: Sequence[int], dim: int):
        super().__init__()
        if len(user_sizes) != len(FE.USER_FIELDS) or len(item_sizes) != len(FE.ITEM_FIELDS):
            raise ValueError(f"expected {len(FE.USER_FIELDS)} user and {len(FE.ITEM_FIELDS)} item table sizes")
        self.dim = dim
        self.user = nn.ModuleDict({name: nn.Embedding(n, dim, padding_idx=0) for name, n in zip(FE.USER_FIELDS, user_sizes)})
        self.item = nn.ModuleDict({name: nn.Embedding(n, dim, padding_idx=0) for name, n in zip(FE.ITEM_FIELDS, item_sizes)})
        for table in (*self.user.values(), *self.item.values()):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()

    @property
    def out_dim(self) -> int:
        return (len(self.user) + len(self.item)) * self.dim

    def forward(self, user_feats: torch.Tensor, item_feats: torch.Tensor) -> torch.Tensor:
        """user_feats (B, 4) int64, item_feats (B, 5) int64 -> (B, 9 * dim) concatenated embeddings."""
        parts = [table(user_feats[:, j]) for j, table in enumerate(self.user.values())]
        parts += [table(item_feats[:, j]) for j, table in enumerate(self.item.values())]
        return torch.cat(parts, dim=-1)

    def item_fields(self, feats: torch.Tensor, fields=SEQ_ITEM_FIELDS) -> torch.Tensor:
        """feats (..., 5) item ids (item_feats or seq_items) -> (..., len(fields) * dim): the
        item tables' embeddings of those columns, concatenated (row 0, an empty slot, is 0)."""
        tables = list(self.item.values())
        return torch.cat([tables[j](feats[..., j]) for j in fields], dim=-1)


def regular_inputs(embeddings: FeatureEmbeddings, sequence: "TargetAttention | None", user_feats, item_feats,
                   item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
    """The bottom input every ranker and teacher builds from the regular (serving) tensors:
    embeddings, item_dense, interacted, then (with a `sequence`) the target-attention vector.
    seq_items (S, L, 5), seq_extras (S, L, 3) with S = B or 1 (one request's sequence)."""
    parts = [embeddings(user_feats, item_feats), item_dense, interacted]
    if sequence is not None:
        if seq_items is None or seq_extras is None:
            raise ValueError("this ranker reads the behaviour sequence: seq_items and seq_extras are required")
        seq = embeddings.item_fields(seq_items)  # (S, L, E)
        parts.append(sequence(embeddings.item_fields(item_feats), seq, seq_extras, seq_items[..., 0] > 0))
    return torch.cat(parts, dim=-1)


def build_sequence(kind: str, emb_dim: int, attention_dim: int = 32) -> "TargetAttention | None":
    """The `sequence` option -> its module (None for "none")."""
    if kind not in SEQUENCES:
        raise ValueError(f"sequence must be one of {SEQUENCES}, got {kind!r}")
    return TargetAttention(emb_dim, attention_dim) if kind == "din" else None


class SharedBottom(nn.Module):
    """MLP of Linear -> BatchNorm -> LeakyReLU blocks (BN before the activation, as in PFD)."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (512, 256, 128), negative_slope: float = 0.01):
        super().__init__()
        if not hidden:
            raise ValueError("hidden needs at least one layer")
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            # no Linear bias: the BatchNorm shift that follows makes it redundant
            layers += [nn.Linear(prev, width, bias=False), nn.BatchNorm1d(width), nn.LeakyReLU(negative_slope)]
            prev = width
        self.layers = nn.Sequential(*layers)
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) float32 -> (B, hidden[-1])."""
        return self.layers(x)


class Head(nn.Module):
    """A linear logit head on top of the shared bottom."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1)
        # zero weights: the initial logit is the bias alone, so with `set_prior` the first
        # prediction is the base rate for every row. A random init spreads the logits and,
        # through the sigmoid, inflates the mean prediction of a briefly trained model
        nn.init.zeros_(self.linear.weight)

    def set_prior(self, positive_rate: float) -> None:
        """Start the bias at the logit of the label base rate.

        The first steps then fit the ranking instead of the base rate, which matters for
        the rare CVR label and keeps short runs calibrated.
        """
        p = min(max(float(positive_rate), 1e-6), 1 - 1e-6)
        with torch.no_grad():
            self.linear.bias.fill_(math.log(p / (1 - p)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, in_dim) -> logits (B,)."""
        return self.linear(h).squeeze(-1)


class Ranker(nn.Module):
    """Pointwise ranker on regular features: the CTR model and the CVR model are both one.

    Inputs are the serving tensors of docs/ARCHITECTURE.md; the interacted features are
    regular inputs here (the fine ranker computes them online from the user's event log).
    With a `sequence` module the ranker also reads seq_items / seq_extras (target attention,
    fine_rank.sequence); without one it takes and ignores them.
    """

    def __init__(self, embeddings: FeatureEmbeddings, hidden: Sequence[int] = (512, 256, 128), negative_slope: float = 0.01,
                 sequence: TargetAttention | None = None, n_item_dense: int = N_ITEM_DENSE):
        super().__init__()
        self.embeddings = embeddings
        self.sequence = sequence
        self.n_item_dense = n_item_dense  # the price, then the item statistics when the model reads them
        extra = sequence.out_dim if sequence is not None else 0
        self.bottom = SharedBottom(embeddings.out_dim + n_item_dense + N_INTERACTED + extra, hidden, negative_slope)
        self.head = Head(self.bottom.out_dim)

    @classmethod
    def build(cls, vocab: FE.Vocab, emb_dim: int = 16, hidden: Sequence[int] = (512, 256, 128), sequence: str = "none",
              attention_dim: int = 32, n_item_dense: int = N_ITEM_DENSE) -> "Ranker":
        emb = FeatureEmbeddings(vocab.user_sizes(), vocab.item_sizes(), emb_dim)
        return cls(emb, hidden, sequence=build_sequence(sequence, emb_dim, attention_dim), n_item_dense=n_item_dense)

    def inputs(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
        """-> (B, bottom input): embeddings, item_dense, interacted (and the sequence vector)."""
        return regular_inputs(self.embeddings, self.sequence, user_feats, item_feats, item_dense, interacted,
                              seq_items, seq_extras)

    def hidden(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
        """The serving tensors -> (B, hidden[-1]) shared-bottom output (where an auxiliary head attaches)."""
        return self.bottom(self.inputs(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras))

    def logits(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
        """user_feats (B, 4) int64, item_feats (B, 5) int64, item_dense (B, 1) float32,
        interacted (B, X) float32[, seq_items (S, L, 5) int, seq_extras (S, L, 3) float32, S in
        {1, B}] -> main-head logits (B,) (for the log-loss)."""
        return self.head(self.hidden(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras))

    def forward(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
        """As `logits` -> probability (B,) in (0, 1) (the exported serving output)."""
        return torch.sigmoid(self.logits(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras))


# ------------------------------------------------------------------ distillation variants
#
# The serving model is always a plain `Ranker` (the student); the variants below wrap or sit
# beside it at training time only, so export and the bundle contract do not change.

N_POST_EVENT = 4  # columns of `post_event`: log dwell, log comments, chatted, cart


class Teacher(nn.Module):
    """A CVR teacher (PFD Table 4) that may see the post-event (privileged) features.

    regular=True  shares the student's `FeatureEmbeddings` (PFD's Share&Sync), and its
                  sequence attention when it has one, and reads the regular inputs;
                  regular=False reads the post-event features alone (LUPI).
    n_privileged  post-event columns appended to the bottom input (0: SD control and MD).
    hidden        the student's widths for SD / PFD / LUPI, wider and deeper for MD / PFD+MD.
    """

    def __init__(self, embeddings: FeatureEmbeddings | None, n_privileged: int, hidden: Sequence[int],
                 sequence: TargetAttention | None = None, n_item_dense: int = N_ITEM_DENSE):
        super().__init__()
        if embeddings is None and n_privileged == 0:
            raise ValueError("a teacher needs regular or privileged inputs")
        self.embeddings = embeddings
        self.sequence = sequence if embeddings is not None else None
        self.n_privileged = n_privileged
        regular = 0
        if embeddings is not None:
            regular = embeddings.out_dim + n_item_dense + N_INTERACTED + (sequence.out_dim if sequence is not None else 0)
        self.bottom = SharedBottom(regular + n_privileged, hidden)
        self.head = Head(self.bottom.out_dim)

    def logits(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None,
               post_event=None) -> torch.Tensor:
        """Serving tensors as in `Ranker` (seq_items / seq_extras None without a sequence) +
        post_event (B, 4) float32 -> logits (B,)."""
        parts = []
        if self.embeddings is not None:
            parts.append(regular_inputs(self.embeddings, self.sequence, user_feats, item_feats, item_dense, interacted,
                                        seq_items, seq_extras))
        if self.n_privileged:
            parts.append(post_event)
        return self.head(self.bottom(torch.cat(parts, dim=-1)))


def build_teacher(kind: str, student: Ranker, hidden: Sequence[int], md_hidden: Sequence[int],
                  inputs: Ranker | None = None) -> Teacher:
    """kind: sd (same as the student, no privileged input), md (wider/deeper, no privileged),
    lupi (post-event only), pfd (regular + post-event), pfd_md (PFD with the MD widths).
    The teacher reads the regular inputs through the embeddings (and sequence attention) of
    `inputs`: the student's own by default (Share), another ranker's for a teacher with
    input components of its own (Ind)."""
    source = inputs if inputs is not None else student
    emb = source.embeddings
    table = {
        "sd": (emb, 0, hidden),
        "md": (emb, 0, md_hidden),
        "lupi": (None, N_POST_EVENT, hidden),
        "pfd": (emb, N_POST_EVENT, hidden),
        "pfd_md": (emb, N_POST_EVENT, md_hidden),
    }
    if kind not in table:
        raise ValueError(f"unknown teacher {kind!r}; choose one of {sorted(table)}")
    return Teacher(*table[kind], sequence=source.sequence, n_item_dense=student.n_item_dense)


class MTLRanker(nn.Module):
    """The MTL baseline of PFD §5.3: hard parameter sharing of the first hidden layer.

    The main task is the student's own path (its first bottom block is the shared layer, the
    rest of its bottom and its head are the main tower), and each privileged feature gets a
    tower of `aux_hidden` widths on the shared layer's output. The student stays a plain
    `Ranker`, so the exported model is the same graph as the baseline's.
    """

    def __init__(self, student: Ranker, n_aux: int = N_POST_EVENT, aux_hidden: Sequence[int] = (256, 128)):
        super().__init__()
        self.student = student
        shared_width = student.bottom.layers[0].out_features
        self.towers = nn.ModuleList(
            nn.Sequential(SharedBottom(shared_width, aux_hidden), Head(aux_hidden[-1])) for _ in range(n_aux)
        )

    def both(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The serving tensors -> main logits (B,), auxiliary outputs (B, n_aux) (logits or regression values)."""
        layers = self.student.bottom.layers
        shared = layers[:3](self.student.inputs(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras))  # (B, hidden[0])
        main = self.student.head(layers[3:](shared))
        aux = torch.stack([tower(shared) for tower in self.towers], dim=-1)
        return main, aux


class AuxTower(nn.Module):
    """SEAD's auxiliary head: its own tower on the shared-bottom output (a `SharedBottom` block
    of `width`), then two branches with their own weights (BBN's bilateral branches): the
    scratch branch (learns y) and the distillation branch (learns the main head's y'). Every
    layer is randomly initialised, so from the first step the auxiliary loss reaches the
    shared bottom along directions of its own, not the main head's."""

    def __init__(self, in_dim: int, width: int = 64):
        super().__init__()
        if width < 2:
            raise ValueError(f"aux tower width must be >= 2, got {width}")
        self.trunk = SharedBottom(in_dim, (width,))
        self.scratch = nn.Sequential(SharedBottom(width, (width // 2,)), nn.Linear(width // 2, 1))
        self.distill = nn.Sequential(SharedBottom(width, (width // 2,)), nn.Linear(width // 2, 1))

    def set_prior(self, positive_rate: float) -> None:
        """Both branches start at the label base rate (their output biases)."""
        p = min(max(float(positive_rate), 1e-6), 1 - 1e-6)
        with torch.no_grad():
            for branch in (self.scratch, self.distill):
                branch[1].bias.fill_(math.log(p / (1 - p)))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, in_dim) -> (scratch logits (B,), distillation logits (B,))."""
        t = self.trunk(h)
        return self.scratch(t).squeeze(-1), self.distill(t).squeeze(-1)


class SelfAuxiliary(nn.Module):
    """SEAD: a `Ranker` (main head = teacher and serving head) plus an `AuxTower` on its shared
    bottom (`Ranker.hidden`). Embeddings and bottom are shared and trained by both losses;
    only `main` is exported."""

    def __init__(self, ranker: Ranker, aux_width: int = 64):
        super().__init__()
        self.main = ranker
        self.aux = AuxTower(ranker.bottom.out_dim, aux_width)

    def both(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None, stop_aux_gradient: bool = False):
        """The serving tensors -> (main logits (B,), scratch logits (B,), distillation logits (B,));
        `stop_aux_gradient` is SEAD's SGA ablation."""
        h = self.main.hidden(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras)  # (B, hidden[-1])
        return (self.main.head(h), *self.aux(sead.aux_input(h, stop_aux_gradient)))

    def aux_logits(self, selector: str, *xs) -> torch.Tensor:
        """The auxiliary head's merged logit (B,) at the end of training (for reports)."""
        _, zs, zd = self.both(*xs)
        return sead.merge(selector, zs, zd, progress=1.0)

    def forward(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> torch.Tensor:
        """The serving output: the main head's probability (B,)."""
        return self.main(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras)


class SignalTeacher(nn.Module):
    """The teacher tower of SEAD's signal-loss variant: a `Ranker` of its own (embeddings,
    bottom, main head: learns from the consented, unbiased rows) and an auxiliary head on its
    bottom (its own `SharedBottom` block and output: learns from the biased stream). The
    student is a separate `Ranker` that shares nothing with it."""

    def __init__(self, ranker: Ranker, aux_width: int = 64):
        super().__init__()
        self.main = ranker
        self.aux = nn.Sequential(SharedBottom(ranker.bottom.out_dim, (aux_width,)), nn.Linear(aux_width, 1))

    def set_aux_prior(self, positive_rate: float) -> None:
        p = min(max(float(positive_rate), 1e-6), 1 - 1e-6)
        with torch.no_grad():
            self.aux[1].bias.fill_(math.log(p / (1 - p)))

    def both(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The serving tensors -> (main logits (B,): unbiased head, aux logits (B,): biased-stream head)."""
        h = self.main.hidden(user_feats, item_feats, item_dense, interacted, seq_items, seq_extras)
        return self.main.head(h), self.aux(h).squeeze(-1)
