"""Model costs (`recstack bench models`): the coarse and fine stages' scoring cost for one
request, measured in one run.

    from recstack.bench.models import run
    res = run("OUT_DIR", data_dir="DATA_DIR", runs="RUNS")

Coarse stage: scoring `n_candidates` candidates of ONE request

- by inner product with PRECOMPUTED item vectors, as `recstack/serving/cascade.py` serves it
  (`inner_products_by_idx`: FAISS reads each candidate's float32 row in place and dots it with
  the user vector), beside numpy's `item_vectors[cands] @ user_vec` (a gather, then a matvec)
  and the same matvec on an already contiguous block (no gather);
- by the PFD+MD teacher DNN (`coarse_rank.model.DNNTeacher`, eval mode, PyTorch eager, no grad)
  on the same candidates, with the request's user inputs broadcast (the behaviour sequence is
  encoded once; the per-(user, item) interacted features are handed in precomputed, so the
  teacher is not charged for computing them);
- against a plain memory scan of the same bytes (`np.sum` over the gathered block, and a
  copy of it into a preallocated buffer).

Fine stage: the CTR `fine_rank.model.Ranker` on `fine_candidates` candidates, ONNX Runtime vs
PyTorch eager, with the parity figure (max abs difference of the probabilities).

Everything runs single-threaded (torch 1 thread, ONNX Runtime intra/inter-op 1, BLAS 1 thread
via threadpoolctl) with warm-up; each figure is the median over the timed repeats. The costs
do not depend on the weights: models come from trained checkpoints when `runs` has them,
otherwise they are randomly initialised with the default Config sizes; the report says which.
Item vectors are random unit vectors (times the score scale) of the corpus size: their values
never change the cost of a gather and a matvec.
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recstack import features as FE
from recstack.bench import report as R
from recstack.bench.timing import loadavg, machine_info, single_threaded, time_interleaved
from recstack.evaluation import report as E

SCHEMA = "recstack.bench.models/1"
OUT_DIM = 128  # the serving contract's coarse vector size
SEQ_LEN = 50  # behaviour slots (docs/ARCHITECTURE.md)

# (name, goal, comparison); "ge": measured >= goal, "le": measured <= goal
TARGETS = {
    "coarse_speedup_vs_teacher": (1000.0, "ge"),
    "coarse_vs_memory_scan": (2.0, "le"),
    # int8 item vectors as served (int8 scan, float32 re-score of the 1.5x shortlist, the cut to
    # COARSE_KEEP; served when export's top-500 check passes) vs a scan of the fp32 bytes
    "coarse_int8_shortlist_vs_memory_scan": (2.5, "le"),
    # fine: the served ranker (int8, which export keeps only at equal quality: held-out AUC,
    # calibration, served top-50) >= 2x eager; fp32 ONNX Runtime within 1.1x its matrix products
    "fine_int8_speedup_vs_eager": (2.0, "ge"),
    "ort_vs_gemm_floor": (1.1, "le"),
    "fine_parity_max_abs_diff": (1e-5, "le"),
    # the served cascade's CPU (process time, all threads) per request, in process (bench all)
    "server_cpu_ms_per_request": (6.0, "le"),
}
COARSE_KEEP = 500  # the coarse cut of the served request (10,000 -> 500 -> 50)
DEFAULT_REPEATS = {"fast": 50, "teacher": 7, "fine": 200}
QUICK_REPEATS = {"fast": 5, "teacher": 2, "fine": 5}


def repeats_for(quick: bool, repeats: int | None) -> dict:
    """The timed repeats of each kind of path: the defaults (or the quick ones), or `repeats` for all."""
    reps = dict(QUICK_REPEATS if quick else DEFAULT_REPEATS)
    return {k: repeats for k in reps} if repeats is not None else reps


# ------------------------------------------------------------------ models and inputs


def vocab_for(data_dir: str | Path | None) -> tuple[FE.Vocab, str]:
    """-> (the vocabulary that sizes the models and the corpus, where it comes from)."""
    if data_dir is not None:
        world = json.loads((Path(data_dir) / "world.json").read_text())
        return FE.Vocab.from_dict(world["vocab"]), f"vocab of {Path(data_dir).resolve()}"
    from recstack.world.config import preset

    w = preset("small")
    vocab = FE.Vocab(n_users=w.n_users, n_items=w.n_items, n_categories=w.n_categories, n_shops=w.n_shops,
                    n_brands=w.n_brands, n_price_buckets=w.n_price_buckets, n_age_buckets=w.n_age_buckets,
                    n_genders=w.n_genders, n_activity_levels=w.n_activity_levels, log_price_mean=0.0, log_price_std=1.0)
    return vocab, "`small` preset sizes"


def coarse_models(vocab: FE.Vocab, runs: str | Path | None, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """-> (student, PFD+MD teacher, provenance), both in eval mode.

    The coarse checkpoint holds the student only: with one, the student's weights are loaded
    and the teacher is wired to its embeddings and sequence encoder (Share&Sync) with a
    freshly initialised DNN head; without one, everything is freshly initialised.
    """
    from coarse_rank.config import checkpoint_config
    from coarse_rank.train import Config, build_student, build_teacher

    ckpt_path = Path(runs) / "coarse" / "checkpoint.pt" if runs is not None else None
    torch.manual_seed(seed)
    if ckpt_path is not None and ckpt_path.exists():
        from recstack.training import checkpoint

        ckpt = checkpoint.load(ckpt_path, stage="coarse")
        cfg = checkpoint_config(ckpt["config"])
        vocab = FE.Vocab.from_dict(ckpt["vocab"])
        cfg.teacher = "pfd_md"
        student = build_student(cfg, vocab)
        student.load_state_dict(ckpt["model"])
        source = (f"checkpoint {ckpt_path.resolve()} (student weights; the teacher's DNN head is not in the "
                  "checkpoint and is freshly initialised on the student's shared embeddings)")
    else:
        cfg = Config(teacher="pfd_md")
        student = build_student(cfg, vocab)
        source = "random initialisation, default coarse_rank Config sizes"
    teacher = build_teacher(cfg, vocab, student)
    return student.eval(), teacher.eval(), {"source": source, "vocab": vocab, "teacher_hidden": list(cfg.teacher_hidden),
                                            "manner": cfg.manner}


def fine_model(vocab: FE.Vocab, runs: str | Path | None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """-> (CTR Ranker in eval mode, provenance)."""
    from fine_rank.model import Ranker
    from fine_rank.train import Config

    ckpt_path = Path(runs) / "fine" / "checkpoint.pt" if runs is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        from recstack.training import checkpoint
        from fine_rank.export import load_models

        cfg, models = load_models(checkpoint.load(ckpt_path, stage="fine"))
        return models["ctr"].eval(), {"source": f"checkpoint {ckpt_path.resolve()} (CTR model)",
                                      "hidden": list(cfg.ctr_hidden), "emb_dim": cfg.ctr_emb_dim,
                                      "vocab": FE.Vocab.from_dict(checkpoint.load(ckpt_path)["vocab"])}
    cfg = Config()
    torch.manual_seed(seed)
    model = Ranker.build(vocab, cfg.ctr_emb_dim, cfg.ctr_hidden)
    # a fresh Ranker's head has zero weights (every probability is the same) and its
    # BatchNorms running stats (0, 1): fine for timing, but the parity check needs outputs
    # that vary, so give the head weights and the BN statistics non-trivial values
    with torch.no_grad():
        torch.nn.init.normal_(model.head.linear.weight, std=0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), {"source": "random initialisation, default fine_rank Config sizes",
                          "hidden": list(cfg.ctr_hidden), "emb_dim": cfg.ctr_emb_dim, "vocab": vocab}


def linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def gemm_floor(layers: list[torch.nn.Linear], n: int, seed: int = 0) -> tuple[Callable[[], torch.Tensor], float]:
    """-> (fn, flops): `fn` runs only the matrix products of `layers` (an MLP's layers, in
    order) on n rows, without the embeddings, concatenation, BatchNorm or activations; its
    time is the floor that any runtime executing the same layers in fp32 pays."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, layers[0].in_features, generator=g)
    flops = 2.0 * n * sum(l.in_features * l.out_features for l in layers)

    def fn():
        with torch.no_grad():
            x = x0
            for l in layers:
                x = torch.nn.functional.linear(x, l.weight, l.bias)
            return x

    return fn, flops


