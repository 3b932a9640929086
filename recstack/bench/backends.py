"""Retrieval backends side by side, in one run: the FAISS index in process vs the same vectors
in Milvus (a milvus-lite server in its own process, reached over loopback gRPC as a cluster
would be).

    python -m recstack.bench.backends --out DIR --checkpoint runs/retrieval/checkpoint.pt
    python -m recstack.bench.backends --out DIR --artifacts artifacts/current      # + end to end

1. Vectors (recstack.bench.backends_data): a bundle's item_emb.npy and its ONNX user tower, or
   a retrieval checkpoint's two towers, on test-day requests of their data; synthetic ones
   without either. Each request is one call of 1 + S rows, as the cascade makes it: the user
   vector and the item vectors of its S item-to-item seeds, k = K for all.
2. Indexes: the serving index on both sides. With a bundle, FAISS is its index.faiss as
   served; otherwise FAISS IVF-Flat with the exporter's default lists for the corpus size
   (retrieval.index.default_spec: IVF4096 at 1e6) and nprobe. Milvus holds an IVF_FLAT
   collection with the same lists and nprobe (milvus-lite builds one IVF index per segment).
3. Measured: build (FAISS: train + add; Milvus: insert + flush + index + load) and a cold
   load (server restarted, collection loaded); the server's RSS; per call p50 / p99 of each
   backend on the same calls, one after the other (a shared machine's load hits both alike);
   recall@K against exact float64 search (ties counted) of the user rows and of the seed
   rows; the engine-side breakdown of a milvus-lite call (recstack.bench.milvus_lite_probe).
4. End to end (with a bundle): `recstack serve` with each backend, the highest offered QPS
   whose p99 <= the bound (recstack.bench.loadtest.sweep_qps), and the degraded answers
   (popularity, when Milvus did not answer within the retrieval timeout) from /metrics.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from recstack.bench.backends_data import Corpus, bundle_corpus, checkpoint_corpus, synthetic_corpus
from recstack.bench.backends_report import report_lines
from recstack.bench.e2e import free_port, wait_serving
from recstack.bench.loadtest import sweep_qps
from recstack.bench.milvus_lite_probe import engine_breakdown
from recstack.evaluation.metrics import recall_vs_exact
from recstack.serving.milvus_backend import MilvusBackend, collection_name, publish
from retrieval import index as index_lib

REPO = Path(__file__).resolve().parents[2]
COLLECTION = "items"


# milvus-lite's own `server` command logs the port it was asked for, so a server on port 0
# could not be found; this starts the same gRPC server and prints the port it bound, and on
# SIGTERM stops it and closes the database (flushing it) as the command does on Ctrl-C.
_SERVE = ("import signal, sys, threading\n"
          "from milvus_lite.adapter.grpc.server import start_server_in_thread\n"
          "server, db, port = start_server_in_thread(sys.argv[1], '127.0.0.1', 0)\n"
          "print(f'milvus-lite port {port}', flush=True)\n"
          "stop = threading.Event()\n"
          "signal.signal(signal.SIGTERM, lambda *_: stop.set())\n"
          "while not stop.wait(1.0):\n    pass\n"
          "server.stop(grace=5).wait()\n"
          "db.close()\n")


class MilvusLiteServer:
    """A milvus-lite gRPC server on a data folder, on a port it picks itself, in its own process
    so that its memory is its own."""

    def __init__(self, data_dir: Path, log: Path):
        self.data_dir, self.log = Path(data_dir), Path(log)
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self, timeout_s: float = 600.0) -> float:
        """-> seconds until the server answered a client."""
        from pymilvus import MilvusClient

        t0 = time.perf_counter()
        self.log.touch()
        offset = self.log.stat().st_size  # this start's lines come after
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(self.data_dir)], stdout=self.log.open("a"),
                                     stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite exited with {self.proc.returncode}; see {self.log}")
            found = re.findall(r"milvus-lite port (\d+)", self.log.read_text()[offset:])
            if found:
                self.uri = f"http://127.0.0.1:{found[0]}"
                try:
                    MilvusClient(uri=self.uri, timeout=5).close()
                    return time.perf_counter() - t0
                except Exception:  # listening, not answering yet
                    pass
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"milvus-lite not answering after {timeout_s} s; see {self.log}")
            time.sleep(0.5)

    def memory_mb(self) -> dict:
        """{"rss_mb": now, "peak_mb": the high-water mark} of the server process."""
        got = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                got["rss_mb" if key == "VmRSS" else "peak_mb"] = int(value.split()[0]) / 1024
        return got

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def content_version(emb: np.ndarray) -> str:
    """The sha256 of the vectors as `np.save` writes them: a bundle's embedding version for the
    same vectors (recstack.serving.candidates.embedding_version)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb, np.float32), allow_pickle=False)
    return hashlib.sha256(buf.getbuffer()).hexdigest()


