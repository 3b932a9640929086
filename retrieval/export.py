"""Export the retrieval stage: user tower (ONNX), corpus item embeddings, FAISS index.

    from retrieval.export import export
    result = export("runs/retrieval/checkpoint.pt", "artifacts/v1/retrieval")

Files (relative to out_dir), as in docs/ARCHITECTURE.md:
    user_tower.onnx   user_feats (B, 4), seq_items (B, L, 5), seq_extras (B, L, 3) -> user_emb (B, D)
    item_emb.npy      float32 (n_items, D), row = item_id (also the item-to-item source)
    index.faiss       inner-product index over item_emb; FAISS id == item_id

Both towers emit unit vectors and the index uses METRIC_INNER_PRODUCT: the metric the
model was trained with (the temperature only scaled training logits). The index's recall
against exact search is measured on real test-day requests through the exported ONNX
tower and the index as read back from disk, i.e. what the server will run.
"""
from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

from recstack import bundle_files
from recstack.training import checkpoint
from recstack.data import SimData, load
from recstack.features import Vocab
from recstack.evaluation.metrics import recall_vs_exact
from recstack.training.onnx import export_onnx, onnx_session, parity
from retrieval import index as index_lib
from retrieval.index import search_params, set_search_params  # noqa: F401  (re-exported)
from retrieval.config import Config, checkpoint_config  # noqa: F401  (Config: re-exported)
from retrieval.inputs import STAGE, USER_INPUTS, embed_items, materialise, serving_stats
from retrieval.model import build_model

PARITY_TOLERANCE = 1e-5
NAMES = bundle_files.FILES[STAGE]
FILES = tuple(NAMES.values())


class ExportError(RuntimeError):
    """The export cannot be trusted (parity failure, data that does not match the checkpoint)."""


def build_index(emb: np.ndarray, factory: str = "Flat", nprobe: int | None = None, ef_search: int | None = None) -> faiss.Index:
    """(n, D) embeddings -> a trained METRIC_INNER_PRODUCT index holding them with ids 0..n-1.

    Rows are added in order, so FAISS id == row == item_id. See retrieval.index.build.
    """
    return index_lib.build(emb, factory, nprobe=nprobe, ef_search=ef_search)


def ann_recall(index: faiss.Index, corpus: np.ndarray, queries: np.ndarray, ks: list[int]) -> dict:
    """Recall@K of `index` against exact inner-product search over `corpus`, per K.

    recstack.evaluation.metrics.recall_vs_exact averaged over the queries: a returned item is a hit when
    its exact score reaches the exact K-th best (ties count); FAISS -1 padding is a miss.
    Also the index's search time per query (one batched call, this process's threads).
    """
    ks = sorted({min(k, len(corpus)) for k in ks})
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    t0 = time.perf_counter()
    _, found = index.search(queries, ks[-1])  # (Q, K)
    ms = (time.perf_counter() - t0) * 1e3 / max(len(queries), 1)
    recall = recall_vs_exact(found, queries, corpus, ks)
    out = {f"ann_recall@{k}": float(recall[k].mean()) for k in ks}
    out["ann_search_ms_per_query"] = float(ms)
    return out


def request_sample(data: SimData, n: int, seed: int) -> dict[str, np.ndarray]:
    """User-tower inputs for up to `n` distinct test-day requests (user, ts), plus one cold-start row.

    Real rows exercise the model on the feature distribution it will serve; the cold-start
    row (unknown user, empty sequence) is the edge case a parity check must cover.
    """
    ex = data.examples(data.test_day)
    if len(ex) == 0:
        ex = data.examples(data.train_days)
    keys = np.stack([ex.imps["user_id"].astype(np.float64), ex.imps["ts"].astype(np.float64)], axis=1)
    _, first = np.unique(keys, axis=0, return_index=True)
    rows = np.random.default_rng(seed).permutation(first)[:n]
    inputs = materialise(ex.subset(np.sort(rows)), USER_INPUTS)
    cold = {
        "user_feats": np.zeros((1,) + inputs["user_feats"].shape[1:], np.int64),
        "seq_items": np.zeros((1,) + inputs["seq_items"].shape[1:], np.int64),
        "seq_extras": np.zeros((1,) + inputs["seq_extras"].shape[1:], np.float32),
    }
    return {k: np.concatenate([inputs[k], cold[k]]) for k in USER_INPUTS}