def random_ids(rng: np.random.Generator, sizes, n: int) -> np.ndarray:
    """(n, len(sizes)) int64 model-input ids in 1..size-1 (0 is padding)."""
    return np.stack([rng.integers(1, s, n) for s in sizes], axis=1).astype(np.int64)


def request_inputs(rng: np.random.Generator, vocab: FE.Vocab, n: int, n_item_dense: int = 1) -> dict[str, np.ndarray]:
    """A random request of n candidates in the teacher's ONNX input layout (user inputs once);
    `n_item_dense`: item_dense's columns (the price, and the item statistics of a model that reads them)."""
    return {
        "user_feats": random_ids(rng, vocab.user_sizes(), 1),
        "seq_items": random_ids(rng, vocab.item_sizes(), SEQ_LEN)[None],
        "seq_extras": rng.standard_normal((1, SEQ_LEN, 3)).astype(np.float32),
        "item_feats": random_ids(rng, vocab.item_sizes(), n),
        "item_dense": rng.standard_normal((n, n_item_dense)).astype(np.float32),
        "interacted": rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32),
    }


# ------------------------------------------------------------------ coarse


def _inner_product_paths(scale: float, vocab: FE.Vocab, n_candidates: int, fast: int,
                         rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray, int]:
    """The inner-product and memory paths on one request's candidates -> (paths, cands, the
    gathered block, corpus size)."""
    from recstack.quant import int8_inner_products_by_idx, quantise_rows, shortlist_size, shortlist_top
    from recstack.serving.cascade import inner_products_by_idx

    corpus = max(vocab.n_items, n_candidates)
    vecs = rng.standard_normal((corpus, OUT_DIM), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    item_vectors = np.ascontiguousarray(vecs * np.float32(scale), dtype=np.float32)  # scale folded in, as export does
    del vecs
    cands = rng.choice(corpus, size=n_candidates, replace=False).astype(np.int64)  # retrieval order: unsorted
    user_vec = rng.standard_normal(OUT_DIM).astype(np.float32)
    user_vec /= np.linalg.norm(user_vec)
    block = np.ascontiguousarray(item_vectors[cands])  # the gathered bytes
    buf = np.empty_like(block)
    codes, scales = quantise_rows(item_vectors)
    keep = min(COARSE_KEEP, n_candidates)
    short = shortlist_size(keep, n_candidates)
    fns = {
        "inner_product_serving": (lambda: inner_products_by_idx(item_vectors, cands, user_vec), fast),
        "inner_product_int8": (lambda: int8_inner_products_by_idx(codes, scales, cands, user_vec), fast),
        # as served (recstack.serving.coarse.CoarseVectors.top): int8 scan, float32 re-score of the shortlist, the cut
        "inner_product_int8_shortlist": (lambda: shortlist_top(
            int8_inner_products_by_idx(codes, scales, cands, user_vec), keep, short,
            lambda p: inner_products_by_idx(item_vectors, cands[p], user_vec)), fast),
        "inner_product_numpy": (lambda: item_vectors[cands] @ user_vec, fast),
        "inner_product_sorted_gather": (lambda: item_vectors[np.sort(cands)] @ user_vec, fast),
        "inner_product_contiguous": (lambda: block @ user_vec, fast),
        "gather_only": (lambda: np.take(item_vectors, cands, axis=0, out=buf), fast),
        "memory_scan_sum": (lambda: block.sum(), fast),
        "memory_copy": (lambda: np.copyto(buf, block), fast),
    }
    return fns, cands, block, corpus


def _teacher_call(teacher, vocab: FE.Vocab, cands: np.ndarray, rng: np.random.Generator) -> Callable[[], torch.Tensor]:
    """The teacher on the same candidates, one request's user inputs broadcast."""
    n = len(cands)
    seq_items = random_ids(rng, vocab.item_sizes(), SEQ_LEN)[None]  # (1, L, 5), all slots valid
    inputs = {
        "user_feats": torch.from_numpy(random_ids(rng, vocab.user_sizes(), 1)),  # (1, 4)
        "seq_items": torch.from_numpy(seq_items),
        "seq_extras": torch.from_numpy(rng.standard_normal((1, SEQ_LEN, 3)).astype(np.float32)),
        "request_index": torch.zeros(n, dtype=torch.int64),
        "item_feats": torch.from_numpy(np.concatenate(
            [cands[:, None] % (vocab.n_items) + 1, random_ids(rng, vocab.item_sizes()[1:], n)], axis=1)),
        "item_dense": torch.from_numpy(rng.standard_normal((n, getattr(teacher, "n_item_dense", 1))).astype(np.float32)),
        "interacted": torch.from_numpy(rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32)),
    }

    def run_teacher():
        with torch.no_grad():
            return teacher(**inputs)

    out = run_teacher()
    if out.shape != (n,) or not torch.isfinite(out).all():
        raise RuntimeError(f"teacher output {tuple(out.shape)} is not {n} finite logits")
    return run_teacher


