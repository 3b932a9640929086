"""Inputs of the two towers, built from `recstack.data` examples, and the embeddings they give:
used by training, evaluation and export alike.

Pure array work: no training code (export imports this module).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from recstack.data import SimData, materialise  # noqa: F401  (the stage's name for it)
from recstack.features import ItemTable

from retrieval.model import TwoTower, stats_columns

STAGE = "retrieval"
USER_INPUTS = ("user_feats", "seq_items", "seq_extras")
ITEM_INPUTS = ("item_feats", "item_dense")


def corpus_inputs(items: ItemTable, stats: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """item tower inputs for every item of the corpus, in item_id order; `stats` (n_items, F):
    one day's item statistics (recstack.item_stats), appended to item_dense after the price."""
    ids = np.arange(items.n)
    return {"item_feats": items.feats(ids), "item_dense": np.ascontiguousarray(items.dense(ids, stats))}


def serving_stats(cfg, data: SimData, day: int) -> np.ndarray | None:
    """The item statistics table of `day` (the columns the config's item tower reads) when it
    reads them, else None."""
    return np.ascontiguousarray(data.item_stats.table(day)[:, stats_columns(cfg)]) if cfg.item_stats else None


def row_stats(cfg, data: SimData) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """(days (N,), items (N,)) -> the item statistics the config's tower reads, (N, F) float32,
    each row those of its day; None when the tower reads none."""
    if not cfg.item_stats:
        return None
    cols = stats_columns(cfg)
    return lambda days, items: np.ascontiguousarray(data.item_stats.features(days, items)[:, cols])


def add_row_stats(cfg, data: SimData, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Training rows (with "day" and "item_id") -> the same rows, item_dense followed by each
    row's item statistics when the config's tower reads them (in place; returned)."""
    return append_stats(rows, row_stats(cfg, data))


def append_stats(rows: dict[str, np.ndarray], fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None) -> dict[str, np.ndarray]:
    """`add_row_stats` with the `row_stats` function given (None: the rows unchanged)."""
    if fn is not None:
        rows["item_dense"] = np.ascontiguousarray(np.concatenate(
            [rows["item_dense"][:, :1], fn(rows["day"], rows["item_id"])], axis=1))
    return rows


@torch.no_grad()
def embed_items(model: TwoTower, items: ItemTable, stats: np.ndarray | None = None, batch_size: int = 8192) -> np.ndarray:
    """Item-tower embeddings of the whole corpus: float32 (n_items, D), row = item_id. A tower
    that reads the item statistics needs `stats`, the table of the day the vectors serve."""
    model.eval()
    inputs = corpus_inputs(items, stats)
    if inputs["item_dense"].shape[1] != model.item_tower.n_dense:
        raise ValueError(f"the item tower reads {model.item_tower.n_dense} dense columns, the corpus gives "
                         f"{inputs['item_dense'].shape[1]} (item statistics {'missing' if stats is None else 'not read'})")
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