def faiss_index(corpus: Corpus, version: str, artifacts: str | None, nlist: int | None, nprobe: int,
                scratch: Path) -> tuple[faiss.Index, dict]:
    """The bundle's index as served, or IVF-Flat built here (kept in scratch for a later run on
    the same vectors) -> (index, {"factory", "nlist", "nprobe", "build_seconds"})."""
    faiss.omp_set_num_threads(1)
    if artifacts:
        from recstack.bundle import Bundle
        from recstack.serving.candidates import FaissBackend

        bundle = Bundle.open(artifacts)
        index = FaissBackend.from_bundle(bundle, len(corpus.item_emb)).index
        build_s = bundle.stage("retrieval").get("meta", {}).get("index_build_seconds")
    else:
        factory = f"IVF{nlist or index_lib.default_nlist(len(corpus.item_emb))},Flat"
        cached = scratch / f"faiss-{version[:16]}-{factory.replace(',', '-')}.index"
        build_s = None
        if cached.exists():
            index = faiss.read_index(str(cached))
            index_lib.set_search_params(index, nprobe=nprobe)
        else:
            t0 = time.perf_counter()
            index = index_lib.build(corpus.item_emb, factory, nprobe=nprobe)
            build_s = time.perf_counter() - t0
            faiss.write_index(index, str(cached))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise ValueError("the FAISS index is not IVF: the side by side compares IVF-Flat with Milvus IVF_FLAT")
    return index, {"factory": f"IVF{ivf.nlist},Flat", "nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe),
                   "build_seconds": build_s}


def serving_nlist(corpus: Corpus, artifacts: str | None, nlist: int | None) -> int:
    """The IVF lists of the FAISS index the run will search (before it is built)."""
    if artifacts:
        from recstack.bundle import Bundle
        from recstack.serving.candidates import FaissBackend

        index = FaissBackend.from_bundle(Bundle.open(artifacts), len(corpus.item_emb)).index
        return int(faiss.extract_index_ivf(index).nlist)
    return nlist or index_lib.default_nlist(len(corpus.item_emb))


def milvus_collection(server: MilvusLiteServer, corpus: Corpus, version: str, index_type: str, nlist: int,
                      timeout_s: float) -> dict:
    """Publish the vectors (unless the data folder already holds this version), restart the
    server, load the collection cold -> the times and the server's memory at each point."""
    out: dict = {"collection": collection_name(COLLECTION, version), "index_type": index_type,
                 "nlist": nlist if index_type == "IVF_FLAT" else None}
    out["start_seconds"] = server.start()
    try:
        MilvusBackend.connect(server.uri, COLLECTION, version=version, n_items=len(corpus.item_emb)).close()
        out["publish_seconds"], out["reused_data"] = None, str(server.data_dir)
    except Exception:  # not there yet (or another version): publish it
        t0 = time.perf_counter()
        publish(corpus.item_emb, server.uri, COLLECTION, version, index_type=index_type, nlist=nlist, batch=50_000)
        out["publish_seconds"] = time.perf_counter() - t0
    out["memory_after_publish"] = server.memory_mb()
    server.stop()
    out["restart_seconds"] = server.start()
    t0 = time.perf_counter()
    backend = MilvusBackend.connect(server.uri, COLLECTION, version=version, n_items=len(corpus.item_emb),
                                    timeout_s=timeout_s)
    out["load_seconds"] = time.perf_counter() - t0
    out["memory_after_load"] = server.memory_mb()
    backend.close()
    return out


def _recall(found: np.ndarray, queries: np.ndarray, emb: np.ndarray, k: int) -> float:
    return float(recall_vs_exact(found, queries, emb, [k])[k].mean()) if len(queries) else float("nan")