def bench_coarse(student, teacher, vocab: FE.Vocab, n_candidates: int, repeats: dict, seed: int = 0,
                 extra: Callable[[int, np.ndarray], dict] | None = None) -> dict:
    """`extra(n_candidates, cands)` -> more paths {name: (fn, repeats)} timed in the same rounds."""
    rng = np.random.default_rng(seed)
    fns, cands, block, corpus = _inner_product_paths(student.scale, vocab, n_candidates, repeats["fast"], rng)
    fns["teacher_dnn"] = (_teacher_call(teacher, vocab, cands, rng), repeats["teacher"])
    floor_fn, teacher_flops = gemm_floor(linears(teacher.mlp), n_candidates, seed)
    fns["teacher_gemm_floor"] = (floor_fn, repeats["teacher"])
    if extra:
        fns.update(extra(n_candidates, cands))
    t = time_interleaved(fns, warmup=1)

    m = {k: v["median"] for k, v in t.items()}
    ratios = {
        "coarse_speedup_vs_teacher": m["teacher_dnn"] / m["inner_product_serving"],
        "coarse_contiguous_speedup_vs_teacher": m["teacher_dnn"] / m["inner_product_contiguous"],
        "coarse_vs_memory_scan": m["inner_product_serving"] / m["memory_scan_sum"],
        "coarse_int8_vs_memory_scan": m["inner_product_int8"] / m["memory_scan_sum"],
        "coarse_int8_shortlist_vs_memory_scan": m["inner_product_int8_shortlist"] / m["memory_scan_sum"],
        "fused_speedup_vs_numpy_gather": m["inner_product_numpy"] / m["inner_product_serving"],
        "coarse_vs_memory_copy": m["inner_product_serving"] / m["memory_copy"],
        "contiguous_vs_memory_scan": m["inner_product_contiguous"] / m["memory_scan_sum"],
        "sorted_gather_vs_memory_scan": m["inner_product_sorted_gather"] / m["memory_scan_sum"],
        # the highest speed-up over the teacher that any path reading the gathered bytes once can reach
        "teacher_vs_memory_scan": m["teacher_dnn"] / m["memory_scan_sum"],
    }
    n_bytes = int(block.nbytes)
    return {
        "n_candidates": n_candidates, "corpus_items": corpus, "dim": OUT_DIM, "dtype": "float32",
        "gathered_bytes": n_bytes,
        "scan_gb_per_s": n_bytes / (m["memory_scan_sum"] * 1e-3) / 1e9,
        "teacher_params": int(sum(p.numel() for p in teacher.parameters())),
        "teacher_mlp_gflop": teacher_flops / 1e9,
        "teacher_gflop_per_s": teacher_flops / (m["teacher_dnn"] * 1e-3) / 1e9,
        "gather_gb_per_s": n_bytes / (m["gather_only"] * 1e-3) / 1e9,
        "timings_ms": t, "ratios": ratios,
    }


