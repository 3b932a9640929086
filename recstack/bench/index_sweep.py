"""Retrieval index bench: recall@K against exact search vs single-threaded latency, per index.

    from recstack.bench.index_sweep import run
    results = run("docs/results/retrieval", checkpoint="runs/large/retrieval/checkpoint.pt")
    # or: python -m recstack.bench.index_sweep --checkpoint CKPT --out DIR

Queries are real: the trained user tower on test-day requests of the checkpoint's world;
the corpus is that model's item embeddings (1e6 items on `large`). For every index type
(factory string) and every value of its search knob (IVF nprobe, HNSW efSearch) it measures

- recall@K against exact search, averaged over the queries: a returned item is a hit when its
  exact score reaches the exact K-th best, ties counted (recstack.evaluation.metrics.recall_vs_exact;
  FAISS -1 = a miss);
- ms per query, single-threaded, one query per call (as the server searches), p50 and p99,
  and the same for exact search *in the same run*, so the speed-up is a ratio of two
  numbers measured under the same load (the machine is shared);
- build time (training + adding; `build_threads` threads) and memory (serialised size).

The serving default is the fastest point with recall@K >= `target_recall`; it is written
to results.json beside the whole curve and drawn on recall_latency.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from recstack.evaluation.metrics import exact_kth_scores, recall_vs_exact
from retrieval import index as index_lib

# (factory, search knob, values swept). Sized for 1e6 items, D = 64, K = 1000.
DEFAULT_SWEEP: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("IVF1024,Flat", "nprobe", (8, 16, 32, 64)),
    ("IVF4096,Flat", "nprobe", (16, 32, 48, 64, 96, 128, 256)),
    ("IVF4096,PQ32x4fs", "nprobe", (32, 64, 128, 256)),  # 16-byte 4-bit fast-scan codes
    ("IVF4096,PQ32x4fs,RFlat", "nprobe", (32, 64, 128)),  # the same, re-ranked exactly (keeps the vectors)
    ("HNSW32", "ef_search", (1000, 2000)),  # efSearch >= k; the build is the slowest of all
)


def _latency_ms(index: faiss.Index, queries: np.ndarray, k: int, repeats: int = 1) -> np.ndarray:
    """ms per single-query search call, (n,) — the serving pattern (batch of one)."""
    out = np.empty(len(queries) * repeats)
    j = 0
    for _ in range(repeats):
        for q in queries:
            t0 = time.perf_counter()
            index.search(q[None], k)
            out[j] = (time.perf_counter() - t0) * 1e3
            j += 1
    return out


def embeddings_from_checkpoint(checkpoint: str | Path, n_queries: int, seed: int = 0,
                               data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(item_emb (n_items, D), user_emb of up to n_queries distinct test-day requests (Q, D), info)."""
    import torch

    from recstack.training import checkpoint as C
    from recstack.data import load
    from retrieval.config import checkpoint_config
    from retrieval.export import request_sample
    from retrieval.inputs import serving_stats
    from retrieval.train import build_model, embed_items, embed_users

    ckpt = C.load(checkpoint, stage="retrieval")
    cfg = checkpoint_config(ckpt["config"])
    data = load(data_dir or ckpt["data_dir"])
    model = build_model(cfg, data.vocab)
    model.load_state_dict(ckpt["model"])
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        item_emb = embed_items(model, data.items, serving_stats(cfg, data, data.split_days(cfg.split)[1]))
        req = request_sample(data, n_queries, seed)
        queries = embed_users(model, {k: v[:-1] for k, v in req.items()})  # drop the cold-start row
    info = {"checkpoint": str(checkpoint), "data_dir": str(data.root), "n_items": int(data.items.n), "dim": int(item_emb.shape[1]),
            "queries": f"{len(queries)} distinct test-day (day {data.test_day}) requests through the trained user tower",
            "model_metrics": {k: v for k, v in ckpt["metrics"].items() if isinstance(v, (int, float))},
            "embed_seconds": round(time.perf_counter() - t0, 1)}
    return item_emb, queries, info


