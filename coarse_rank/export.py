"""Export the coarse student for serving: the user tower to ONNX, item vectors precomputed.

Serving then scores N candidates with one user-tower forward pass and one (N, 128) x (128,)
product; the score scale is folded into the item vectors so that product *is* the logit.

    out = export("runs/coarse/checkpoint.pt", "artifacts/v1/coarse")
    out["files"]  # ["user_tower.onnx", "item_vectors.npy"]
    out["meta"]   # dim, scale, parity diffs, ...
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recstack import bundle_files
from recstack.quant import (INT8_METHOD, SHORTLIST_FACTOR, int8_inner_products_by_idx, quantise_rows, shortlist_size,
                            shortlist_top, top_positions, topk_overlap)
from recstack.training import onnx as onnx_export
from recstack.data import SimData, load
from recstack.features import SEQ_LEN

from coarse_rank.model import InnerProductStudent
from coarse_rank.inputs import STAGE, load_student, model_inputs
from coarse_rank.objective import GmvStudent, UserVectorWithOne, centred_item_terms, item_terms

USER_INPUTS = ("user_feats", "seq_items", "seq_extras")
USER_OUTPUT = "user_vec"
PARITY_TOL = 1e-5  # user tower, ONNX Runtime vs PyTorch (unit vectors)
LOGIT_TOL = 1e-4  # serving logit (ONNX user_vec . precomputed item vector) vs the torch student
PARITY_ROWS = 256  # real test-day rows used for the checks
NAMES = bundle_files.FILES[STAGE]
# int8 item vectors serve only if, over INT8_REQUESTS real test-day user vectors each scoring
# INT8_CANDIDATES random items (retrieval-like), the top-INT8_TOP_K they serve (int8 shortlist,
# float32 re-score) matches float32's by at least INT8_MIN_OVERLAP on average
INT8_REQUESTS = 1000
INT8_CANDIDATES = 10_000
INT8_TOP_K = 500
INT8_MIN_OVERLAP = 0.99


class ExportError(RuntimeError):
    """The exported artifacts do not reproduce the trained model."""


@torch.no_grad()
def item_vectors(model: InnerProductStudent, data: SimData, chunk: int = 8192, stats: np.ndarray | None = None
                 ) -> np.ndarray:
    """Item-tower vectors of the whole corpus times the score scale: float32 (n_items, out_dim),
    row i = raw item id i (the same id space as the FAISS index). `stats`: the item statistics
    table (I, S) of the serving day, for a tower that reads them."""
    model.eval()
    n = data.items.n
    parts = []
    for s in range(0, n, chunk):
        ids = np.arange(s, min(s + chunk, n))
        feats = torch.from_numpy(data.items.feats(ids))
        dense = torch.from_numpy(np.ascontiguousarray(data.items.dense(ids, stats)))
        parts.append(model.item_tower(feats, dense).numpy())
    vecs = np.concatenate(parts) if parts else np.zeros((0, model.item_tower.mlp[-1].out_features), np.float32)
    return (vecs * np.float32(model.scale)).astype(np.float32)


def served_item_vectors(model: InnerProductStudent, cfg, data: SimData) -> tuple[np.ndarray, np.ndarray | None, float, int]:
    """The item vectors the bundle serves: the item tower's (scaled) for the serving day (the day
    after the training days: its item statistics go in when the tower reads them), with the gmv
    student's centred item term as one more coordinate. -> (vectors (I, D[+1]) float32, the item
    terms (I,) or None, their mean, the serving day)."""
    _, serve_day = data.split_days(cfg.split)
    stats = data.item_stats.table(serve_day) if cfg.item_stats else None
    vecs = item_vectors(model, data, stats=stats)
    item_term, term_mean = None, 0.0
    if isinstance(model, GmvStudent):  # one more coordinate: the item term, against a user-side 1
        item_term, term_mean = centred_item_terms(model, data.items, stats)
        vecs = np.concatenate([vecs, item_term.astype(np.float32)[:, None]], axis=1)
    return np.ascontiguousarray(vecs, np.float32), item_term, term_mean, serve_day


def _check_rows(data: SimData, n: int, day: int, item_stats: bool = False) -> dict[str, np.ndarray]:
    """Real rows of `day` (spread over the day) plus one cold-start row: an unknown user with
    an empty sequence, the input most likely to break masking in the exported graph."""
    ex = data.examples(day, item_stats=item_stats)
    rows = np.unique(np.linspace(0, len(ex) - 1, num=min(n, len(ex))).astype(np.int64))
    batch = ex.batch(rows)
    cold = {
        "user_feats": np.zeros((1, 4), np.int64),
        "seq_items": np.zeros((1, SEQ_LEN, 5), np.int64),
        "seq_extras": np.zeros((1, SEQ_LEN, 3), np.float32),
        "item_feats": batch["item_feats"][:1],
        "item_dense": batch["item_dense"][:1],
        "item_id": batch["item_id"][:1],
    }
    return {k: np.ascontiguousarray(np.concatenate([batch[k], cold[k]])) for k in cold}


def export(checkpoint_path: str | Path, out_dir: str | Path, *, data_dir: str | Path | None = None) -> dict:
    """Write `user_tower.onnx` and `item_vectors.npy` under `out_dir`; returns {"files", "meta"}.

    `data_dir` defaults to the one recorded in the checkpoint (the corpus and the check rows
    come from it). Raises ExportError when the ONNX user tower differs from PyTorch by more
    than 1e-5 or the serving logits differ from the student's by more than 1e-4.
    """
    model, cfg, ckpt = load_student(checkpoint_path)
    data = load(data_dir or ckpt["data_dir"])
    if data.vocab.to_dict() != ckpt["vocab"]:
        raise ExportError(f"{data.root} has a different vocabulary from the one {checkpoint_path} was trained on")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    vecs, item_term, term_mean, serve_day = served_item_vectors(model, cfg, data)
    if not np.isfinite(vecs).all():  # a diverged model
        raise ExportError(f"{NAMES['item_vectors']}: {int((~np.isfinite(vecs)).sum())} NaN or infinite values; refusing to export")
    np.save(out_dir / NAMES["item_vectors"], vecs, allow_pickle=False)

    rows = _check_rows(data, PARITY_ROWS, serve_day, cfg.item_stats)
    user_in = {k: rows[k] for k in USER_INPUTS}
    tower = model.user_tower if item_term is None else UserVectorWithOne(model.user_tower).eval()
    onnx_path = onnx_export.export_onnx(tower, user_in, out_dir / NAMES["user_tower"], [USER_OUTPUT])
    # the full batch, and single rows (batch 1 exercises the dynamic batch axis)
    parity = onnx_export.parity(tower, onnx_path, user_in)
    for r in (0, len(rows["user_feats"]) - 1):
        parity = max(parity, onnx_export.parity(tower, onnx_path, {k: v[r : r + 1] for k, v in user_in.items()}))
    if not parity <= PARITY_TOL:  # also catches NaN
        raise ExportError(f"coarse user tower: ONNX vs PyTorch max abs diff {parity:.3g} > {PARITY_TOL}")

    # what serving computes: ONNX user vector . precomputed (scaled) item vector
    user_vec = onnx_export.onnx_session(onnx_path).run([USER_OUTPUT], user_in)[0]  # (B, D)
    serving_logit = np.einsum("bd,bd->b", user_vec, vecs[rows["item_id"]])
    with torch.no_grad():
        torch_logit = model(**model_inputs(rows)).numpy()
    if item_term is not None:  # the student's own item term on these rows, recomputed, with the same centring
        terms = item_terms(model, rows["item_feats"], rows["item_dense"], data.items.price[rows["item_id"]])
        torch_logit = torch_logit + (terms - term_mean)
    logit_diff = float(np.max(np.abs(serving_logit - torch_logit)))
    if not logit_diff <= LOGIT_TOL:
        raise ExportError(f"coarse serving logits vs torch student max abs diff {logit_diff:.3g} > {LOGIT_TOL}")
    norm_err = float(np.max(np.abs(np.linalg.norm(user_vec[:, : model.item_tower.mlp[-1].out_features], axis=1) - 1.0)))

    int8 = int8_parity(onnx_path, data, vecs)
    files = [NAMES["user_tower"], NAMES["item_vectors"]]
    if int8["served"]:
        codes, scales = quantise_rows(vecs)
        np.save(out_dir / NAMES["item_codes"], codes, allow_pickle=False)
        np.save(out_dir / NAMES["item_scales"], scales, allow_pickle=False)
        files += [NAMES["item_codes"], NAMES["item_scales"]]

    meta = {
        "item_vectors_int8": int8,
        "dim": int(vecs.shape[1]),
        "scale": float(model.scale),
        "n_items": int(vecs.shape[0]),
        "user_tower_inputs": list(USER_INPUTS),
        "user_tower_output": USER_OUTPUT,
        "item_vectors_scaled": True,
        "objective": cfg.objective,  # "gmv": the last coordinate is log pCVR + log price (centred) against a user-side 1
        "item_stats_day": serve_day if cfg.item_stats else None,  # the statistics folded into the item vectors
        "parity_max_abs_diff": parity,
        "logit_max_abs_diff": logit_diff,
        "user_vec_norm_max_err": norm_err,
        "check_rows": int(len(rows["user_feats"])),
        "config": ckpt["config"],
        "metrics": ckpt.get("metrics", {}),
    }
    return {"files": files, "meta": meta}


def int8_parity(onnx_path: Path, data: SimData, vecs: np.ndarray, seed: int = 0,
                shortlist_factor: float = SHORTLIST_FACTOR) -> dict:
    """Whether the int8 item vectors, as served (their scores pick a shortlist of
    `shortlist_factor` x 500, re-scored in float32, recstack.quant.shortlist_top), keep
    float32's top-500: the mean overlap over 1,000 requests (real test-day user vectors from the
    exported tower, each with 10,000 random candidates, fewer on a small corpus) must reach
    0.99. The int8 scores' own top-500 overlap is recorded beside it. -> {"served", "reason", ...}."""
    ex = data.examples(data.test_day)
    n_req = min(INT8_REQUESTS, len(ex))
    rows = np.unique(np.linspace(0, len(ex) - 1, num=n_req).astype(np.int64)) if n_req else np.zeros(0, np.int64)
    codes, scales = quantise_rows(vecs)
    rng = np.random.default_rng(seed)
    n_cands = min(INT8_CANDIDATES, len(vecs))
    k = min(INT8_TOP_K, n_cands)
    overlaps, raw = [], []
    if len(rows) and n_cands:
        batch = ex.batch(rows)
        user_vecs = onnx_export.onnx_session(onnx_path).run(
            [USER_OUTPUT], {key: np.ascontiguousarray(batch[key]) for key in USER_INPUTS})[0]  # (B, D)
        for u in user_vecs:
            u = np.ascontiguousarray(u, np.float32)
            cands = rng.choice(len(vecs), size=n_cands, replace=False).astype(np.int64)
            ref = vecs[cands] @ u
            approx = int8_inner_products_by_idx(codes, scales, cands, u)
            pos, _ = shortlist_top(approx, k, shortlist_size(k, n_cands, shortlist_factor), lambda p: vecs[cands[p]] @ u)
            overlaps.append(len(np.intersect1d(top_positions(ref, k), pos)) / k if k else 1.0)
            raw.append(topk_overlap(ref, approx, k))
    mean = float(np.mean(overlaps)) if overlaps else float("nan")
    served = bool(overlaps) and mean >= INT8_MIN_OVERLAP
    what = f"top-{k} overlap of the int8 shortlist ({shortlist_factor:g}x) re-scored in float32"
    if not overlaps:
        reason = "no test-day requests to check the int8 vectors on; serving float32"
    elif served:
        reason = f"{what} {mean:.4f} >= {INT8_MIN_OVERLAP}: serving int8"
    else:
        reason = f"{what} {mean:.4f} < {INT8_MIN_OVERLAP}: serving float32"
    return {"served": served, "reason": reason, "method": INT8_METHOD, "shortlist_factor": float(shortlist_factor),
            "requests": len(overlaps), "candidates": int(n_cands), "top_k": k, "min_overlap": INT8_MIN_OVERLAP,
            "mean_overlap": mean, "worst_overlap": float(min(overlaps)) if overlaps else float("nan"),
            "int8_only_mean_overlap": float(np.mean(raw)) if raw else float("nan"),
            "int8_only_worst_overlap": float(min(raw)) if raw else float("nan"),
            "max_abs_vector_err": float(np.max(np.abs(codes.astype(np.float32) * scales[:, None] - vecs))) if len(vecs) else 0.0}


