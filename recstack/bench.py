"""Model-cost benchmarks of the cascade, measured in one run (issue 7, `recstack bench models`).

    from recstack.bench import run
    res = run("docs/results/bench", data_dir="/tmp/lead/large", runs="runs")

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

from recstack import experiment as E
from recstack import features as F

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


def _vocab(data_dir: str | Path | None) -> tuple[F.Vocab, str]:
    if data_dir is not None:
        world = json.loads((Path(data_dir) / "world.json").read_text())
        return F.Vocab.from_dict(world["vocab"]), f"vocab of {Path(data_dir).resolve()}"
    from recstack.world.config import preset

    w = preset("small")
    vocab = F.Vocab(n_users=w.n_users, n_items=w.n_items, n_categories=w.n_categories, n_shops=w.n_shops,
                    n_brands=w.n_brands, n_price_buckets=w.n_price_buckets, n_age_buckets=w.n_age_buckets,
                    n_genders=w.n_genders, n_activity_levels=w.n_activity_levels, log_price_mean=0.0, log_price_std=1.0)
    return vocab, "`small` preset sizes"


def coarse_models(vocab: F.Vocab, runs: str | Path | None, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
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
        from recstack import checkpoint

        ckpt = checkpoint.load(ckpt_path, stage="coarse")
        cfg = from_dict(Config, ckpt["config"])
        vocab = F.Vocab.from_dict(ckpt["vocab"])
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


def fine_model(vocab: F.Vocab, runs: str | Path | None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """-> (CTR Ranker in eval mode, provenance)."""
    from fine_rank.model import Ranker
    from fine_rank.train import Config

    ckpt_path = Path(runs) / "fine" / "checkpoint.pt" if runs is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        from recstack import checkpoint
        from fine_rank.export import load_models

        cfg, models = load_models(checkpoint.load(ckpt_path, stage="fine"))
        return models["ctr"].eval(), {"source": f"checkpoint {ckpt_path.resolve()} (CTR model)",
                                      "hidden": list(cfg.ctr_hidden), "emb_dim": cfg.ctr_emb_dim,
                                      "vocab": F.Vocab.from_dict(checkpoint.load(ckpt_path)["vocab"])}
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


def bench_coarse(student, teacher, vocab: F.Vocab, n_candidates: int, repeats: dict, seed: int = 0) -> dict:
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

    t = {}
    t["inner_product_serving"] = time_ms(lambda: item_vectors[cands] @ user_vec, repeats["fast"])
    t["inner_product_sorted_gather"] = time_ms(lambda: item_vectors[np.sort(cands)] @ user_vec, repeats["fast"])
    t["inner_product_contiguous"] = time_ms(lambda: block @ user_vec, repeats["fast"])
    t["gather_only"] = time_ms(lambda: np.take(item_vectors, cands, axis=0, out=buf), repeats["fast"])
    t["memory_scan_sum"] = time_ms(lambda: block.sum(), repeats["fast"])
    t["memory_copy"] = time_ms(lambda: np.copyto(buf, block), repeats["fast"])

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
        "interacted": torch.from_numpy(rng.random((n_candidates, len(F.INTERACTED_FIELDS))).astype(np.float32)),
    }

    def run_teacher():
        with torch.no_grad():
            return teacher(**inputs)

    out = run_teacher()
    if out.shape != (n_candidates,) or not torch.isfinite(out).all():
        raise RuntimeError(f"teacher output {tuple(out.shape)} is not {n_candidates} finite logits")
    t["teacher_dnn"] = time_ms(run_teacher, repeats["teacher"], warmup=1)
    floor_fn, teacher_flops = gemm_floor(_linears(teacher.mlp), n_candidates, seed)
    t["teacher_gemm_floor"] = time_ms(floor_fn, repeats["teacher"], warmup=1)

    m = {k: v["median"] for k, v in t.items()}
    ratios = {
        "coarse_speedup_vs_teacher": m["teacher_dnn"] / m["inner_product_serving"],
        "coarse_contiguous_speedup_vs_teacher": m["teacher_dnn"] / m["inner_product_contiguous"],
        "coarse_vs_memory_scan": m["inner_product_serving"] / m["memory_scan_sum"],
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


def bench_fine(model, vocab: F.Vocab, n: int, repeats: dict, seed: int = 0) -> dict:
    from recstack.onnx_export import export_onnx, onnx_session

    rng = np.random.default_rng(seed + 1)
    inputs = {
        "user_feats": np.repeat(_ids(rng, vocab.user_sizes(), 1), n, axis=0),  # one request, as the cascade
        "item_feats": _ids(rng, vocab.item_sizes(), n),
        "item_dense": rng.standard_normal((n, 1)).astype(np.float32),
        "interacted": rng.random((n, len(F.INTERACTED_FIELDS))).astype(np.float32),
    }
    with tempfile.TemporaryDirectory(prefix="recstack-bench-") as tmp:
        path = export_onnx(model, inputs, Path(tmp) / "ctr.onnx", ["prob"])
        session = onnx_session(path, threads=1)
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
    t = {"torch_eager": time_ms(eager, repeats["fine"], warmup=5), "onnxruntime": time_ms(ort, repeats["fine"], warmup=5)}
    floor_fn, flops = gemm_floor(_linears(model), n, seed)
    t["gemm_floor"] = time_ms(floor_fn, repeats["fine"], warmup=5)
    return {
        "n_candidates": n, "parity_max_abs_diff": parity, "mlp_gflop": flops / 1e9,
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
    "inner_product_serving": "coarse: inner product, serving path (gather + matvec)",
    "inner_product_sorted_gather": "coarse: inner product, candidate ids sorted first (sort + gather + matvec)",
    "inner_product_contiguous": "coarse: inner product, contiguous block (matvec only)",
    "gather_only": "coarse: gather only (np.take into a buffer)",
    "memory_scan_sum": "memory scan of the same bytes (np.sum)",
    "memory_copy": "memory copy of the same bytes (np.copyto)",
    "teacher_dnn": "coarse: PFD+MD teacher DNN (torch eager)",
    "teacher_gemm_floor": "coarse: teacher's matrix products alone (floor)",
    "gemm_floor": "fine: CTR ranker's matrix products alone (floor)",
    "torch_eager": "fine: CTR ranker, PyTorch eager",
    "onnxruntime": "fine: CTR ranker, ONNX Runtime",
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


def bounds_text(res: dict) -> list[str]:
    """Numbers-only explanation of the bounds (every figure comes from `res`)."""
    c, f = res["coarse"], res["fine"]
    m = {k: v["median"] for k, v in c["timings_ms"].items()}
    fm = {k: v["median"] for k, v in f["timings_ms"].items()}
    r = c["ratios"]
    best = r["teacher_vs_memory_scan"]
    return [
        f"- Coarse, gather: of the serving path's {m['inner_product_serving']:.3g} ms, gathering the candidates' rows "
        f"alone takes {m['gather_only']:.3g} ms ({c['gather_gb_per_s']:.2g} GB/s against {c['scan_gb_per_s']:.3g} GB/s for a "
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
        "(e.g. int8 / fp16 kernels), which would likely break the 1e-5 parity bound (not measured here).",
    ]


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
        "Serving path exactly as `recstack/serving/cascade.py`: `item_vectors[cands] @ user_vec`. "
        f"Teacher: `coarse_rank.model.DNNTeacher` (PFD+MD, hidden {res['models']['coarse']['teacher_hidden']}, "
        f"{c['teacher_params']:,} parameters incl. the shared embeddings), eval mode, eager, `torch.no_grad()`, all "
        "candidates in one batch; the user's inputs are broadcast (the behaviour sequence is encoded once per request) "
        "and the interacted features are handed in precomputed (the teacher is not charged for computing them).",
        "",
        E.markdown_table(["path", "median ms", "p10 ms", "p90 ms", "repeats"],
                         [[LABELS[k], _fmt_ms(v["median"]), _fmt_ms(v["p10"]), _fmt_ms(v["p90"]), v["repeats"]]
                          for k, v in c["timings_ms"].items()]),
        "",
        E.markdown_table(["ratio", "value"], [[k, f"{v:.3g}"] for k, v in c["ratios"].items()]),
        "",
        f"Memory scan bandwidth (np.sum, 1 thread): {c['scan_gb_per_s']:.1f} GB/s. The PFD paper reports the inner "
        "product ~830x faster than its DNN teacher.",
        "",
        f"## Fine: CTR ranker on {f['n_candidates']} candidates of one request",
        "",
        f"`fine_rank.model.Ranker` (embedding dim {res['models']['fine']['emb_dim']}, hidden {res['models']['fine']['hidden']}) "
        "exported with `recstack.onnx_export.export_onnx` (opset 17) and run with `onnx_session(threads=1)`; eager is "
        "`model(**inputs)` under `torch.no_grad()`. Both are handed the same numpy inputs each call.",
        "",
        E.markdown_table(["runtime", "median ms", "p10 ms", "p90 ms", "repeats"],
                         [[LABELS[k], _fmt_ms(v["median"]), _fmt_ms(v["p10"]), _fmt_ms(v["p90"]), v["repeats"]]
                          for k, v in f["timings_ms"].items()]),
        "",
        f"ONNX Runtime / eager speed-up: {f['ratios']['fine_ort_speedup_vs_eager']:.2f}x; parity (max abs diff of the "
        f"probabilities): {f['parity_max_abs_diff']:.2e}.",
        "",
        "## What bounds the measured ratios",
        "",
        *bounds_text(res),
        "",
        "![model costs](bench.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


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
              command=" ".join(["python -m recstack.bench", *(argv if argv is not None else sys.argv[1:])]))
    print(json.dumps({"targets": res["targets"], "machine": {k: res["machine"][k] for k in
                                                             ("cpu_model", "nproc", "loadavg_start", "loadavg_end")}},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
