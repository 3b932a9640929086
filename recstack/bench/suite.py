"""Benchmarks of the cascade, measured in one run (issue 7): `recstack bench all` (run_all: every
section — model costs, the retrieval point, the serving path's profile and its before/after, end to
end through gRPC with the single-stage and teacher-as-coarse peers and GMV@50 against the truth)
and `recstack bench models` (run: the model costs alone).

    from recstack.bench.suite import run, run_all
    res = run("docs/results/bench", data_dir="/tmp/lead/large", runs="runs")
    res = run_all("docs/results/bench", data_dir="/tmp/lead/large", artifacts="artifacts", scratch="/tmp/b")

Coarse stage: scoring `n_candidates` candidates of ONE request

- by inner product with PRECOMPUTED item vectors, as `recstack/serving/cascade.py` serves it
  (`item_vectors[cands] @ user_vec`: a gather of the candidates' float32 rows, then a matvec),
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
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from recstack.evaluation import protocol as E
from recstack import features as FE

SCHEMA = "recstack.bench.models/1"
OUT_DIM = 128  # the serving contract's coarse vector size
SEQ_LEN = 50  # behaviour slots (docs/ARCHITECTURE.md)

# (name, goal, comparison); "ge": measured >= goal, "le": measured <= goal
TARGETS = {
    "coarse_speedup_vs_teacher": (1000.0, "ge"),
    "coarse_vs_memory_scan": (2.0, "le"),
    "fine_ort_speedup_vs_eager": (2.5, "ge"),
    "fine_parity_max_abs_diff": (1e-5, "le"),
}
DEFAULT_REPEATS = {"fast": 50, "teacher": 7, "fine": 200}
QUICK_REPEATS = {"fast": 5, "teacher": 2, "fine": 5}


# ------------------------------------------------------------------ timing / machine


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed -> ms summary (median first)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t0) * 1e3)
    xs.sort()
    return {
        "median": statistics.median(xs), "min": xs[0], "max": xs[-1],
        "p10": float(np.percentile(xs, 10)), "p90": float(np.percentile(xs, 90)), "repeats": repeats,
    }


def time_interleaved(fns: dict[str, tuple[Callable[[], object], int]], warmup: int = 1) -> dict[str, dict]:
    """Time several paths round-robin, so a change in the machine's load (it is shared) hits
    all of them alike and their ratios stay comparable: `fns` maps name -> (fn, repeats); each
    path runs `warmup` times untimed, then its repeats are spread evenly over the rounds
    (a path with fewer repeats runs in fewer rounds). -> name -> time_ms-style summary."""
    if any(r < 1 for _, r in fns.values()):
        raise ValueError("repeats must be >= 1")
    for fn, _ in fns.values():
        for _ in range(warmup):
            fn()
    rounds = max(r for _, r in fns.values())
    xs: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds):
        for k, (fn, r) in fns.items():
            if (i + 1) * r // rounds == i * r // rounds:  # r of the `rounds` rounds, evenly spread
                continue
            t0 = time.perf_counter()
            fn()
            xs[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, v in xs.items():
        v.sort()
        out[k] = {"median": statistics.median(v), "min": v[0], "max": v[-1], "p10": float(np.percentile(v, 10)),
                  "p90": float(np.percentile(v, 90)), "repeats": len(v)}
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    import onnxruntime as ort

    info = {
        "hostname": platform.node(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
        info["transparent_hugepages"] = thp[thp.index("[") + 1:thp.index("]")] if "[" in thp else thp
    except (OSError, ValueError):
        info["transparent_hugepages"] = "unknown"
    try:  # numpy madvise()s large arrays onto huge pages when THP is `madvise`; the gather depends on it
        info["numpy_madvise_hugepage"] = bool(np._core.multiarray._get_madvise_hugepage())
    except AttributeError:
        info["numpy_madvise_hugepage"] = None
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = sorted({f"{d.get('internal_api')} {d.get('version')}" for d in threadpool_info()
                               if d.get("user_api") == "blas"})
    except ImportError:
        info["blas"] = []
    return info


def _single_threaded(stack: ExitStack) -> dict:
    """Pin torch and BLAS to one thread for the duration of `stack`; -> what was pinned."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    stack.callback(torch.set_num_threads, prev)
    pinned = {"torch_threads": 1, "onnxruntime_intra_op": 1, "onnxruntime_inter_op": 1}
    try:
        from threadpoolctl import threadpool_limits

        stack.enter_context(threadpool_limits(limits=1))
        pinned["blas_threads"] = 1
    except ImportError:
        pinned["blas_threads"] = "not pinned (threadpoolctl missing)"
    return pinned


# ------------------------------------------------------------------ models


def _vocab(data_dir: str | Path | None) -> tuple[FE.Vocab, str]:
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
    from recstack.config import from_dict
    from coarse_rank.train import Config, build_student, build_teacher

    ckpt_path = Path(runs) / "coarse" / "checkpoint.pt" if runs is not None else None
    torch.manual_seed(seed)
    if ckpt_path is not None and ckpt_path.exists():
        from recstack.training import checkpoint

        ckpt = checkpoint.load(ckpt_path, stage="coarse")
        cfg = from_dict(Config, ckpt["config"])
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


def _linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)]


