"""What quantisation and the merged fine graph buy (`python -m recstack.bench.quant`), in one run:

- coarse: one request's candidates scored against item vectors of the corpus size, float32
  (the FAISS fused gather-dot) vs int8 with per-row scales (recstack.quant's fused kernel) vs
  the numpy alternatives (fp16 or int8 gather, convert, matvec), against a memory scan of the
  float32 bytes; and the int8 ranking's top-500 overlap with float32's;
- fine: CTR + CVR on one request's candidates: torch eager, two ONNX sessions (the older
  layout), one merged graph, and its int8 copy, beside the matrix products alone (the floor);
- serving: the cascade on a bundle, per request: CPU time (process time, all threads) and
  wall time per stage, each configuration on the same requests in turn, plus a cProfile.

Single-threaded (torch, BLAS, ONNX Runtime, FAISS). The machine may be shared: compare the
ratios of one run (the paths of a table are timed round-robin), not figures across runs.
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from recstack.bench.models import gemm_floor, linears, request_inputs
from recstack.bench.timing import loadavg, machine_info, single_threaded, time_interleaved
from recstack.quant import (int8_inner_products_by_idx, quantise_rows, shortlist_size, shortlist_top, top_positions,
                            topk_overlap)

COARSE_TARGET = 2.5  # int8 fused gather-dot <= 2.5x a scan of the float32 bytes
FINE_TARGET = 2.0  # served fine ranking >= 2x torch eager (at equal quality: the export's checks)
FLOOR_TARGET = 1.1  # float32 ONNX Runtime within 1.1x of its matrix products alone


def _unit_rows(rng: np.random.Generator, n: int, d: int, scale: float, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        v = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        out[s : s + len(v)] = v * (np.float32(scale) / np.linalg.norm(v, axis=1, keepdims=True))
    return out


def _served_cut(vecs, codes, scales, cands, q, keep: int):
    """The coarse cut as served with int8 codes (recstack.serving.coarse.CoarseVectors.top)."""
    from recstack.serving.coarse import inner_products_by_idx

    return shortlist_top(int8_inner_products_by_idx(codes, scales, cands, q), keep, shortlist_size(keep, len(cands)),
                         lambda p: inner_products_by_idx(vecs, cands[p], q))


def bench_coarse(n_items: int = 1_000_000, n_candidates: int = 100_000, dim: int = 128, repeats: int = 30,
                 parity_requests: int = 1000, parity_candidates: int = 10_000, scale: float = 5.0, seed: int = 0,
                 keep: int = 500) -> dict:
    """Random unit item vectors times `scale` (the served vectors' form); candidates drawn without
    replacement in random order (retrieval's order); `keep`: the coarse cut."""
    from recstack.serving.coarse import inner_products_by_idx

    rng = np.random.default_rng(seed)
    vecs = _unit_rows(rng, n_items, dim, scale)
    codes, scales = quantise_rows(vecs)
    half = vecs.astype(np.float16)
    cands = rng.choice(n_items, size=n_candidates, replace=False).astype(np.int64)
    q = rng.standard_normal(dim).astype(np.float32)
    q /= np.linalg.norm(q)
    block = np.ascontiguousarray(vecs[cands])  # the float32 bytes a request reads
    buf16, buf8 = np.empty((n_candidates, dim), np.float16), np.empty((n_candidates, dim), np.int8)
    fns = {
        "fp32_fused_faiss": (lambda: inner_products_by_idx(vecs, cands, q), repeats),
        "int8_fused": (lambda: int8_inner_products_by_idx(codes, scales, cands, q), repeats),
        "int8_shortlist_fp32_rescore": (lambda: _served_cut(vecs, codes, scales, cands, q, keep), repeats),
        "fp16_numpy_gather_matvec": (lambda: np.take(half, cands, axis=0, out=buf16).astype(np.float32) @ q, repeats),
        "int8_numpy_gather_matvec": (lambda: (np.take(codes, cands, axis=0, out=buf8).astype(np.float32) @ q)
                                     * scales[cands], repeats),
        "memory_scan_fp32_bytes": (lambda: block.sum(), repeats),
    }
    t = time_interleaved(fns, warmup=2)
    m = {k: v["median"] for k, v in t.items()}
    overlaps, served = [], []
    for _ in range(parity_requests):
        c = rng.choice(n_items, size=min(parity_candidates, n_items), replace=False).astype(np.int64)
        u = rng.standard_normal(dim).astype(np.float32)
        u /= np.linalg.norm(u)
        ref = vecs[c] @ u
        overlaps.append(topk_overlap(ref, int8_inner_products_by_idx(codes, scales, c, u), keep))
        served.append(len(np.intersect1d(top_positions(ref, keep), _served_cut(vecs, codes, scales, c, u, keep)[0])) / keep)
    return {
        "n_items": n_items, "n_candidates": n_candidates, "dim": dim, "timings_ms": t,
        "bytes": {"fp32": int(vecs.nbytes), "int8_with_scales": int(codes.nbytes + scales.nbytes), "fp16": int(half.nbytes)},
        "ratios": {"int8_fused_vs_fp32_scan": m["int8_fused"] / m["memory_scan_fp32_bytes"],
                   "int8_shortlist_fp32_rescore_vs_fp32_scan": m["int8_shortlist_fp32_rescore"] / m["memory_scan_fp32_bytes"],
                   "fp32_fused_vs_fp32_scan": m["fp32_fused_faiss"] / m["memory_scan_fp32_bytes"],
                   "int8_fused_speedup_vs_fp32_fused": m["fp32_fused_faiss"] / m["int8_fused"]},
        "parity_top500": {"requests": parity_requests, "candidates": min(parity_candidates, n_items),
                          "mean": float(np.mean(overlaps)), "min": float(np.min(overlaps)),
                          "served_mean": float(np.mean(served)), "served_min": float(np.min(served))},
    }


def _fine_sessions(models: dict, inputs: dict, tmp: Path) -> dict:
    """name -> callable: the fine paths on the same inputs (serving session options)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from fine_rank.export import _Both
    from fine_rank.inputs import SEQUENCE_INPUTS, input_names
    from recstack.serving.loading import onnx_session
    from recstack.training.onnx import export_onnx

    axes = {k: "sequences" for k in SEQUENCE_INPUTS}  # one request's sequence beside its candidates
    sess, own = {}, {}
    for task in ("ctr", "cvr"):
        own[task] = {k: inputs[k] for k in input_names(models[task])}
        sess[task] = onnx_session(export_onnx(models[task], own[task], tmp / f"{task}.onnx", ["prob"], axes=axes), 1)
    merged = export_onnx(_Both(models["ctr"], models["cvr"]), inputs, tmp / "ranker.onnx", ["pctr", "pcvr"], axes=axes)
    quantize_dynamic(str(merged), str(tmp / "ranker_int8.onnx"), weight_type=QuantType.QInt8, per_channel=False)
    sess["merged"], sess["int8"] = onnx_session(merged, 1), onnx_session(tmp / "ranker_int8.onnx", 1)
    for m in models.values():
        m.eval()  # the exporter leaves its wrapper's (train) mode behind

    def eager():
        with torch.no_grad():
            x = {k: torch.from_numpy(v) for k, v in inputs.items()}
            return models["ctr"](**x).numpy(), models["cvr"](**x).numpy()

    return {
        "torch_eager": eager,
        "onnxruntime_two_sessions": lambda: (sess["ctr"].run(None, own["ctr"])[0], sess["cvr"].run(None, own["cvr"])[0]),
        "onnxruntime_merged_fp32": lambda: tuple(sess["merged"].run(None, inputs)),
        "onnxruntime_merged_int8": lambda: tuple(sess["int8"].run(None, inputs)),
    }


def bench_fine(checkpoint_path: str | Path, n: int = 500, repeats: int = 200, seed: int = 0) -> dict:
    """CTR + CVR of one request's `n` candidates from the trained fine checkpoint."""
    from fine_rank.export import load_models
    from recstack.features import Vocab
    from recstack.training import checkpoint

    ckpt = checkpoint.load(checkpoint_path, stage="fine")
    _, models = load_models(ckpt)
    from fine_rank.export import graph_inputs

    every = request_inputs(np.random.default_rng(seed), Vocab.from_dict(ckpt["vocab"]), n, models["ctr"].n_item_dense)
    every["user_feats"] = np.repeat(every["user_feats"], n, axis=0)  # one request's user, as the cascade feeds it
    every["seq_extras"] = np.abs(every["seq_extras"])  # ages, dwell, purchase flag: never negative
    inputs = {k: np.ascontiguousarray(every[k]) for k in graph_inputs(models)}  # the sequence stays one row
    with tempfile.TemporaryDirectory(prefix="recstack-bench-quant-") as tmp:
        paths = _fine_sessions(models, inputs, Path(tmp))
    ref = paths["torch_eager"]()
    diffs = {k: float(max(np.max(np.abs(a - b)) for a, b in zip(ref, f()))) for k, f in paths.items()}
    (ctr_floor, ctr_flops), (cvr_floor, cvr_flops) = (gemm_floor(linears(models[t]), n, seed) for t in ("ctr", "cvr"))
    flops = ctr_flops + cvr_flops
    fns = {k: (f, repeats) for k, f in paths.items()}
    fns["gemm_floor"] = (lambda: (ctr_floor(), cvr_floor()), repeats)  # both models' matrix products
    t = time_interleaved(fns, warmup=5)
    m = {k: v["median"] for k, v in t.items()}
    return {
        "n_candidates": n, "timings_ms": t, "max_abs_diff_vs_eager": diffs, "mlp_gflop": flops / 1e9,
        "ratios": {"int8_speedup_vs_eager": m["torch_eager"] / m["onnxruntime_merged_int8"],
                   "merged_fp32_speedup_vs_eager": m["torch_eager"] / m["onnxruntime_merged_fp32"],
                   "merged_fp32_vs_gemm_floor": m["onnxruntime_merged_fp32"] / m["gemm_floor"],
                   "two_sessions_vs_merged_fp32": m["onnxruntime_two_sessions"] / m["onnxruntime_merged_fp32"]},
    }


def _serving_queries(data_dir: str | Path, n: int, sizes: dict, seed: int) -> list:
    from recstack.bench.serving_path import _test_day_users
    from recstack.serving.cascade import Query

    _, req = _test_day_users(data_dir, n, seed)
    return [Query(user_id=int(u), num_results=sizes["k"], retrieval_size=sizes["retrieval_size"],
                  coarse_size=sizes["coarse_size"]) for u in req["user_id"]]


def bench_serving(cascades: dict, data_dir: str | Path, n_requests: int = 200, sizes: dict | None = None,
                  seed: int = 0, profile: str | None = None) -> dict:
    """name -> Cascade: each request runs on every cascade in turn (same order each time), timed
    by wall clock and by process CPU time; then a cProfile of `profile`'s cascade."""
    from recstack.bench.serving_path import _profile

    sizes = sizes or {"retrieval_size": 10_000, "coarse_size": 500, "k": 50}
    queries = _serving_queries(data_dir, n_requests, sizes, seed)
    for c in cascades.values():
        for q in queries[:10]:
            c.rank(q)
    cpu = {k: [] for k in cascades}
    stages: dict[str, dict[str, list[float]]] = {k: {} for k in cascades}
    for q in queries:
        for name, c in cascades.items():
            c0 = time.process_time()
            r = c.rank(q)
            cpu[name].append((time.process_time() - c0) * 1e3)
            for s, v in r.timings_ms.items():
                stages[name].setdefault(s, []).append(v)
    out = {"n_requests": len(queries), "sizes": sizes, "configs": {}}
    for name in cascades:
        out["configs"][name] = {
            "cpu_ms_per_request": float(np.mean(cpu[name])),
            "stage_ms": {s: {"p50": float(np.median(v)), "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v))}
                         for s, v in stages[name].items()},
        }
    if profile:
        top, total = _profile(cascades[profile], queries, 18)
        out["profile"] = {"config": profile, "top": top, "total_own_ms_per_request": total}
    return out


def gmv_paired(cascades: dict, data_dir: str | Path, n_users: int = 300, retrieval_size: int = 1000,
               coarse_size: int = 200, seed: int = 0) -> dict:
    """GMV@50 share against the simulator's truth (recstack.evaluation.cascade's oracle and
    requests) of two cascades {"a": .., "b": ..} on the same users at the serving default sizes;
    -> each one's mean and the paired difference b - a with its 95 % CI."""
    from scipy import stats

    from recstack.data import load
    from recstack.evaluation.cascade import _measure, _Oracle, requests
    from recstack.world.truth import Truth

    data, truth = load(data_dir), Truth.load(data_dir)
    first = next(iter(cascades.values()))
    oracle = _Oracle(truth, requests(data, data.test_day, n_users, seed), data.test_day, min(50, first.n_items))
    shares = {name: np.asarray(_measure(c, oracle, retrieval_size, coarse_size)["gmv_share"]) for name, c in cascades.items()}
    a, b = list(shares)
    d = shares[b] - shares[a]
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"users": int(len(d)), "sizes": {"retrieval_size": retrieval_size, "coarse_size": coarse_size, "k": oracle.k},
            "gmv_share": {k: float(v.mean()) for k, v in shares.items()},
            "diff": f"{b} - {a}", "diff_mean": float(d.mean()), "diff_ci95": [float(d.mean()) - half, float(d.mean()) + half]}


def run(out_dir: str | Path, *, artifacts: str | Path, data_dir: str | Path, fine_checkpoint: str | Path,
        legacy_artifacts: str | Path | None = None, n_items: int = 1_000_000, n_requests: int = 200,
        repeats: int = 30, seed: int = 0) -> dict:
    """All three parts in one run; writes out_dir/results.json and returns it."""
    from recstack.bundle import Bundle
    from recstack.serving.cascade import _FINE_INPUTS, Cascade
    from recstack.serving.fine import FineScorer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine_info(), "loadavg_start": loadavg()}
    t0 = time.perf_counter()
    with ExitStack() as stack:
        res["threads"] = single_threaded(stack)
        res["coarse"] = bench_coarse(n_items=n_items, repeats=repeats, seed=seed)
        res["fine"] = bench_fine(fine_checkpoint, repeats=200, seed=seed)
        served = Cascade.load(artifacts)
        fp32 = Cascade.load(artifacts)
        fp32.fine = FineScorer.load(fp32.bundle, _FINE_INPUTS, 1, precision="fp32")
        cascades = {"served": served, "merged_fp32_fine": fp32}
        if legacy_artifacts:
            cascades["two_graph_fp32_fine"] = Cascade.load(legacy_artifacts)
        res["serving"] = bench_serving(cascades, data_dir, n_requests, seed=seed, profile="served")
        res["serving"]["served_precision"] = {"fine": served.fine.precision, "coarse": served.coarse_vectors.precision}
    res["loadavg_end"] = loadavg()
    res["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    return res


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True, help="the served bundle (or an artifacts root)")
    ap.add_argument("--legacy-artifacts", default=None, help="a bundle of the same models in the two-graph layout")
    ap.add_argument("--data", required=True, help="the bundle's world")
    ap.add_argument("--fine-checkpoint", required=True, help="RUNS/fine/checkpoint.pt")
    ap.add_argument("--items", type=int, default=1_000_000, help="corpus size of the coarse measurement")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    r = run(a.out, artifacts=a.artifacts, data_dir=a.data, fine_checkpoint=a.fine_checkpoint,
            legacy_artifacts=a.legacy_artifacts, n_items=a.items, n_requests=a.requests)
    print(json.dumps({k: r[k]["ratios"] for k in ("coarse", "fine")}, indent=2))
