"""Train the coarse ranker's inner-product student on clicks (log-loss over impressions).

    from coarse_rank.train import Config, train
    metrics = train(Config(max_steps=200), "data/small", "runs/coarse")

Held-out evaluation is next-day: fit on the days before the evaluation day, report AUC on
the evaluation day beside the ground-truth ceiling (the simulator's true pCTR scored
against the same clicks), which no model can beat in expectation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recstack import checkpoint, metrics
from recstack.config import ConfigError, to_dict
from recstack.data import Examples, load, to_torch
from recstack.features import Vocab

from coarse_rank.model import InnerProductStudent

STAGE = "coarse"
MODEL_INPUTS = ("user_feats", "seq_items", "seq_extras", "item_feats", "item_dense")
OPTIMIZERS = ("adagrad", "adam")
SPLITS = ("test", "valid")


@dataclass
class Config:
    # --- model (PFD §5) ---
    embed_dim: int = 16  # per categorical field; 9 fields, so the towers see 64 (user) / 80 (item) embedding dims
    d_model: int = 128  # attention width: 4 heads x subspace 32, as in the paper
    n_heads: int = 4  # attention heads (paper: 4)
    ff_dim: int = 256  # hidden width of the attention layer's feed-forward network
    hidden: tuple[int, ...] = (512, 256)  # tower MLP widths before the output layer (paper: 512 -> 256 -> 128)
    out_dim: int = 128  # user / item vector size (paper: 128); the serving contract assumes 128
    scale: float = 5.0  # logit = scale * <u, v>; compensates for l2 normalisation (paper: 5)
    # --- optimisation ---
    optimizer: str = "adagrad"  # "adagrad" (paper) or "adam"
    lr: float = 0.05  # peak learning rate after warm-up; the paper's 0.01 is for 1e9 examples, ours are ~1e5
    warmup_steps: int = 50  # linear LR warm-up from ~0 to lr over these steps (paper: 1e6 of its steps)
    weight_decay: float = 0.0  # L2 penalty passed to the optimizer (0: none, as in the paper)
    batch_size: int = 512  # impressions per step (paper: 1024; smaller = more updates on a CPU budget)
    epochs: int = 1  # passes over the training days (paper: 1)
    max_steps: int = 500  # cap on optimizer steps (0 = no cap): ~1 epoch of `small` (~463 steps), keeps larger worlds at ~1-2 min
    seed: int = 0  # seeds parameter init and the shuffling order
    length_buckets: int = 4  # speed-up only (exact): encode sequences in groups of similar length, see UserTower.encode_sequence
    # --- data / evaluation ---
    split: str = "test"  # "test": fit days 1..D-1, evaluate day D; "valid": fit 1..D-2, evaluate D-1 (LR sweeps)
    eval_max_rows: int = 50_000  # evaluate on at most this many impressions of the evaluation day (seeded sample)
    eval_batch_size: int = 2048  # rows per forward pass at evaluation

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for name in ("embed_dim", "d_model", "n_heads", "ff_dim", "out_dim", "batch_size", "epochs", "eval_max_rows",
                     "eval_batch_size", "length_buckets"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (BatchNorm needs two rows to normalise over)")
        if any(w <= 0 for w in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {self.hidden}")
        if self.lr <= 0 or self.scale <= 0:
            raise ConfigError("lr and scale must be positive")
        if self.warmup_steps < 0 or self.max_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps, max_steps and weight_decay must be >= 0")


def build_student(cfg: Config, vocab: Vocab) -> InnerProductStudent:
    """The student as `cfg` describes it (also used by export to rebuild from a checkpoint)."""
    return InnerProductStudent(
        vocab, embed_dim=cfg.embed_dim, d_model=cfg.d_model, n_heads=cfg.n_heads, ff_dim=cfg.ff_dim,
        hidden=tuple(cfg.hidden), out_dim=cfg.out_dim, scale=cfg.scale,
    )


def make_optimizer(cfg: Config, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer plus the paper's schedule: LR rises linearly over `warmup_steps`, then stays fixed."""
    params = list(params)
    if cfg.optimizer == "adagrad":
        opt = torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
    return opt, sched


def model_inputs(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The student's per-row inputs (for `forward`) from a `recstack.data` batch."""
    return to_torch({k: batch[k] for k in MODEL_INPUTS})


def request_inputs(batch: dict[str, np.ndarray], ts: np.ndarray) -> dict[str, torch.Tensor]:
    """The inputs of `InnerProductStudent.score_requests` from a per-row batch.

    Impressions of one request (same user, same time) have identical user-side inputs, so
    they share one user-tower row: with ~10 impressions per request this cuts the dominant
    cost (the attention layer) ~10x. Sequences are cut after the last slot any row uses;
    empty slots do not change the output, so this is exact.
    """
    key = np.stack([batch["user_id"], np.ascontiguousarray(ts, dtype=np.float64).view(np.int64)], axis=1)
    _, first, index = np.unique(key, axis=0, return_index=True, return_inverse=True)
    seq_items = batch["seq_items"][first]  # (R, L, 5)
    used = np.flatnonzero((seq_items[..., 0] > 0).any(axis=0))
    length = int(used[-1]) + 1 if len(used) else 1
    return to_torch({
        "user_feats": batch["user_feats"][first],
        "seq_items": seq_items[:, :length],
        "seq_extras": batch["seq_extras"][first, :length],
        "request_index": index.reshape(-1).astype(np.int64),
        "item_feats": batch["item_feats"],
        "item_dense": batch["item_dense"],
    })


def request_batches(examples: Examples, batch_size: int, *, shuffle: bool = False, seed: int = 0
                    ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]]:
    """Yield (per-row batch, `score_requests` inputs) with the impressions of a session kept
    together, so each user-tower row is shared by as many impressions as possible.

    With `shuffle`, sessions (not impressions) are visited in a seeded random order; without,
    rows come in their stored order (a session's impressions are stored together).
    """
    order = np.arange(len(examples))
    if shuffle and len(order):
        _, inv = np.unique(examples.imps["session_id"], return_inverse=True)
        rank = np.random.default_rng(seed).permutation(inv.max() + 1)[inv]
        order = np.argsort(rank, kind="stable")
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        batch = examples.batch(rows)
        yield batch, request_inputs(batch, examples.imps["ts"][rows])


