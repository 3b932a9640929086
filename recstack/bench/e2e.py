"""End-to-end gRPC benchmark of a served bundle and its peers.

    from recstack.bench.e2e import run_e2e
    res = run_e2e("ARTIFACTS", "DATA_DIR", scratch="SCRATCH_DIR", plots="OUT_DIR", teacher_onnx="TEACHER_ONNX")

`recstack bench all` calls it; `python -m recstack.bench.e2e` runs it alone. For each server
configuration it starts a local server process (loopback, stopped by its pid), waits for health
SERVING, and drives it with `recstack.bench.loadtest` (open loop, latency from the scheduled send, users
drawn from the data's test day):

  * cascade, `recstack serve --workers 1` (and `--workers 2`): requests 10,000 -> 500 -> 50
    (retrieval_size, coarse_size, num_results: the default stage sizes);
  * single stage (a peer), one process: requests 10,000 -> 10,000 -> 50, i.e. the fine ranker
    scores every retrieved candidate. The server's coarse_size_max (2,000) refuses that, so the peer
    is a `build_server` process with `ServingLimits(coarse_size_max=10_000)`, otherwise the same
    settings as `recstack serve` (4 RPC threads, 1 ONNX thread, its default feature store and
    impression log, so each request does the same live work);
  * teacher as coarse (a peer), one process: requests 10,000 -> 500 -> 50 with the coarse stage
    scored by the PFD+MD teacher DNN (ONNX Runtime, `coarse_rank.export.export_teacher`) instead of
    the inner product: the teacher gets the request's user inputs once and every candidate's item
    features and interacted features (computed per request, as a served DNN coarse stage must).

Runs per configuration: one fixed-QPS run (p50/p90/p99/max, per-stage server timings, a PNG), a
sweep for the highest QPS with p99 <= the bound, and a saturation run (offered far above capacity:
the achieved OK QPS is the throughput). GMV@50 against the world's truth, in process through the
serving code (recstack.evaluation.cascade), for the cascade and each peer on the same users.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recstack import features as FE
from recstack.bench.e2e_report import _sat, check_targets, report_lines
from recstack.bench.timing import loadavg, machine_info, process_tree_cpu_s
from recstack.serving.cascade import Cascade
from recstack.quant import top_positions
from recstack.serving.loading import onnx_session

REPO = Path(__file__).resolve().parents[2]  # the checkout: the servers run from it

CASCADE = {"retrieval_size": 10_000, "coarse_size": 500, "k": 50}
SINGLE = {"retrieval_size": 10_000, "coarse_size": 10_000, "k": 50}
TEACHER = dict(CASCADE)  # same sizes; the coarse scorer is the teacher DNN
KNOWN = {"cascade_w1": ("cascade", 1, CASCADE), "cascade_w2": ("cascade", 2, CASCADE),
         "single_stage_w1": ("single", 1, SINGLE), "teacher_coarse_w1": ("teacher", 1, TEACHER)}
DEFAULT_CONFIGS = "cascade_w1,single_stage_w1,teacher_coarse_w1"


def config_spec(name: str) -> tuple[str, int, dict]:
    """A config name -> (kind, workers, sizes): the names of KNOWN, or `cascade_cC_wW` (the cascade
    at coarse size C with W workers)."""
    if name in KNOWN:
        return KNOWN[name]
    m = re.fullmatch(r"cascade_c(\d+)_w(\d+)", name)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"configs: unknown {name!r}; known {sorted(KNOWN)} or cascade_cC_wW")
    return "cascade", int(m.group(2)), {**CASCADE, "coarse_size": int(m.group(1))}


class TeacherCoarseCascade(Cascade):
    """The serving cascade with the coarse stage scored by a DNN teacher exported with
    `coarse_rank.export.export_teacher` (ONNX, inputs user_feats / seq_items / seq_extras for the
    request and item_feats / item_dense / interacted per candidate) instead of the inner product."""

    teacher_onnx: str | None = None  # set before `load` (the server process calls `Cascade.load(path)`)

    def __init__(self, bundle, onnx_threads: int = 1, teacher_onnx: str | None = None, **kw):
        super().__init__(bundle, onnx_threads=onnx_threads, **kw)
        path = teacher_onnx or self.teacher_onnx
        if not path:
            raise ValueError("TeacherCoarseCascade: teacher_onnx (an export_teacher ONNX file) is required")
        self.teacher = onnx_session(Path(path), onnx_threads)
        names = {i.name for i in self.teacher.get_inputs()}
        need = {"user_feats", "seq_items", "seq_extras", "item_feats", "item_dense", "interacted"}
        if names != need:
            raise ValueError(f"{path}: teacher inputs {sorted(names)}, expected {sorted(need)}")
        # a teacher trained with the item statistics reads the table written beside it
        # (recstack.bench.teacher.export_teacher_onnx) after the price
        width = next(i.shape[-1] for i in self.teacher.get_inputs() if i.name == "item_dense")
        self.teacher_stats = None
        if isinstance(width, int) and width > 1:
            table = Path(path).with_suffix(".item_stats.npy")
            if not table.exists():
                raise ValueError(f"{path}: the teacher reads {width} item_dense columns and no {table.name} is beside it")
            self.teacher_stats = np.load(table, allow_pickle=False)
            if self.teacher_stats.shape != (self.n_items, width - 1):
                raise ValueError(f"{table}: shape {self.teacher_stats.shape}, expected ({self.n_items}, {width - 1})")

    def score_coarse(self, tower_in: dict[str, np.ndarray], cands: np.ndarray) -> np.ndarray:
        item_feats = self.items.feats(cands)  # (R, 5)
        dense = self.items.dense(cands, self.teacher_stats)  # the price, then the statistics when the teacher reads them
        feeds = {**tower_in, "item_feats": item_feats, "item_dense": dense,
                 "interacted": FE.interacted_features(tower_in["seq_items"], tower_in["seq_extras"], item_feats)}
        return self.teacher.run(None, feeds)[0].reshape(-1)

    def select_coarse(self, tower_in: dict[str, np.ndarray], cands: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.score_coarse(tower_in, cands)
        pos = top_positions(scores, keep)
        return pos, scores[pos]


# ------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float = 600.0) -> float:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.perf_counter()
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - t0
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"{target} not SERVING after {timeout_s} s")


def _peer_child(kind: str, artifacts: str, port: int, teacher_onnx: str | None) -> int:
    """A peer server (single stage or teacher as coarse): build_server with the live path of
    `recstack serve`, runs until SIGTERM."""
    import threading

    from recstack.serving import server as S
    from recstack.serving.process import ServeOptions, open_live
    from recstack.serving.validate import ServingLimits

    if kind == "teacher":
        TeacherCoarseCascade.teacher_onnx = teacher_onnx
        S.Cascade = TeacherCoarseCascade  # the servicer loads the bundle through this name
        limits = ServingLimits()
    else:
        limits = ServingLimits(coarse_size_max=SINGLE["coarse_size"])
    # the feature store and impression log of `recstack serve`'s defaults, so that a peer pays the
    # same per-request live work (store read, impression record) as the cascade it is compared with
    live = open_live(artifacts, ServeOptions())
    try:
        server, _, _ = S.build_server(artifacts, "127.0.0.1", port, 4, limits=limits, onnx_threads=1, live=live)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        server.stop(5).wait()
    finally:
        live.close()
    return 0


def start_server(kind: str, artifacts: str, port: int, workers: int, log: Path,
                 teacher_onnx: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kind == "cascade":
        cmd = [sys.executable, "-m", "recstack.cli", "serve", "--artifacts", artifacts, "--port", str(port),
               "--workers", str(workers)]
    else:
        if kind == "teacher" and not teacher_onnx:
            raise ValueError("the teacher-as-coarse peer needs teacher_onnx")
        cmd = [sys.executable, "-m", "recstack.bench.e2e", "--peer-child", kind, "--artifacts", artifacts,
               "--port", str(port), *(["--teacher-onnx", teacher_onnx] if teacher_onnx else [])]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


DEFAULT_LOAD = {"qps": 50.0, "duration": 30.0, "sweep_duration": 10.0, "sweep_steps": 7, "p99_bound": 50.0,
                "sat_qps": 400.0, "sat_duration": 15.0, "peer_qps": 5.0, "peer_sweep_start": 2.0, "peer_sat_qps": 60.0,
                "concurrency": 64, "timeout": 2.0, "warmup_duration": 4.0}


def bench_config(name: str, kind: str, workers: int, sizes: dict, artifacts: str, data: str, scratch: Path,
                 plots: Path | None, load: dict, teacher_onnx: str | None = None) -> dict:
    from recstack.bench import loadtest as L

    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server(kind, artifacts, port, workers, scratch / f"{name}.server.log", teacher_onnx)
    out = {"name": name, "kind": kind, "workers": workers, "sizes": sizes, "server_pid": proc.pid}
    peer = kind != "cascade"
    try:
        out["startup_s"] = wait_serving(target, proc)
        kw = dict(k=sizes["k"], users=data, concurrency=load["concurrency"], timeout_s=load["timeout"],
                  retrieval_size=sizes["retrieval_size"], coarse_size=sizes["coarse_size"])
        # warm-up (connections, caches; not reported), repeated until every process answers: health
        # SERVING comes from the first worker ready, the others may still be loading
        t_ready = time.perf_counter()
        while True:
            w = L.run_once(target, 5, load["warmup_duration"], **{**kw, "seed": 99})
            if set(w["status"]) <= {"OK"} or time.perf_counter() - t_ready > 180:
                break
        out["warmup_status"] = w["status"]
        fixed_qps = load["peer_qps"] if peer else load["qps"]
        png = (lambda s: plots / f"{name}_{s}.png") if plots else (lambda s: None)
        cpu0 = process_tree_cpu_s(proc.pid)
        out["fixed"] = L.run(target, fixed_qps, load["duration"], plot=png("fixed"), **kw)
        ok = out["fixed"]["status"].get("OK", 0)
        # the server's own CPU (every worker, gRPC and protobuf included, the load generator not)
        # per answered request: what bounds its throughput on cores of its own
        out["fixed"]["server_cpu_ms_per_ok"] = (process_tree_cpu_s(proc.pid) - cpu0) * 1e3 / ok if ok else None
        out["sweep"] = L.run(target, load["peer_sweep_start"] if peer else fixed_qps, load["sweep_duration"],
                             sweep=True, p99_bound_ms=load["p99_bound"], steps=load["sweep_steps"], plot=png("sweep"), **kw)
        out["saturation"] = L.run(target, load["peer_sat_qps"] if peer else load["sat_qps"], load["sat_duration"], **kw)
    finally:
        out["server_exit"] = stop_server(proc)
    for key in ("fixed", "sweep", "saturation"):
        if key in out:
            print(f"--- {name} {key}\n{L.format_result(out[key])}", flush=True)
    return out


# ------------------------------------------------------------------ GMV


def gmv_retained(artifacts: str, data: str, scratch: Path, n_users: int, teacher_onnx: str | None = None,
                 i2i_share: float = 0.3, cascade: Cascade | None = None, extra_coarse: tuple[int, ...] = ()) -> dict:
    """GMV@50 against the world's truth for the cascade (10,000 -> 500, and 10,000 -> each of
    `extra_coarse`), the single-stage peer (10,000 -> 10,000) and, with `teacher_onnx`, the
    teacher-as-coarse peer (10,000 -> 500), same users, in process through the serving code
    (recstack.evaluation.cascade)."""
    from recstack.evaluation.cascade import run as cascade_eval

    common = dict(n_users=n_users, k=CASCADE["k"], retrieval_sizes=(CASCADE["retrieval_size"],),
                  i2i_shares=(i2i_share,), default_retrieval=CASCADE["retrieval_size"],
                  default_coarse=CASCADE["coarse_size"], exhaustive=False, plot=False)
    t0 = time.perf_counter()
    r = cascade_eval(artifacts, data, scratch / "gmv", coarse_sizes=(CASCADE["coarse_size"], SINGLE["coarse_size"],
                                                                    *extra_coarse),
                     cascade=cascade, **common)
    rows = {(c["retrieval_size"], c["coarse_size"]): c for c in r["configs"]}
    n = max(c["retrieval_size"] for c in r["configs"])  # sizes are clamped to the corpus

    def row(rows_: dict, sizes: dict) -> dict:
        return rows_[(min(sizes["retrieval_size"], n), min(sizes["coarse_size"], n))]

    casc, peer = row(rows, CASCADE), row(rows, SINGLE)
    out = {"n_users": r["n_users"], "k": r["k"], "day": r["day"], "i2i_share": i2i_share,
           "cascade_gmv_share": casc["gmv_share"], "cascade_gmv_share_se": casc["gmv_share_se"],
           "single_stage_gmv_share": peer["gmv_share"], "single_stage_gmv_share_se": peer["gmv_share_se"],
           "retained": casc["gmv_share"] / peer["gmv_share"] if peer["gmv_share"] > 0 else None,
           "cascade_ms_in_process": casc["ms"], "single_stage_ms_in_process": peer["ms"],
           # share of the oracle top-50 still present after each stage (what the coarse cut loses)
           "recall": {name: {m: row_[m] for m in ("recall_retrieval", "recall_coarse", "recall_served")}
                      for name, row_ in (("cascade", casc), ("single_stage", peer))}}
    # the cascade at other coarse sizes, against the same single stage
    out["cascade_at"] = {str(c): {"gmv_share": x["gmv_share"], "gmv_share_se": x["gmv_share_se"], "ms_in_process": x["ms"],
                                  "retained": x["gmv_share"] / peer["gmv_share"] if peer["gmv_share"] > 0 else None}
                         for c in extra_coarse for x in [row(rows, {**CASCADE, "coarse_size": c})]}
    if teacher_onnx:
        tc = TeacherCoarseCascade.load(artifacts, teacher_onnx=teacher_onnx, warm=False)
        rt = cascade_eval(artifacts, data, scratch / "gmv_teacher", coarse_sizes=(TEACHER["coarse_size"],),
                          cascade=tc, **common)
        t = row({(c["retrieval_size"], c["coarse_size"]): c for c in rt["configs"]}, TEACHER)
        out["recall"]["teacher_coarse"] = {m: t[m] for m in ("recall_retrieval", "recall_coarse", "recall_served")}
        out.update({"teacher_coarse_gmv_share": t["gmv_share"], "teacher_coarse_gmv_share_se": t["gmv_share_se"],
                    "teacher_coarse_ms_in_process": t["ms"],
                    "cascade_vs_teacher_coarse": casc["gmv_share"] / t["gmv_share"] if t["gmv_share"] > 0 else None,
                    "teacher_coarse_vs_single_stage": t["gmv_share"] / peer["gmv_share"] if peer["gmv_share"] > 0 else None})
        del tc
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def run_e2e(artifacts: str, data: str, *, scratch: str | Path, plots: str | Path | None = None,
            configs: str = DEFAULT_CONFIGS, teacher_onnx: str | None = None, gmv_users: int = 0,
            load: dict | None = None, results_path: str | Path | None = None, cascade: Cascade | None = None) -> dict:
    """Benchmark each configuration in `configs` (names of KNOWN) through gRPC, then (with
    `gmv_users`) GMV@50 against the truth. -> the results dict; `results_path` gets it after
    every configuration (a crash keeps the finished ones)."""
    load = {**DEFAULT_LOAD, **(load or {})}
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if plots:
        Path(plots).mkdir(parents=True, exist_ok=True)
    names = [n for n in configs.split(",") if n]
    specs = {n: config_spec(n) for n in names}
    if "teacher_coarse_w1" in names and not teacher_onnx:
        raise ValueError("configs: teacher_coarse_w1 needs teacher_onnx")
    res = {"machine": machine_info(), "loadavg_before": loadavg(), "artifacts": str(artifacts), "data": str(data),
           "p99_bound_ms": load["p99_bound"], "load": load, "configs": [], "teacher_onnx": teacher_onnx}
    try:
        import pyarrow.parquet as pq

        res["n_items"] = pq.ParquetFile(Path(data) / "items.parquet").metadata.num_rows
    except Exception:  # noqa: BLE001 - informational only
        res["n_items"] = None
    for name in names:
        kind, workers, sizes = specs[name]
        try:
            res["configs"].append(bench_config(name, kind, workers, sizes, str(artifacts), str(data), scratch,
                                               Path(plots) if plots else None, load, teacher_onnx))
        except Exception as e:  # noqa: BLE001 - keep the other configs' figures
            res["configs"].append({"name": name, "kind": kind, "workers": workers, "sizes": sizes, "error": repr(e)})
            print(f"{name}: {e!r}", file=sys.stderr)
        if results_path:
            Path(results_path).write_text(json.dumps(res, indent=2) + "\n")
    res["loadavg_after"] = loadavg()
    if gmv_users:
        extra = sorted({sz["coarse_size"] for k, _, sz in specs.values() if k == "cascade"} - {CASCADE["coarse_size"]})
        res["gmv"] = gmv_retained(str(artifacts), str(data), scratch, gmv_users, teacher_onnx, cascade=cascade,
                                  extra_coarse=tuple(extra))
    by_name = {c["name"]: c for c in res["configs"]}
    res["targets"] = check_targets(by_name, res.get("gmv"))
    sats = {n: _sat(c) for n, c in by_name.items()}
    res["throughput_ratios"] = {f"cascade_w1/{n}": sats["cascade_w1"] / s for n, s in sats.items()
                                if n != "cascade_w1" and s and sats.get("cascade_w1")}
    cpu = {n: (c.get("fixed") or {}).get("server_cpu_ms_per_ok") for n, c in by_name.items()}
    if cpu.get("single_stage_w1"):  # single stage CPU / cascade CPU per answered request
        res["server_cpu_ratios"] = {f"single_stage_w1/{n}": cpu["single_stage_w1"] / v for n, v in cpu.items()
                                    if n.startswith("cascade") and v}
    if results_path:
        Path(results_path).write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="end-to-end gRPC benchmark of a bundle and its peers")
    p.add_argument("--artifacts", required=True)
    p.add_argument("--data", help="the world the bundle was trained on (test-day users)")
    p.add_argument("--out", help="report folder (required unless --peer-child)")
    p.add_argument("--scratch", default=None, help="server logs (default: a new temporary folder)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--peer-child", default=None, choices=["single", "teacher"], help=argparse.SUPPRESS)
    p.add_argument("--teacher-onnx", default=None, help="coarse_rank.export.export_teacher output (teacher peer)")
    for k, v in DEFAULT_LOAD.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated of {sorted(KNOWN)}")
    p.add_argument("--gmv-users", type=int, default=0, help="also GMV@50 vs truth on this many users (0 = skip)")
    a = p.parse_args(argv)
    if a.peer_child:
        return _peer_child(a.peer_child, a.artifacts, a.port, a.teacher_onnx)
    if not a.data or not a.out:
        p.error("--data and --out are required")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load = {k: getattr(a, k) for k in DEFAULT_LOAD}
    scratch = a.scratch or tempfile.mkdtemp(prefix="recstack-e2e-")
    res = run_e2e(a.artifacts, a.data, scratch=scratch, plots=out, configs=a.configs, teacher_onnx=a.teacher_onnx,
                  gmv_users=a.gmv_users, load=load, results_path=out / "results.json")
    res["command"] = shlex.join([sys.executable, "-m", "recstack.bench.e2e", *(argv if argv is not None else sys.argv[1:])])
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "report.md").write_text("\n".join(["# End-to-end gRPC benchmark", "", f"Command: `{res['command']}`", "",
                                              *report_lines(res)]) + "\n")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
