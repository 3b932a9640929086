"""The vectors the retrieval-backend bench searches: item vectors and requests, as the server
would search them.

    corpus = bundle_corpus(bundle_dir, n_queries)        # the bundle's item_emb.npy + its ONNX user tower
    corpus = checkpoint_corpus(checkpoint, n_queries)    # the item tower over the corpus + the torch user tower
    corpus = synthetic_corpus(n, dim, n_queries)         # clustered unit vectors (tests; no model needed)

Each request is one backend call, as `Cascade` makes it: row 0 is the user vector (the ANN
source), the other rows are the vectors of the request's item-to-item seeds (its sequence's
distinct items, newest first, at most `seeds`). The real corpora take the requests from the
data's test day (retrieval.export.request_sample, the sample the exporter's recall check uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Corpus:
    """item_emb (I, D) float32, row = item id; users (Q, D) float32 user vectors; seeds: Q arrays
    of item ids (the rows after the user's in its call); `source` names where they came from;
    `version`: the bundle's embedding version (sha256 of item_emb.npy) when from a bundle."""

    item_emb: np.ndarray
    users: np.ndarray
    seeds: list[np.ndarray]
    source: str
    version: str | None = None

    def call_rows(self, q: int) -> np.ndarray:
        """(1 + S, D): request q's user vector, then its seeds' item vectors."""
        return np.concatenate([self.users[q][None], self.item_emb[self.seeds[q]]]).astype(np.float32)


def seeds_of(seq_items: np.ndarray, seeds: int) -> list[np.ndarray]:
    """(Q, L, 5) model inputs -> Q arrays of raw item ids: each sequence's distinct items,
    newest first, at most `seeds` (Cascade.recent_items' rule: model ids are raw + 1, 0 empty)."""
    out = []
    for row in seq_items[:, :, 0]:
        ids = row[row > 0] - 1
        _, first = np.unique(ids, return_index=True)
        out.append(ids[np.sort(first)][:seeds].astype(np.int64))
    return out


def synthetic_corpus(n: int, dim: int, n_queries: int, seed: int = 0, clusters: int = 1000,
                     seeds: int = 5) -> Corpus:
    """(n, dim) unit item vectors around `clusters` centres; user vectors each a random item's
    vector plus noise; `seeds` random items per request."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    emb = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # bounded temporaries
        m = min(100_000, n - s)
        block = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, dim)).astype(np.float32)
        emb[s:s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = emb[rng.integers(0, n, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    users = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    return Corpus(emb, users, [rng.integers(0, n, seeds) for _ in range(n_queries)],
                  f"synthetic: {n:,} unit vectors around {clusters} centres, seed {seed}")


def _requests(data_dir: str | Path, n_queries: int, seed: int) -> dict[str, np.ndarray]:
    """User-tower inputs of up to n_queries distinct test-day requests (the cold-start row dropped)."""
    from recstack.data import load
    from retrieval.export import request_sample

    rows = request_sample(load(data_dir), n_queries, seed)
    return {k: v[:-1] for k, v in rows.items()}


def _retrieval_model(checkpoint: str | Path, data_dir: str | Path | None):
    """-> (TwoTower in eval mode, data_dir, label, its config) from a retrieval checkpoint, or from
    a training state (`train_state.pt`: the running phase's last snapshot, which names no data:
    `data_dir`)."""
    from recstack.data import load
    from recstack.features import Vocab
    from recstack.training import checkpoint as ckpt_lib
    from retrieval.config import checkpoint_config
    from retrieval.inputs import STAGE
    from retrieval.model import build_model

    ckpt = ckpt_lib.load(checkpoint, stage=STAGE)
    if ckpt.get("kind") == ckpt_lib.STATE_KIND:
        if data_dir is None:
            raise ValueError(f"{checkpoint} is a training state, which names no data: pass its --data folder")
        snap = ckpt["current"] or ckpt["done"][-1]
        state = {k[len("model."):]: v for k, v in snap["model"].items() if k.startswith("model.")}
        vocab, label = load(data_dir).vocab, f"training state {checkpoint} at step {snap.get('step')}"
    else:
        state, vocab, label = ckpt["model"], Vocab.from_dict(ckpt["vocab"]), f"checkpoint {checkpoint}"
        data_dir = ckpt["data_dir"]
    cfg = checkpoint_config(ckpt["config"])
    model = build_model(cfg, vocab)
    model.load_state_dict(state)
    return model.eval(), data_dir, label, cfg


def checkpoint_corpus(checkpoint: str | Path, n_queries: int, seed: int = 0, seeds: int = 5,
                      data_dir: str | Path | None = None) -> Corpus:
    """A retrieval checkpoint's (or training state's) item tower over its data's whole corpus,
    and its user tower on n_queries test-day requests of that data."""
    from recstack.data import load
    from retrieval.inputs import embed_items, embed_users, serving_stats

    model, data_dir, label, cfg = _retrieval_model(checkpoint, data_dir)
    data = load(data_dir)
    item_emb = embed_items(model, data.items, serving_stats(cfg, data, data.split_days(cfg.split)[1]))
    req = _requests(data_dir, n_queries, seed)
    return Corpus(item_emb, embed_users(model, req), seeds_of(req["seq_items"], seeds),
                  f"{label}: item tower over {data_dir}, user tower on test-day requests")


def bundle_corpus(bundle_dir: str | Path, n_queries: int, seed: int = 0, seeds: int = 5) -> Corpus:
    """A bundle's retrieval/item_emb.npy, and its ONNX user tower on n_queries test-day requests
    of the data its snapshot was taken from."""
    from recstack.bundle import Bundle
    from recstack.bundle_files import RETRIEVAL_ITEM_EMB, RETRIEVAL_TOWER
    from recstack.serving.candidates import embedding_version
    from recstack.training.onnx import onnx_session

    bundle = Bundle.open(bundle_dir)
    data_dir = bundle.manifest["snapshot"]["data_dir"]
    req = _requests(data_dir, n_queries, seed)
    session = onnx_session(bundle.path(RETRIEVAL_TOWER))
    users = np.concatenate([session.run(["user_emb"], {k: v[s:s + 256] for k, v in req.items()})[0]
                            for s in range(0, len(req["user_feats"]), 256)])
    item_emb = np.load(bundle.path(RETRIEVAL_ITEM_EMB), allow_pickle=False)
    return Corpus(item_emb, users.astype(np.float32), seeds_of(req["seq_items"], seeds),
                  f"bundle {Path(bundle.root)}: item_emb.npy, ONNX user tower on test-day requests of {data_dir}",
                  version=embedding_version(bundle))
