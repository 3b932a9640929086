"""Export the fine ranker's CTR and CVR models as ONE ONNX graph (students only, no privileged
inputs), and its int8 copy when that keeps the ranking's quality.

    result = export("runs/fine/checkpoint.pt", "artifacts/v1/fine")
    # out_dir/ranker.onnx: user_feats (B,4) int64, item_feats (B,5) int64, item_dense (B,1) f32,
    #   interacted (B,7) f32 -> pctr (B,), pcvr (B,)    (serving feeds the shared inputs once)
    # out_dir/ranker_int8.onnx: the same graph, weights int8 (dynamic quantisation), if it passes

The graph is checked against PyTorch on real rows of the held-out day (batch 1 and a
fine-ranking-sized batch of 500) and refused if it differs by more than 1e-5; the
calibration the service will see (ONNX outputs on the held-out day) goes into the meta.
The int8 copy is kept only when, on the held-out day, each model's AUC is within 0.0005 of
float32's and its calibration (mean prediction / mean label) within 0.5 %; the bundle export
then also checks the served top-50 (recstack/pipeline/fine_check.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recstack import bundle_files
from recstack.bundle import BundleError, check_file
from recstack.training import checkpoint
from recstack.evaluation import metrics as M
from recstack.config import from_dict
from recstack.data import load
from recstack.features import Vocab
from recstack.training.onnx import export_onnx, onnx_session

from fine_rank.model import Ranker
from fine_rank.config import STAGE, TASKS, Config
from fine_rank.inputs import MODEL_INPUTS, clicked, materialise, split_days

PARITY_TOL = 1e-5
PARITY_BATCHES = (1, 500)  # one candidate; a typical fine-ranking request
OUTPUTS = {"ctr": "pctr", "cvr": "pcvr"}  # task -> the merged graph's output
INT8_MAX_AUC_DROP = 0.0005  # |AUC int8 - AUC fp32| per model, held-out day
INT8_MAX_CALIBRATION_SHIFT = 0.005  # |calibration int8 / calibration fp32 - 1| per model


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


class _Both(torch.nn.Module):
    """CTR and CVR rankers side by side: the fine inputs -> (pctr (B,), pcvr (B,))."""

    def __init__(self, ctr: Ranker, cvr: Ranker):
        super().__init__()
        self.ctr, self.cvr = ctr, cvr

    def forward(self, user_feats, item_feats, item_dense, interacted):
        x = {"user_feats": user_feats, "item_feats": item_feats, "item_dense": item_dense, "interacted": interacted}
        return self.ctr(**x), self.cvr(**x)


def _onnx_probs(session, table: dict[str, np.ndarray], output: str, batch_size: int = 8192) -> np.ndarray:
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        out[s : s + batch_size] = session.run([output], {k: table[k][s : s + batch_size] for k in MODEL_INPUTS})[0]
    return out


def _parity(models: dict[str, Ranker], path: Path, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """task -> max abs difference between the merged graph's output and that task's torch model."""
    outs = onnx_session(path).run([OUTPUTS[t] for t in TASKS], {k: rows[k] for k in MODEL_INPUTS})
    diffs = {}
    for task, got in zip(TASKS, outs):
        with torch.no_grad():
            ref = models[task](**{k: torch.from_numpy(rows[k]) for k in MODEL_INPUTS}).numpy()
        diffs[task] = float(np.max(np.abs(ref - got))) if len(ref) else 0.0
    return diffs


def _quality(path: Path, populations: dict, labels: dict[str, str]) -> dict[str, dict]:
    """task -> AUC, calibration, mean prediction of the graph at `path` on the held-out day."""
    sess = onnx_session(path)
    out = {}
    for task in TASKS:
        rows = populations[task]
        probs = _onnx_probs(sess, rows, OUTPUTS[task])
        y = rows[labels[task]]
        out[task] = {"auc": M.auc(y, probs), "calibration": M.calibration(y, probs), "mean_pred": float(np.mean(probs)),
                     "probs": probs}
    return out


def relative_shift(new: float, ref: float) -> float:
    """new / ref - 1 (the calibrations are on the same labels, so this is the shift of the mean
    prediction); 0 when both are 0, infinite when only ref is, NaN when either is NaN: the two
    last fail the bound."""
    if ref == 0:
        return 0.0 if new == 0 else float("inf")
    return float(new) / float(ref) - 1.0


def quantise_int8(fp32_path: Path, int8_path: Path, fp32_quality: dict, populations: dict, labels: dict) -> dict:
    """Write the int8 copy of the merged graph (ONNX Runtime dynamic quantisation: int8 weights,
    activations quantised per call) and keep it only if each model's held-out AUC and
    calibration stay within the bounds. -> the check's meta ({"kept", "reason", per task ...})."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # ONNX Runtime's defaults: signed int8 weights, one scale per tensor
    quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=False)
    q = _quality(int8_path, populations, labels)
    meta: dict = {"max_auc_drop": INT8_MAX_AUC_DROP, "max_calibration_shift": INT8_MAX_CALIBRATION_SHIFT}
    failures = []
    for task in TASKS:
        ref = fp32_quality[task]
        auc_diff = q[task]["auc"] - ref["auc"]
        cal_shift = relative_shift(q[task]["calibration"], ref["calibration"])
        meta[task] = {"auc": q[task]["auc"], "auc_diff": auc_diff, "calibration": q[task]["calibration"],
                      "calibration_shift": cal_shift,
                      "max_abs_prob_diff": float(np.max(np.abs(q[task]["probs"] - ref["probs"]))) if len(ref["probs"]) else 0.0}
        if not abs(auc_diff) <= INT8_MAX_AUC_DROP:  # NaN fails too
            failures.append(f"{task} AUC moved by {auc_diff:+.5f} (bound {INT8_MAX_AUC_DROP})")
        if not abs(cal_shift) <= INT8_MAX_CALIBRATION_SHIFT:
            failures.append(f"{task} calibration moved by {cal_shift:+.4%} (bound {INT8_MAX_CALIBRATION_SHIFT:.1%})")
    meta["kept"] = not failures
    meta["reason"] = "; ".join(failures) if failures else "held-out AUC and calibration within bounds"
    if failures:
        int8_path.unlink(missing_ok=True)
    return meta