def _inputs(checkpoint, cache, item_emb, queries, n_queries: int, seed: int, data_dir) -> tuple[np.ndarray, np.ndarray, dict]:
    """(item embeddings, queries, where they come from): the checkpoint's (through `cache` when
    it exists), or the given arrays."""
    if checkpoint is not None and cache is not None and Path(cache).exists():
        with np.load(cache, allow_pickle=False) as z:
            return z["item_emb"], z["queries"], json.loads(str(z["source"]))
    if checkpoint is not None:
        item_emb, queries, source = embeddings_from_checkpoint(checkpoint, n_queries, seed, data_dir)
        if cache is not None:
            np.savez(cache, item_emb=item_emb, queries=queries, source=json.dumps(source))
        return item_emb, queries, source
    if item_emb is None or queries is None:
        raise ValueError("pass a checkpoint, or item_emb and queries")
    return item_emb, queries, {"n_items": int(len(item_emb)), "dim": int(item_emb.shape[1]),
                               "queries": f"{len(queries)} given query vectors"}


def _exact_point(item_emb: np.ndarray, timed: np.ndarray, k: int, build_threads: int) -> dict:
    """Exact search's build time, memory and single-threaded latency."""
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(build_threads)
    exact_index = index_lib.build(item_emb, "Flat")
    exact_build = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    exact_ms = _latency_ms(exact_index, timed, k)
    exact = {"factory": "Flat", "build_seconds": exact_build, "memory_bytes": index_lib.memory_bytes(exact_index),
             "p50_ms": float(np.median(exact_ms)), "p99_ms": float(np.percentile(exact_ms, 99)), "recall": 1.0}
    del exact_index
    print(f"exact: p50 {exact['p50_ms']:.2f} ms/query, {exact['memory_bytes'] / 2**20:.0f} MiB", flush=True)
    return exact


def _factory_points(item_emb, queries, timed, k: int, kth, exact: dict, factory: str, knob: str, values,
                    build_threads: int, seed: int) -> list[dict]:
    """One index type built once, measured at each value of its search knob (none when FAISS
    refuses to build it on this corpus)."""
    faiss.omp_set_num_threads(build_threads)
    t0 = time.perf_counter()
    try:
        index = index_lib.build(item_emb, factory, seed=seed)
    except ValueError as e:
        print(f"{factory}: skipped ({e})", flush=True)
        return []
    build_s = time.perf_counter() - t0
    mem = index_lib.memory_bytes(index)
    faiss.omp_set_num_threads(1)
    points = []
    for v in values:
        applied = index_lib.set_search_params(index, **{knob: v})
        _, found = index.search(queries, k)
        rec = recall_vs_exact(found, queries, item_emb, [k], kth=kth)[k]
        ms = _latency_ms(index, timed, k)
        # interleave an exact-search sample so every point has its own same-load reference
        ref = _latency_ms_exact(item_emb, timed[:20], k)
        p = {"factory": factory, "knob": knob, "value": int(v), "applied": applied, "build_seconds": build_s,
             "memory_bytes": mem, f"recall@{k}": float(rec.mean()), "recall_p10": float(np.percentile(rec, 10)),
             "p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
             "exact_p50_ms_same_time": float(np.median(ref))}
        p["speedup_vs_exact"] = exact["p50_ms"] / p["p50_ms"]
        points.append(p)
        print(f"{factory:>14s} {knob}={v:<5d} recall@{k} {p[f'recall@{k}']:.4f}  p50 {p['p50_ms']:.3f} ms"
              f"  x{p['speedup_vs_exact']:.1f} vs exact  build {build_s:.0f}s  {mem / 2**20:.0f} MiB", flush=True)
    del index
    return points