def gemm_floor(linears: list[torch.nn.Linear], n: int, seed: int = 0) -> tuple[Callable[[], torch.Tensor], float]:
    """-> (fn, flops): `fn` runs only the matrix products of `linears` (an MLP's layers, in
    order) on n rows, without the embeddings, concatenation, BatchNorm or activations; its
    time is the floor that any runtime executing the same layers in fp32 pays."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, linears[0].in_features, generator=g)
    flops = 2.0 * n * sum(l.in_features * l.out_features for l in linears)

    def fn():
        with torch.no_grad():
            x = x0
            for l in linears:
                x = torch.nn.functional.linear(x, l.weight, l.bias)
            return x

    return fn, flops


def _ids(rng: np.random.Generator, sizes, n: int) -> np.ndarray:
    """(n, len(sizes)) int64 model-input ids in 1..size-1 (0 is padding)."""
    return np.stack([rng.integers(1, s, n) for s in sizes], axis=1).astype(np.int64)


# ------------------------------------------------------------------ coarse


def bench_coarse(student, teacher, vocab: FE.Vocab, n_candidates: int, repeats: dict, seed: int = 0,
                 extra: Callable[[int, np.ndarray], dict] | None = None) -> dict:
    """`extra(n_candidates, cands)` -> more paths {name: (fn, repeats)} timed in the same rounds."""
    rng = np.random.default_rng(seed)
    corpus = max(vocab.n_items, n_candidates)
    vecs = rng.standard_normal((corpus, OUT_DIM), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    item_vectors = np.ascontiguousarray(vecs * np.float32(student.scale), dtype=np.float32)  # scale folded in, as export does
    del vecs
    cands = rng.choice(corpus, size=n_candidates, replace=False).astype(np.int64)  # retrieval order: unsorted
    user_vec = rng.standard_normal(OUT_DIM).astype(np.float32)
    user_vec /= np.linalg.norm(user_vec)
    block = np.ascontiguousarray(item_vectors[cands])  # the gathered bytes
    buf = np.empty_like(block)

    from recstack.serving.cascade import inner_products_by_idx

    fast = repeats["fast"]
    fns = {
        "inner_product_serving": (lambda: inner_products_by_idx(item_vectors, cands, user_vec), fast),
        "inner_product_numpy": (lambda: item_vectors[cands] @ user_vec, fast),
        "inner_product_sorted_gather": (lambda: item_vectors[np.sort(cands)] @ user_vec, fast),
        "inner_product_contiguous": (lambda: block @ user_vec, fast),
        "gather_only": (lambda: np.take(item_vectors, cands, axis=0, out=buf), fast),
        "memory_scan_sum": (lambda: block.sum(), fast),
        "memory_copy": (lambda: np.copyto(buf, block), fast),
    }

    # the teacher on the same candidates, one request's user inputs broadcast
    seq_items = _ids(rng, vocab.item_sizes(), SEQ_LEN)[None]  # (1, L, 5), all slots valid
    inputs = {
        "user_feats": torch.from_numpy(_ids(rng, vocab.user_sizes(), 1)),  # (1, 4)
        "seq_items": torch.from_numpy(seq_items),
        "seq_extras": torch.from_numpy(rng.standard_normal((1, SEQ_LEN, 3)).astype(np.float32)),
        "request_index": torch.zeros(n_candidates, dtype=torch.int64),
        "item_feats": torch.from_numpy(np.concatenate(
            [cands[:, None] % (vocab.n_items) + 1, _ids(rng, vocab.item_sizes()[1:], n_candidates)], axis=1)),
        "item_dense": torch.from_numpy(rng.standard_normal((n_candidates, 1)).astype(np.float32)),
        "interacted": torch.from_numpy(rng.random((n_candidates, len(FE.INTERACTED_FIELDS))).astype(np.float32)),
    }

    def run_teacher():
        with torch.no_grad():
            return teacher(**inputs)

    out = run_teacher()
    if out.shape != (n_candidates,) or not torch.isfinite(out).all():
        raise RuntimeError(f"teacher output {tuple(out.shape)} is not {n_candidates} finite logits")
    floor_fn, teacher_flops = gemm_floor(_linears(teacher.mlp), n_candidates, seed)
    fns["teacher_dnn"] = (run_teacher, repeats["teacher"])
    fns["teacher_gemm_floor"] = (floor_fn, repeats["teacher"])
    if extra:
        fns.update(extra(n_candidates, cands))
    t = time_interleaved(fns, warmup=1)

    m = {k: v["median"] for k, v in t.items()}
    ratios = {
        "coarse_speedup_vs_teacher": m["teacher_dnn"] / m["inner_product_serving"],
        "coarse_contiguous_speedup_vs_teacher": m["teacher_dnn"] / m["inner_product_contiguous"],
        "coarse_vs_memory_scan": m["inner_product_serving"] / m["memory_scan_sum"],
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


def bench_fine(model, vocab: FE.Vocab, n: int, repeats: dict, seed: int = 0) -> dict:
    from recstack.training.onnx import export_onnx, onnx_session

    rng = np.random.default_rng(seed + 1)
    inputs = {
        "user_feats": np.repeat(_ids(rng, vocab.user_sizes(), 1), n, axis=0),  # one request, as the cascade
        "item_feats": _ids(rng, vocab.item_sizes(), n),
        "item_dense": rng.standard_normal((n, 1)).astype(np.float32),
        "interacted": rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32),
    }
    from recstack.serving.cascade import onnx_session as serving_session

    variants: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="recstack-bench-") as tmp:
        path = export_onnx(model, inputs, Path(tmp) / "ctr.onnx", ["prob"])
        session = onnx_session(path, threads=1)
        # the serving session (recstack.serving.cascade: sequential, no spinning) and options around it
        variants["onnxruntime_serving_session"] = serving_session(path, 1)
        variants["onnxruntime_intra_op_2"] = serving_session(path, 2)
        try:  # int8 weights (dynamic quantization): cheaper arithmetic, parity reported, not served
            from onnxruntime.quantization import QuantType, quantize_dynamic

            qpath = Path(tmp) / "ctr.int8.onnx"
            quantize_dynamic(str(path), str(qpath), weight_type=QuantType.QInt8)
            variants["onnxruntime_int8_dynamic"] = serving_session(qpath, 1)
        except Exception as e:  # noqa: BLE001 - optional: report why it is missing
            variants["onnxruntime_int8_dynamic"] = f"not measured: {e!r}"[:200]
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
        run_v = (lambda s_: (lambda: s_.run(None, inputs)[0]))(sess)
        variant_parity[name] = float(np.max(np.abs(ref - run_v())))
        fns[name] = (run_v, r)
    floor_fn, flops = gemm_floor(_linears(model), n, seed)
    fns["gemm_floor"] = (floor_fn, r)
    t = time_interleaved(fns, warmup=5)
    return {
        "n_candidates": n, "parity_max_abs_diff": parity, "mlp_gflop": flops / 1e9, "variant_parity_max_abs_diff": variant_parity,
        "gflop_per_s": {k: flops / (t[k]["median"] * 1e-3) / 1e9 for k in ("torch_eager", "onnxruntime", "gemm_floor")},
        "timings_ms": t,
        "ratios": {"fine_ort_speedup_vs_eager": t["torch_eager"]["median"] / t["onnxruntime"]["median"],
                   # the highest ORT / eager ratio a runtime running the same fp32 matrix products can reach
                   "eager_vs_gemm_floor": t["torch_eager"]["median"] / t["gemm_floor"]["median"],
                   "ort_vs_gemm_floor": t["onnxruntime"]["median"] / t["gemm_floor"]["median"]},
    }


# ------------------------------------------------------------------ targets / report


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


LABELS = {
    "inner_product_serving": "coarse: inner product, serving path (fused FAISS gather-dot, fvec_inner_products_by_idx)",
    "inner_product_numpy": "coarse: inner product, previous serving path (numpy gather + BLAS matvec)",
    "inner_product_sorted_gather": "coarse: inner product, candidate ids sorted first (sort + gather + matvec)",
    "inner_product_contiguous": "coarse: inner product, contiguous block (matvec only)",
    "gather_only": "coarse: gather only (np.take into a buffer)",
    "memory_scan_sum": "memory scan of the same bytes (np.sum)",
    "memory_copy": "memory copy of the same bytes (np.copyto)",
    "teacher_dnn": "coarse: PFD+MD teacher DNN (torch eager)",
    "teacher_gemm_floor": "coarse: teacher's matrix products alone (floor)",
    "gemm_floor": "fine: CTR ranker's matrix products alone (floor)",
    "teacher_dnn_onnxruntime": "coarse: PFD+MD teacher DNN (ONNX Runtime, serving session options)",
    "torch_eager": "fine: CTR ranker, PyTorch eager",
    "onnxruntime": "fine: CTR ranker, ONNX Runtime",
    "onnxruntime_serving_session": "fine: CTR ranker, ONNX Runtime with the serving session options",
    "onnxruntime_intra_op_2": "fine: CTR ranker, ONNX Runtime, 2 intra-op threads (serving options otherwise)",
    "onnxruntime_int8_dynamic": "fine: CTR ranker, ONNX Runtime, int8 dynamic quantization (not served)",
}


def plot(path: Path, res: dict) -> Path:
    plt = E._plt()
    names, vals, colors = [], [], []
    for stage, color in (("coarse", "tab:blue"), ("fine", "tab:orange")):
        for k, v in res[stage]["timings_ms"].items():
            names.append(LABELS.get(k, k))
            vals.append(v["median"])
            colors.append("tab:gray" if k.startswith("memory") else color)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(y, vals, color=colors)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.3g} ms", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per request (median, 1 thread, log scale)")
    c, f = res["coarse"], res["fine"]
    ax.set_title(f"coarse: {c['n_candidates']:,} candidates; fine: {f['n_candidates']} candidates\n"
                 f"{res['machine']['cpu_model']} ({res['machine']['nproc']} cores, load {res['machine']['loadavg_start']})",
                 fontsize=9)
    ax.set_xlim(right=max(vals) * 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"

def _coarse_tables(c: dict) -> list[str]:
    """The coarse section's timing and ratio tables (shared by `bench models` and `bench all`)."""
    return [
        E.markdown_table(["path", "median ms", "p10 ms", "p90 ms", "repeats"],
                         [[LABELS.get(k, k), _fmt_ms(v["median"]), _fmt_ms(v["p10"]), _fmt_ms(v["p90"]), v["repeats"]]
                          for k, v in c["timings_ms"].items()]),
        "",
        E.markdown_table(["ratio", "value"], [[k, f"{v:.3g}"] for k, v in c["ratios"].items()]),
        "",
        f"Memory scan bandwidth (np.sum, 1 thread): {c['scan_gb_per_s']:.1f} GB/s. The PFD paper reports the inner "
        "product ~830x faster than its DNN teacher.",
    ]