# ------------------------------------------------------------------ fine


def _fine_variants(model, inputs: dict, tmp: Path) -> tuple[object, dict[str, object]]:
    """-> (the fp32 ONNX session, {variant: its session, or why it is missing}): the serving
    session (recstack.serving.cascade: sequential, no spinning) and options around it."""
    from recstack.serving.loading import onnx_session as serving_session
    from recstack.training.onnx import export_onnx, onnx_session

    path = export_onnx(model, inputs, tmp / "ctr.onnx", ["prob"], axes={"seq_items": "sequences", "seq_extras": "sequences"})
    session = onnx_session(path, threads=1)
    variants: dict[str, object] = {"onnxruntime_serving_session": serving_session(path, 1),
                                   "onnxruntime_intra_op_2": serving_session(path, 2)}
    try:  # int8 weights (dynamic quantization): served when the export's quality checks pass
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from fine_rank.export import float32_nodes, input_layers
        from fine_rank.serving_graph import ServingRanker

        qpath = tmp / "ctr.int8.onnx"
        quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8, per_channel=False)
        variants["onnxruntime_int8_plain_graph"] = serving_session(qpath, 1)
        # as fine_rank.export writes it: the serving form, the user fed once, its user and dense
        # input blocks in float32
        one = {**inputs, "user_feats": inputs["user_feats"][:1]}
        spath = export_onnx(ServingRanker(model.eval()), one, tmp / "ctr.served.onnx", ["prob"],
                            axes={"user_feats": "users", "seq_items": "sequences", "seq_extras": "sequences"})
        keep = float32_nodes(input_layers(spath, ("",)), ("",))  # one model's graph: no task in its names
        sq = tmp / "ctr.served.int8.onnx"
        quantize_dynamic(str(spath), str(sq), weight_type=QuantType.QInt8, per_channel=False, nodes_to_exclude=keep)
        variants["onnxruntime_int8_dynamic"] = (serving_session(sq, 1), one)
    except Exception as e:  # noqa: BLE001 - optional: report why it is missing
        variants["onnxruntime_int8_dynamic"] = f"not measured: {e!r}"[:200]
    return session, variants


