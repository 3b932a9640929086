"""The fine rankers' rows as model inputs, built from `recstack.data` examples: what training,
evaluation and export share. No training code (export imports this module)."""
from __future__ import annotations

import numpy as np

from recstack.data import Examples, SimData, materialise as _materialise

from fine_rank.config import SPLITS

MODEL_INPUTS = ("user_feats", "item_feats", "item_dense", "interacted")  # every ranker's ONNX inputs, in order
SEQUENCE_INPUTS = ("seq_items", "seq_extras")  # then these, for a ranker with a sequence (`sequence="din"`)
ALL_INPUTS = MODEL_INPUTS + SEQUENCE_INPUTS  # the positional order of every ranker's arguments
# columns kept when the examples are materialised: inputs, labels, privileged features (for
# the PFD teachers), ground truth (evaluation only) and consent (signal-loss experiments)
TABLE_COLUMNS = MODEL_INPUTS + (
    "post_event", "click", "purchase", "purchase_observed", "true_pctr", "true_pcvr", "consent", "user_id", "item_id",
)
# a materialised sequence holds item ids as int32 (half the memory of a (N, 50, 5) int64
# table; embedding lookups take either); `feeds` widens them to the served int64
SEQ_ITEMS_DTYPE = np.int32


def materialise(examples: Examples, chunk: int = 16384, sequence: bool = True, item_stats: bool = True
                ) -> dict[str, np.ndarray]:
    """Examples -> dict of numpy columns (TABLE_COLUMNS, and SEQUENCE_INPUTS unless `sequence`
    is False: rankers without a sequence do not need their memory), built once. `item_stats`
    (as the default Config): `item_dense` also holds each row's item statistics on its day
    (recstack.item_stats), after the price; False for a ranker that reads none.

    The behaviour-sequence gathers behind the interacted features dominate batch building,
    and the fine ranker only needs their result, so it is computed once per row rather than
    once per row per epoch.
    """
    keys = TABLE_COLUMNS + (SEQUENCE_INPUTS if sequence else ())
    n = len(examples)
    if not n:
        return _materialise(examples, keys, chunk)  # its error: no rows
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for s in range(0, n, chunk):  # a chunk at a time: the int64 sequence is never held whole
        batch = examples.batch(np.arange(s, min(s + chunk, n)), item_stats=item_stats)
        if sequence:
            batch["seq_items"] = batch["seq_items"].astype(SEQ_ITEMS_DTYPE)
        for k in keys:
            out[k].append(batch[k])
    return {k: np.ascontiguousarray(np.concatenate(v)) for k, v in out.items()}


def input_names(model) -> tuple[str, ...]:
    """The serving tensors `model` (a Ranker) reads: MODEL_INPUTS, then SEQUENCE_INPUTS with a sequence."""
    return ALL_INPUTS if getattr(model, "sequence", None) is not None else MODEL_INPUTS


def row_inputs(x: dict, idx) -> list:
    """The positional arguments of every ranker for rows `idx` of a table (numpy or torch):
    ALL_INPUTS in order, None for the sequence columns a table without them lacks."""
    return [x[k][idx] if k in x else None for k in ALL_INPUTS]


def feeds(table: dict[str, np.ndarray], names: tuple[str, ...], rows=slice(None)) -> dict[str, np.ndarray]:
    """ONNX feeds of `rows` of a materialised table: the named inputs, seq_items widened to int64."""
    out = {k: np.ascontiguousarray(table[k][rows]) for k in names}
    if "seq_items" in out:
        out["seq_items"] = out["seq_items"].astype(np.int64)
    return out


def clicked(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with a click: the CVR population (purchase is only defined after a click)."""
    keep = table["click"] > 0.5
    return {k: v[keep] for k, v in table.items()}


def split_days(data: SimData, split: str) -> tuple[list[int], int]:
    """-> (days to fit on, day to score) (`SimData.split_days`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return data.split_days(split)

