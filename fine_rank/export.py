"""Export the fine ranker's CTR and CVR models to ONNX (students only, no privileged inputs).

    result = export("runs/fine/checkpoint.pt", "artifacts/v1/fine")
    # out_dir/ctr.onnx, out_dir/cvr.onnx:
    #   user_feats (B,4) int64, item_feats (B,5) int64, item_dense (B,1) f32, interacted (B,7) f32 -> prob (B,)

Each graph is checked against PyTorch on real rows of the held-out day (batch 1 and a
fine-ranking-sized batch of 500) and refused if they differ by more than 1e-5; the
calibration the service will see (ONNX outputs on the held-out day) goes into the meta.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recstack import bundle_files
from recstack.training import checkpoint
from recstack.evaluation import metrics as M
from recstack.config import from_dict
from recstack.data import load
from recstack.features import Vocab
from recstack.training.onnx import export_onnx, onnx_session, parity

from fine_rank.model import Ranker
from fine_rank.config import STAGE, TASKS, Config
from fine_rank.inputs import MODEL_INPUTS, clicked, materialise, split_days

PARITY_TOL = 1e-5
PARITY_BATCHES = (1, 500)  # one candidate; a typical fine-ranking request
OUTPUT_NAME = "prob"


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


def load_models(ckpt: dict) -> tuple[Config, dict[str, Ranker]]:
    """A fine checkpoint dict -> (config, {"ctr": Ranker, "cvr": Ranker}) in eval mode."""
    cfg = from_dict(Config, ckpt["config"])
    vocab = Vocab.from_dict(ckpt["vocab"])
    models = {}
    for task in TASKS:
        s = cfg.settings(task)
        model = Ranker.build(vocab, s.emb_dim, s.hidden)
        model.load_state_dict(ckpt["model"][task])
        models[task] = model.eval()
    return cfg, models


def _rows(table: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    take = rng.choice(len(table["click"]), size=n, replace=n > len(table["click"]))
    return {k: np.ascontiguousarray(table[k][take]) for k in MODEL_INPUTS}


def _onnx_probs(session, table: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        out[s : s + batch_size] = session.run([OUTPUT_NAME], {k: table[k][s : s + batch_size] for k in MODEL_INPUTS})[0]
    return out


def export(checkpoint_path: str | Path, out_dir: str | Path, *, data_dir: str | Path | None = None) -> dict:
    """Write `out_dir/ctr.onnx` and `out_dir/cvr.onnx`; -> {"files": [...], "meta": {...}}.

    `data_dir` defaults to the checkpoint's training data (parity and calibration need
    real rows). Raises ExportError when ONNX and PyTorch differ by more than 1e-5.
    """
    ckpt = checkpoint.load(checkpoint_path, stage=STAGE)
    cfg, models = load_models(ckpt)
    data = load(data_dir if data_dir is not None else ckpt["data_dir"])
    if data.vocab != Vocab.from_dict(ckpt["vocab"]):
        raise ExportError(f"{data.root} has a different vocabulary from the one the checkpoint was trained on")
    _, eval_day = split_days(data, cfg.split)
    day = materialise(data.examples(eval_day))
    populations = {"ctr": day, "cvr": clicked(day)}
    eval_labels = {"ctr": "click", "cvr": "purchase"}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files, meta = [], {"eval_day": eval_day, "parity_tol": PARITY_TOL, "inputs": list(MODEL_INPUTS), "output": OUTPUT_NAME}
    for task in TASKS:
        model, rows = models[task], populations[task]
        path = out_dir / bundle_files.FILES[STAGE][task]
        export_onnx(model, _rows(rows, PARITY_BATCHES[-1], rng), path, [OUTPUT_NAME])
        diffs = {str(b): parity(model, path, _rows(rows, b, rng)) for b in PARITY_BATCHES}
        worst = max(diffs.values())
        if not worst <= PARITY_TOL:  # also refuses NaN
            path.unlink(missing_ok=True)
            raise ExportError(f"{task}.onnx differs from PyTorch by {worst:.3g} > {PARITY_TOL} (per batch size: {diffs})")
        probs = _onnx_probs(onnx_session(path), rows)
        labels = rows[eval_labels[task]]
        meta[task] = {
            "file": path.name,
            "parity_max_abs_diff": diffs,
            "label": eval_labels[task],
            "n_eval": int(len(labels)),
            "calibration": M.calibration(labels, probs),
            "auc": M.auc(labels, probs),
            "mean_pred": float(np.mean(probs)),
            "mean_label": float(np.mean(labels)),
        }
        files.append(path.name)
    return {"files": files, "meta": meta}