def bench_fine(model, vocab: FE.Vocab, n: int, repeats: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed + 1)
    inputs = {
        "user_feats": np.repeat(random_ids(rng, vocab.user_sizes(), 1), n, axis=0),  # one request, as the cascade
        "item_feats": random_ids(rng, vocab.item_sizes(), n),
        # the price, and the item statistics when the ranker reads them
        "item_dense": rng.standard_normal((n, getattr(model, "n_item_dense", 1))).astype(np.float32),
        "interacted": rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32),
    }
    if getattr(model, "sequence", None) is not None:  # one request's sequence, fed once (S = 1), as served
        inputs["seq_items"] = random_ids(rng, vocab.item_sizes(), SEQ_LEN)[None]
        inputs["seq_extras"] = rng.random((1, SEQ_LEN, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="recstack-bench-") as tmp:
        session, variants = _fine_variants(model, inputs, Path(tmp))
    # export_onnx wraps the model in a fresh (train-mode) module; torch.onnx.export restores
    # that wrapper's mode afterwards, which puts the model back in train mode: undo it
    model.eval()
    if any(m.training for m in model.modules()):
        raise RuntimeError("the fine model is not in eval mode")

    def eager():
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    def ort():
        return session.run(None, inputs)[0]

    ref, got = eager().numpy(), ort()
    parity = float(np.max(np.abs(ref - got)))
    r = repeats["fine"]
    fns = {"torch_eager": (eager, r), "onnxruntime": (ort, r)}
    variant_parity: dict[str, object] = {}
    for name, sess in variants.items():
        if isinstance(sess, str):
            variant_parity[name] = sess
            continue
        sess, feeds = sess if isinstance(sess, tuple) else (sess, inputs)  # a variant may be fed its own layout
        run_v = (lambda s_, f_: (lambda: s_.run(None, f_)[0]))(sess, feeds)
        variant_parity[name] = float(np.max(np.abs(ref - run_v())))
        fns[name] = (run_v, r)
    floor_fn, flops = gemm_floor(linears(model), n, seed)
    fns["gemm_floor"] = (floor_fn, r)
    t = time_interleaved(fns, warmup=5)
    int8 = {"fine_int8_speedup_vs_eager": t["torch_eager"]["median"] / t["onnxruntime_int8_dynamic"]["median"]} \
        if "onnxruntime_int8_dynamic" in t else {}
    return {
        "n_candidates": n, "parity_max_abs_diff": parity, "mlp_gflop": flops / 1e9, "variant_parity_max_abs_diff": variant_parity,
        "gflop_per_s": {k: flops / (t[k]["median"] * 1e-3) / 1e9 for k in ("torch_eager", "onnxruntime", "gemm_floor")},
        "timings_ms": t,
        "ratios": {"fine_ort_speedup_vs_eager": t["torch_eager"]["median"] / t["onnxruntime"]["median"],
                   # the highest ORT / eager ratio a runtime running the same fp32 matrix products can reach
                   "eager_vs_gemm_floor": t["torch_eager"]["median"] / t["gemm_floor"]["median"],
                   "ort_vs_gemm_floor": t["onnxruntime"]["median"] / t["gemm_floor"]["median"], **int8},
    }


# ------------------------------------------------------------------ targets


def check_targets(measured: dict) -> list[dict]:
    """-> one row per target: measured, goal, met, and by how much a missed one falls short
    (`shortfall`: the factor between goal and measured, >= 1 when missed)."""
    rows = []
    for name, (goal, op) in TARGETS.items():
        if name not in measured:
            continue
        x = float(measured[name])
        met = x >= goal if op == "ge" else x <= goal
        if met:
            short = None
        elif op == "ge":
            short = goal / x if x > 0 else float("inf")
        else:
            short = x / goal
        rows.append({"name": name, "goal": goal, "op": ">=" if op == "ge" else "<=", "measured": x, "met": met,
                     "shortfall_factor": short})
    return rows


def measured_ratios(coarse: dict, fine: dict) -> dict:
    """The figures the targets are checked against."""
    return {**coarse["ratios"], **fine["ratios"], "fine_parity_max_abs_diff": fine["parity_max_abs_diff"]}


# ------------------------------------------------------------------ `recstack bench models`


def run(out_dir: str | Path, *, data_dir: str | Path | None = None, runs: str | Path | None = None,
        n_candidates: int = 100_000, fine_candidates: int = 500, repeats: int | None = None,
        quick: bool = False, seed: int = 0, command: str | None = None) -> dict:
    """Measure the coarse and fine model costs in one run; write report.md, results.json and
    bench.png under `out_dir`; -> the results dict (the content of results.json).

    `data_dir`: a world whose vocabulary sizes the models and the item corpus (default: the
    `small` preset sizes); `runs`: a runs dir with coarse/ and/or fine/checkpoint.pt (default:
    freshly initialised models); `repeats`: timed repeats for every measurement (default:
    50 for the inner product and memory paths, 7 for the teacher, 200 for the fine ranker);
    `quick`: small sizes and few repeats (seconds; for tests, not a report).
    """
    if n_candidates < 1 or fine_candidates < 2:
        raise ValueError("n_candidates must be >= 1 and fine_candidates >= 2")
    if repeats is not None and repeats < 1:
        raise ValueError("repeats must be >= 1")
    if quick:
        n_candidates = min(n_candidates, 5_000)
    reps = repeats_for(quick, repeats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = loadavg()

    with ExitStack() as stack:
        threads = single_threaded(stack)
        vocab, vocab_source = vocab_for(data_dir)
        student, teacher, cinfo = coarse_models(vocab, runs, seed)
        coarse = bench_coarse(student, teacher, cinfo["vocab"], n_candidates, reps, seed)
        del student, teacher
        fmodel, finfo = fine_model(vocab, runs, seed)
        fine = bench_fine(fmodel, finfo["vocab"], fine_candidates, reps, seed)
    if cinfo["vocab"] != vocab:  # a checkpoint's own vocabulary sized the models
        vocab_source = "the coarse checkpoint's vocabulary"

    machine["loadavg_end"] = loadavg()
    res = {
        "schema": SCHEMA,
        "machine": machine,
        "settings": {"quick": quick, "n_candidates": n_candidates, "fine_candidates": fine_candidates, "repeats": reps,
                     "threads": threads, "seed": seed, "data_dir": str(data_dir) if data_dir else None,
                     "runs": str(runs) if runs else None, "command": command,
                     "wall_s": time.perf_counter() - t_start},
        "models": {
            "vocab_source": vocab_source, "n_items": cinfo["vocab"].n_items,
            "coarse": {"source": cinfo["source"], "teacher": "pfd_md", "teacher_hidden": cinfo["teacher_hidden"],
                       "manner": cinfo["manner"]},
            "fine": {"source": finfo["source"], "task": "ctr", "hidden": finfo["hidden"], "emb_dim": finfo["emb_dim"]},
        },
        "coarse": coarse,
        "fine": fine,
        "targets": check_targets(measured_ratios(coarse, fine)),
    }
    E.write_results(out, res)
    R.plot(out / "bench.png", res)
    R.write_report(out, res)
    return res

