"""Export the fine ranker's CTR and CVR models as ONE ONNX graph (students only, no privileged
inputs), and its int8 copy when that keeps the ranking's quality.

    result = export("runs/fine/checkpoint.pt", "artifacts/v1/fine")
    # out_dir/ranker.onnx: user_feats (B,4) int64, item_feats (B,5) int64, item_dense (B,1) f32,
    #   interacted (B,12) f32[, seq_items (S,50,5) int64, seq_extras (S,50,3) f32] -> pctr (B,), pcvr (B,)
    #   (the sequence inputs when a model reads the sequence; serving feeds S = 1, one request's)
    # out_dir/ranker_int8.onnx: the same graph, weights int8 (dynamic quantisation), if it passes

The graph is checked against PyTorch on real rows of the held-out day (batch 1 and a
fine-ranking-sized batch of 500, and with a sequence also one request's layout: one row's
sequence, S = 1, against 500 candidates) and refused if it differs by more than 1e-5; the
calibration the service will see (ONNX outputs on the held-out day) goes into the meta.
The int8 copy is kept only when, on the held-out day, each model's AUC is within 0.0005 of
float32's and its calibration (mean prediction / mean label) within 0.5 %, a model that fails
keeping its input layer in float32 for a second try; the bundle export then also checks the
served top-50 (recstack/pipeline/fine_check.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from recstack import bundle_files
from recstack.bundle import BundleError, check_file
from recstack.training import checkpoint
from recstack.evaluation import metrics as M
from recstack.data import load
from recstack.features import Vocab
from recstack.item_stats import FIELDS as ITEM_STATS_FIELDS
from recstack.training.onnx import export_onnx, onnx_session

from fine_rank.model import Ranker
from fine_rank.serving_graph import INPUT_BLOCKS, ServingBoth
from fine_rank.config import STAGE, TASKS, Config, checkpoint_config
from fine_rank.inputs import ALL_INPUTS, SEQUENCE_INPUTS, clicked, feeds, input_names, materialise, split_days

PARITY_TOL = 1e-5
PARITY_BATCHES = (1, 500)  # one candidate; a typical fine-ranking request
OUTPUTS = {"ctr": "pctr", "cvr": "pcvr"}  # task -> the merged graph's output
INT8_MAX_AUC_DROP = 0.0005  # |AUC int8 - AUC fp32| per model, held-out day
INT8_MAX_CALIBRATION_SHIFT = 0.005  # |calibration int8 / calibration fp32 - 1| per model
# input-layer blocks an int8 graph keeps in float32: raw prices and counts (a sliver of the
# multiply-adds) and the request's user (one row)
FLOAT32_BLOCKS = ("in_user", "in_dense")


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


def load_models(ckpt: dict) -> tuple[Config, dict[str, Ranker]]:
    """A fine checkpoint dict -> (config, {"ctr": Ranker, "cvr": Ranker}) in eval mode."""
    cfg = checkpoint_config(ckpt["config"])
    vocab = Vocab.from_dict(ckpt["vocab"])
    models = {}
    for task in TASKS:
        s = cfg.settings(task)
        model = Ranker.build(vocab, s.emb_dim, s.hidden, s.sequence, s.attention_dim, s.n_item_dense)
        model.load_state_dict(ckpt["model"][task])
        models[task] = model.eval()
    return cfg, models


def graph_inputs(models: dict[str, Ranker]) -> tuple[str, ...]:
    """The merged graph's inputs: every input either model reads, in ALL_INPUTS order."""
    used = {k for m in models.values() for k in input_names(m)}
    return tuple(k for k in ALL_INPUTS if k in used)


