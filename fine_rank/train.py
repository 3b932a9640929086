"""Train the fine ranker's CTR and CVR models and score them on the held-out day.

    cfg = Config(ctr_epochs=1)
    metrics = train(cfg, "data/small", "runs/fine")   # writes runs/fine/checkpoint.pt

CTR is fitted on every impression of the training days (label: click); CVR on the clicked
impressions only (label: purchase, or `purchase_observed` for the consent-limited stream),
both with the log-loss. Held-out metrics on the test day sit next to the ceiling that the
simulator's ground truth reaches on the same rows, and include calibration (mean
prediction / mean label), because the service multiplies pCTR x pCVR x price and so needs
calibrated probabilities, not just a good ordering.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from recstack import checkpoint, metrics as M
from recstack.config import ConfigError, to_dict
from recstack.data import Examples, SimData, load

from fine_rank.model import Ranker

STAGE = "fine"
TASKS = ("ctr", "cvr")
MODEL_INPUTS = ("user_feats", "item_feats", "item_dense", "interacted")  # the ONNX inputs, in order
# columns kept when the examples are materialised: inputs, labels, privileged features (for
# the PFD teachers), ground truth (evaluation only) and consent (signal-loss experiments)
TABLE_COLUMNS = MODEL_INPUTS + (
    "post_event", "click", "purchase", "purchase_observed", "true_pctr", "true_pcvr", "consent", "user_id", "item_id",
)
OPTIMIZERS = ("adam", "adagrad")
CVR_LABELS = ("purchase", "purchase_observed")
SPLITS = ("test", "valid")


@dataclass
class Config:
    """Fine-ranker training settings; `ctr_*` / `cvr_*` fields configure each model."""

    seed: int = 0  # torch init + shuffling; the CVR model uses seed + 1
    split: str = "test"  # "test": fit days 1..D-1, score day D; "valid": fit 1..D-2, score D-1 (LR sweeps)
    cvr_label: str = "purchase"  # "purchase_observed": only consented users' purchases (signal loss)
    eval_batch_size: int = 8192  # inference batch for held-out scoring (memory only)
    # CTR: ~237k training impressions on `small`. The id embeddings overfit fast: on
    # `small` one epoch scores a better next-day AUC and log-loss than two
    ctr_emb_dim: int = 16  # per categorical column; 9 columns -> 144 + 8 dense inputs
    ctr_hidden: tuple[int, ...] = (512, 256, 128)  # shared-bottom widths (PFD: 3 layers)
    ctr_optimizer: str = "adam"  # adam | adagrad (PFD's choice; give it lr ~0.01-0.05)
    ctr_lr: float = 1e-3  # Adam's usual default; stable with BatchNorm
    ctr_weight_decay: float = 0.0  # L2 on all weights (passed to the optimizer)
    ctr_batch_size: int = 512  # ~460 steps per epoch on `small`; BatchNorm is stable at this size
    ctr_epochs: int = 1  # passes over the training impressions
    ctr_max_steps: int = 0  # cap on optimizer steps; 0 = no cap
    ctr_lr_decay: bool = True  # linear decay to 0 over the run (see `fit`: calibration)
    # CVR: ~20x fewer (clicked) rows, 13 % positives; two epochs beat one and three on `small`
    cvr_emb_dim: int = 16  # as ctr_emb_dim
    cvr_hidden: tuple[int, ...] = (512, 256, 128)  # as ctr_hidden
    cvr_optimizer: str = "adam"  # as ctr_optimizer
    cvr_lr: float = 1e-3  # as ctr_lr
    cvr_weight_decay: float = 0.0  # as ctr_weight_decay
    cvr_batch_size: int = 512  # ~27 steps per epoch on `small`'s clicked rows
    cvr_epochs: int = 2  # passes over the clicked impressions
    cvr_max_steps: int = 0  # cap on optimizer steps; 0 = no cap
    cvr_lr_decay: bool = True  # as ctr_lr_decay

    def validate(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.cvr_label not in CVR_LABELS:
            raise ConfigError(f"cvr_label must be one of {CVR_LABELS}, got {self.cvr_label!r}")
        if self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size must be >= 1")
        for task in TASKS:
            self.settings(task).validate(task)

    def settings(self, task: str) -> "ModelSettings":
        """The `ctr_*` or `cvr_*` fields as one object."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return ModelSettings(**{f: getattr(self, f"{task}_{f}") for f in ModelSettings.__dataclass_fields__})

    def __post_init__(self) -> None:
        self.ctr_hidden = tuple(self.ctr_hidden)
        self.cvr_hidden = tuple(self.cvr_hidden)
        self.validate()