def run(
    out_dir: str | Path,
    checkpoint: str | Path | None = None,
    *,
    data_dir: str | Path | None = None,
    item_emb: np.ndarray | None = None,
    queries: np.ndarray | None = None,
    k: int = 1000,
    n_queries: int = 1000,
    n_timed: int = 200,
    sweep=DEFAULT_SWEEP,
    target_recall: float = 0.95,
    build_threads: int = 2,
    seed: int = 0,
    plot: bool = True,
    cache: str | Path | None = None,
) -> dict:
    """Sweep the indexes of `sweep` over the corpus; write results.json (+ recall_latency.png) to out_dir.

    Either `checkpoint` (a trained retrieval model: its item embeddings and test-day user
    vectors; `data_dir` overrides the world it was trained on) or both `item_emb` (N, D) and
    `queries` (Q, D). `cache`: an .npz path keeping the checkpoint's embeddings between
    runs (scratch space, never the repo). Returns the results dict (JSON types).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    item_emb, queries, source = _inputs(checkpoint, cache, item_emb, queries, n_queries, seed, data_dir)
    item_emb = np.ascontiguousarray(item_emb, dtype=np.float32)
    queries = np.ascontiguousarray(queries[:n_queries], dtype=np.float32)
    k = min(k, len(item_emb))
    timed = queries[: min(n_timed, len(queries))]

    # FAISS's thread count is process-wide: the sweep sets it per phase and gives it back after
    threads_before = faiss.omp_get_max_threads()
    try:
        # exact reference: each query's K-th best exact score, which every ANN point's recall is
        # measured against; and exact search's latency (same run, same thread count as every ANN point)
        kth = exact_kth_scores(queries, item_emb, [k])
        exact = _exact_point(item_emb, timed, k, build_threads)
        points = []
        for factory, knob, values in sweep:
            points += _factory_points(item_emb, queries, timed, k, kth, exact, factory, knob, values, build_threads, seed)
    finally:
        faiss.omp_set_num_threads(threads_before)

    ok = [p for p in points if p[f"recall@{k}"] >= target_recall]
    chosen = min(ok, key=lambda p: p["p50_ms"]) if ok else None
    results = {
        "k": k, "target_recall": target_recall, "n_queries": int(len(queries)), "n_timed": int(len(timed)),
        "threads": {"search": 1, "build": build_threads}, "source": source, "exact": exact, "points": points,
        "serving_default": chosen,
        "targets": None if chosen is None else {
            f"recall@{k}>={target_recall}": chosen[f"recall@{k}"] >= target_recall,
            "speedup>=10x": chosen["speedup_vs_exact"] >= 10, "p50<=3ms": chosen["p50_ms"] <= 3.0,
            "build<300s": chosen["build_seconds"] < 300},
        "machine": {"platform": platform.platform(), "faiss": faiss.__version__},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if plot:
        _plot(results, out / "recall_latency.png")
    return results


def combine(runs: dict[str, dict], out_dir: str | Path, target_recall: float = 0.95, plot: bool = True) -> dict:
    """Several `run` results on the same corpus and index sweep, one per query set (e.g. user
    vectors for ANN, item vectors for the item-to-item source, which searches the same index).

    The serving default is the cheapest (factory, knob value) whose recall@K clears
    `target_recall` on *every* query set, cheapest by its worst p50 across the sets. Speed-ups
    stay relative to the exact search of the run they were measured in. Writes results.json
    (+ recall_latency.png) to out_dir and returns the dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = {r["k"] for r in runs.values()}
    if len(k) != 1:
        raise ValueError(f"runs measured different K: {sorted(k)}")
    k = k.pop()
    key = lambda p: (p["factory"], p["knob"], p["value"])  # noqa: E731
    common = set.intersection(*({key(p) for p in r["points"]} for r in runs.values()))
    candidates = []
    for c in sorted(common):
        pts = {name: next(p for p in r["points"] if key(p) == c) for name, r in runs.items()}
        if all(p[f"recall@{k}"] >= target_recall for p in pts.values()):
            candidates.append({"factory": c[0], "knob": c[1], "value": c[2],
                               "worst_p50_ms": max(p["p50_ms"] for p in pts.values()),
                               "per_query_set": {n: {m: p[m] for m in (f"recall@{k}", "p50_ms", "p99_ms", "speedup_vs_exact",
                                                                        "build_seconds", "memory_bytes")} for n, p in pts.items()}})
    chosen = min(candidates, key=lambda c: c["worst_p50_ms"]) if candidates else None
    results = {"k": k, "target_recall": target_recall, "rule": "cheapest worst-case p50 with recall >= target on every query set",
               "serving_default": chosen, "runs": runs}
    if chosen:
        per = chosen["per_query_set"].values()
        results["targets"] = {f"recall@{k}>={target_recall}": True, "speedup>=10x": all(p["speedup_vs_exact"] >= 10 for p in per),
                              "p50<=3ms": all(p["p50_ms"] <= 3.0 for p in per), "build<300s": all(p["build_seconds"] < 300 for p in per)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs), 4.8), squeeze=False)
        for ax, (name, r) in zip(axes[0], runs.items()):
            r = dict(r, serving_default=None if chosen is None else next(
                p for p in r["points"] if key(p) == (chosen["factory"], chosen["knob"], chosen["value"])))
            _draw(ax, r)
            ax.set_title(f"{name}: " + ax.get_title(), fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "recall_latency.png", dpi=120)
        plt.close(fig)
    return results