def export(
    checkpoint_path: str | Path,
    out_dir: str | Path,
    *,
    index_factory: str | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
) -> dict:
    """Write user_tower.onnx, item_emb.npy and index.faiss under out_dir.

    index_factory / nprobe / ef_search default to the checkpoint's config ("auto": by corpus
    size, retrieval.index.default_spec). Raises
    ExportError if the ONNX tower differs from PyTorch by more than 1e-5 (nothing is left
    behind then). Returns {"files": [relative paths], "meta": {...}} (JSON types).
    """
    ckpt = checkpoint.load(checkpoint_path, stage=STAGE)
    cfg = checkpoint_config(ckpt["config"])
    vocab = Vocab.from_dict(ckpt["vocab"])
    nprobe = cfg.nprobe if nprobe is None else nprobe
    ef_search = cfg.ef_search if ef_search is None else ef_search

    model = build_model(cfg, vocab)
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = load(ckpt["data_dir"])
    if data.vocab != vocab:
        raise ExportError(f"{ckpt['data_dir']} does not match the checkpoint's vocabulary (was the data re-simulated?)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requests = request_sample(data, cfg.ann_eval_queries, cfg.seed)

    onnx_path = out / NAMES["user_tower"]
    export_onnx(model.user_tower, requests, onnx_path, ["user_emb"])
    diff = parity(model.user_tower, onnx_path, requests)
    if not diff <= PARITY_TOLERANCE:  # also catches NaN
        onnx_path.unlink(missing_ok=True)
        raise ExportError(f"user tower ONNX/PyTorch max abs diff {diff:.3g} > {PARITY_TOLERANCE:g}; refusing to export")

    # the vectors serve the day after the training days: the item statistics of that day go in
    serve_day = data.split_days(cfg.split)[1]
    item_emb = embed_items(model, data.items, serving_stats(cfg, data, serve_day))
    if not np.isfinite(item_emb).all():  # a diverged model: refused before an index is built from it
        raise ExportError(f"{NAMES['item_emb']}: {int((~np.isfinite(item_emb)).sum())} NaN or infinite values; refusing to export")
    np.save(out / NAMES["item_emb"], item_emb, allow_pickle=False)
    # "auto" (the default) picks the index by corpus size (retrieval/index.py, from the bench)
    spec = index_lib.resolve(index_factory or cfg.index_factory, len(item_emb), nprobe, ef_search)
    factory = spec["factory"]
    t_build = time.perf_counter()
    built = build_index(item_emb, factory, spec["nprobe"], spec["ef_search"])
    t_build = time.perf_counter() - t_build
    faiss.write_index(built, str(out / NAMES["index"]))

    # Measure what serving will run: the index as read back, queried with ONNX user vectors.
    index = faiss.read_index(str(out / NAMES["index"]))
    if index.ntotal != len(item_emb) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ExportError(f"index.faiss holds {index.ntotal} vectors with metric {index.metric_type}; expected "
                          f"{len(item_emb)} with inner product")
    queries = onnx_session(onnx_path).run(["user_emb"], requests)[0][:-1]  # drop the cold-start row
    recall = ann_recall(index, item_emb, queries, [k for k in cfg.eval_k])

    meta = {
        "dim": int(item_emb.shape[1]),
        "index_factory": factory,
        "metric": "inner_product",
        "normalized": True,
        **({"item_stats_day": int(serve_day)} if cfg.item_stats else {}),
        "n_items": int(len(item_emb)),
        **search_params(index),
        "index_build_seconds": float(t_build),
        "index_bytes": int((out / NAMES["index"]).stat().st_size),
        "onnx_inputs": list(USER_INPUTS),
        "onnx_output": "user_emb",
        "parity_max_abs_diff": float(diff),
        "parity_rows": int(len(requests["user_feats"])),
        "ann_queries": int(len(queries)),
        **recall,
    }
    return {"files": list(FILES), "meta": meta}