def bounds_text(res: dict) -> list[str]:
    """Numbers-only explanation of the bounds (every figure comes from `res`)."""
    c, f = res["coarse"], res["fine"]
    m = {k: v["median"] for k, v in c["timings_ms"].items()}
    fm = {k: v["median"] for k, v in f["timings_ms"].items()}
    r = c["ratios"]
    best = r["teacher_vs_memory_scan"]
    return [
        f"- Coarse, random access: the serving path (fused FAISS gather-dot) takes {m['inner_product_serving']:.3g} ms for "
        f"{c['n_candidates']:,} rows = {m['inner_product_serving'] * 1e6 / c['n_candidates']:.0f} ns per row, against "
        f"{m['inner_product_numpy']:.3g} ms for the previous numpy gather + matvec ({r['fused_speedup_vs_numpy_gather']:.2f}x); "
        f"the copy-gather alone (np.take) takes {m['gather_only']:.3g} ms ({c['gather_gb_per_s']:.2g} GB/s against {c['scan_gb_per_s']:.3g} GB/s for a "
        f"sequential scan): each candidate is a {c['dim'] * 4}-byte row at a random place in a "
        f"{c['corpus_items'] * c['dim'] * 4 / 1e6:.0f} MB table, so the gather is random access (cache and TLB misses "
        f"once the table outgrows the caches) rather than a streaming read. The matvec on the already gathered, contiguous block takes "
        f"{m['inner_product_contiguous']:.3g} ms = {r['contiguous_vs_memory_scan']:.2f}x the scan of the same bytes. "
        f"Sorting the candidate ids before the gather: {m['inner_product_sorted_gather']:.3g} ms "
        f"({r['sorted_gather_vs_memory_scan']:.2f}x the scan).",
        f"- Coarse, teacher: the PFD+MD DNN runs {c['teacher_mlp_gflop']:.3g} GFLOP of matrix products per request "
        f"({c['teacher_gflop_per_s']:.3g} GFLOP/s end to end; the matrix products alone take {m['teacher_gemm_floor']:.4g} ms "
        f"of its {m['teacher_dnn']:.4g} ms). A path exactly as fast as the memory scan of the "
        f"gathered bytes would be {best:.0f}x faster than this teacher here (teacher / memory scan)"
        + (f": the 1000x goal would need the inner product to run {1000 / best:.2g}x faster than a plain scan of "
           "its own input, on this machine with these sizes." if best < 1000 else "."),
        f"- Fine: the CTR ranker's MLP is {f['mlp_gflop'] * 1e3:.3g} MFLOP at {f['n_candidates']} candidates; its matrix "
        f"products alone take {fm['gemm_floor']:.3g} ms in torch ({f['gflop_per_s']['gemm_floor']:.3g} GFLOP/s), eager runs the "
        f"whole model in {fm['torch_eager']:.3g} ms ({f['ratios']['eager_vs_gemm_floor']:.2f}x the floor) and ONNX Runtime in "
        f"{fm['onnxruntime']:.3g} ms ({f['ratios']['ort_vs_gemm_floor']:.2f}x the floor). Eager's overhead over the fp32 "
        "matrix products is the most a graph runtime can remove; a 2.5x gain would need fewer or cheaper FLOPs "
        "(e.g. int8 / fp16 kernels)" + _int8_text(f) + ".",
    ]


def _int8_text(f: dict) -> str:
    q = f.get("variant_parity_max_abs_diff", {}).get("onnxruntime_int8_dynamic")
    t = f["timings_ms"].get("onnxruntime_int8_dynamic")
    if not isinstance(q, float) or t is None:
        return ", which would likely break the 1e-5 parity bound (not measured here)"
    return (f": int8 dynamic quantization runs in {t['median']:.3g} ms "
            f"({f['timings_ms']['torch_eager']['median'] / t['median']:.2f}x eager) but its probabilities differ by "
            f"{q:.2e} from the fp32 model's ({'within' if q <= 1e-5 else 'outside'} the 1e-5 bound), so it is "
            + ("an option" if q <= 1e-5 else "reported as an option, not served"))