@dataclass(frozen=True)
class ModelSettings:
    """Settings of one model (CTR or CVR); see the matching fields of `Config`."""

    emb_dim: int
    hidden: tuple[int, ...]
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    max_steps: int
    lr_decay: bool

    def validate(self, task: str) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{task}_optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.emb_dim < 1 or not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"{task}_emb_dim and {task}_hidden must be positive")
        # BatchNorm needs at least two rows per training batch
        if self.batch_size < 2 or self.epochs < 1 or self.max_steps < 0 or self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"{task}: batch_size >= 2, epochs >= 1, max_steps >= 0, lr > 0, weight_decay >= 0 required")

    def steps(self, n_rows: int) -> int:
        per_epoch = math.ceil(n_rows / self.batch_size)
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


# ---------------------------------------------------------------------------- data


def materialise(examples: Examples, chunk: int = 16384) -> dict[str, np.ndarray]:
    """Examples -> dict of numpy columns (TABLE_COLUMNS), built once.

    The behaviour-sequence gathers behind the interacted features dominate batch building,
    and the fine ranker only needs their (B, 7) result, so it is computed once per row
    rather than once per row per epoch.
    """
    n = len(examples)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in TABLE_COLUMNS}
    for s in range(0, n, chunk):
        b = examples.batch(np.arange(s, min(s + chunk, n)))
        for k in TABLE_COLUMNS:
            parts[k].append(b[k])
    if n == 0:
        raise ValueError("no examples to materialise")
    return {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}


