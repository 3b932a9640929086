"""Train the two-tower retrieval model on clicks: in-batch sampled softmax with logQ correction.

    from retrieval.train import Config, train
    metrics = train(Config(epochs=2), "data/tiny", "runs/retrieval")

Each clicked impression of the training days is one (request, item) positive. The other
positives of the batch (and optionally uniform samples from the corpus) are its
negatives. In-batch negatives are drawn in proportion to click frequency, so popular
items are over-sampled as negatives; subtracting log(sampling probability) from every
logit (Yi et al., RecSys 2019) removes that bias, otherwise the model learns to push
popular items down.

Held-out metric: recall@K on test-day clicks, retrieving over the whole corpus by inner
product, printed beside a popularity baseline and chance (K / n_items).

Streaming (`Config.stream_chunk_rows` = N > 0; shards from `recstack simulate --shard-rows`):
the clicked training rows are read N per chunk per rank (recstack.shards), each rank its own
slice and batch_size // world_size positives per step, scored against every rank's
positives (all-gathered) and the uniform negatives; full batches only, within a chunk. The
logQ click counts are exact (one pass over the item_id column, O(n_items) memory); the
test day stays in memory. N = 0 (default) is the in-memory path, unchanged.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from recstack import checkpoint, distributed as D
from recstack.config import ConfigError, to_dict
from recstack.data import Examples, SimData, load
from recstack.features import ItemTable, Vocab
from recstack.shards import ShardStream, position as shard_position, train_chunks
from retrieval.model import TwoTower

STAGE = "retrieval"
USER_INPUTS = ("user_feats", "seq_items", "seq_extras")
ITEM_INPUTS = ("item_feats", "item_dense")


@dataclass
class Config:
    # --- model ---------------------------------------------------------------------
    # The user id gets no embedding by default: the behaviour sequence already carries the
    # user, and on next-day evaluation an id table memorises the training days' intents
    # (small preset, 6 epochs: test recall@50 0.542 without it vs 0.507 with an 8-d one).
    user_dims: tuple[int, ...] = (0, 4, 2, 4)  # embedding dims of user_feats: user id, age bucket, gender, activity (0 = unused)
    # Small item-id table: most items have 0-2 training clicks; their attributes generalise, their ids overfit.
    item_dims: tuple[int, ...] = (8, 16, 16, 16, 4)  # item id, category, shop, brand, price bucket; shared by item tower and sequence
    seq_heads: int = 2  # learned weightings of the behaviour sequence (recency-led, mean-led at init)
    user_hidden: tuple[int, ...] = (128,)  # user-tower MLP hidden sizes
    item_hidden: tuple[int, ...] = (128,)  # item-tower MLP hidden sizes
    dim: int = 64  # D: embedding size in the index; 64 floats = 256 B per item
    # --- loss ----------------------------------------------------------------------
    temperature: float = 0.05  # logits = cosine / T; unit vectors need a small T to reach confident softmaxes
    learn_temperature: bool = False  # fixed T is more stable on tiny data; learnable T is clamped to [0.01, 1]
    logq_correction: bool = True  # subtract log(sampling prob.) from logits; False = plain in-batch softmax (ablation)
    logq_smoothing: float = 1.0  # add-k count smoothing in the click-frequency estimate of the sampling probability
    # Uniform negatives from the whole corpus (mixed negative sampling, Yang et al. 2020).
    # Without them an item never clicked in training is never a negative, so nothing stops
    # the long tail from drifting into every user's top K over the full corpus (small
    # preset, 5 epochs: recall@50 0.49 with 0, 0.54 with 512; tiny: 0.17 vs 0.49).
    num_uniform_negatives: int = 512
    # --- optimisation --------------------------------------------------------------
    lr: float = 3e-3  # Adam; embeddings are sparse-ish, a larger LR than for dense nets pays off
    weight_decay: float = 0.0  # decoupled (AdamW); 0 leaves rarely seen ids alone
    batch_size: int = 256  # also the number of in-batch negatives per positive
    epochs: int = 4  # passes over the clicked training impressions; next-day recall peaks at 3-5 on small
    max_steps: Optional[int] = None  # hard cap on optimiser steps (None = epochs decide)
    seed: int = 0
    # --- evaluation and index ------------------------------------------------------
    eval_k: tuple[int, ...] = (50, 100, 500)  # recall@K cut-offs; Ks larger than the corpus are skipped
    eval_batch_size: int = 2048  # requests per forward pass in evaluation / export
    # faiss.index_factory string, e.g. "Flat" (exact), "IVF4096,Flat", "IVF4096,PQ32", "HNSW32";
    # "auto" = by corpus size (retrieval/index.py: exact up to 2e5 items, IVF-Flat above,
    # at the point of the large-corpus recall/latency curve with recall@1000 >= 0.95)
    index_factory: str = "auto"
    nprobe: Optional[int] = None  # IVF lists probed per query (None = the default for the index; ignored by non-IVF)
    ef_search: Optional[int] = None  # HNSW search breadth, >= k (None = the default; ignored by non-HNSW)
    ann_eval_queries: int = 1000  # test-day requests used to measure the index's recall vs exact search at export
    # N > 0: the training clicks are streamed from the Parquet shards, N clicked rows per chunk
    # per rank (recstack.shards), each rank reading only its slice; logQ's click counts come
    # from one exact counting pass over the item_id column
    stream_chunk_rows: int = 0  # 0: materialised in memory (DDP splits each global batch across ranks)

    def validate(self) -> None:
        if min(self.user_dims + self.item_dims) < 0:
            raise ConfigError("embedding dims must be >= 0")
        if sum(self.user_dims) == 0 or sum(self.item_dims) == 0:
            raise ConfigError("user_dims and item_dims each need at least one column with dim > 0")
        if len(self.user_dims) != 4:
            raise ConfigError(f"user_dims needs 4 entries (user, age_bucket, gender, activity), got {self.user_dims}")
        if len(self.item_dims) != 5:
            raise ConfigError(f"item_dims needs 5 entries (item, category, shop, brand, price_bucket), got {self.item_dims}")
        for name in ("seq_heads", "dim", "batch_size", "epochs", "eval_batch_size", "nprobe", "ef_search", "ann_eval_queries"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (in-batch negatives)")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.num_uniform_negatives < 0:
            raise ConfigError("num_uniform_negatives must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be >= 1 or None")
        if not self.eval_k or min(self.eval_k) < 1:
            raise ConfigError(f"eval_k must be a non-empty list of positive ints, got {self.eval_k}")
        if self.stream_chunk_rows < 0:
            raise ConfigError(f"stream_chunk_rows must be >= 0 (0: in memory), got {self.stream_chunk_rows}")


def build_model(cfg: Config, vocab: Vocab) -> TwoTower:
    return TwoTower(
        vocab, user_dims=cfg.user_dims, item_dims=cfg.item_dims, seq_heads=cfg.seq_heads,
        user_hidden=cfg.user_hidden, item_hidden=cfg.item_hidden, dim=cfg.dim,
    )


# --- loss ------------------------------------------------------------------------------


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


# --- data helpers ----------------------------------------------------------------------


def materialise(examples: Examples, keys: tuple[str, ...], chunk: int = 8192) -> dict[str, np.ndarray]:
    """All rows of `examples` as model inputs (only `keys`), built chunk by chunk."""
    n = len(examples)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for s in range(0, n, chunk):
        batch = examples.batch(np.arange(s, min(s + chunk, n)))
        for k in keys:
            parts[k].append(batch[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def corpus_inputs(items: ItemTable) -> dict[str, np.ndarray]:
    """item tower inputs for every item of the corpus, in item_id order."""
    ids = np.arange(items.n)
    return {"item_feats": items.feats(ids), "item_dense": items.dense(ids)}


@torch.no_grad()
def embed_items(model: TwoTower, items: ItemTable, batch_size: int = 8192) -> np.ndarray:
    """Item-tower embeddings of the whole corpus: float32 (n_items, D), row = item_id."""
    model.eval()
    inputs = corpus_inputs(items)
    out = np.empty((items.n, model.dim), dtype=np.float32)
    for s in range(0, items.n, batch_size):
        sl = slice(s, s + batch_size)
        out[sl] = model.item_tower(*(torch.from_numpy(inputs[k][sl]) for k in ITEM_INPUTS)).numpy()
    return out


@torch.no_grad()
def embed_users(model: TwoTower, inputs: dict[str, np.ndarray], batch_size: int = 2048) -> np.ndarray:
    """User-tower embeddings for request rows: float32 (N, D)."""
    model.eval()
    n = len(inputs["user_feats"])
    out = np.empty((n, model.dim), dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        out[sl] = model.user_tower(*(torch.from_numpy(np.ascontiguousarray(inputs[k][sl])) for k in USER_INPUTS)).numpy()
    return out


def top_k_inner_product(queries: np.ndarray, corpus: np.ndarray, k: int, chunk_elems: int = 1 << 24) -> np.ndarray:
    """Exact top-k ids by inner product, best first: (N, D), (M, D) -> (N, k) int64."""
    k = min(k, len(corpus))
    rows = max(1, chunk_elems // max(len(corpus), 1))
    c = torch.from_numpy(np.ascontiguousarray(corpus))
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), rows):
        scores = torch.from_numpy(np.ascontiguousarray(queries[s : s + rows])) @ c.T  # (n, M)
        out[s : s + rows] = torch.topk(scores, k, dim=1).indices.numpy()
    return out


# --- evaluation ------------------------------------------------------------------------


def evaluate(
    model: TwoTower, data: SimData, day: int, eval_k: tuple[int, ...], train_click_counts: np.ndarray, batch_size: int = 2048,
) -> dict[str, float]:
    """Recall@K of `day`'s clicks, retrieving over the whole corpus, beside baselines.

    For each clicked impression (user, ts) the user tower sees the profile and the
    behaviours strictly before ts; a hit is the clicked item among the top K. Baselines:
    the K items most clicked in training (popularity) and chance, K / n_items.
    `tail_recall@K` is the model's recall on the clicks outside the popular top K (where
    the popularity baseline scores 0 by construction).
    """
    n_items = data.items.n
    ks = sorted({k for k in eval_k if k <= n_items})
    if not ks:
        raise ValueError(f"every eval_k {eval_k} exceeds the corpus size {n_items}")
    clicks = data.examples(day, clicked_only=True)
    metrics: dict[str, float] = {"test_clicks": int(len(clicks))}  # counts stay ints (metrics.json)
    if len(clicks) == 0:
        return metrics
    inputs = materialise(clicks, USER_INPUTS + ("item_id",))
    target = inputs["item_id"]
    retrieved = top_k_inner_product(embed_users(model, inputs, batch_size), embed_items(model, data.items), ks[-1])
    popular = np.argsort(-np.asarray(train_click_counts), kind="stable")[: ks[-1]]
    for k in ks:
        hit = (retrieved[:, :k] == target[:, None]).any(axis=1)
        in_popular = np.isin(target, popular[:k])
        metrics[f"recall@{k}"] = float(hit.mean())
        metrics[f"pop_recall@{k}"] = float(in_popular.mean())
        metrics[f"random_recall@{k}"] = k / n_items
        # What personalisation adds: recall on the clicks the popularity list misses.
        if (~in_popular).any():  # undefined (and left out) when popularity covers every click
            metrics[f"tail_recall@{k}"] = float(hit[~in_popular].mean())
    return metrics


# --- training --------------------------------------------------------------------------


def train(cfg: Config | None, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True,
          resume: bool = False, checkpoint_every: int = 0) -> dict:
    """Fit on clicks of data.train_days, evaluate on the test day, save out_dir/checkpoint.pt.

    checkpoint_every: write the training state to `out_dir/train_state.pt` every that many
    optimiser steps (0: never); resume: continue from that file when it exists.

    Under torchrun each rank takes a contiguous share of every batch's positives and uniform
    negatives, and the candidate embeddings are all-gathered (with gradients): every user
    row is scored against the whole global batch's candidates, so the loss, its logQ
    correction and the step count are those of one process. Rank 0 evaluates and writes;
    the other ranks return the training stats.
    """
    cfg = cfg or Config()
    cfg.validate()
    t0 = time.perf_counter()
    world = D.world()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    data = load(data_dir)
    vocab = data.vocab
    n_items = data.items.n
    streamed = cfg.stream_chunk_rows > 0
    keys = USER_INPUTS + ITEM_INPUTS + ("item_id",)
    if streamed:
        st = ShardStream(data, data.train_days, chunk_rows=cfg.stream_chunk_rows, seed=cfg.seed, rank=world.rank,
                         world_size=world.size, clicked_only=True)
        n = st.total_rows
        counts = np.zeros(n_items, dtype=np.int64)  # exact click counts: one pass over the item_id column
        for cols in st.scan(["item_id"]):
            counts += np.bincount(cols["item_id"], minlength=n_items)
        train_in: dict[str, np.ndarray] = {}  # the current chunk's rows (streamed)
    else:
        clicks = data.examples(data.train_days, clicked_only=True)
        n = len(clicks)
    if n < 2:
        raise RuntimeError(f"{data_dir}: {n} training clicks; need at least 2")
    if not streamed:
        train_in = materialise(clicks, keys)
        counts = np.bincount(train_in["item_id"], minlength=n_items)

    batch_size = min(cfg.batch_size, n)
    D.check_divisible(batch_size=batch_size, num_uniform_negatives=cfg.num_uniform_negatives)
    local_batch = batch_size // world.size
    log_q_items = torch.from_numpy(
        sampling_log_q(counts, batch_size, cfg.num_uniform_negatives, cfg.logq_smoothing)
        if cfg.logq_correction else np.zeros(n_items, dtype=np.float32)
    )
    corpus = corpus_inputs(data.items)

    model = build_model(cfg, vocab)
    loss_fn = SampledSoftmaxLoss(cfg.temperature, cfg.learn_temperature)
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    trained = nn.ModuleDict({"model": model, "loss": loss_fn})

    # Full batches only: a ragged last batch would have fewer negatives than the logQ
    # estimate (which assumes batch_size candidates) accounts for.
    steps_per_epoch = n // batch_size
    if streamed:  # full batches of local_batch rows within each chunk of this rank's slice
        full, last = divmod(st.rows_per_rank, st.chunk_rows)
        steps_per_epoch = full * (st.chunk_rows // local_batch) + last // local_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"stream_chunk_rows={cfg.stream_chunk_rows}: no chunk holds a full batch of {local_batch} "
                              f"rows per rank ({st.rows_per_rank} clicked rows per rank)")
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    def local_step(rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        pos_ids = train_in["item_id"][rows]
        user_emb = model.user_tower(*(torch.from_numpy(train_in[k][rows]) for k in USER_INPUTS))
        cand_ids = pos_ids
        item_feats, item_dense = train_in["item_feats"][rows], train_in["item_dense"][rows]
        if neg is not None:
            cand_ids = np.concatenate([pos_ids, neg])
            item_feats = np.concatenate([item_feats, corpus["item_feats"][neg]])
            item_dense = np.concatenate([item_dense, corpus["item_dense"][neg]])
        cand_emb = model.item_tower(torch.from_numpy(item_feats), torch.from_numpy(item_dense))
        cand_ids_t = torch.from_numpy(cand_ids)
        return loss_fn(user_emb, cand_emb, torch.from_numpy(pos_ids), cand_ids_t, log_q_items[cand_ids_t])

    def embed_own(mine: np.ndarray, neg: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """User embeddings of this rank's rows, and item embeddings of their positives followed
        by this rank's share of the uniform negatives."""
        user_emb = model.user_tower(*(torch.from_numpy(train_in[k][mine]) for k in USER_INPUTS))
        item_feats, item_dense = train_in["item_feats"][mine], train_in["item_dense"][mine]
        if neg is not None:
            nlo, nhi = D.shard_bounds(len(neg), world)
            item_feats = np.concatenate([item_feats, corpus["item_feats"][neg[nlo:nhi]]])
            item_dense = np.concatenate([item_dense, corpus["item_dense"][neg[nlo:nhi]]])
        return user_emb, model.item_tower(torch.from_numpy(item_feats), torch.from_numpy(item_dense))

    def shared_step(rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        """This rank's share of the user rows against the global batch's candidates, in the
        single-process order (positives, then uniform negatives)."""
        lo, hi = D.shard_bounds(len(rows), world)
        user_emb, emb = embed_own(rows[lo:hi], neg)  # (B/W, D), (B/W + K/W, D)
        cand_emb = D.all_gather_with_grad(emb[: hi - lo])  # (B, D)
        pos_ids = train_in["item_id"][rows]
        cand_ids = pos_ids
        if neg is not None:
            cand_emb = torch.cat([cand_emb, D.all_gather_with_grad(emb[hi - lo :])])  # (B + K, D)
            cand_ids = np.concatenate([pos_ids, neg])
        cand_ids_t = torch.from_numpy(cand_ids)
        return loss_fn(user_emb, cand_emb, torch.from_numpy(pos_ids[lo:hi]), cand_ids_t, log_q_items[cand_ids_t], lo)

    def streamed_step(rows: np.ndarray, neg: np.ndarray | None) -> torch.Tensor:
        """Streamed under DDP: this rank's own rows (a share of the global batch) against every
        rank's positives (all-gathered in rank order) and the shared uniform negatives."""
        b = len(rows)
        user_emb, emb = embed_own(rows, neg)
        pos_ids = torch.from_numpy(np.ascontiguousarray(train_in["item_id"][rows]))
        cand_emb = D.all_gather_with_grad(emb[:b])  # (B, D)
        cand_ids_t = D.all_gather_tensor(pos_ids)
        if neg is not None:
            cand_emb = torch.cat([cand_emb, D.all_gather_with_grad(emb[b:])])  # (B + K, D)
            cand_ids_t = torch.cat([cand_ids_t, torch.from_numpy(neg)])
        return loss_fn(user_emb, cand_emb, pos_ids, cand_ids_t, log_q_items[cand_ids_t], world.rank * b)

    if world.distributed:
        step_fn = D.wrap(trained, streamed_step if streamed else shared_step)
    else:
        step_fn = local_step
    main = D.is_main()
    state = checkpoint.TrainingState(Path(out_dir) / checkpoint.STATE_FILE, STAGE, to_dict(cfg), checkpoint_every,
                                     resume, write=main)
    with state:
        ph = checkpoint.phase("retrieval", n)
        if ph.done is not None:
            trained.load_state_dict(ph.done["model"])
            step, running = int(ph.done["stats"]["steps"]), float(ph.done["stats"]["loss"])
        else:
            step, running, order, first = 0, float("nan"), None, 0
            if ph.resume is not None:
                r = ph.resume
                if streamed != ("stream" in r):
                    raise checkpoint.CheckpointError(
                        f"retrieval: the snapshot was written by a {'streamed' if 'stream' in r else 'in-memory'} run, "
                        f"this one is {'streamed' if streamed else 'in memory'}")
                trained.load_state_dict(r["model"])
                opt.load_state_dict(r["optimizer"])
                rng.bit_generator.state = r["generator"]
                step, running, first = r["step"], r["running"], r["next"]
                order = r["order"].numpy() if not streamed else None
            model.train()
            bar = tqdm(total=total_steps, initial=step, desc="retrieval", unit="step", disable=not (progress and main),
                       leave=False)

            def train_step(rows: np.ndarray, snapshot_extra) -> None:
                nonlocal step, running
                neg = rng.integers(0, n_items, size=cfg.num_uniform_negatives) if cfg.num_uniform_negatives else None
                loss = step_fn(rows, neg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running = loss.item() if math.isnan(running) else 0.95 * running + 0.05 * loss.item()
                step += 1
                bar.update(1)
                if step % 10 == 0 or step == total_steps:
                    bar.set_postfix(loss=f"{running:.3f}")
                ph.after_step(step, lambda: {"model": trained.state_dict(), "optimizer": opt.state_dict(),
                                             "generator": rng.bit_generator.state, "running": running,
                                             **snapshot_extra()})

            if streamed and step < total_steps:
                resume_at = ph.resume["stream"] if ph.resume is not None else None
                for _, cursor, chunk, skip in train_chunks(st, cfg.epochs, resume_at):
                    train_in.clear()
                    train_in.update(materialise(chunk, keys))
                    # full batches only, as in memory: the chunk's last rows (fewer than a batch) are left out
                    for k in range(skip, len(chunk) // local_batch):
                        train_step(np.arange(k * local_batch, (k + 1) * local_batch),
                                   lambda: {"order": None, "next": 0, "stream": shard_position(cursor, k + 1)})
                        if step >= total_steps:
                            break
                    if step >= total_steps:
                        break
                train_in.clear()
            while not streamed and step < total_steps:
                if order is None:
                    order, first = rng.permutation(n), 0
                for s in range(first, steps_per_epoch):
                    if step >= total_steps:
                        break
                    rows = order[s * batch_size : (s + 1) * batch_size]
                    train_step(rows, lambda: {"order": torch.from_numpy(order), "next": s + 1})
                order = None
            bar.close()
            D.check_in_sync(trained, "retrieval")
            ph.finish(trained.state_dict(), {"steps": step, "loss": running})
    train_seconds = time.perf_counter() - t0

    if not main:
        D.barrier()
        return {"train_clicks": int(n), "steps": int(step), "train_loss": float(running),
                "train_seconds": float(train_seconds)}
    metrics = evaluate(model, data, data.test_day, cfg.eval_k, counts, cfg.eval_batch_size)
    metrics.update(
        train_clicks=int(n), steps=int(step), train_loss=float(running),
        temperature=float(loss_fn.temperature.item()), train_seconds=float(train_seconds),
    )
    if streamed:
        metrics["stream_chunk_rows"] = int(cfg.stream_chunk_rows)
    if world.distributed:
        metrics["world_size"] = int(world.size)
    if state.resumed:
        metrics["resumed"] = True
    _print_metrics(metrics, data.test_day)

    checkpoint.save(Path(out_dir) / "checkpoint.pt", {
        "stage": STAGE,
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "metrics": metrics,
        "data_dir": str(Path(data_dir).resolve()),
        "vocab": vocab.to_dict(),
    })
    D.barrier()
    return metrics


def _print_metrics(metrics: dict, day: int) -> None:
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("recall@"))
    print(f"retrieval: {int(metrics['train_clicks'])} training clicks, {int(metrics['steps'])} steps, "
          f"{metrics['train_seconds']:.1f}s; test day {day}: {int(metrics['test_clicks'])} clicks")
    for k in ks:
        print(f"  recall@{k:<5d} model {metrics[f'recall@{k}']:.4f}   popularity {metrics[f'pop_recall@{k}']:.4f}"
              f"   random {metrics[f'random_recall@{k}']:.4f}   model on clicks outside the popular top-{k}:"
              f" {metrics.get(f'tail_recall@{k}', float('nan')):.4f}")