def _write_report(out: Path, lines: list[str], res: dict, bounds_heading: str, notes=()) -> Path:
    """lines + the bounds section (and notes) + the model-cost plot -> out/report.md."""
    lines = lines + [bounds_heading, "", *bounds_text(res), *[f"- {n}" for n in notes], "",
                     "![model costs](bench.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report(out: Path, res: dict) -> Path:
    mach, c, f = res["machine"], res["coarse"], res["fine"]
    lines = [
        "# Model-cost benchmark: coarse inner product vs teacher DNN vs memory scan; fine ONNX Runtime vs eager",
        "",
        f"Command: `{res['settings']['command']}`" if res["settings"].get("command") else "",
        "",
        f"Machine: {mach['cpu_model']}, nproc {mach['nproc']} (cpu_count {mach['cpu_count']}), host `{mach['hostname']}`; "
        f"load average (1/5/15 min) at start {mach['loadavg_start']}, at end {mach['loadavg_end']}. "
        f"Python {mach['python']}, numpy {mach['numpy']} (BLAS: {', '.join(mach['blas']) or 'unknown'}), "
        f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}. {mach['platform']}. Transparent huge pages: "
        f"{mach['transparent_hugepages']} (numpy madvise huge pages: {mach['numpy_madvise_hugepage']}).",
        "",
        f"Threads: {res['settings']['threads']}. Each figure is the median over the timed repeats after warm-up "
        f"(repeats: {res['settings']['repeats']}); p10/p90 alongside. Wall time of the whole run: {res['settings']['wall_s']:.1f} s."
        + (" **Quick mode (small sizes): not the standard report.**" if res["settings"]["quick"] else ""),
        "",
        f"Models: coarse — {res['models']['coarse']['source']}; fine — {res['models']['fine']['source']}. "
        f"Vocabulary: {res['models']['vocab_source']} ({res['models']['n_items']:,} items). "
        "The costs measured here do not depend on the weights' values.",
        "",
        "## Targets",
        "",
        E.markdown_table(
            ["target", "goal", "measured", "met", "missed by"],
            [[r["name"], f"{r['op']} {r['goal']:g}", f"{r['measured']:.4g}", "yes" if r["met"] else "**no**",
              "" if r["met"] else f"{r['shortfall_factor']:.3g}x"] for r in res["targets"]],
        ),
        "",
        "`missed by` is the factor between the goal and the measured value (e.g. 2x: the measured speed-up is half the goal).",
        "",
        f"## Coarse: {c['n_candidates']:,} candidates of one request",
        "",
        f"Item vectors: {c['corpus_items']:,} x {c['dim']} {c['dtype']} (the corpus), candidates drawn without replacement in "
        f"random (retrieval-like) order; the gathered block is {c['gathered_bytes'] / 1e6:.1f} MB. "
        "Serving path exactly as `recstack/serving/cascade.py` (`inner_products_by_idx`: FAISS reads each candidate's "
        "row in place and dots it with the user vector, no gathered copy, no BLAS call); the previous serving path "
        "`item_vectors[cands] @ user_vec` beside it. "
        f"Teacher: `coarse_rank.model.DNNTeacher` (PFD+MD, hidden {res['models']['coarse']['teacher_hidden']}, "
        f"{c['teacher_params']:,} parameters incl. the shared embeddings), eval mode, eager, `torch.no_grad()`, all "
        "candidates in one batch; the user's inputs are broadcast (the behaviour sequence is encoded once per request) "
        "and the interacted features are handed in precomputed (the teacher is not charged for computing them).",
        "",
        *_coarse_tables(c),
        "",
        f"## Fine: CTR ranker on {f['n_candidates']} candidates of one request",
        "",
        f"`fine_rank.model.Ranker` (embedding dim {res['models']['fine']['emb_dim']}, hidden {res['models']['fine']['hidden']}) "
        "exported with `recstack.training.onnx.export_onnx` (opset 17) and run with `onnx_session(threads=1)`; eager is "
        "`model(**inputs)` under `torch.no_grad()`. Both are handed the same numpy inputs each call.",
        "",
        E.markdown_table(["runtime", "median ms", "p10 ms", "p90 ms", "repeats"],
                         [[LABELS[k], _fmt_ms(v["median"]), _fmt_ms(v["p10"]), _fmt_ms(v["p90"]), v["repeats"]]
                          for k, v in f["timings_ms"].items()]),
        "",
        f"ONNX Runtime / eager speed-up: {f['ratios']['fine_ort_speedup_vs_eager']:.2f}x; parity (max abs diff of the "
        f"probabilities): {f['parity_max_abs_diff']:.2e}.",
        "",
    ]
    return _write_report(out, lines, res, "## What bounds the measured ratios")


# ------------------------------------------------------------------ teacher for the teacher-as-coarse peer


def load_or_train_teacher(data_dir: str | Path, path: str | Path, *, max_steps: int = 600, eval_max_rows: int = 20_000,
                          seed: int = 0) -> tuple[torch.nn.Module, FE.Vocab, dict]:
    """The PFD+MD teacher (eval mode) of `path` (a torch file written here: config, vocab, student and
    teacher state dicts, metrics), trained first on `data_dir`'s training days if `path` does not
    exist (coarse_rank.train.fit with `max_steps` / `eval_max_rows`; its student is not served).
    Refuses a file whose vocabulary is not `data_dir`'s. -> (teacher, vocab, info)."""
    from recstack.config import from_dict, to_dict
    from coarse_rank.train import Config, build_student, build_teacher, fit

    path = Path(path)
    world_vocab = FE.Vocab.from_dict(json.loads((Path(data_dir) / "world.json").read_text())["vocab"])
    if not path.exists():
        from recstack.data import load

        cfg = Config(teacher="pfd_md", max_steps=max_steps, eval_max_rows=eval_max_rows, seed=seed)
        data = load(data_dir)
        t0 = time.perf_counter()
        fitted = fit(cfg, data, data.train_days, data.test_day, progress=False)
        metrics = {k: v for k, v in fitted.result.items() if isinstance(v, (int, float, str))}
        metrics["wall_seconds"] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": to_dict(cfg), "vocab": data.vocab.to_dict(), "student": fitted.student.state_dict(),
                    "teacher": fitted.teacher.state_dict(), "metrics": metrics}, path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is refused with its reason
        raise ValueError(f"teacher file {path}: cannot read it: {e}") from e
    missing = [k for k in ("config", "vocab", "student", "teacher") if k not in ckpt]
    if missing:
        raise ValueError(f"teacher file {path}: missing {missing}")
    vocab = FE.Vocab.from_dict(ckpt["vocab"])
    if vocab != world_vocab:
        raise ValueError(f"teacher file {path}: its vocabulary is not the one of {data_dir}")
    cfg = from_dict(Config, ckpt["config"])
    if cfg.teacher != "pfd_md":
        raise ValueError(f"teacher file {path}: teacher {cfg.teacher!r}, expected 'pfd_md'")
    student = build_student(cfg, vocab)
    student.load_state_dict(ckpt["student"])
    teacher = build_teacher(cfg, vocab, student)
    teacher.load_state_dict(ckpt["teacher"])
    metrics = ckpt.get("metrics", {})
    return teacher.eval(), vocab, {"path": str(path), "metrics": metrics, "max_steps": cfg.max_steps,
                                   "hidden": list(cfg.teacher_hidden), "manner": cfg.manner}


def export_teacher_onnx(teacher: torch.nn.Module, vocab: FE.Vocab, path: str | Path, seed: int = 0) -> dict:
    """The teacher as a one-request coarse scorer in ONNX (coarse_rank.export.export_teacher),
    checked against PyTorch on a random request of 64 candidates."""
    from coarse_rank.export import export_teacher

    rng = np.random.default_rng(seed)
    n = 64
    inputs = {
        "user_feats": _ids(rng, vocab.user_sizes(), 1),
        "seq_items": _ids(rng, vocab.item_sizes(), SEQ_LEN)[None],
        "seq_extras": rng.standard_normal((1, SEQ_LEN, 3)).astype(np.float32),
        "item_feats": _ids(rng, vocab.item_sizes(), n),
        "item_dense": rng.standard_normal((n, 1)).astype(np.float32),
        "interacted": rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32),
    }
    return export_teacher(teacher, inputs, path)


# ------------------------------------------------------------------ retrieval point, serving-path profile