def export(checkpoint_path: str | Path, out_dir: str | Path, *, data_dir: str | Path | None = None,
           int8: bool = True) -> dict:
    """Write `out_dir/ranker.onnx` (and `ranker_int8.onnx` when it passes); -> {"files": [...], "meta": {...}}.

    `data_dir` defaults to the checkpoint's training data (parity, calibration and the int8
    checks need real rows). Raises ExportError when ONNX and PyTorch differ by more than 1e-5.
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
    path = out_dir / bundle_files.FILES[STAGE]["ranker"]
    export_onnx(_Both(models["ctr"], models["cvr"]), _rows(day, PARITY_BATCHES[-1], rng), path, [OUTPUTS[t] for t in TASKS])
    # each task's parity on its own population's rows
    diffs = {t: {str(b): _parity(models, path, _rows(populations[t], b, rng))[t] for b in PARITY_BATCHES} for t in TASKS}
    worst = float(np.max([v for d in diffs.values() for v in d.values()]))  # np.max keeps a NaN (max() may not)
    if not worst <= PARITY_TOL:  # also refuses NaN
        path.unlink(missing_ok=True)
        raise ExportError(f"{path.name} differs from PyTorch by {worst:.3g} > {PARITY_TOL} (per task and batch size: {diffs})")
    try:  # a diverged model (NaN weights the parity rows missed) cannot be quantised or served
        check_file(out_dir, path.name)
    except BundleError as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"refusing to export: {e}") from None
    quality = _quality(path, populations, eval_labels)
    files = [path.name]
    meta = {"eval_day": eval_day, "parity_tol": PARITY_TOL, "inputs": list(MODEL_INPUTS), "outputs": OUTPUTS,
            "file": path.name}
    for task in TASKS:
        labels = populations[task][eval_labels[task]]
        meta[task] = {
            "output": OUTPUTS[task],
            "parity_max_abs_diff": diffs[task],
            "label": eval_labels[task],
            "n_eval": int(len(labels)),
            "calibration": quality[task]["calibration"],
            "auc": quality[task]["auc"],
            "mean_pred": quality[task]["mean_pred"],
            "mean_label": float(np.mean(labels)),
        }
    if int8:
        int8_path = out_dir / bundle_files.FILES[STAGE]["ranker_int8"]
        meta["int8"] = quantise_int8(path, int8_path, quality, populations, eval_labels)
        if meta["int8"]["kept"]:
            files.append(int8_path.name)
    return {"files": files, "meta": meta}
