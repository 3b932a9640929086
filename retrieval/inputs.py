"""Inputs of the two towers, built from `recstack.data` examples, and the embeddings they give:
used by training, evaluation and export alike.

Pure array work: no training code (export imports this module).
"""
from __future__ import annotations

import numpy as np
import torch

from recstack.data import materialise  # noqa: F401  (the stage's name for it)
from recstack.features import ItemTable

from retrieval.model import TwoTower

STAGE = "retrieval"
USER_INPUTS = ("user_feats", "seq_items", "seq_extras")
ITEM_INPUTS = ("item_feats", "item_dense")


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

