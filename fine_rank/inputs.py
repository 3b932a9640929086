"""The fine rankers' rows as model inputs, built from `recstack.data` examples: what training,
evaluation and export share. No training code (export imports this module)."""
from __future__ import annotations

import numpy as np

from recstack.data import Examples, SimData, materialise as _materialise

from fine_rank.config import SPLITS

MODEL_INPUTS = ("user_feats", "item_feats", "item_dense", "interacted")  # the ONNX inputs, in order
# columns kept when the examples are materialised: inputs, labels, privileged features (for
# the PFD teachers), ground truth (evaluation only) and consent (signal-loss experiments)
TABLE_COLUMNS = MODEL_INPUTS + (
    "post_event", "click", "purchase", "purchase_observed", "true_pctr", "true_pcvr", "consent", "user_id", "item_id",
)


def materialise(examples: Examples, chunk: int = 16384) -> dict[str, np.ndarray]:
    """Examples -> dict of numpy columns (TABLE_COLUMNS), built once.

    The behaviour-sequence gathers behind the interacted features dominate batch building,
    and the fine ranker only needs their (B, X) result, so it is computed once per row
    rather than once per row per epoch.
    """
    return _materialise(examples, TABLE_COLUMNS, chunk)


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

