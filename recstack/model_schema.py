"""The schema every exported ONNX model carries in its `metadata_props`, so that a model file
alone says how to feed it: its inputs (name, dtype, shape, columns), the id offset, the
transforms that turn raw data into those columns, and the bundle it was exported into.

    schema = json.loads(session.get_modelmeta().custom_metadata_map[SCHEMA_KEY])

The columns and transforms are the ones `recstack.features` computes (the code the trainers
and the server share); `ItemTable(..., **schema["item_dense"])` rebuilds `item_dense`.
Names only and plain data: this module imports nothing heavy.
"""
from __future__ import annotations

import json

from recstack import features as F
from recstack import item_stats as S

SCHEMA_KEY = "recstack.schema"  # metadata_props key; the value is JSON
SCHEMA_FORMAT = 1

# input name -> the columns along its last axis
COLUMNS = {
    "user_feats": list(F.USER_FIELDS),
    "item_feats": list(F.ITEM_FIELDS),
    "seq_items": list(F.ITEM_FIELDS),
    "seq_extras": list(F.SEQ_EXTRA_FIELDS),
    "item_dense": ["log_price_standardised"],
    "interacted": list(F.INTERACTED_FIELDS),
    "post_event": list(F.POST_EVENT_FIELDS),
}
TRANSFORMS = {
    "user_feats": "raw id + id_offset per column (0 = unknown user / padding)",
    "item_feats": "raw id + id_offset per column (0 = padding)",
    "seq_items": "the user's last seq_len behaviours strictly before the request, newest first; raw id + id_offset "
                 "(0 = empty slot); recstack.features.sequence_tensors",
    "seq_extras": "log1p(hours since the behaviour), log1p(dwell seconds), 1.0 if a purchase; 0 in empty slots; "
                  "recstack.features.sequence_tensors",
    "item_dense": "(log(price) - log_price_mean) / log_price_std; recstack.features.ItemTable.dense; a graph of "
                  f"{1 + len(S.FIELDS)} columns also reads the item statistics after it: the bundle's "
                  "fine/item_stats.npy row of the candidate (recstack.item_stats)",
    "interacted": "log1p(count) of the sequence's clicks on the candidate's category / shop / brand within 24 h, "
                  "the same within 7 d, on the item itself within 7 d; recstack.features.interacted_features",
}


def _columns(name: str, shape: list) -> list[str]:
    """An input's columns; a fine graph's item_dense may carry the item statistics after the price."""
    cols = COLUMNS.get(name, [])
    if name == "item_dense" and shape and shape[-1] == len(cols) + len(S.FIELDS):
        return cols + list(S.FIELDS)
    return cols


def model_schema(stage: str, role: str, inputs: list[tuple[str, str, list]], outputs: list[tuple[str, str, list]],
                 vocab: dict, bundle_version: str) -> dict:
    """The schema of one model file. inputs / outputs: (name, dtype, shape) as the graph declares
    them (a dynamic axis is its name, e.g. "batch"); vocab: `recstack.features.Vocab.to_dict()`."""
    return {
        "format": SCHEMA_FORMAT,
        "stage": stage,
        "model": role,
        "bundle_version": bundle_version,
        "inputs": [{"name": n, "dtype": t, "shape": s, "columns": _columns(n, s),
                    "transform": TRANSFORMS.get(n, "")} for n, t, s in inputs],
        "outputs": [{"name": n, "dtype": t, "shape": s} for n, t, s in outputs],
        "id_offset": 1,
        "seq_len": F.SEQ_LEN,
        "item_dense": {"log_price_mean": float(vocab["log_price_mean"]), "log_price_std": float(vocab["log_price_std"])},
        "vocab": dict(vocab),
        "features_module": "recstack.features",
    }


def encode(schema: dict) -> dict[str, str]:
    """The metadata_props entries for a schema."""
    return {SCHEMA_KEY: json.dumps(schema, sort_keys=True)}