def bench_retrieval_point(cascade, data_dir: str | Path, n_queries: int = 200, ks: tuple[int, ...] = (1000, 10_000),
                          seed: int = 0) -> dict:
    """The served index (its type and search parameters as loaded by the cascade) against exact
    inner-product search over the bundle's item embeddings, on real test-day queries (the bundle's
    retrieval tower on the requests of `n_queries` users): recall@k and ms per single-query call,
    both single-threaded, in the same run, for each k."""
    import faiss

    from recstack.data import load
    from recstack.evaluation.metrics import recall_vs_exact
    from recstack.evaluation.cascade import requests

    if cascade.item_emb is None:
        raise ValueError("bench retrieval point: the bundle has no retrieval/item_emb.npy (exact search needs it)")
    data = load(data_dir)
    req = requests(data, data.test_day, n_queries, seed)
    q = np.concatenate([cascade.retrieval_tower({"user_feats": req["user_feats"][i:i + 1],
                                                 "seq_items": req["seq_items"][i:i + 1],
                                                 "seq_extras": req["seq_extras"][i:i + 1]})
                        for i in range(len(req["user_id"]))]).astype(np.float32)
    exact = faiss.IndexFlatIP(cascade.item_emb.shape[1])
    exact.add(np.ascontiguousarray(cascade.item_emb, dtype=np.float32))
    faiss.omp_set_num_threads(1)
    out = {"index": type(faiss.downcast_index(cascade.index)).__name__, "search_params": dict(cascade.search_params),
           "n_items": int(cascade.n_items), "dim": int(q.shape[1]), "n_queries": int(len(q)), "points": []}
    for k in ks:
        k = min(k, cascade.n_items)
        t_ann, t_ex, found = [], [], []
        for i in range(len(q)):
            t0 = time.perf_counter()
            _, a = cascade.index.search(q[i:i + 1], k)
            t1 = time.perf_counter()
            exact.search(q[i:i + 1], k)
            t2 = time.perf_counter()
            t_ann.append((t1 - t0) * 1e3)
            t_ex.append((t2 - t1) * 1e3)
            found.append(a[0])
        rec = recall_vs_exact(np.stack(found), q, cascade.item_emb, [k])[k]  # ties with the k-th count
        out["points"].append({
            "k": k, "recall": float(np.mean(rec)), "recall_min": float(np.min(rec)),
            "ann_ms_p50": float(np.median(t_ann)), "ann_ms_p99": float(np.percentile(t_ann, 99)),
            "exact_ms_p50": float(np.median(t_ex)), "exact_ms_p99": float(np.percentile(t_ex, 99)),
            "speedup_p50": float(np.median(t_ex) / np.median(t_ann)),
        })
    del exact
    return out


def _old_first_occurrences(ids: np.ndarray) -> np.ndarray:
    """The previous serving code's deduplication (np.unique + sort of the first indices)."""
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def _response_per_field(r) -> object:
    """The previous serving code's protobuf building: one numpy scalar conversion per field."""
    from recstack.serving.server import pb

    resp = pb.RankResponse(model_version="v", cold_start=r.cold_start)
    for i in range(len(r.item_ids)):
        resp.items.add(item_id=int(r.item_ids[i]), score=float(r.scores[i]), pctr=float(r.pctr[i]),
                       pcvr=float(r.pcvr[i]), price=float(r.price[i]), coarse_score=float(r.coarse_scores[i]),
                       source=r.sources[i])
    return resp


def bench_serving_path(cascade, data_dir: str | Path, n_requests: int = 200, sizes: dict | None = None,
                       seed: int = 0, profile_top: int = 18) -> dict:
    """The serving cascade in process on real test-day users (features from the bundle's store, as
    the server computes them): per-stage ms (p50/p99/mean); a cProfile of the same requests (the
    functions with the most own time, ms per request); and each change made to the hot path
    timed against the code it replaced, on these requests' own candidates, in the same run."""
    import cProfile
    import pstats

    from recstack.data import load
    from recstack.serving.cascade import Query, inner_products_by_idx
    from recstack.serving.server import response_from_ranking
    from recstack.evaluation.cascade import requests

    sizes = sizes or {"retrieval_size": 10_000, "coarse_size": 500, "k": 50}
    data = load(data_dir)
    users = requests(data, data.test_day, n_requests, seed)["user_id"]
    queries = [Query(user_id=int(u), num_results=sizes["k"], retrieval_size=sizes["retrieval_size"],
                     coarse_size=sizes["coarse_size"]) for u in users]
    for q in queries[:10]:  # warm-up
        cascade.rank(q)
    stages: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for q in queries:
        for k, v in cascade.rank(q).timings_ms.items():
            stages.setdefault(k, []).append(v)
    wall_ms = (time.perf_counter() - t0) * 1e3 / len(queries)
    prof = cProfile.Profile()
    prof.enable()
    for q in queries:
        cascade.rank(q)
    prof.disable()
    st = pstats.Stats(prof)
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(fname).name}:{line}({func})" if line else func,
                     "calls_per_request": nc / len(queries), "own_ms_per_request": tt * 1e3 / len(queries),
                     "cum_ms_per_request": ct * 1e3 / len(queries)})
    rows.sort(key=lambda r: -r["own_ms_per_request"])

    # before / after of each hot-path change, on the same requests' candidates
    traces = []
    for q in queries[: min(100, len(queries))]:
        tr: dict = {}
        seq_items, seq_extras, _ = cascade.sequence(q)
        uf = cascade.users.feats(np.array([q.user_id], dtype=np.int64))
        r = cascade.rank_features(q, uf, seq_items, seq_extras, trace=tr)
        uv = cascade.coarse_tower({"user_feats": uf, "seq_items": seq_items, "seq_extras": seq_extras})[0]
        _, ann = cascade.index.search(cascade.retrieval_tower({"user_feats": uf, "seq_items": seq_items,
                                                               "seq_extras": seq_extras}).astype(np.float32),
                                      sizes["retrieval_size"])
        traces.append((tr["retrieved"], uv, ann[0][ann[0] >= 0], r))
    scratch = cascade._scratch.get()

    def each(fn):
        return lambda: [fn(*t) for t in traces]

    n = len(traces)
    pairs = {
        "coarse_scores": (each(lambda c, u, a, r: cascade.item_vectors[c] @ u),
                          each(lambda c, u, a, r: inner_products_by_idx(cascade.item_vectors, c, u))),
        "dedupe_ann": (each(lambda c, u, a, r: _old_first_occurrences(a)),
                       each(lambda c, u, a, r: scratch.first_occurrences(a))),
        "membership": (each(lambda c, u, a, r: np.isin(c[-3000:], c[:7000])),
                       each(lambda c, u, a, r: scratch.member(c[-3000:], c[:7000]))),
        "protobuf_response": (each(lambda c, u, a, r: _response_per_field(r)),
                              each(lambda c, u, a, r: response_from_ranking(r, "v", False))),
    }
    for c, u, a, r in traces:  # the replacements give the same answers
        np.testing.assert_allclose(inner_products_by_idx(cascade.item_vectors, c, u), cascade.item_vectors[c] @ u,
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(scratch.first_occurrences(a), _old_first_occurrences(a))
        np.testing.assert_array_equal(scratch.member(c[-3000:], c[:7000]), np.isin(c[-3000:], c[:7000]))
    changes = {}
    for name, (before, after) in pairs.items():
        tt = time_interleaved({"before": (before, 5), "after": (after, 5)}, warmup=1)
        tb, ta = tt["before"], tt["after"]
        changes[name] = {"before_ms_per_request": tb["median"] / n, "after_ms_per_request": ta["median"] / n,
                         "speedup": tb["median"] / ta["median"]}
    return {
        "n_requests": len(queries), "sizes": sizes, "wall_ms_per_request": wall_ms,
        "stage_ms": {k: {"p50": float(np.median(v)), "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v))}
                     for k, v in stages.items()},
        "profile_top": rows[:profile_top], "profile_total_ms_per_request": sum(r["own_ms_per_request"] for r in rows),
        "changes": changes,
    }


# ------------------------------------------------------------------ everything in one run (`recstack bench all`)

ALL_SCHEMA = "recstack.bench.all/1"
QUICK_LOAD = {"qps": 20.0, "duration": 2.0, "sweep_duration": 1.0, "sweep_steps": 2, "sat_qps": 100.0, "sat_duration": 1.5,
              "peer_qps": 5.0, "peer_sweep_start": 5.0, "peer_sat_qps": 40.0, "timeout": 2.0,
              "warmup_duration": 0.5}


def teacher_onnx_fn(onnx_path: str | Path, vocab: FE.Vocab, n: int, seed: int = 0) -> Callable[[], object]:
    """-> a call of the exported teacher (ONNX Runtime, serving session options, 1 thread) on n
    candidates of one request (interacted features handed in, as for the eager teacher)."""
    from recstack.serving.cascade import onnx_session as serving_session

    rng = np.random.default_rng(seed + 2)
    feeds = {
        "user_feats": _ids(rng, vocab.user_sizes(), 1), "seq_items": _ids(rng, vocab.item_sizes(), SEQ_LEN)[None],
        "seq_extras": rng.standard_normal((1, SEQ_LEN, 3)).astype(np.float32),
        "item_feats": _ids(rng, vocab.item_sizes(), n), "item_dense": rng.standard_normal((n, 1)).astype(np.float32),
        "interacted": rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32),
    }
    sess = serving_session(Path(onnx_path), 1)
    return lambda: sess.run(None, feeds)


def bench_coarse_stage_served(cascade, teacher_cascade, data_dir: str | Path, n_requests: int, sizes: dict,
                              seed: int = 0) -> dict:
    """The coarse stage as served at `sizes` (retrieval_size candidates of real requests): the
    cascade's `score_coarse` (user tower + fused inner product) vs the teacher-as-coarse peer's
    (item features + interacted features + teacher DNN in ONNX Runtime), same candidates."""
    from recstack.data import load
    from recstack.serving.cascade import Query
    from recstack.evaluation.cascade import requests

    data = load(data_dir)
    users = requests(data, data.test_day, n_requests, seed)["user_id"]
    work = []
    for u in users:
        q = Query(user_id=int(u), num_results=sizes["k"], retrieval_size=sizes["retrieval_size"],
                  coarse_size=sizes["coarse_size"])
        seq_items, seq_extras, _ = cascade.sequence(q)
        uf = cascade.users.feats(np.array([q.user_id], dtype=np.int64))
        tr: dict = {}
        cascade.rank_features(q, uf, seq_items, seq_extras, trace=tr)
        work.append(({"user_feats": uf, "seq_items": seq_items, "seq_extras": seq_extras}, tr["retrieved"]))
    out = {}
    for name, c in (("inner_product", cascade), ("teacher_dnn", teacher_cascade)):
        xs = []
        c.score_coarse(*work[0])
        for tin, cands in work:
            t0 = time.perf_counter()
            c.score_coarse(tin, cands)
            xs.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"p50": float(np.median(xs)), "p99": float(np.percentile(xs, 99)), "mean": float(np.mean(xs))}
    out["speedup_p50"] = out["teacher_dnn"]["p50"] / out["inner_product"]["p50"]
    out["n_requests"] = len(work)
    out["candidates_mean"] = float(np.mean([len(c) for _, c in work]))
    return out


