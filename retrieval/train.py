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
the clicked training rows are read N per chunk per rank (recstack.data.shards), each rank its own
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
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from recstack.training import distributed as D, sparse
from recstack.config import ConfigError
from recstack.data import SimData, load
from recstack.data.shards import ShardStream
from recstack.training.loop import Batches, Ema, Loop, save_model, streamed_batches, training_state

from retrieval.config import Config
from retrieval.inputs import (  # noqa: F401  (embed_items, top_k_inner_product: re-exported)
    ITEM_INPUTS, STAGE, USER_INPUTS, add_row_stats, append_stats, corpus_inputs, embed_items, embed_users, materialise, row_stats,
    serving_stats, top_k_inner_product,
)
from retrieval.model import TwoTower, build_model
from retrieval.positives import log_events, log_positives
from retrieval.tasks import (  # noqa: F401  (sampled_softmax_loss: re-exported)
    InBatchSoftmaxStep, SampledSoftmaxLoss, logq_vector, sampled_softmax_loss, sampling_log_q,
)

TRAIN_KEYS = USER_INPUTS + ITEM_INPUTS + ("item_id", "day")  # the model inputs of a training click, and its day


# --- evaluation ------------------------------------------------------------------------


def evaluate(
    model: TwoTower, data: SimData, day: int, eval_k: tuple[int, ...], train_click_counts: np.ndarray, batch_size: int = 2048,
    stats: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K of `day`'s clicks, retrieving over the whole corpus, beside baselines.

    For each clicked impression (user, ts) the user tower sees the profile and the
    behaviours strictly before ts; a hit is the clicked item among the top K. Baselines:
    the K items most clicked in training (popularity) and chance, K / n_items.
    `tail_recall@K` is the model's recall on the clicks outside the popular top K (where
    the popularity baseline scores 0 by construction). `pop_log_recall@K`: popularity counted
    over every click of the behaviour log before `day` (history days included), the baseline
    that sees the same clicks as a model trained on `positives=log`. `stats`: `day`'s item
    statistics table, for an item tower that reads them.
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
    retrieved = top_k_inner_product(embed_users(model, inputs, batch_size), embed_items(model, data.items, stats), ks[-1])
    popular = np.argsort(-np.asarray(train_click_counts), kind="stable")[: ks[-1]]
    log_counts = np.bincount(log_events(data, ("click",), day)["item_id"], minlength=n_items)
    popular_log = np.argsort(-log_counts, kind="stable")[: ks[-1]]
    for k in ks:
        hit = (retrieved[:, :k] == target[:, None]).any(axis=1)
        in_popular = np.isin(target, popular[:k])
        metrics[f"recall@{k}"] = float(hit.mean())
        metrics[f"pop_recall@{k}"] = float(in_popular.mean())
        metrics[f"pop_log_recall@{k}"] = float(np.isin(target, popular_log[:k]).mean())
        metrics[f"random_recall@{k}"] = k / n_items
        # What personalisation adds: recall on the clicks the popularity list misses.
        if (~in_popular).any():  # undefined (and left out) when popularity covers every click
            metrics[f"tail_recall@{k}"] = float(hit[~in_popular].mean())
    return metrics


class EpochCurve:
    """Recall on the evaluation day after each epoch (`Config.eval_every_epoch`): the curve
    that says whether more epochs would pay. Draws nothing from the training generator."""

    def __init__(self, model: TwoTower, data: SimData, day: int, cfg: Config, clicks: "Clicks"):
        self.model, self.data, self.day, self.cfg, self.clicks = model, data, day, cfg, clicks
        self.points: list[dict] = []

    def __call__(self) -> None:
        m = evaluate(self.model, self.data, self.day, self.cfg.eval_k, self.clicks.popularity_counts, self.cfg.eval_batch_size,
                     serving_stats(self.cfg, self.data, self.day))
        self.model.train()
        self.points.append({"epoch": len(self.points) + 1, **{
            k: v for k, v in m.items() if k.startswith(("recall@", "pop_recall@", "pop_log_recall@"))}})


# --- training --------------------------------------------------------------------------


@dataclass
class Clicks:
    """The training positives: `n` of them, their per-item counts (logQ), and either every
    positive as model inputs (`rows`, in memory) or this rank's `stream`. `popularity`: the
    fit days' impression clicks per item, the popularity baseline whatever the positives."""

    n: int
    counts: np.ndarray
    rows: dict[str, np.ndarray]
    stream: Optional[ShardStream] = None
    popularity: Optional[np.ndarray] = None

    @property
    def popularity_counts(self) -> np.ndarray:
        return self.counts if self.popularity is None else self.popularity