def _latency(ms: list[float]) -> dict:
    t = np.asarray(ms)
    return {"calls": len(t), "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "mean_ms": float(t.mean()), "max_ms": float(t.max())}


def side_by_side(corpus: Corpus, index: faiss.Index, backend: MilvusBackend, *, k: int, n_queries: int,
                 milvus_queries: int) -> dict:
    """Every call on FAISS, the first `milvus_queries` also on Milvus right after; recall@k of
    the user rows (FAISS on all calls and on Milvus' calls) and of the seed rows (Milvus' calls)."""
    n_queries, m = min(n_queries, len(corpus.users)), min(milvus_queries, n_queries, len(corpus.users))
    users = {"faiss": np.empty((n_queries, k), np.int64), "milvus": np.empty((m, k), np.int64)}
    seeds: dict[str, list] = {"faiss": [], "milvus": []}
    ms: dict[str, list] = {"faiss": [], "milvus": []}
    for i in range(n_queries):
        rows = corpus.call_rows(i)
        t = time.perf_counter()
        _, ids = index.search(rows, k)
        ms["faiss"].append((time.perf_counter() - t) * 1e3)
        users["faiss"][i] = ids[0]
        if i < m:
            seeds["faiss"].append(ids[1:])
            t = time.perf_counter()
            ids = backend.search(rows, k)
            ms["milvus"].append((time.perf_counter() - t) * 1e3)
            users["milvus"][i] = ids[0]
            seeds["milvus"].append(ids[1:])
    emb = corpus.item_emb
    seed_q = np.concatenate([emb[corpus.seeds[i]] for i in range(m)]) if m else np.empty((0, emb.shape[1]))
    out = {"k": k, "calls": n_queries, "milvus_calls": m,
           "rows_per_call": float(np.mean([1 + len(corpus.seeds[i]) for i in range(n_queries)]))}
    for name in ("faiss", "milvus"):
        out[name] = {**_latency(ms[name]),
                     "user_recall_at_k_same_calls": _recall(users[name][:m], corpus.users[:m], emb, k),
                     "seed_recall_at_k_same_calls": _recall(np.concatenate(seeds[name]) if m else users[name][:0],
                                                            seed_q, emb, k)}
    out["faiss"]["user_recall_at_k_all_calls"] = _recall(users["faiss"], corpus.users[:n_queries], emb, k)
    overlap = [len(np.intersect1d(users["faiss"][i], users["milvus"][i])) / k for i in range(m)]
    out["user_top_k_overlap_faiss_milvus"] = float(np.mean(overlap)) if m else float("nan")
    return out


def _degraded(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("recstack_degraded_retrieval_total"):
                return float(line.split()[-1])
    return 0.0


def e2e_per_backend(artifacts: str, backend: str, scratch: Path, *, p99_bound_ms: float = 50.0, start_qps: float = 10.0,
                    duration_s: float = 8.0, steps: int = 6, timeout_ms: float = 50.0) -> dict:
    """One `recstack serve` (its default threads) with `backend`; the QPS sweep against it."""
    port, mport = free_port(), free_port()
    name = "faiss" if backend == "faiss" else "milvus"
    cmd = [sys.executable, "-m", "recstack", "serve", "--artifacts", artifacts, "--port", str(port),
           "--metrics-port", str(mport), "--retrieval-backend", backend, "--retrieval-timeout-ms", str(timeout_ms)]
    log = scratch / f"serve-{name}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        res = {"ready_seconds": wait_serving(f"127.0.0.1:{port}", proc)}
        res.update(sweep_qps(f"127.0.0.1:{port}", p99_bound_ms, start_qps, duration_s, 64, steps=steps, timeout_s=2.0,
                             progress=lambda i, n, r: print(f"  {name} {i}/{n}: {r['offered_qps']:.1f} qps p99 "
                                                             f"{r['latency_ms']['p99']} ms", flush=True)))
        res["degraded_answers"] = _degraded(mport)
        res["ok_answers"] = sum(r["status"].get("OK", 0) for r in res["runs"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return res


def load_corpus(artifacts: str | None, checkpoint: str | None, n_items: int, n_queries: int,
                data_dir: str | None = None) -> Corpus:
    if artifacts:
        return bundle_corpus(artifacts, n_queries)
    if checkpoint:
        return checkpoint_corpus(checkpoint, n_queries, data_dir=data_dir)
    return synthetic_corpus(n_items, 64, n_queries)


def run(out: str | Path, *, artifacts: str | None = None, checkpoint: str | None = None, data_dir: str | None = None,
        n_items: int = 100_000, n_queries: int = 300, milvus_queries: int = 40, probe_calls: int = 5, k: int = 1000,
        nlist: int | None = None, nprobe: int = index_lib.DEFAULT_IVF_NPROBE, milvus_index: str = "IVF_FLAT",
        e2e: bool = True, scratch: str | Path = "/tmp/recstack-bench-backends", command: str = "") -> dict:
    """The whole bench (module docstring) -> results.json and report.md under `out`. The
    milvus-lite data folder and the FAISS index are kept in scratch: a later run on the same
    vectors reuses them. Milvus publishes while FAISS builds (each build's time is measured
    beside the other)."""
    out, scratch = Path(out), Path(scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": command, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                  "load_avg_at_start": os.getloadavg()}}
    t0 = time.perf_counter()
    corpus = load_corpus(artifacts, checkpoint, n_items, n_queries, data_dir)
    version = corpus.version or content_version(corpus.item_emb)
    res["vectors"] = {"source": corpus.source, "n_items": len(corpus.item_emb), "dim": int(corpus.item_emb.shape[1]),
                      "queries": len(corpus.users), "version": version, "seconds": time.perf_counter() - t0}
    print(json.dumps(res["vectors"]), flush=True)
    server = MilvusLiteServer(scratch / "milvus", scratch / "milvus.log")
    try:
        with ThreadPoolExecutor(1) as pool:
            publishing = pool.submit(milvus_collection, server, corpus, version, milvus_index,
                                     serving_nlist(corpus, artifacts, nlist), 600.0)
            index, res["faiss_index"] = faiss_index(corpus, version, artifacts, nlist, nprobe, scratch)
            print(json.dumps(res["faiss_index"]), flush=True)
            res["milvus_collection"] = publishing.result()
        print(json.dumps(res["milvus_collection"]), flush=True)
        nprobe = res["faiss_index"]["nprobe"]
        backend = MilvusBackend.connect(server.uri, COLLECTION, version=version, n_items=len(corpus.item_emb),
                                        timeout_s=600.0)
        if milvus_index == "IVF_FLAT":
            backend.search_params["params"]["nprobe"] = nprobe
        res["retrieval"] = side_by_side(corpus, index, backend, k=k, n_queries=n_queries, milvus_queries=milvus_queries)
        backend.close()
        res["milvus_collection"]["memory_after_searches"] = server.memory_mb()
        print(json.dumps(res["retrieval"]), flush=True)
        server.stop()
        calls = [corpus.call_rows(i) for i in range(min(probe_calls, len(corpus.users)))]
        res["milvus_engine"] = engine_breakdown(server.data_dir, res["milvus_collection"]["collection"], calls, k=k,
                                                search_params=dict(backend.search_params["params"]))
        print(json.dumps(res["milvus_engine"]["profiled_ms_per_call"]), flush=True)
        if artifacts and e2e:
            del corpus, index
            server.start()
            res["e2e"] = {"artifacts": str(artifacts), "collection": res["milvus_collection"]["collection"]}
            for uri in ("faiss", f"milvus://{server.uri[len('http://'):]}/{COLLECTION}"):
                res["e2e"]["faiss" if uri == "faiss" else "milvus"] = e2e_per_backend(artifacts, uri, scratch)
    finally:
        server.stop()
    res["machine"]["load_avg_at_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "report.md").write_text("\n".join(report_lines(res)) + "\n")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recstack.bench.backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--artifacts", default=None, help="a bundle: its vectors and index, and the end-to-end QPS")
    p.add_argument("--checkpoint", default=None, help="a retrieval checkpoint: its towers' vectors (no bundle needed)")
    p.add_argument("--data", default=None, help="with a training-state --checkpoint: its data folder")
    p.add_argument("--items", type=int, default=100_000, help="synthetic corpus size, without a bundle or checkpoint")
    p.add_argument("--queries", type=int, default=300, help="calls searched on FAISS")
    p.add_argument("--milvus-queries", type=int, default=40, help="the first N of those also searched on Milvus")
    p.add_argument("--probe-calls", type=int, default=5, help="of those, profiled again inside milvus-lite")
    p.add_argument("-k", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=None, help="IVF lists without a bundle (default: the exporter's)")
    p.add_argument("--nprobe", type=int, default=index_lib.DEFAULT_IVF_NPROBE, help="without a bundle")
    p.add_argument("--milvus-index", default="IVF_FLAT", choices=("IVF_FLAT", "FLAT"),
                   help="IVF_FLAT: FAISS's lists and nprobe; FLAT: exact, what `export --publish` publishes by default")
    p.add_argument("--no-e2e", action="store_true", help="with --artifacts: the retrieval part only")
    p.add_argument("--scratch", default="/tmp/recstack-bench-backends", help="milvus-lite data (reused) and logs")
    a = p.parse_args(argv)
    run(a.out, artifacts=a.artifacts, checkpoint=a.checkpoint, data_dir=a.data, n_items=a.items, n_queries=a.queries,
        milvus_queries=a.milvus_queries, probe_calls=a.probe_calls, k=a.k, nlist=a.nlist, nprobe=a.nprobe,
        milvus_index=a.milvus_index,
        e2e=not a.no_e2e, scratch=a.scratch,
        command="python -m recstack.bench.backends " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