def clicked(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with a click: the CVR population (purchase is only defined after a click)."""
    keep = table["click"] > 0.5
    return {k: v[keep] for k, v in table.items()}


def split_days(data: SimData, split: str) -> tuple[list[int], int]:
    """-> (days to fit on, day to score)."""
    if split == "test":
        return data.train_days, data.test_day
    if split == "valid":
        return data.fit_days, data.valid_day
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ------------------------------------------------------------------------- training


def make_optimizer(model: torch.nn.Module, s: ModelSettings) -> torch.optim.Optimizer:
    if s.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r}")


def build_model(vocab, s: ModelSettings, seed: int) -> Ranker:
    torch.manual_seed(seed)
    return Ranker.build(vocab, s.emb_dim, s.hidden)


def fit(model: Ranker, table: dict[str, np.ndarray], label: str, s: ModelSettings, seed: int, bar=None) -> dict:
    """Minimise the log-loss of `model.logits` against `table[label]`; returns training stats."""
    inputs = {k: torch.from_numpy(table[k]) for k in MODEL_INPUTS}
    y = torch.from_numpy(table[label].astype(np.float32))
    n = len(y)
    if n < 2:
        raise ValueError(f"need at least 2 training rows for {label!r}, got {n}")
    model.head.set_prior(float(y.mean()))
    opt = make_optimizer(model, s)
    total = s.steps(n)
    # decay to 0: the last iterates stop jittering the output bias (which would show up as
    # a calibration error of several %) and BatchNorm statistics catch up with the weights
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1.0 - i / total) if s.lr_decay else 1.0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(seed)
    step, recent = 0, []
    model.train()
    t0 = time.perf_counter()
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, s.batch_size):
            idx = perm[start : start + s.batch_size]
            if len(idx) < 2:  # BatchNorm cannot normalise a single row
                continue
            logits = model.logits(*(inputs[k][idx] for k in MODEL_INPUTS))
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            recent = (recent + [loss.item()])[-50:]
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(recent):.4f}")
            if step >= total:
                break
    refresh_batchnorm(model, lambda idx: model.logits(*(inputs[k][idx] for k in MODEL_INPUTS)), n, s.batch_size, gen)
    return {"n_train": int(n), "train_positive_rate": float(y.mean()), "steps": step,
            "train_loss_last50": float(np.mean(recent)), "train_seconds": time.perf_counter() - t0}


@torch.no_grad()
def refresh_batchnorm(model: torch.nn.Module, forward: Callable[[torch.Tensor], object], n_rows: int, batch_size: int,
                      gen: torch.Generator, max_rows: int = 65536) -> None:
    """Re-estimate BatchNorm running statistics with the final weights ("precise BN").

    `forward(rows)` runs the model on the training rows `rows` (a (B,) index tensor); up to
    `max_rows` random rows are used. Leaves the model in eval mode.

    The running averages collected during training mix statistics of earlier weights; in
    the deeper layers they drift by several % from those of the final model, and the
    serving (eval-mode) output is then miscalibrated by as much even on training rows.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        model.eval()
        return
    rows = torch.randperm(n_rows, generator=gen)[:max_rows]
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        if len(idx) >= 2:
            forward(idx)
    for bn, m in zip(bns, saved):
        bn.momentum = m
    model.eval()


@torch.no_grad()
def predict(model: Ranker, table: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    """-> (N,) float32 probabilities from the serving forward (eval mode)."""
    model.eval()
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        sl = slice(s, s + batch_size)
        out[sl] = model(*(torch.from_numpy(table[k][sl]) for k in MODEL_INPUTS)).numpy()
    return out


def evaluate(labels: np.ndarray, probs: np.ndarray, truth: np.ndarray) -> dict:
    """Held-out metrics of `probs`, each next to the ground truth's value on the same rows."""
    labels = np.asarray(labels, dtype=np.float64)
    return {
        "n": int(len(labels)),
        "auc": M.auc(labels, probs),
        "auc_truth": M.auc(labels, truth),
        "logloss": M.logloss(labels, probs),
        "logloss_truth": M.logloss(labels, truth),
        "calibration": M.calibration(labels, probs),
        # the truth's own ratio shows how far sampling noise alone moves the label mean
        "calibration_truth": M.calibration(labels, truth),
        # mean prediction / mean true probability: the model's own bias, free of label noise
        "calibration_vs_truth": float(np.mean(probs) / max(np.mean(truth), 1e-12)),
        "mean_pred": float(np.mean(probs)),
        "mean_label": float(np.mean(labels)),
    }


def format_metrics(m: dict) -> str:
    lines = [f"fine ranker, held-out day {m['eval_day']} (fit on days {m['train_days']}):"]
    for task in TASKS:
        e = m[task]
        lines.append(
            f"  {task.upper()} [{e['label']}{'' if e['train_label'] == e['label'] else ', trained on ' + e['train_label']}, "
            f"n={e['n']}]  AUC {e['auc']:.4f} (truth {e['auc_truth']:.4f})  "
            f"log-loss {e['logloss']:.4f} (truth {e['logloss_truth']:.4f})  "
            f"calibration {e['calibration']:.3f} (truth {e['calibration_truth']:.3f}; "
            f"vs truth {e['calibration_vs_truth']:.3f})  "
            f"[{e['train']['steps']} steps, {e['train']['train_seconds']:.1f}s]"
        )
    return "\n".join(lines)


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Fit CTR and CVR, score them on the held-out day, save `out_dir/checkpoint.pt`; -> metrics."""
    cfg.validate()
    t_start = time.perf_counter()
    data = load(data_dir)
    fit_days, eval_day = split_days(data, cfg.split)
    train_table = materialise(data.examples(fit_days))
    eval_table = materialise(data.examples(eval_day))
    tables = {"ctr": (train_table, eval_table), "cvr": (clicked(train_table), clicked(eval_table))}
    labels = {"ctr": "click", "cvr": cfg.cvr_label}
    truths = {"ctr": "true_pctr", "cvr": "true_pcvr"}
    settings = {task: cfg.settings(task) for task in TASKS}
    seeds = {"ctr": cfg.seed, "cvr": cfg.seed + 1}
    t_data = time.perf_counter() - t_start

    total_steps = sum(settings[t].steps(len(tables[t][0]["click"])) for t in TASKS)
    models: dict[str, Ranker] = {}
    metrics: dict = {"eval_day": eval_day, "train_days": list(fit_days), "split": cfg.split, "data_seconds": t_data}
    with tqdm(total=total_steps, desc="fine", disable=not progress, unit="step") as bar:
        for task in TASKS:
            fit_rows, eval_rows = tables[task]
            bar.set_description(f"fine {task}")
            model = build_model(data.vocab, settings[task], seeds[task])
            stats = fit(model, fit_rows, labels[task], settings[task], seeds[task], bar)
            probs = predict(model, eval_rows, cfg.eval_batch_size)
            # CVR is always scored against real purchases: under signal loss the training
            # label undercounts them, and the service needs the true conversion probability
            eval_label = "click" if task == "ctr" else "purchase"
            m = evaluate(eval_rows[eval_label], probs, eval_rows[truths[task]])
            m["label"] = eval_label
            m["train_label"] = labels[task]
            m["train"] = stats
            if labels[task] != eval_label:
                m["vs_train_label"] = evaluate(eval_rows[labels[task]], probs, eval_rows[truths[task]])
            metrics[task] = m
            models[task] = model
    metrics["wall_seconds"] = time.perf_counter() - t_start
    if progress:
        print(format_metrics(metrics))

    checkpoint.save(
        Path(out_dir) / "checkpoint.pt",
        {
            "stage": STAGE,
            "config": to_dict(cfg),
            "model": {task: models[task].state_dict() for task in TASKS},
            "metrics": metrics,
            "data_dir": str(Path(data_dir).resolve()),
            "vocab": data.vocab.to_dict(),
        },
    )
    return metrics