@torch.no_grad()
def predict(model: InnerProductStudent, examples: Examples, batch_size: int = 2048, length_buckets: int = 4) -> dict[str, np.ndarray]:
    """Logits (N,) for every row of `examples` with the rows' click and true_pctr (same row order
    as `examples`)."""
    was_training = model.training
    model.eval()
    out = {"logit": [], "click": [], "true_pctr": []}
    for batch, inputs in request_batches(examples, batch_size):
        out["logit"].append(model.score_requests(**inputs, length_buckets=length_buckets).numpy())
        out["click"].append(batch["click"])
        out["true_pctr"].append(batch["true_pctr"])
    model.train(was_training)
    return {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in out.items()}

def evaluate(model: InnerProductStudent, examples: Examples, batch_size: int = 2048, length_buckets: int = 4) -> dict[str, float]:
    """Student AUC / log-loss / calibration on `examples`, and the ground-truth ceiling AUC
    (the simulator's true pCTR scored against the same clicks)."""
    p = predict(model, examples, batch_size, length_buckets)
    prob = 1.0 / (1.0 + np.exp(-p["logit"].astype(np.float64)))
    return {
        "auc": metrics.auc(p["click"], p["logit"]),
        "ceiling_auc": metrics.auc(p["click"], p["true_pctr"]),
        "logloss": metrics.logloss(p["click"], prob),
        "calibration": metrics.calibration(p["click"], prob),
        "ctr": float(np.mean(p["click"])) if len(p["click"]) else float("nan"),
        "n_eval": int(len(p["click"])),
    }


def _sample_rows(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def train(cfg: Config, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Fit the student on clicks, evaluate next-day, save `out_dir/checkpoint.pt`; returns the metrics."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    data = load(data_dir)
    fit_days, eval_day = (data.train_days, data.test_day) if cfg.split == "test" else (data.fit_days, data.valid_day)
    if not fit_days:
        raise ConfigError(f"split={cfg.split!r} leaves no training days in a {data.n_days}-day world")
    train_ex = data.examples(fit_days)
    eval_ex = data.examples(eval_day)
    eval_ex = eval_ex.subset(_sample_rows(len(eval_ex), cfg.eval_max_rows, cfg.seed))

    model = build_student(cfg, data.vocab)
    opt, sched = make_optimizer(cfg, model.parameters())
    per_epoch = len(train_ex) // cfg.batch_size + (len(train_ex) % cfg.batch_size >= 2)
    total = cfg.epochs * per_epoch
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    model.train()
    step, loss_ema, t0 = 0, None, time.perf_counter()
    bar = tqdm(total=total, desc="coarse", unit="step", disable=not progress, leave=False)
    for epoch in range(cfg.epochs):
        if step >= total:
            break
        for batch, inputs in request_batches(train_ex, cfg.batch_size, shuffle=True, seed=cfg.seed * 1009 + epoch):
            if len(inputs["user_feats"]) < 2:  # BatchNorm cannot normalise a single row
                continue
            logits = model.score_requests(**inputs, length_buckets=cfg.length_buckets)
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(batch["click"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}", lr=f"{sched.get_last_lr()[0]:.3g}")
            if step >= total:
                break
    bar.close()
    train_seconds = time.perf_counter() - t0

    result = evaluate(model, eval_ex, cfg.eval_batch_size, cfg.length_buckets)
    result.update({
        "steps": step,
        "train_examples": len(train_ex),
        "train_seconds": round(train_seconds, 2),
        "final_train_loss": float(loss_ema) if loss_ema is not None else float("nan"),
        "eval_day": int(eval_day),
        "fit_days": [int(d) for d in fit_days],
    })
    print(
        f"coarse student  day {eval_day}: AUC {result['auc']:.4f}  (ground-truth ceiling {result['ceiling_auc']:.4f})  "
        f"logloss {result['logloss']:.4f}  calibration {result['calibration']:.3f}  "
        f"[{step} steps, {train_seconds:.1f}s, {result['n_eval']} eval rows]"
    )
    out_dir = Path(out_dir)
    checkpoint.save(out_dir / "checkpoint.pt", {
        "stage": STAGE,
        "config": to_dict(cfg),
        "model": model.state_dict(),
        "metrics": result,
        "data_dir": str(Path(data_dir).resolve()),
        "vocab": data.vocab.to_dict(),
    })
    return result


def load_student(path: str | Path) -> tuple[InnerProductStudent, Config, dict]:
    """Rebuild the trained student (eval mode) from a coarse checkpoint: (model, config, checkpoint)."""
    from recstack.config import from_dict

    ckpt = checkpoint.load(path, stage=STAGE)
    cfg = from_dict(Config, ckpt["config"])
    model = build_student(cfg, Vocab.from_dict(ckpt["vocab"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt


if __name__ == "__main__":  # thin CLI for local runs; `recstack train coarse` is the real entry point
    import argparse

    from recstack.config import apply_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    train(apply_overrides(Config(), args.overrides), args.data, args.out)
