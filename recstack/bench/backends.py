"""Retrieval backends side by side, in one run: the bundle's FAISS index in process vs the
same vectors in Milvus (a milvus-lite server in its own process, reached over loopback gRPC
as a cluster would be).

    python -m recstack.bench.backends --out DIR --items 1000000 --artifacts BUNDLE

1. Retrieval: N unit item vectors (D = 64; `synthetic_corpus`: clustered, so that an IVF index
   has structure to exploit) and queries near them. Both backends hold an IVF-Flat index
   with the same lists and nprobe; each query is searched by both, one after the other (the
   shared machine's load hits both alike), as the server does: one call of 1 + S rows (the
   user vector and S item-to-item seeds), k = K. recall@K is against exact float64 search
   (ties counted), over the user rows; latency is per call, p50 / p99. milvus-lite (3.2) does
   not keep the `nlist` an IVF index was created with once the collection is loaded again
   (created with 8 lists and searched with nprobe 8, its recall@50 on 3,000 items was 0.89,
   not 1.0); its default is 128, so `--nlist 128` is the setting that compares like with like.
2. End to end: `recstack serve` with each backend over the same bundle, and the highest
   offered QPS whose p99 <= the bound (recstack.bench.loadtest.sweep_qps), with the count of
   degraded answers (popularity fallback when Milvus was slower than its timeout) read from
   the server's /metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import faiss
import numpy as np

from recstack.bench.e2e import free_port, wait_serving
from recstack.bench.loadtest import sweep_qps
from recstack.evaluation.metrics import exact_kth_scores, recall_vs_exact
from recstack.serving.milvus_backend import MilvusBackend, publish
from retrieval import index as index_lib

REPO = Path(__file__).resolve().parents[2]


def synthetic_corpus(n: int, dim: int, n_queries: int, seed: int = 0, clusters: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) unit item vectors around `clusters` centres, and (n_queries, dim) unit queries,
    each a random item's vector plus noise (a user near some of the corpus)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    emb = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # bounded temporaries
        m = min(100_000, n - s)
        block = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, dim)).astype(np.float32)
        emb[s:s + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    q = emb[rng.integers(0, n, n_queries)] + 0.3 * rng.standard_normal((n_queries, dim)).astype(np.float32)
    return emb, (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def start_milvus_lite(data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A milvus-lite server process on a free loopback port -> (process, http://127.0.0.1:PORT)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    uri = f"http://127.0.0.1:{port}"
    from pymilvus import MilvusClient

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite exited with {proc.returncode}; see {log}")
        try:
            MilvusClient(uri=uri, timeout=2).close()
            return proc, uri
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def retrieval_side_by_side(emb: np.ndarray, queries: np.ndarray, uri: str, *, k: int = 1000, nlist: int = 128,
                           nprobe: int = 8, seeds: int = 5, seed: int = 0) -> dict:
    """Recall@k against exact search and per-call latency of FAISS IVF-Flat in process vs Milvus
    IVF_FLAT (same nlist / nprobe) for the same vectors; see the module docstring."""
    n, dim = emb.shape
    version = f"bench{n}x{dim}s{seed}".ljust(16, "0")
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(1)
    index = index_lib.build(emb, f"IVF{nlist},Flat", nprobe=nprobe)
    faiss_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    publish(emb, uri, "bench", version, index_type="IVF_FLAT", nlist=nlist)
    milvus_build = time.perf_counter() - t0
    backend = MilvusBackend.connect(uri, "bench", version=version, n_items=n, timeout_s=60.0)
    backend.search_params["params"]["nprobe"] = nprobe
    rng = np.random.default_rng(seed + 1)
    found = {"faiss": np.empty((len(queries), k), np.int64), "milvus": np.empty((len(queries), k), np.int64)}
    ms = {"faiss": [], "milvus": []}
    for i, q in enumerate(queries):
        rows = np.concatenate([q[None], emb[rng.integers(0, n, seeds)]])  # the user vector + S seeds, one call
        t = time.perf_counter()
        _, ids = index.search(rows, k)
        ms["faiss"].append((time.perf_counter() - t) * 1e3)
        found["faiss"][i] = ids[0]
        t = time.perf_counter()
        ids = backend.search(rows, k)
        ms["milvus"].append((time.perf_counter() - t) * 1e3)
        found["milvus"][i] = ids[0]
    backend.close()
    kth = exact_kth_scores(queries, emb, [k])
    out = {"n_items": n, "dim": dim, "k": k, "queries": len(queries), "rows_per_call": 1 + seeds,
           "index": {"faiss": f"IVF{nlist},Flat nprobe={nprobe}", "milvus": f"IVF_FLAT nlist={nlist} nprobe={nprobe}"},
           "build_seconds": {"faiss": faiss_build, "milvus": milvus_build}}
    for name in ("faiss", "milvus"):
        rec = recall_vs_exact(found[name], queries, emb, [k], kth=kth)[k]
        t = np.asarray(ms[name])
        out[name] = {"recall_at_k": float(rec.mean()), "p50_ms": float(np.percentile(t, 50)),
                     "p99_ms": float(np.percentile(t, 99)), "mean_ms": float(t.mean())}
    return out


def _degraded(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("recstack_degraded_retrieval_total"):
                return float(line.split()[-1])
    return 0.0


def e2e_per_backend(artifacts: str, backend: str, scratch: Path, *, p99_bound_ms: float = 50.0, start_qps: float = 10.0,
                    duration_s: float = 8.0, steps: int = 6, timeout_ms: float = 50.0) -> dict:
    """One `recstack serve` (1 process, 4 threads) with `backend`; the QPS sweep against it."""
    port, mport = free_port(), free_port()
    name = "faiss" if backend == "faiss" else "milvus"
    cmd = [sys.executable, "-m", "recstack", "serve", "--artifacts", artifacts, "--port", str(port),
           "--metrics-port", str(mport), "--retrieval-backend", backend, "--retrieval-timeout-ms", str(timeout_ms)]
    log = scratch / f"serve-{name}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        res = sweep_qps(f"127.0.0.1:{port}", p99_bound_ms, start_qps, duration_s, 64, steps=steps, timeout_s=2.0,
                        progress=lambda i, n, r: print(f"  {name} {i}/{n}: {r['offered_qps']:.0f} qps p99 "
                                                        f"{r['latency_ms']['p99']} ms", flush=True))
        res["degraded_answers"] = _degraded(mport)
        res["ok_answers"] = sum(r["status"].get("OK", 0) for r in res["runs"])
    finally:
        _stop(proc)
    return res


def run(out: str | Path, *, n_items: int = 1_000_000, n_queries: int = 300, k: int = 1000, nlist: int = 128,
        nprobe: int = 8, artifacts: str | None = None, scratch: str | Path = "/tmp/recstack-bench-backends",
        command: str = "") -> dict:
    out, scratch = Path(out), Path(scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": command, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg_at_start": os.getloadavg()}}
    proc, uri = start_milvus_lite(scratch / f"milvus-{time.strftime('%H%M%S')}", scratch / "milvus.log")
    try:
        emb, queries = synthetic_corpus(n_items, 64, n_queries)
        print(f"retrieval: {n_items:,} items, {n_queries} queries", flush=True)
        res["retrieval"] = retrieval_side_by_side(emb, queries, uri, k=k, nlist=nlist, nprobe=nprobe)
        print(json.dumps(res["retrieval"], indent=1), flush=True)
        del emb
        if artifacts:
            from recstack.bundle import Bundle
            from recstack.pipeline.publish import publish_bundle

            collection = publish_bundle(artifacts, f"milvus://{uri[len('http://'):]}/items")
            res["e2e"] = {"artifacts": str(Bundle.open(artifacts).root), "collection": collection,
                          "n_items": Bundle.open(artifacts).manifest["vocab"]["n_items"]}
            for backend in ("faiss", f"milvus://{uri[len('http://'):]}/items"):
                res["e2e"]["faiss" if backend == "faiss" else "milvus"] = e2e_per_backend(artifacts, backend, scratch)
    finally:
        _stop(proc)
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "report.md").write_text("\n".join(report_lines(res)) + "\n")
    return res


def report_lines(res: dict) -> list[str]:
    """results.json -> report.md lines: the retrieval table, then the end-to-end table."""
    r = res["retrieval"]
    m = res["machine"]
    lines = [f"# Retrieval backends side by side", "", f"`{res['command']}`", "",
             f"Machine: {m['cpus']} CPUs, shared; load average {m['load_avg_at_start'][0]:.1f} at the start, "
             f"{m['load_avg_at_end'][0]:.1f} at the end (other jobs).", "",
             f"## Retrieval: {r['n_items']:,} synthetic {r['dim']}-d unit vectors, {r['queries']} queries, "
             f"one call of {r['rows_per_call']} rows (user + seeds), k = {r['k']}", "",
             "| backend | index | recall@%d vs exact | p50 ms / call | p99 ms / call | build + load s |" % r["k"],
             "|---|---|---|---|---|---|"]
    for b in ("faiss", "milvus"):
        lines.append(f"| {b} | {r['index'][b]} | {r[b]['recall_at_k']:.3f} | {r[b]['p50_ms']:.1f} | "
                     f"{r[b]['p99_ms']:.1f} | {r['build_seconds'][b]:.1f} |")
    e = res.get("e2e")
    if e:
        lines += ["", f"## End to end: `recstack serve` (1 process, 4 threads) over {e['artifacts']} "
                      f"({e['n_items']:,} items), retrieval timeout 50 ms", "",
                  "| backend | best QPS with p99 <= 50 ms | runs (offered QPS: p99 ms) | OK answers | degraded answers |",
                  "|---|---|---|---|---|"]
        for b in ("faiss", "milvus"):
            x = e[b]
            runs = ", ".join(f"{r_['offered_qps']:.1f}: {r_['latency_ms']['p99']}" for r_ in x["runs"])
            lines.append(f"| {b} | {x['best_qps']:.1f} | {runs} | {x['ok_answers']} | {x['degraded_answers']:.0f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recstack.bench.backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("-k", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=128)
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--artifacts", default=None, help="a bundle: also the end-to-end QPS per backend")
    p.add_argument("--scratch", default="/tmp/recstack-bench-backends")
    a = p.parse_args(argv)
    run(a.out, n_items=a.items, n_queries=a.queries, k=a.k, nlist=a.nlist, nprobe=a.nprobe, artifacts=a.artifacts,
        scratch=a.scratch, command="python -m recstack.bench.backends " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
