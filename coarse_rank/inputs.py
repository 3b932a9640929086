"""The coarse student's inputs from `recstack.data` batches, and the student rebuilt from a
checkpoint: what training, evaluation and export share. No training code (export imports it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recstack.training import checkpoint
from recstack.data import to_torch
from recstack.features import Vocab

from coarse_rank.config import Config, checkpoint_config
from coarse_rank.model import InnerProductStudent
from coarse_rank.objective import build_student

STAGE = "coarse"
MODEL_INPUTS = ("user_feats", "seq_items", "seq_extras", "item_feats", "item_dense")


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



def load_student(path: str | Path) -> tuple[InnerProductStudent, Config, dict]:
    """Rebuild the trained student (eval mode) from a coarse checkpoint: (model, config, checkpoint)."""
    ckpt = checkpoint.load(path, stage=STAGE)
    cfg = checkpoint_config(ckpt["config"])
    model = build_student(cfg, Vocab.from_dict(ckpt["vocab"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt
