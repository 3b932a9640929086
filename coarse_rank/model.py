"""The coarse ranker's inner-product student (PFD paper, Eq. 3), built from reusable parts.

    score(u, i) = scale * < l2norm(Phi_u(X_u)), l2norm(Phi_i(X_i)) >

The parts are separate modules so that a distillation teacher trained synchronously with the
student (PFD Eq. 5, Algorithm 1) can share them instead of copying them:

- `FeatureEmbeddings` owns every embedding table (user fields, item fields). The same item
  tables embed both the candidate item and the items of the behaviour sequence.
- `BehaviourEncoder` turns the 50-slot behaviour sequence into one vector (one layer of
  multi-head self-attention, no position encoding: the per-behaviour extras stand in).
- `UserTower` / `ItemTower` map their side to a unit vector; they hold *references* to the
  embeddings (and the encoder), so two towers built on the same instances share them.
- `InnerProductStudent` composes the above.

Pure modules: no I/O, no training code. Input names and layouts follow docs/ARCHITECTURE.md
(ids are raw id + 1, 0 = padding / unknown).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recstack.features import INTERACTED_FIELDS, Vocab

if TYPE_CHECKING:
    from coarse_rank.config import Config

# A finite stand-in for -inf in attention scores: a row whose keys were all masked would
# become softmax(-inf, ..., -inf) = NaN with -inf; with a finite value it stays finite. The
# always-valid summary slot already prevents such rows; this is the second line of defence.
_MASKED_SCORE = -1e9


class FeatureEmbeddings(nn.Module):
    """All embedding tables of the coarse ranker, one per categorical field.

    Tables are indexed by the model-input ids (raw id + 1); row 0 is padding / unknown and is
    kept at zero (`padding_idx=0`), so an unknown user or an empty slot contributes nothing.
    """

    def __init__(self, vocab: Vocab, dim: int, init_std: float = 0.05):
        super().__init__()
        self.dim = dim
        self.init_std = init_std
        self.user_tables = nn.ModuleList(nn.Embedding(n, dim, padding_idx=0) for n in vocab.user_sizes())
        self.item_tables = nn.ModuleList(nn.Embedding(n, dim, padding_idx=0) for n in vocab.item_sizes())
        for table in [*self.user_tables, *self.item_tables]:
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[0].zero_()

    @property
    def user_dim(self) -> int:
        return self.dim * len(self.user_tables)

    @property
    def item_dim(self) -> int:
        return self.dim * len(self.item_tables)

    def sharing(self, *, except_user_fields: Sequence[int] = (), vocab: Vocab | None = None) -> "FeatureEmbeddings":
        """A new instance whose tables ARE this one's (same Parameters), except the user-field
        columns listed, which get fresh tables (PFD Table 7 "Share*": all shared but user id).

        `vocab` is needed only when some table is not shared.
        """
        out = FeatureEmbeddings.__new__(FeatureEmbeddings)
        nn.Module.__init__(out)
        out.dim = self.dim
        out.init_std = self.init_std
        tables = []
        for j, table in enumerate(self.user_tables):
            if j in except_user_fields:
                if vocab is None:
                    raise ValueError("sharing(except_user_fields=...) needs the vocab to size the fresh tables")
                fresh = nn.Embedding(vocab.user_sizes()[j], self.dim, padding_idx=0)
                nn.init.normal_(fresh.weight, std=self.init_std)
                with torch.no_grad():
                    fresh.weight[0].zero_()
                tables.append(fresh)
            else:
                tables.append(table)
        out.user_tables = nn.ModuleList(tables)
        out.item_tables = self.item_tables
        return out

    def user(self, user_feats: torch.Tensor) -> torch.Tensor:
        """user_feats (B, 4) int64 -> (B, 4 * dim)."""
        return torch.cat([t(user_feats[:, j]) for j, t in enumerate(self.user_tables)], dim=-1)

    def item(self, item_feats: torch.Tensor) -> torch.Tensor:
        """item_feats (..., 5) int64 -> (..., 5 * dim); works for candidates (B, 5) and
        sequences (B, L, 5) alike."""
        return torch.cat([t(item_feats[..., j]) for j, t in enumerate(self.item_tables)], dim=-1)


class SelfAttentionLayer(nn.Module):
    """One post-LN transformer encoder layer (Vaswani et al.): multi-head self-attention and a
    feed-forward network, each with a skip connection and layer normalisation.

    Written out rather than `nn.MultiheadAttention` so the masking semantics are explicit and
    identical in PyTorch and in the exported ONNX graph.
    """

    def __init__(self, d_model: int, n_heads: int, ff_dim: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.attn_out = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.ReLU(), nn.Linear(ff_dim, d_model))
        self.ff_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) float, valid (B, T) bool (keys that may be attended to) -> (B, T, D).

        Every row of `valid` must hold at least one True for the output to be meaningful
        (it stays finite regardless).
        """
        t, d = x.shape[1], x.shape[2]
        qkv = self.qkv(x).reshape(-1, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        scores = scores.masked_fill(~valid[:, None, None, :], _MASKED_SCORE)
        attn = torch.softmax(scores, dim=-1)
        mixed = torch.matmul(attn, v).transpose(1, 2).reshape(-1, t, d)  # (B, T, D)
        x = self.attn_norm(x + self.attn_out(mixed))
        return self.ff_norm(x + self.ff(x))


class BehaviourEncoder(nn.Module):
    """Behaviour sequence -> one vector (PFD §5: one layer of multi-head self-attention,
    no position encoding, mean pooling over the sequence).

    Each slot's token is a projection of its item-field embeddings plus a projection of its
    extras (time since, dwell, purchase flag); the extras take the role of position
    encodings and also say how much the behaviour matters.

    A learned summary slot is prepended and is always valid: a user with no behaviours at
    all (first day, cold start) then still has one key to attend to and one slot to pool,
    so the output is finite (fully masked attention rows are NaN in PyTorch and ONNX alike)
    and is a learned "no history" vector rather than an arbitrary one.
    """

    def __init__(self, item_dim: int, n_extras: int = 3, d_model: int = 128, n_heads: int = 4, ff_dim: int = 256):
        super().__init__()
        self.d_model = d_model
        self.item_proj = nn.Linear(item_dim, d_model)
        self.extras_proj = nn.Linear(n_extras, d_model, bias=False)
        self.summary = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.layer = SelfAttentionLayer(d_model, n_heads, ff_dim)

    def forward(self, seq_emb: torch.Tensor, seq_extras: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """seq_emb (B, L, E) item-field embeddings, seq_extras (B, L, X), valid (B, L) bool
        -> (B, d_model): mean over the summary slot and the valid behaviour slots."""
        tokens = self.item_proj(seq_emb) + self.extras_proj(seq_extras)  # (B, L, D)
        summary = self.summary.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([summary, tokens], dim=1)  # (B, 1 + L, D)
        keep = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # (B, 1 + L)
        h = self.layer(x, keep)  # (B, 1 + L, D)
        w = keep.to(h.dtype).unsqueeze(-1)  # (B, 1 + L, 1); padding rows get weight 0
        return (h * w).sum(dim=1) / w.sum(dim=1)  # denominator >= 1 (the summary slot)


class MLP(nn.Sequential):
    """in -> [Linear -> BatchNorm -> LeakyReLU] per hidden width -> Linear(out).

    BN before the activation as in the PFD paper; the last layer is linear because the
    towers l2-normalise its output.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, negative_slope: float = 0.01):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.LeakyReLU(negative_slope)]
            in_dim = width
        layers.append(nn.Linear(in_dim, out_dim))
        super().__init__(*layers)


def split_first_layer(mlp: nn.Sequential, x_req: torch.Tensor, request_index: torch.Tensor,
                      x_imp: torch.Tensor) -> torch.Tensor:
    """mlp applied to cat([x_req[request_index], x_imp], -1) without materialising that
    (B, in) matrix: mlp[0] is linear, so its request columns run on the R request rows and
    its impression columns on the B impression rows, and the two are added per impression.

    x_req (R, a), request_index (B,) int64 in [0, R), x_imp (B, in - a) -> mlp output (B, out).
    Same parameters and the same function (up to float rounding); a request's shared part
    costs once per request instead of once per candidate.
    """
    first = mlp[0]
    a = x_req.shape[-1]
    h = F.linear(x_req, first.weight[:, :a], first.bias).index_select(0, request_index)
    h = h + F.linear(x_imp, first.weight[:, a:])
    for layer in list(mlp)[1:]:
        h = layer(h)
    return h


def encode_sequence(embeddings: "FeatureEmbeddings", sequence: "BehaviourEncoder", seq_items: torch.Tensor,
                    seq_extras: torch.Tensor, length_buckets: int = 1) -> torch.Tensor:
    """seq_items (B, L, 5) int64, seq_extras (B, L, 3) float32 -> (B, d_model); see
    `UserTower.encode_sequence` (shared by the towers and the DNN teachers)."""
    valid = seq_items[..., 0] > 0  # (B, L); an empty slot has item id 0
    if length_buckets <= 1:
        return sequence(embeddings.item(seq_items), seq_extras, valid)
    slot = torch.arange(1, valid.shape[1] + 1, device=valid.device)
    used = (valid * slot).amax(dim=1)  # (B,) slots up to and including the last valid one
    order = torch.argsort(used)
    parts = []
    for rows in order.tensor_split(min(length_buckets, len(order))):
        n = max(int(used[rows].max()), 1) if len(rows) else 1
        si, se = seq_items[rows, :n], seq_extras[rows, :n]
        parts.append(sequence(embeddings.item(si), se, valid[rows, :n]))
    return torch.cat(parts).index_select(0, torch.argsort(order))  # back to the input row order


class UserTower(nn.Module):
    """Phi_u: user features + behaviour sequence -> unit vector (PFD Eq. 3, user side).

    Holds references to shared `FeatureEmbeddings` and `BehaviourEncoder`. `encode_sequence`
    and `head` are separate so a model sharing the encoder (a synchronous teacher) can run
    the costly sequence part once and reuse its output; `extra_dim` widens the MLP input for
    a subclass whose `head` appends more features (e.g. PFD's interacted features).
    """

    def __init__(self, embeddings: FeatureEmbeddings, sequence: BehaviourEncoder,
                 hidden: Sequence[int] = (512, 256), out_dim: int = 128, extra_dim: int = 0):
        super().__init__()
        self.embeddings = embeddings
        self.sequence = sequence
        self.mlp = MLP(embeddings.user_dim + sequence.d_model + extra_dim, hidden, out_dim)

    def encode_sequence(self, seq_items: torch.Tensor, seq_extras: torch.Tensor, length_buckets: int = 1) -> torch.Tensor:
        """seq_items (B, L, 5) int64, seq_extras (B, L, 3) float32 -> (B, d_model).

        `length_buckets > 1` is a training-time speed-up: rows are grouped by how many slots
        they use and each group is cut after its last used slot, so attention and the
        feed-forward run on far fewer empty slots (most users fill a fraction of the 50).
        Exact, because empty slots do not change a row's output and the encoder has no
        cross-row operation. Export traces the default (one bucket).
        """
        return encode_sequence(self.embeddings, self.sequence, seq_items, seq_extras, length_buckets)

    def head(self, user_feats: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """user_feats (B, 4) int64, pooled (B, d_model) -> user_vec (B, out_dim), l2-normalised."""
        return F.normalize(self.mlp(torch.cat([self.embeddings.user(user_feats), pooled], dim=-1)), dim=-1)

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor,
                length_buckets: int = 1) -> torch.Tensor:
        """user_feats (B, 4) int64, seq_items (B, L, 5) int64, seq_extras (B, L, 3) float32
        -> user_vec (B, out_dim) float32, l2-normalised."""
        return self.head(user_feats, self.encode_sequence(seq_items, seq_extras, length_buckets))


class ItemTower(nn.Module):
    """Phi_i: item features -> unit vector (PFD Eq. 3, item side). Precomputed for the
    whole corpus at export, so its cost never reaches serving."""

    def __init__(self, embeddings: FeatureEmbeddings, n_dense: int = 1,
                 hidden: Sequence[int] = (512, 256), out_dim: int = 128):
        super().__init__()
        self.embeddings = embeddings
        self.mlp = MLP(embeddings.item_dim + n_dense, hidden, out_dim)

    def features(self, item_feats: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """item_feats (B, 5) int64, item_dense (B, 1) float32 -> (B, 5 * dim + 1)."""
        return torch.cat([self.embeddings.item(item_feats), item_dense], dim=-1)

    def forward(self, item_feats: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """item_feats (B, 5) int64, item_dense (B, 1) float32 -> item_vec (B, out_dim), l2-normalised."""
        return F.normalize(self.mlp(self.features(item_feats, item_dense)), dim=-1)


class InnerProductStudent(nn.Module):
    """The serving model of the coarse ranker: logit = scale * <user_vec, item_vec>.

    The scale (5 in the paper) compensates for the l2 normalisation, which would otherwise
    limit logits to [-1, 1].
    """

    def __init__(self, vocab: Vocab, *, embed_dim: int = 16, d_model: int = 128, n_heads: int = 4,
                 ff_dim: int = 256, hidden: Sequence[int] = (512, 256), out_dim: int = 128,
                 scale: float = 5.0, n_extras: int = 3, n_item_dense: int = 1):
        super().__init__()
        self.scale = float(scale)
        self.embeddings = FeatureEmbeddings(vocab, embed_dim)
        self.sequence = BehaviourEncoder(self.embeddings.item_dim, n_extras, d_model, n_heads, ff_dim)
        self.user_tower = UserTower(self.embeddings, self.sequence, hidden, out_dim)
        self.item_tower = ItemTower(self.embeddings, n_item_dense, hidden, out_dim)

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor,
                item_feats: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """user_feats (B, 4), seq_items (B, L, 5), seq_extras (B, L, 3), item_feats (B, 5),
        item_dense (B, 1) -> click logits (B,) float32 (one item per user row)."""
        u = self.user_tower(user_feats, seq_items, seq_extras)  # (B, out_dim)
        v = self.item_tower(item_feats, item_dense)  # (B, out_dim)
        return self.scale * (u * v).sum(dim=-1)

    def score_requests(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor,
                       request_index: torch.Tensor, item_feats: torch.Tensor, item_dense: torch.Tensor,
                       length_buckets: int = 1) -> torch.Tensor:
        """Logits for B impressions drawn from R requests, running the user tower once per request
        (as serving does) instead of once per impression.

        user_feats (R, 4), seq_items (R, L, 5), seq_extras (R, L, 3), request_index (B,) int64 in
        [0, R), item_feats (B, 5), item_dense (B, 1) -> (B,). Equals `forward` on the gathered
        rows in eval mode; in train mode the user tower's BatchNorm sees per-request statistics.
        `length_buckets`: see `UserTower.encode_sequence`.
        """
        u = self.user_tower(user_feats, seq_items, seq_extras, length_buckets)  # (R, out_dim)
        v = self.item_tower(item_feats, item_dense)  # (B, out_dim)
        return self.scale * (u.index_select(0, request_index) * v).sum(dim=-1)


def student_click_logit(student: InnerProductStudent, inputs: dict, length_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's click logit of every row of a batch -> (pooled sequence (R, d_model), logit (B,)):
    the user tower once per request, gathered to its rows, times the item tower."""
    tower = student.user_tower
    pooled = tower.encode_sequence(inputs["seq_items"], inputs["seq_extras"], length_buckets)  # (R, d_model)
    u = tower.head(inputs["user_feats"], pooled).index_select(0, inputs["request_index"])  # (B, out)
    v = student.item_tower(inputs["item_feats"], inputs["item_dense"])  # (B, out)
    return pooled, student.scale * (u * v).sum(dim=-1)


# --- distillation teachers (PFD §3-§4, Table 2) ---------------------------------------------
#
# Every teacher scores the same B impressions as the student and takes the student's request
# layout (user rows R, `request_index` (B,) into them) plus the impressions' interacted
# features (B, X). A teacher built on the student's `FeatureEmbeddings` / `BehaviourEncoder`
# instances shares them (Share&Sync); `pooled` then lets the trainer run the costly sequence
# encoder once for both models. Teachers never reach serving: only the student is exported.


class PrivilegedUserTower(UserTower):
    """PFD's teacher user side: the student's user tower with the interacted (user x item)
    features appended to the MLP input. The user vector then depends on the candidate, so it
    is computed per impression (B rows), which is exactly why it cannot be served at the
    coarse stage's cost."""

    def __init__(self, embeddings: FeatureEmbeddings, sequence: BehaviourEncoder, n_interacted: int,
                 hidden: Sequence[int] = (512, 256), out_dim: int = 128):
        super().__init__(embeddings, sequence, hidden, out_dim, extra_dim=n_interacted)

    def head_privileged(self, user_feats: torch.Tensor, pooled: torch.Tensor, interacted: torch.Tensor,
                        request_index: torch.Tensor) -> torch.Tensor:
        """user_feats (R, 4), pooled (R, d_model), interacted (B, X), request_index (B,) in [0, R)
        -> (B, out_dim), l2-normalised: the MLP on [user, pooled, interacted] of each impression.

        The first layer is split by its input columns (`split_first_layer`): the request part
        runs once per request, only the interacted part once per impression. The same function
        and parameters as the MLP on the gathered rows, at a fraction of the per-impression cost.
        """
        x_req = torch.cat([self.embeddings.user(user_feats), pooled], dim=-1)  # (R, user_dim + d_model)
        return F.normalize(split_first_layer(self.mlp, x_req, request_index, interacted), dim=-1)


class InnerProductTeacher(nn.Module):
    """SD (n_interacted = 0: the student's architecture, no privileged features) and PFD
    (n_interacted > 0: the interacted features at the user side) teachers:
    logit = scale * <Phi_u(X_u, X*), Phi_i(X_i)>."""

    def __init__(self, embeddings: FeatureEmbeddings, sequence: BehaviourEncoder, n_interacted: int = 0, *,
                 hidden: Sequence[int] = (512, 256), out_dim: int = 128, scale: float = 5.0, n_item_dense: int = 1):
        super().__init__()
        self.scale = float(scale)
        self.n_interacted = n_interacted
        self.user_tower = PrivilegedUserTower(embeddings, sequence, n_interacted, hidden, out_dim)
        self.item_tower = ItemTower(embeddings, n_item_dense, hidden, out_dim)

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor,
                request_index: torch.Tensor, item_feats: torch.Tensor, item_dense: torch.Tensor,
                interacted: torch.Tensor, pooled: torch.Tensor | None = None, length_buckets: int = 1) -> torch.Tensor:
        """Request layout as `InnerProductStudent.score_requests` plus interacted (B, X) and an
        optional precomputed pooled sequence (R, d_model) -> logits (B,)."""
        if pooled is None:
            pooled = self.user_tower.encode_sequence(seq_items, seq_extras, length_buckets)  # (R, d_model)
        v = self.item_tower(item_feats, item_dense)  # (B, out_dim)
        if self.n_interacted == 0:  # as the student: one user row per request
            u = self.user_tower.head(user_feats, pooled).index_select(0, request_index)
        else:  # candidate-dependent user vector: one row per impression
            u = self.user_tower.head_privileged(user_feats, pooled, interacted, request_index)
        return self.scale * (u * v).sum(dim=-1)


class DNNTeacher(nn.Module):
    """MD (n_interacted = 0) and PFD+MD (n_interacted > 0) teachers: a 3-layer DNN
    (512-256-128, BN before LeakyReLU) over the concatenated user, sequence and item
    representations (and the interacted features), so user and item interact from the first
    layer on, which an inner product cannot do."""

    def __init__(self, embeddings: FeatureEmbeddings, sequence: BehaviourEncoder, n_interacted: int = 0, *,
                 hidden: Sequence[int] = (512, 256, 128), n_item_dense: int = 1):
        super().__init__()
        self.embeddings = embeddings
        self.sequence = sequence
        self.n_interacted = n_interacted
        self.n_item_dense = n_item_dense  # the price, then the item statistics when read
        in_dim = embeddings.user_dim + sequence.d_model + embeddings.item_dim + n_item_dense + n_interacted
        self.mlp = MLP(in_dim, hidden, 1)

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor,
                request_index: torch.Tensor, item_feats: torch.Tensor, item_dense: torch.Tensor,
                interacted: torch.Tensor, pooled: torch.Tensor | None = None, length_buckets: int = 1) -> torch.Tensor:
        """Same inputs as `InnerProductTeacher.forward` -> logits (B,)."""
        if pooled is None:
            pooled = encode_sequence(self.embeddings, self.sequence, seq_items, seq_extras, length_buckets)  # (R, d_model)
        user = torch.cat([self.embeddings.user(user_feats), pooled], dim=-1)  # (R, .): once per request
        parts = [self.embeddings.item(item_feats), item_dense]
        if self.n_interacted:
            parts.append(interacted)
        return split_first_layer(self.mlp, user, request_index, torch.cat(parts, dim=-1)).squeeze(-1)


class LUPITeacher(nn.Module):
    """LUPI (Lopez-Paz et al.): a teacher that sees the privileged (interacted) features only,
    through the same 3-layer DNN. It knows the user's recent clicks on this item's category /
    shop / brand but not who the user or the item is."""

    def __init__(self, n_interacted: int, *, hidden: Sequence[int] = (512, 256, 128)):
        super().__init__()
        self.mlp = MLP(n_interacted, hidden, 1)

    def forward(self, user_feats: torch.Tensor, seq_items: torch.Tensor, seq_extras: torch.Tensor,
                request_index: torch.Tensor, item_feats: torch.Tensor, item_dense: torch.Tensor,
                interacted: torch.Tensor, pooled: torch.Tensor | None = None, length_buckets: int = 1) -> torch.Tensor:
        """Same inputs as `InnerProductTeacher.forward` (only `interacted` (B, X) is used) -> logits (B,)."""
        return self.mlp(interacted).squeeze(-1)


# --- built from a config (training, and export rebuilding a checkpoint) ---------------------


def build_student(cfg: "Config", vocab: Vocab) -> InnerProductStudent:
    """The student as `cfg` describes it (also used by export to rebuild from a checkpoint)."""
    return InnerProductStudent(
        vocab, embed_dim=cfg.embed_dim, d_model=cfg.d_model, n_heads=cfg.n_heads, ff_dim=cfg.ff_dim,
        hidden=tuple(cfg.hidden), out_dim=cfg.out_dim, scale=cfg.scale, n_item_dense=cfg.n_item_dense,
    )


def build_teacher(cfg: "Config", vocab: Vocab, student: InnerProductStudent) -> nn.Module | None:
    """The teacher `cfg.teacher` describes, wired to the student per `cfg.manner`:
    share_* manners hand it the student's embedding tables and behaviour encoder (the same
    Parameters; share_star_sync gives it a fresh user id table), ind_* manners fresh ones."""
    if cfg.teacher in ("baseline", "oracle"):  # the oracle's soft labels come from the batch (tasks.DistillationStep)
        return None
    n_x = len(INTERACTED_FIELDS)
    if cfg.teacher == "lupi":
        return LUPITeacher(n_x, hidden=tuple(cfg.teacher_hidden))
    if cfg.manner == "share_sync":
        emb, seq = student.embeddings, student.sequence
    elif cfg.manner == "share_star_sync":
        emb, seq = student.embeddings.sharing(except_user_fields=(0,), vocab=vocab), student.sequence
    else:
        emb = FeatureEmbeddings(vocab, cfg.embed_dim)
        seq = BehaviourEncoder(emb.item_dim, 3, cfg.d_model, cfg.n_heads, cfg.ff_dim)
    privileged = n_x if cfg.teacher in ("pfd", "pfd_md") else 0
    if cfg.teacher in ("sd", "pfd"):
        return InnerProductTeacher(emb, seq, privileged, hidden=tuple(cfg.hidden), out_dim=cfg.out_dim, scale=cfg.scale,
                                   n_item_dense=cfg.n_item_dense)
    return DNNTeacher(emb, seq, privileged, hidden=tuple(cfg.teacher_hidden), n_item_dense=cfg.n_item_dense)