def _latency_ms_exact(item_emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact search latency on a few queries with a throwaway flat index (no copy of the data)."""
    index = faiss.IndexFlatIP(item_emb.shape[1])
    index.add(item_emb)
    ms = _latency_ms(index, queries, k)
    del index
    return ms


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw(ax, results: dict) -> None:
    k = results["k"]
    for factory in dict.fromkeys(p["factory"] for p in results["points"]):
        pts = [p for p in results["points"] if p["factory"] == factory]
        ax.plot([p["p50_ms"] for p in pts], [p[f"recall@{k}"] for p in pts], "o-", label=factory)
        for p in pts:
            ax.annotate(str(p["value"]), (p["p50_ms"], p[f"recall@{k}"]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ex = results["exact"]
    ax.plot([ex["p50_ms"]], [1.0], "k*", ms=12, label=f"exact (Flat) {ex['p50_ms']:.1f} ms")
    ax.axhline(results["target_recall"], color="grey", ls="--", lw=0.8)
    ch = results["serving_default"]
    if ch:
        ax.plot([ch["p50_ms"]], [ch[f"recall@{k}"]], "rs", ms=11, mfc="none", mew=2,
                label=f"serving default: {ch['factory']} {ch['knob']}={ch['value']}")
    ax.set_xscale("log")
    ax.set_xlabel("ms per query, single-threaded, p50 (log)")
    ax.set_ylabel(f"recall@{k} vs exact")
    src = results["source"]
    ax.set_title(f"{src.get('n_items')} items, D={src.get('dim')}, {results['n_queries']} queries")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")


IVF_SWEEP = tuple(x for x in DEFAULT_SWEEP if x[0].endswith(",Flat") and x[0].startswith("IVF"))


def clicked_item_queries(data_dir: str | Path, item_emb: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Item vectors of up to n distinct items clicked on the test day: the i2i source's queries."""
    from recstack.data import load

    data = load(data_dir)
    im = data.impressions(data.test_day)
    clicked = np.unique(im["item_id"][im["click"].astype(bool)])
    pick = np.sort(np.random.default_rng(seed).choice(clicked, min(n, len(clicked)), replace=False))
    return item_emb[pick], (f"item vectors of {len(pick)} distinct items clicked on test day {data.test_day} "
                            f"(the i2i source's queries); {len(clicked)} distinct clicked items")


def run_both(out_dir: str | Path, checkpoint: str | Path, *, n_queries: int = 500, n_timed: int = 200, k: int = 1000,
             target_recall: float = 0.95, cache: str | Path | None = None, data_dir: str | Path | None = None) -> dict:
    """What docs/results/retrieval reports: `run` with user vectors over DEFAULT_SWEEP, `run` with
    clicked items' vectors over the IVF-Flat sweeps, and `combine` to pick the serving default."""
    out = Path(out_dir)
    users = run(out / "user_queries", checkpoint, data_dir=data_dir, k=k, n_queries=n_queries, n_timed=n_timed,
                target_recall=target_recall, cache=cache)
    if cache is not None and Path(cache).exists():  # run() wrote it
        with np.load(cache, allow_pickle=False) as z:
            item_emb = z["item_emb"]
    else:
        item_emb, _, _ = embeddings_from_checkpoint(checkpoint, 1, data_dir=data_dir)
    queries, what = clicked_item_queries(data_dir or users["source"]["data_dir"], item_emb, n_queries)
    items = run(out / "item_queries", item_emb=item_emb, queries=queries, k=k, n_queries=n_queries, n_timed=n_timed,
                sweep=IVF_SWEEP, target_recall=target_recall)
    items["source"]["queries"] = what
    return combine({"user vectors (ANN source)": users, "item vectors (i2i source)": items}, out, target_recall)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a trained retrieval checkpoint (RUNS/retrieval/checkpoint.pt)")
    ap.add_argument("--data", default=None, help="override the checkpoint's data dir")
    ap.add_argument("--out", default="docs/results/retrieval")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--timed", type=int, default=200)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--cache", default=None, help="an .npz in scratch space keeping the embeddings between runs")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    res = run_both(args.out, args.checkpoint, data_dir=args.data, k=args.k, n_queries=args.queries, n_timed=args.timed,
                   cache=args.cache)
    print(json.dumps({"serving_default": res["serving_default"], "targets": res.get("targets")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