def _rows(table: dict[str, np.ndarray], n: int, rng: np.random.Generator, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    take = rng.choice(len(table["click"]), size=n, replace=n > len(table["click"]))
    return feeds(table, names, take)


def _request_rows(table: dict[str, np.ndarray], n: int, rng: np.random.Generator,
                  names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """n candidates of one request as served: one row's user and sequence (U = S = 1), n rows' items."""
    rows = _rows(table, n, rng, names)
    one = feeds(table, names, [int(rng.integers(len(table["click"])))])
    for k in ("user_feats", *SEQUENCE_INPUTS):
        if k in rows:
            rows[k] = one[k]
    return rows


class _Both(torch.nn.Module):
    """CTR and CVR rankers side by side: the fine inputs -> (pctr (B,), pcvr (B,))."""

    def __init__(self, ctr: Ranker, cvr: Ranker):
        super().__init__()
        self.ctr, self.cvr = ctr, cvr

    def forward(self, user_feats, item_feats, item_dense, interacted, seq_items=None, seq_extras=None):
        x = (user_feats, item_feats, item_dense, interacted, seq_items, seq_extras)
        return self.ctr(*x), self.cvr(*x)


def _onnx_probs(session, table: dict[str, np.ndarray], output: str, batch_size: int = 8192) -> np.ndarray:
    names = tuple(i.name for i in session.get_inputs())
    n = len(table["click"])
    out = np.empty(n, dtype=np.float32)
    for s in range(0, n, batch_size):
        out[s : s + batch_size] = session.run([output], feeds(table, names, slice(s, s + batch_size)))[0]
    return out


def _parity(models: dict[str, Ranker], path: Path, rows: dict[str, np.ndarray]) -> dict[str, float]:
    """task -> max abs difference between the merged graph's output and that task's torch model
    (the torch model is given the user row once per candidate when the graph gets it once)."""
    outs = onnx_session(path).run([OUTPUTS[t] for t in TASKS], rows)
    n = len(rows["item_feats"])
    torch_rows = {**rows, "user_feats": np.repeat(rows["user_feats"], n // len(rows["user_feats"]), axis=0)}
    diffs = {}
    for task, got in zip(TASKS, outs):
        with torch.no_grad():
            ref = models[task](**{k: torch.from_numpy(torch_rows[k]) for k in input_names(models[task])}).numpy()
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


def input_layers(graph_path: Path, tasks: Sequence[str] = TASKS, blocks: Sequence[str] = INPUT_BLOCKS
                 ) -> dict[tuple[str, str], str]:
    """(task, block) -> the name of that block of the task's input layer (fine_rank.serving_graph:
    in_user, in_item, in_dense) in the graph at `graph_path`, read once; a pair the graph lacks is
    absent. Task "" matches a single model's graph (".../in_item/MatMul")."""
    import onnx

    for block in blocks:
        if block not in INPUT_BLOCKS:
            raise ValueError(f"input layer block must be one of {INPUT_BLOCKS}, got {block!r}")
    found: dict[tuple[str, str], str] = {}
    for node in onnx.load(str(graph_path)).graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        for task in tasks:
            for block in blocks:
                if (task, block) not in found and (f"/{task}/{block}/" if task else f"/{block}/") in node.name:
                    found[(task, block)] = node.name
    return found


def input_layer(graph_path: Path, task: str, block: str = "in_item") -> str | None:
    """The name of one block of a model's input layer in the merged graph, or None when the graph
    has none for that task."""
    return input_layers(graph_path, (task,), (block,)).get((task, block))


def float32_nodes(found: dict[tuple[str, str], str], tasks: Sequence[str] = TASKS) -> list[str]:
    """The input-layer nodes every int8 graph keeps in float32 (FLOAT32_BLOCKS of each task), from
    `input_layers`' answer."""
    return [found[(t, b)] for t in tasks for b in FLOAT32_BLOCKS if (t, b) in found]


def _int8_quality(int8_path: Path, fp32_quality: dict, populations: dict, labels: dict) -> tuple[dict, dict[str, list[str]]]:
    """Each model of an int8 graph against float32 on the held-out day -> (per-task meta, the
    failed bounds per task)."""
    q = _quality(int8_path, populations, labels)
    meta, failures = {}, {}
    for task in TASKS:
        ref = fp32_quality[task]
        auc_diff = q[task]["auc"] - ref["auc"]
        cal_shift = relative_shift(q[task]["calibration"], ref["calibration"])
        meta[task] = {"auc": q[task]["auc"], "auc_diff": auc_diff, "calibration": q[task]["calibration"],
                      "calibration_shift": cal_shift,
                      "max_abs_prob_diff": float(np.max(np.abs(q[task]["probs"] - ref["probs"]))) if len(ref["probs"]) else 0.0}
        bad = []
        if not abs(auc_diff) <= INT8_MAX_AUC_DROP:  # NaN fails too
            bad.append(f"{task} AUC moved by {auc_diff:+.5f} (bound {INT8_MAX_AUC_DROP})")
        if not abs(cal_shift) <= INT8_MAX_CALIBRATION_SHIFT:
            bad.append(f"{task} calibration moved by {cal_shift:+.4%} (bound {INT8_MAX_CALIBRATION_SHIFT:.1%})")
        if bad:
            failures[task] = bad
    return meta, failures


def quantise_int8(fp32_path: Path, int8_path: Path, fp32_quality: dict, populations: dict, labels: dict) -> dict:
    """Write the int8 copy of the merged graph (ONNX Runtime dynamic quantisation: int8 weights,
    activations quantised per call) and keep it only if each model's held-out AUC and
    calibration stay within the bounds. -> the check's meta ({"kept", "reason", "fp32_nodes",
    "attempts", per task ...}).

    Every layer is quantised but the input layer's dense block (item_dense and the interacted
    counts: raw prices and counts, 13 columns, a sliver of the multiply-adds) and its user block
    (one row per request). A model that fails keeps its candidate-embedding block in float32 too
    and the check runs once more."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    layers = input_layers(fp32_path)
    fp32_nodes = float32_nodes(layers)
    attempts: list[dict] = []
    while True:
        # ONNX Runtime's defaults: signed int8 weights, one scale per tensor
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8, per_channel=False,
                         nodes_to_exclude=list(fp32_nodes))
        tasks, failures = _int8_quality(int8_path, fp32_quality, populations, labels)
        reason = "; ".join(m for t in TASKS for m in failures.get(t, []))
        attempts.append({"fp32_nodes": list(fp32_nodes), "failed": reason})
        more = [n for t in TASKS if t in failures and (n := layers.get((t, "in_item"))) and n not in fp32_nodes]
        if not failures or len(attempts) > 1 or not more:
            break
        fp32_nodes += more
    meta: dict = {"max_auc_drop": INT8_MAX_AUC_DROP, "max_calibration_shift": INT8_MAX_CALIBRATION_SHIFT, **tasks,
                  "fp32_nodes": fp32_nodes, "attempts": attempts, "kept": not failures}
    kept_fp32 = f" (float32 kept for {', '.join(fp32_nodes)})" if fp32_nodes else ""
    meta["reason"] = (reason if failures else "held-out AUC and calibration within bounds") + kept_fp32
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
    day = materialise(data.examples(eval_day), sequence=cfg.uses_sequence, item_stats=cfg.item_stats)
    names = graph_inputs(models)
    populations = {"ctr": day, "cvr": clicked(day)}
    eval_labels = {"ctr": "click", "cvr": "purchase"}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    path = out_dir / bundle_files.FILES[STAGE]["ranker"]
    # a request's sequence (S = 1) is fed beside its M candidates: its own leading axis
    # and so is the request's user (U = 1): the graph multiplies its block once
    axes = {"user_feats": "users", **{k: "sequences" for k in SEQUENCE_INPUTS}}
    export_onnx(ServingBoth(models["ctr"], models["cvr"]), _request_rows(day, PARITY_BATCHES[-1], rng, names), path,
                [OUTPUTS[t] for t in TASKS], axes=axes)
    # each task's parity on its own population's rows (one user per row, as offline scoring feeds
    # them) and as served (one request's user and sequence beside its candidates)
    diffs = {t: {str(b): _parity(models, path, _rows(populations[t], b, rng, names))[t] for b in PARITY_BATCHES} for t in TASKS}
    for t in TASKS:
        diffs[t][f"request{PARITY_BATCHES[-1]}"] = _parity(models, path, _request_rows(populations[t], PARITY_BATCHES[-1],
                                                                                       rng, names))[t]
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
    meta = {"eval_day": eval_day, "parity_tol": PARITY_TOL, "inputs": list(names), "outputs": OUTPUTS, "user_rows": "one",
            "file": path.name, "sequence": {t: cfg.settings(t).sequence for t in TASKS}}
    if cfg.item_stats:
        # the table of the day after the training days: what the rankers read when the bundle serves
        stats_path = out_dir / bundle_files.FILES[STAGE]["item_stats"]
        np.save(stats_path, data.item_stats.table(eval_day))
        files.append(stats_path.name)
        meta["item_stats"] = {"file": stats_path.name, "day": eval_day, "fields": list(ITEM_STATS_FIELDS)}
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