TEACHER_INPUTS = ("user_feats", "seq_items", "seq_extras", "item_feats", "item_dense", "interacted")
TEACHER_OUTPUT = "logit"


class _OneRequestTeacher(torch.nn.Module):
    """A DNN teacher scoring the candidates of ONE request: user inputs (1, ...), candidate
    inputs (B, ...); the behaviour sequence is encoded once and broadcast to every candidate."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, user_feats, seq_items, seq_extras, item_feats, item_dense, interacted):
        request_index = torch.zeros_like(item_feats[:, 0])  # (B,) int64: every candidate is request 0
        return self.teacher(user_feats, seq_items, seq_extras, request_index, item_feats, item_dense, interacted)


def export_teacher(teacher: torch.nn.Module, inputs: dict[str, np.ndarray], path: str | Path) -> dict:
    """Export a DNN teacher (e.g. PFD+MD `DNNTeacher`) as a coarse scorer for ONE request:
    inputs `TEACHER_INPUTS` (user ones with 1 row, candidate ones with B rows) -> `logit` (B,).

    Not part of a serving bundle: the benchmark's teacher-as-coarse peer uses it. `inputs` is
    one request's example (B >= 2); raises ExportError when ONNX Runtime differs from PyTorch by
    more than 1e-5 on them. -> {"path", "parity_max_abs_diff"}.
    """
    missing = [k for k in TEACHER_INPUTS if k not in inputs]
    if missing:
        raise ExportError(f"export_teacher: inputs lack {missing}")
    if len(inputs["user_feats"]) != 1:
        raise ExportError(f"export_teacher: user inputs must have 1 row (one request), got {len(inputs['user_feats'])}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = _OneRequestTeacher(teacher.eval()).eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in TEACHER_INPUTS)
    dynamic = {k: {0: "requests" if k in USER_INPUTS else "candidates"} for k in TEACHER_INPUTS}
    dynamic[TEACHER_OUTPUT] = {0: "candidates"}
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=list(TEACHER_INPUTS), output_names=[TEACHER_OUTPUT],
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
        ref = module(*args).numpy()
    teacher.eval()  # the exporter restores the wrapper's mode: keep the teacher in eval mode
    got = onnx_export.onnx_session(path).run([TEACHER_OUTPUT], {k: np.ascontiguousarray(inputs[k]) for k in TEACHER_INPUTS})[0]
    parity = float(np.max(np.abs(ref - got)))
    if not parity <= PARITY_TOL:
        raise ExportError(f"coarse teacher: ONNX vs PyTorch max abs diff {parity:.3g} > {PARITY_TOL}")
    return {"path": str(path), "parity_max_abs_diff": parity}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="export the coarse student (user tower ONNX + item vectors)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="data dir (default: the one recorded in the checkpoint)")
    args = ap.parse_args()
    print(json.dumps(export(args.checkpoint, args.out, data_dir=args.data)["meta"], indent=2))