def run_all(out_dir: str | Path, *, data_dir: str | Path, artifacts: str | Path, scratch: str | Path,
            teacher: str | Path | None = None, teacher_steps: int = 600, runs: str | Path | None = None,
            n_candidates: int = 100_000, fine_candidates: int = 500, repeats: int | None = None,
            retrieval_queries: int = 200, serving_requests: int = 200, gmv_users: int = 100,
            configs: str | None = None, load: dict | None = None, quick: bool = False, seed: int = 0,
            command: str | None = None, notes: list[str] | None = None) -> dict:
    """Every section of the benchmark in one run, written to `out_dir` (report.md, results.json,
    bench.png and the end-to-end PNGs):

    - models: coarse inner product (served fused path, and the previous numpy path) vs the PFD+MD
      teacher DNN (torch eager and ONNX Runtime) vs a memory scan, 1e5 candidates; fine ONNX Runtime
      vs eager + parity, 500 candidates (plus ONNX Runtime options and int8 with their parity);
    - retrieval: recall@1000 / @10,000 and latency of the bundle's index vs exact search;
    - serving path in process: per-stage ms, a cProfile, each hot-path change against the code it
      replaced; the coarse stage as served, inner product vs teacher;
    - end to end through gRPC (`recstack.bench.e2e`): the cascade and its peers (single stage,
      teacher as coarse) with throughput ratios, and GMV@50 against the world's truth.

    `teacher`: the teacher file (load_or_train_teacher; trained with `teacher_steps` when missing,
    default `scratch`/teacher.pt). `quick`: small sizes and seconds-long load runs (tests, not a report).
    """
    from recstack.bench import e2e as E2E
    from recstack.serving.cascade import Cascade

    if quick:
        n_candidates = min(n_candidates, 5_000)
        retrieval_queries, serving_requests, gmv_users = min(retrieval_queries, 10), min(serving_requests, 10), min(gmv_users, 8)
    reps = dict(QUICK_REPEATS if quick else DEFAULT_REPEATS)
    if repeats is not None:
        reps = {k: repeats for k in reps}
    out, scratch = Path(out_dir), Path(scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = _loadavg()
    res: dict = {"schema": ALL_SCHEMA, "machine": machine}

    with ExitStack() as stack:
        threads = _single_threaded(stack)
        vocab, vocab_source = _vocab(data_dir)
        tfile = Path(teacher) if teacher else scratch / "teacher.pt"
        trained_here = not tfile.exists()
        tmodel, tvocab, tinfo = load_or_train_teacher(data_dir, tfile, max_steps=teacher_steps, seed=seed)
        tinfo["trained_in_this_run"] = trained_here
        tonnx = export_teacher_onnx(tmodel, tvocab, scratch / "teacher.onnx", seed)
        tinfo["onnx"] = tonnx
        student, _, cinfo = coarse_models(vocab, runs, seed)
        coarse = bench_coarse(student, tmodel, vocab, n_candidates, reps, seed, extra=lambda n, _c: {
            "teacher_dnn_onnxruntime": (teacher_onnx_fn(tonnx["path"], vocab, n, seed), reps["teacher"])})
        coarse["ratios"]["coarse_speedup_vs_teacher_onnxruntime"] = (
            coarse["timings_ms"]["teacher_dnn_onnxruntime"]["median"] / coarse["timings_ms"]["inner_product_serving"]["median"])
        del student, tmodel
        fmodel, finfo = fine_model(vocab, runs, seed)
        fine = bench_fine(fmodel, finfo["vocab"], fine_candidates, reps, seed)
        del fmodel

    res["models"] = {"vocab_source": vocab_source, "n_items": vocab.n_items,
                     "coarse": {"source": cinfo["source"] + "; the teacher timed is the trained PFD+MD teacher below",
                                "teacher": "pfd_md", "teacher_hidden": tinfo["hidden"], "manner": tinfo["manner"]},
                     "fine": {"source": finfo["source"], "task": "ctr", "hidden": finfo["hidden"], "emb_dim": finfo["emb_dim"]},
                     "teacher": tinfo}
    res["coarse"], res["fine"] = coarse, fine
    E.write_results(out, {**res, "partial": True})

    cascade = Cascade.load(artifacts)
    tcascade = E2E.TeacherCoarseCascade.load(artifacts, teacher_onnx=tonnx["path"], warm=False)
    sizes = dict(E2E.CASCADE)
    with ExitStack() as stack:  # one BLAS thread, as `recstack serve` runs (the "before" numpy path uses BLAS)
        _single_threaded(stack)
        res["retrieval"] = bench_retrieval_point(cascade, data_dir, retrieval_queries, seed=seed)
        res["serving"] = bench_serving_path(cascade, data_dir, serving_requests, sizes, seed)
        res["coarse_stage_served"] = bench_coarse_stage_served(cascade, tcascade, data_dir, min(serving_requests, 50),
                                                               sizes, seed)
    del tcascade
    E.write_results(out, {**res, "partial": True})

    load = {**(QUICK_LOAD if quick else {}), **(load or {})}
    res["e2e"] = E2E.run_e2e(str(artifacts), str(data_dir), scratch=scratch / "load", plots=out,
                             configs=configs or E2E.DEFAULT_CONFIGS, teacher_onnx=tonnx["path"], gmv_users=gmv_users,
                             load=load, cascade=cascade)
    del cascade

    machine["loadavg_end"] = _loadavg()
    measured = {**coarse["ratios"], **fine["ratios"], "fine_parity_max_abs_diff": fine["parity_max_abs_diff"]}
    res["targets"] = check_targets(measured)
    res["settings"] = {"quick": quick, "n_candidates": n_candidates, "fine_candidates": fine_candidates, "repeats": reps,
                       "threads": threads, "seed": seed, "data_dir": str(data_dir), "artifacts": str(artifacts),
                       "runs": str(runs) if runs else None, "retrieval_queries": retrieval_queries,
                       "serving_requests": serving_requests, "gmv_users": gmv_users, "command": command,
                       "wall_s": time.perf_counter() - t_start}
    res["notes"] = list(notes or [])
    E.write_results(out, res)
    plot(out / "bench.png", res)
    write_report_all(out, res)
    return res


def render_all(out_dir: str | Path, notes: list[str] | None = None) -> Path:
    """Re-write report.md (and bench.png) from out_dir/results.json, with `notes` (when given)
    replacing the notes: the interpretation of a finished run, without re-measuring it."""
    out = Path(out_dir)
    res = json.loads((out / "results.json").read_text())
    if res.get("schema") != ALL_SCHEMA:
        raise ValueError(f"{out / 'results.json'}: schema {res.get('schema')!r}, expected {ALL_SCHEMA!r}")
    if notes is not None:
        res["notes"] = list(notes)
        E.write_results(out, res)
    plot(out / "bench.png", res)
    return write_report_all(out, res)


def _ms(x) -> str:
    return "n/a" if x is None else _fmt_ms(x)


def write_report_all(out: Path, res: dict) -> Path:
    from recstack.bench import e2e as E2E

    mach, c, f, s, rv, cs = res["machine"], res["coarse"], res["fine"], res["serving"], res["retrieval"], res["coarse_stage_served"]
    e2e, st = res["e2e"], res["settings"]
    t = res["models"]["teacher"]
    tm = t.get("metrics", {})
    all_targets = [[r["name"], f"{r['op']} {r['goal']:g}", f"{r['measured']:.4g}", "yes" if r["met"] else "**no**",
                    "" if r["met"] else f"{r['shortfall_factor']:.3g}x"] for r in res["targets"]]
    all_targets += [[r["target"], "", r["measured"], "" if r.get("met") is None else ("yes" if r["met"] else "**no**"),
                     "" if r.get("met") in (None, True) else r["verdict"]] for r in e2e["targets"]]
    ch = s["changes"]
    lines = [
        "# recstack bench: coarse, fine, retrieval, serving path and end to end, in one run",
        "",
        f"Command: `{st['command']}`" if st.get("command") else "",
        "",
        f"Machine: {mach['cpu_model']}, nproc {mach['nproc']} (cpu_count {mach['cpu_count']}), host `{mach['hostname']}`; "
        f"load average (1/5/15 min) at start {mach['loadavg_start']}, at end {mach['loadavg_end']} (the machine is shared: "
        "compare ratios measured in this run). "
        f"Python {mach['python']}, numpy {mach['numpy']} (BLAS: {', '.join(mach['blas']) or 'unknown'}), "
        f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}. {mach['platform']}. Transparent huge pages: "
        f"{mach['transparent_hugepages']} (numpy madvise huge pages: {mach['numpy_madvise_hugepage']}).",
        "",
        f"Threads: {st['threads']}; FAISS 1 OpenMP thread. Model figures are medians over the repeats after warm-up "
        f"(repeats: {st['repeats']}), the paths of one table timed round-robin (one call of each per round) so that "
        f"the machine's load changes hit them alike. Wall time of the whole run: {st['wall_s'] / 60:.1f} min."
        + (" **Quick mode (small sizes, seconds-long load runs): not the standard report.**" if st["quick"] else ""),
        "",
        f"Bundle: `{st['artifacts']}` on `{st['data_dir']}` ({res['models']['n_items']:,} items). Teacher (PFD+MD, "
        f"hidden {t['hidden']}, {t['manner']}): `{t['path']}`, {t['max_steps']} training steps"
        + (f", test-day AUC {tm['teacher_auc']:.4f}" if "teacher_auc" in tm else "")
        + (" (trained in this run)" if t.get("trained_in_this_run") else "")
        + f"; exported to ONNX with parity {t['onnx']['parity_max_abs_diff']:.2e} on its logits.",
        "",
        "## Targets",
        "",
        E.markdown_table(["target", "goal", "measured", "met", "missed by"], all_targets),
        "",
        "## Serving path: what was changed and what each change bought (item 3)",
        "",
        f"Measured in process on the bundle, {s['n_requests']} test-day users, {s['sizes']['retrieval_size']:,} -> "
        f"{s['sizes']['coarse_size']} -> {s['sizes']['k']}; each change timed against the code it replaced on the same "
        "requests' own candidates, in this run, with equal answers asserted:",
        "",
        E.markdown_table(["change", "before ms / request", "after ms / request", "speed-up"], [
            ["coarse: `item_vectors[cands] @ user_vec` (numpy gather copy + BLAS matvec) -> FAISS "
             "`fvec_inner_products_by_idx` (fused, rows read in place, no BLAS thread pool)",
             _ms(ch["coarse_scores"]["before_ms_per_request"]), _ms(ch["coarse_scores"]["after_ms_per_request"]),
             f"{ch['coarse_scores']['speedup']:.2f}x"],
            ["retrieval: ANN dedupe `np.unique` + sort -> per-thread position scratch (`np.minimum.at`)",
             _ms(ch["dedupe_ann"]["before_ms_per_request"]), _ms(ch["dedupe_ann"]["after_ms_per_request"]),
             f"{ch['dedupe_ann']['speedup']:.2f}x"],
            ["retrieval: quota merge `np.isin` -> per-thread stamp scratch (3,000 in 7,000)",
             _ms(ch["membership"]["before_ms_per_request"]), _ms(ch["membership"]["after_ms_per_request"]),
             f"{ch['membership']['speedup']:.2f}x"],
            ["response: protobuf items from numpy scalars per field -> one `tolist()` per column",
             _ms(ch["protobuf_response"]["before_ms_per_request"]), _ms(ch["protobuf_response"]["after_ms_per_request"]),
             f"{ch['protobuf_response']['speedup']:.2f}x"],
        ]),
        "",
        f"Per-stage time of the served cascade after the changes ({s['n_requests']} requests, one at a time; "
        f"{s['wall_ms_per_request']:.1f} ms wall per request):",
        "",
        E.markdown_table(["stage", "p50 ms", "p99 ms", "mean ms"],
                         [[k.replace("_ms", ""), _ms(v["p50"]), _ms(v["p99"]), _ms(v["mean"])] for k, v in s["stage_ms"].items()]),
        "",
        "Profile (cProfile over the same requests; the functions with the most own time, ms per request):",
        "",
        E.markdown_table(["function", "calls / request", "own ms", "cumulative ms"],
                         [[f"`{r['function']}`", f"{r['calls_per_request']:.1f}", f"{r['own_ms_per_request']:.3f}",
                           f"{r['cum_ms_per_request']:.3f}"] for r in s["profile_top"]]),
        "",
        f"Coarse stage as served ({cs['n_requests']} requests, {cs['candidates_mean']:,.0f} candidates on average): "
        f"inner product (user tower + fused product) p50 {_ms(cs['inner_product']['p50'])} ms / p99 "
        f"{_ms(cs['inner_product']['p99'])} ms; teacher DNN as coarse (item + interacted features, ONNX Runtime) p50 "
        f"{_ms(cs['teacher_dnn']['p50'])} ms / p99 {_ms(cs['teacher_dnn']['p99'])} ms: {cs['speedup_p50']:.0f}x.",
        "",
        f"## Coarse: {c['n_candidates']:,} candidates of one request",
        "",
        f"Item vectors: {c['corpus_items']:,} x {c['dim']} {c['dtype']}, candidates drawn without replacement in random "
        f"(retrieval-like) order; the gathered block is {c['gathered_bytes'] / 1e6:.1f} MB. The serving path is "
        "`recstack.serving.cascade.inner_products_by_idx`; the previous one (`item_vectors[cands] @ user_vec`) beside it. "
        "Teacher: the trained PFD+MD `DNNTeacher`, all candidates in one batch, the user's inputs broadcast (the "
        "behaviour sequence encoded once) and the interacted features handed in precomputed; in torch eager "
        "(`torch.no_grad()`) and exported to ONNX Runtime (serving session options).",
        "",
        *_coarse_tables(c),
        "",
        f"## Fine: CTR ranker on {f['n_candidates']} candidates of one request",
        "",
        f"`fine_rank.model.Ranker` (embedding dim {res['models']['fine']['emb_dim']}, hidden {res['models']['fine']['hidden']}), "
        f"{res['models']['fine']['source']}; exported with `recstack.training.onnx.export_onnx` (opset 17); eager is "
        "`model(**inputs)` under `torch.no_grad()`; same numpy inputs each call.",
        "",
        E.markdown_table(["runtime", "median ms", "p10 ms", "p90 ms", "parity (max abs diff)"],
                         [[LABELS.get(k, k), _fmt_ms(v["median"]), _fmt_ms(v["p10"]), _fmt_ms(v["p90"]),
                           (f"{f['parity_max_abs_diff']:.2e}" if k == "onnxruntime" else
                            f"{f['variant_parity_max_abs_diff'][k]:.2e}" if isinstance(
                                f["variant_parity_max_abs_diff"].get(k), float) else "")]
                          for k, v in f["timings_ms"].items()]),
        "",
        f"ONNX Runtime / eager: {f['ratios']['fine_ort_speedup_vs_eager']:.2f}x; parity {f['parity_max_abs_diff']:.2e}."
        + "".join(f" {k}: {v}." for k, v in f["variant_parity_max_abs_diff"].items() if isinstance(v, str)),
        "",
        "## Retrieval: the serving default's recall / latency point",
        "",
        f"The bundle's index ({rv['index']}, {rv['search_params'] or 'no search parameters'}) over {rv['n_items']:,} "
        f"items (dim {rv['dim']}) against exact inner-product search (IndexFlatIP) on the same item embeddings; "
        f"{rv['n_queries']} real test-day queries (the bundle's retrieval tower), one query per call, 1 thread, same run.",
        "",
        E.markdown_table(["k", "recall@k (mean)", "min", "ANN p50 / p99 ms", "exact p50 / p99 ms", "speed-up (p50)"],
                         [[f"{p['k']:,}", f"{p['recall']:.4f}", f"{p['recall_min']:.3f}",
                           f"{_ms(p['ann_ms_p50'])} / {_ms(p['ann_ms_p99'])}",
                           f"{_ms(p['exact_ms_p50'])} / {_ms(p['exact_ms_p99'])}", f"{p['speedup_p50']:.1f}x"]
                          for p in rv["points"]]),
        "",
        *E2E.report_lines(e2e),
        "",
        "Plots: `bench.png` (model costs), `<config>_fixed.png` and `<config>_sweep.png` (latency over time at the "
        "fixed QPS; the sweep).",
        "",
    ]
    return _write_report(out, lines, res, "## What bounds the measured figures", res.get("notes", []))