def training_clicks(cfg: Config, data: SimData, data_dir: str | Path) -> Clicks:
    """The training positives (retrieval/positives.py): the fit days' clicked impressions,
    materialised or streamed (cfg.stream_chunk_rows), or the behaviour log's events."""
    world = D.world()
    n_items = data.items.n
    fit_days, eval_day = data.split_days(cfg.split)
    if not fit_days:
        raise ConfigError(f"split={cfg.split}: a {data.n_days}-day world leaves no day to fit on")
    if cfg.positives == "log":
        rows = add_row_stats(cfg, data, log_positives(data, cfg.positive_kinds, eval_day, cfg.session_gap_s))
        imps = data.impressions(fit_days)
        popularity = np.bincount(imps["item_id"][imps["click"].astype(bool)], minlength=n_items)
        return Clicks(len(rows["item_id"]), np.bincount(rows["item_id"], minlength=n_items), rows, None, popularity)
    if cfg.stream_chunk_rows > 0:
        st = ShardStream(data, fit_days, chunk_rows=cfg.stream_chunk_rows, seed=cfg.seed, rank=world.rank,
                         world_size=world.size, clicked_only=True)
        counts = np.zeros(n_items, dtype=np.int64)  # exact click counts: one pass over the item_id column
        for cols in st.scan(["item_id"]):
            counts += np.bincount(cols["item_id"], minlength=n_items)
        clicks = Clicks(st.total_rows, counts, {}, st)  # rows: the current chunk's (streamed)
    else:
        ex = data.examples(fit_days, clicked_only=True)
        clicks = Clicks(len(ex), np.zeros(0), {})
    if clicks.n < 2:
        raise RuntimeError(f"{data_dir}: {clicks.n} training clicks; need at least 2")
    if clicks.stream is None:
        clicks.rows = add_row_stats(cfg, data, materialise(ex, TRAIN_KEYS))
        clicks.counts = np.bincount(clicks.rows["item_id"], minlength=n_items)
    return clicks


def steps_per_epoch(cfg: Config, clicks: Clicks, batch_size: int, local_batch: int) -> int:
    """Full batches only: a ragged last batch would have fewer negatives than the logQ
    estimate (which assumes batch_size candidates) accounts for."""
    st = clicks.stream
    if st is None:
        return clicks.n // batch_size
    # full batches of local_batch rows within each chunk of this rank's slice
    full, last = divmod(st.rows_per_rank, st.chunk_rows)
    steps = full * (st.chunk_rows // local_batch) + last // local_batch
    if steps == 0:
        raise ConfigError(f"stream_chunk_rows={cfg.stream_chunk_rows}: no chunk holds a full batch of {local_batch} "
                          f"rows per rank ({st.rows_per_rank} clicked rows per rank)")
    return steps


def click_batches(cfg: Config, clicks: Clicks, step: InBatchSoftmaxStep, rng: np.random.Generator, batch_size: int,
                  local_batch: int, per_epoch: int, on_epoch: Optional[Callable[[], None]] = None) -> Batches:
    """The loop's batches: row indices into `step.rows`. In memory, each epoch a permutation
    drawn from `rng` (the generator that also draws the uniform negatives) cut into
    `per_epoch` full batches; streamed, full batches of `local_batch` rows within each chunk.
    on_epoch (in memory): called after each epoch but the last, whose model `train` evaluates."""
    if clicks.stream is not None:
        def load(chunk) -> None:
            step.rows.clear()
            step.rows.update(append_stats(materialise(chunk, TRAIN_KEYS), step.stats))

        def chunk_batches(chunk, skip: int):
            # full batches only, as in memory: the chunk's last rows (fewer than a batch) are left out
            for k in range(skip, len(chunk) // local_batch):
                yield k + 1, np.arange(k * local_batch, (k + 1) * local_batch)

        return lambda resume: streamed_batches(clicks.stream, cfg.epochs, resume, chunk_batches,
                                               lambda epoch: {"order": None, "next": 0}, load)

    def epochs(resume: Optional[dict]):
        order, first = (resume["order"].numpy(), resume["next"]) if resume is not None else (None, 0)
        while True:
            if order is None:
                order, first = rng.permutation(clicks.n), 0
            for s in range(first, per_epoch):
                yield order[s * batch_size : (s + 1) * batch_size], lambda: {"order": torch.from_numpy(order), "next": s + 1}
            order = None
            if on_epoch is not None:  # every step of the epoch has run: the loop asks for the next batch
                on_epoch()

    return epochs


def train(cfg: Config | None, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True,
          resume: bool = False, checkpoint_every: int = 0) -> dict:
    """Fit on clicks of data.train_days, evaluate on the test day, save out_dir/checkpoint.pt.

    checkpoint_every: write the training state to `out_dir/train_state.pt` every that many
    optimiser steps (0: never); resume: continue from that file when it exists.

    Under torchrun each rank takes a share of every global batch (`InBatchSoftmaxStep`): the
    loss and the step count are those of one process. Rank 0 evaluates and writes; the
    other ranks return the training stats.
    """
    cfg = cfg or Config()
    cfg.validate()
    t0 = time.perf_counter()
    world = D.world()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    data = load(data_dir)
    n_items = data.items.n
    streamed = cfg.stream_chunk_rows > 0
    clicks = training_clicks(cfg, data, data_dir)
    batch_size = min(cfg.batch_size, clicks.n)
    D.check_divisible(batch_size=batch_size, num_uniform_negatives=cfg.num_uniform_negatives)
    local_batch = batch_size // world.size
    log_q_items = torch.from_numpy(logq_vector(clicks.counts, batch_size, cfg.num_uniform_negatives, cfg.logq_smoothing,
                                               cfg.logq_alpha, cfg.logq_correction))
    model = build_model(cfg, data.vocab)
    loss_fn = SampledSoftmaxLoss(cfg.temperature, cfg.learn_temperature)
    params = list(model.parameters()) + list(loss_fn.parameters())
    if cfg.sparse_embeddings:
        sparse.enable(model)
        opt = sparse.optimizer("adamw", params, cfg.lr, cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    trained = nn.ModuleDict({"model": model, "loss": loss_fn})
    per_epoch = steps_per_epoch(cfg, clicks, batch_size, local_batch)
    total_steps = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    step = InBatchSoftmaxStep(model, loss_fn, corpus_inputs(data.items), log_q_items, rng, cfg.num_uniform_negatives,
                              streamed, row_stats(cfg, data))
    step.rows = clicks.rows
    loop = Loop(STAGE, clicks.n, trained, opt, total_steps, Ema("running", 0.95, 0.05, empty=math.nan),
                streamed=streamed, state=lambda: {"generator": rng.bit_generator.state},
                load_state=lambda r: setattr(rng.bit_generator, "state", r["generator"]),
                before_finish=step.rows.clear if streamed else None, desc=STAGE, show=progress)
    with training_state(out_dir, STAGE, cfg, checkpoint_every, resume) as state:
        model.train()
        curve = EpochCurve(model, data, data.split_days(cfg.split)[1], cfg, clicks) if cfg.eval_every_epoch else None
        stats = loop.run(step, click_batches(cfg, clicks, step, rng, batch_size, local_batch, per_epoch, curve))
    steps, running = int(stats["steps"]), float(stats["loss"])
    train_seconds = time.perf_counter() - t0

    if not D.is_main():
        D.barrier()
        return {"train_clicks": int(clicks.n), "steps": int(steps), "train_loss": float(running),
                "train_seconds": float(train_seconds)}
    eval_day = data.split_days(cfg.split)[1]
    metrics = evaluate(model, data, eval_day, cfg.eval_k, clicks.popularity_counts, cfg.eval_batch_size,
                       serving_stats(cfg, data, eval_day))
    metrics.update(
        train_clicks=int(clicks.n), steps=int(steps), train_loss=float(running),
        temperature=float(loss_fn.temperature.item()), train_seconds=float(train_seconds),
    )
    if curve is not None:
        metrics["epoch_curve"] = curve.points + [{"epoch": len(curve.points) + 1, **{
            k: metrics[k] for k in metrics if k.startswith(("recall@", "pop_recall@", "pop_log_recall@"))}}]
    if streamed:
        metrics["stream_chunk_rows"] = int(cfg.stream_chunk_rows)
    if world.distributed:
        metrics["world_size"] = int(world.size)
    if state.resumed:
        metrics["resumed"] = True
    metrics["eval_day"] = int(eval_day)
    _print_metrics(metrics, eval_day)
    save_model(out_dir, STAGE, cfg, model.state_dict(), metrics, data_dir, data.vocab)
    D.barrier()
    return metrics


def _print_metrics(metrics: dict, day: int) -> None:
    ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith("recall@"))
    print(f"retrieval: {int(metrics['train_clicks'])} training clicks, {int(metrics['steps'])} steps, "
          f"{metrics['train_seconds']:.1f}s; test day {day}: {int(metrics['test_clicks'])} clicks")
    for k in ks:
        print(f"  recall@{k:<5d} model {metrics[f'recall@{k}']:.4f}   popularity {metrics[f'pop_recall@{k}']:.4f}"
              f" (whole log's clicks {metrics[f'pop_log_recall@{k}']:.4f})"
              f"   random {metrics[f'random_recall@{k}']:.4f}   model on clicks outside the popular top-{k}:"
              f" {metrics.get(f'tail_recall@{k}', float('nan')):.4f}")