# ------------------------------------------------------------------ entry point


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
    reps = dict(QUICK_REPEATS if quick else DEFAULT_REPEATS)
    if repeats is not None:
        reps = {k: repeats for k in reps}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine = machine_info()
    machine["loadavg_start"] = _loadavg()

    with ExitStack() as stack:
        threads = _single_threaded(stack)
        vocab, vocab_source = _vocab(data_dir)
        student, teacher, cinfo = coarse_models(vocab, runs, seed)
        coarse = bench_coarse(student, teacher, cinfo["vocab"], n_candidates, reps, seed)
        del student, teacher
        fmodel, finfo = fine_model(vocab, runs, seed)
        fine = bench_fine(fmodel, finfo["vocab"], fine_candidates, reps, seed)
    if cinfo["vocab"] != vocab:  # a checkpoint's own vocabulary sized the models
        vocab_source = "the coarse checkpoint's vocabulary"

    machine["loadavg_end"] = _loadavg()
    measured = {**coarse["ratios"], **fine["ratios"], "fine_parity_max_abs_diff": fine["parity_max_abs_diff"]}
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
        "targets": check_targets(measured),
    }
    E.write_results(out, res)
    plot(out / "bench.png", res)
    write_report(out, res)
    return res


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="coarse / fine model-cost benchmark (recstack bench models)")
    ap.add_argument("--out", default="docs/results/bench")
    ap.add_argument("--data", default=None, help="world dir whose vocabulary sizes the models (default: `small` sizes)")
    ap.add_argument("--runs", default=None, help="runs dir with coarse/ and fine/checkpoint.pt (default: fresh models)")
    ap.add_argument("--candidates", type=int, default=100_000)
    ap.add_argument("--fine-candidates", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.out, data_dir=args.data, runs=args.runs, n_candidates=args.candidates,
              fine_candidates=args.fine_candidates, repeats=args.repeats, quick=args.quick,
              command=" ".join(["python -m recstack.bench.suite", *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps({"targets": res["targets"], "machine": {k: res["machine"][k] for k in
                                                             ("cpu_model", "nproc", "loadavg_start", "loadavg_end")}},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
