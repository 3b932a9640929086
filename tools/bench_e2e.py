"""End-to-end gRPC benchmark of a served bundle (issue 7, item 2, the end-to-end part), on this machine.

    .venv/bin/python tools/bench_e2e.py --artifacts /tmp/e2e-bench/artifacts --data /tmp/lead/large \
        --out docs/results/bench_e2e --scratch /tmp/e2e-bench/load

For each server configuration it starts a local server (loopback, by pid), waits for health
SERVING, and drives it with `recstack.loadtest` (open loop, latency from the scheduled send,
users drawn from the data's test day):

  * cascade, `recstack serve --workers 1` and `--workers 2`: requests 10,000 -> 500 -> 50
    (retrieval_size, coarse_size, num_results: the issue's default stage sizes);
  * single stage (the peer), one process: requests 10,000 -> 10,000 -> 50, i.e. the fine
    ranker scores every retrieved candidate. The server's coarse_size_max (2,000) refuses that,
    so the peer is a `build_server` process with `ServingLimits(coarse_size_max=10_000)`,
    otherwise the same settings as `recstack serve` (4 RPC threads, 1 ONNX thread).

Runs per configuration: one fixed-QPS run (p50/p90/p99/max, per-stage server timings, a PNG),
a `--sweep` for the highest QPS with p99 <= the bound, and a saturation run (offered far
above capacity: the achieved OK QPS is the throughput). Writes results.json, report.md and PNGs.

Every request carries the configuration's stage sizes (`recstack loadtest --retrieval-size
--coarse-size`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASCADE = {"retrieval_size": 10_000, "coarse_size": 500, "k": 50}
SINGLE = {"retrieval_size": 10_000, "coarse_size": 10_000, "k": 50}
TARGETS = {"p99_at_50qps_ms": 25.0, "best_qps_p99_50ms": 150.0, "throughput_ratio": 10.0}


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
            time.sleep(1.0)
    raise TimeoutError(f"{target} not SERVING after {timeout_s} s")


def _peer_child(artifacts: str, port: int) -> int:
    """The single-stage peer server: build_server with coarse_size_max raised; runs until SIGTERM."""
    import threading

    from recstack.serving.server import build_server
    from recstack.serving.validate import ServingLimits

    limits = ServingLimits(coarse_size_max=SINGLE["coarse_size"])
    server, _, _ = build_server(artifacts, "127.0.0.1", port, 4, limits=limits, onnx_threads=1)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(5).wait()
    return 0


def start_server(kind: str, artifacts: str, port: int, workers: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if kind == "cascade":
        cmd = [str(REPO / ".venv/bin/recstack"), "serve", "--artifacts", artifacts, "--port", str(port),
               "--workers", str(workers)]
    else:
        cmd = [sys.executable, __file__, "--peer-child", "--artifacts", artifacts, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def bench_config(name: str, kind: str, workers: int, sizes: dict, a, scratch: Path) -> dict:
    from recstack import loadtest as L

    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server(kind, a.artifacts, port, workers, scratch / f"{name}.server.log")
    out = {"name": name, "kind": kind, "workers": workers, "sizes": sizes, "server_pid": proc.pid}
    try:
        out["startup_s"] = wait_serving(target, proc)
        kw = dict(k=sizes["k"], users=a.data, concurrency=a.concurrency, timeout_s=a.timeout,
                  retrieval_size=sizes["retrieval_size"], coarse_size=sizes["coarse_size"])
        L.run_once(target, 5, 4, **{**kw, "seed": 99})  # warm-up (connections, caches); not reported
        fixed_qps = a.qps if kind == "cascade" else a.peer_qps
        out["fixed"] = L.run(target, fixed_qps, a.duration, plot=Path(a.out) / f"{name}_fixed.png", **kw)
        out["sweep"] = L.run(target, fixed_qps if kind == "cascade" else a.peer_sweep_start, a.sweep_duration,
                             sweep=True, p99_bound_ms=a.p99_bound, steps=a.sweep_steps,
                             plot=Path(a.out) / f"{name}_sweep.png", **kw)
        sat_qps = a.sat_qps if kind == "cascade" else a.peer_sat_qps
        out["saturation"] = L.run(target, sat_qps, a.sat_duration, **kw)
    finally:
        out["server_exit"] = stop_server(proc)
    for key in ("fixed", "sweep", "saturation"):
        if key in out:
            print(f"--- {name} {key}\n{L.format_result(out[key])}", flush=True)
    return out


def gmv_retained(artifacts: str, data: str, scratch: Path, n_users: int, i2i_share: float = 0.3) -> dict:
    """GMV@50 against the world's truth for the cascade (10,000 -> 500) and the single-stage peer
    (10,000 -> 10,000), same users, in process through the serving code (retrieval.cascade_eval)."""
    from retrieval.cascade_eval import run as cascade_eval

    r = cascade_eval(artifacts, data, scratch / "gmv", n_users=n_users, k=CASCADE["k"],
                     retrieval_sizes=(CASCADE["retrieval_size"],), coarse_sizes=(CASCADE["coarse_size"], SINGLE["coarse_size"]),
                     i2i_shares=(i2i_share,), default_retrieval=CASCADE["retrieval_size"],
                     default_coarse=CASCADE["coarse_size"], exhaustive=False, plot=False)
    rows = {(c["retrieval_size"], c["coarse_size"]): c for c in r["configs"]}
    casc = rows[(CASCADE["retrieval_size"], CASCADE["coarse_size"])]
    peer = rows[(SINGLE["retrieval_size"], SINGLE["coarse_size"])]
    return {"n_users": r["n_users"], "k": r["k"], "day": r["day"], "i2i_share": i2i_share,
            "cascade_gmv_share": casc["gmv_share"], "cascade_gmv_share_se": casc["gmv_share_se"],
            "single_stage_gmv_share": peer["gmv_share"], "single_stage_gmv_share_se": peer["gmv_share_se"],
            "retained": casc["gmv_share"] / peer["gmv_share"] if peer["gmv_share"] > 0 else None,
            "cascade_ms_in_process": casc["ms"], "single_stage_ms_in_process": peer["ms"],
            "wall_seconds": r["wall_seconds"]}


def _p(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def write_report(out: Path, res: dict) -> None:
    m = res["machine"]
    lines = ["# End-to-end gRPC benchmark (issue 7, item 2: end to end and the single-stage peer)", "",
             f"Machine: {m['cpu_model']}, nproc {m['nproc']}, load average before {res['loadavg_before']}, "
             f"after {res['loadavg_after']}; python {m['python']}, onnxruntime {m['onnxruntime']}. "
             "Server and load generator on the same host (loopback).", "",
             f"Corpus: `{res['data']}` ({res['n_items']} items); bundle `{res['artifacts']}`.", "",
             "Command:", "", "```", res["command"], *([res["command_gmv"]] if res.get("command_gmv") else []), "```", "",
             "## Fixed QPS", "",
             "| config | sizes (retr -> coarse -> k) | offered QPS | achieved | p50 | p90 | p99 | max (ms) | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        f, s = c.get("fixed"), c["sizes"]
        if not f:
            continue
        lat = f["latency_ms"]
        lines.append(f"| {c['name']} | {s['retrieval_size']} -> {s['coarse_size']} -> {s['k']} | {f['offered_qps']:.0f} | "
                     f"{f['achieved_qps']:.1f} | {_p(lat['p50'])} | {_p(lat['p90'])} | {_p(lat['p99'])} | "
                     f"{_p(lat['max'])} | {f['status']} |")
    lines += ["", "Per-stage server timings at the fixed QPS (ms, p50 / p99):", "",
              "| config | features | retrieval | coarse | fine | total |", "|---|---|---|---|---|---|"]
    for c in res["configs"]:
        st = (c.get("fixed") or {}).get("server_stage_ms") or {}
        if st:
            lines.append(f"| {c['name']} | " + " | ".join(f"{_p(st[s]['p50'])} / {_p(st[s]['p99'])}" for s in
                                                         ("features", "retrieval", "coarse", "fine", "total")) + " |")
    lines += ["", "## Sweep (highest offered QPS with p99 <= bound) and saturation", "",
              "| config | best QPS (p99 <= %.0f ms) | first failing | saturation: offered | achieved OK QPS | p99 (ms) | status |"
              % res["p99_bound_ms"], "|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        sw, sa = c.get("sweep"), c.get("saturation")
        if sw and sa:
            lines.append(f"| {c['name']} | {sw['best_qps']:.1f} | {sw['first_failing_qps']} | {sa['offered_qps']:.0f} | "
                         f"{sa['achieved_qps']:.1f} | {_p(sa['latency_ms']['p99'])} | {sa['status']} |")
    lines += ["", "Sweep runs (offered -> p50 / p99 ms, passed):", ""]
    for c in res["configs"]:
        if c.get("sweep"):
            runs = ", ".join(f"{r['offered_qps']:.1f} -> {_p(r['latency_ms']['p50'])} / {_p(r['latency_ms']['p99'])} "
                             f"{'ok' if r['passed'] else 'FAIL'}" for r in c["sweep"]["runs"])
            lines.append(f"- {c['name']}: {runs}")
    g = res.get("gmv")
    if g:
        lines += ["", f"## GMV@{g['k']} against the world's truth ({g['n_users']} test-day users, i2i share {g['i2i_share']})",
                  "", "Share of the oracle top-50's true expected GMV (retrieval.cascade_eval, in process, same users):", "",
                  f"- cascade 10,000 -> 500 -> 50: {g['cascade_gmv_share']:.4f} ± {g['cascade_gmv_share_se']:.4f} (s.e.)",
                  f"- single stage 10,000 -> 10,000 -> 50: {g['single_stage_gmv_share']:.4f} ± "
                  f"{g['single_stage_gmv_share_se']:.4f}",
                  f"- retained: {g['retained']:.3f} of the single stage's GMV@50 (target >= 0.95)",
                  f"- in-process ms/request: cascade {g['cascade_ms_in_process']:.1f}, single stage "
                  f"{g['single_stage_ms_in_process']:.1f}"]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {t['verdict']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def check_targets(configs: dict) -> list[dict]:
    rows = []
    c1 = configs.get("cascade_w1") or {}
    best = max((c.get("sweep", {}).get("best_qps", 0.0) for n, c in configs.items() if n.startswith("cascade")),
               default=0.0)
    if c1.get("fixed"):
        p99 = c1["fixed"]["latency_ms"]["p99"]
        t = TARGETS["p99_at_50qps_ms"]
        rows.append({"target": f"p99 <= {t:.0f} ms at {c1['fixed']['offered_qps']:.0f} QPS (1 worker)",
                     "measured": f"{_p(p99)} ms",
                     "verdict": ("met" if p99 is not None and p99 <= t else
                                 f"missed by {p99 - t:.1f} ms ({p99 / t:.2f}x)" if p99 else "missed (no OK calls)")})
    t = TARGETS["best_qps_p99_50ms"]
    rows.append({"target": f"highest QPS with p99 <= 50 ms >= {t:.0f} (best of the cascade configs)",
                 "measured": f"{best:.1f} QPS",
                 "verdict": "met" if best >= t else f"missed by {t - best:.1f} QPS ({best / t:.2f} of target)"})
    peer = configs.get("single_stage_w1") or {}
    if c1.get("saturation") and peer.get("saturation"):
        ca, pa = c1["saturation"]["achieved_qps"], peer["saturation"]["achieved_qps"]
        ratio = ca / pa if pa > 0 else float("inf")
        t = TARGETS["throughput_ratio"]
        rows.append({"target": f"cascade >= {t:.0f}x single-stage throughput (1 worker each, saturation OK QPS)",
                     "measured": f"{ca:.1f} / {pa:.1f} = {ratio:.1f}x",
                     "verdict": "met" if ratio >= t else f"missed: {ratio:.1f}x of {t:.0f}x"})
        cb, pb_ = c1.get("sweep", {}).get("best_qps", 0.0), peer.get("sweep", {}).get("best_qps", 0.0)
        rows.append({"target": "(same, by the sweep's best QPS with p99 <= 50 ms)",
                     "measured": f"{cb:.1f} / {pb_:.1f}" + (f" = {cb / pb_:.1f}x" if pb_ > 0 else
                                                           " (the peer never meets the bound)"),
                     "verdict": "n/a: ratio undefined (peer 0 QPS under the bound)" if pb_ == 0 else
                     "met" if cb / pb_ >= t else f"missed: {cb / pb_:.1f}x of {t:.0f}x"})
    return rows


def check_gmv(g: dict | None) -> list[dict]:
    if not g or g.get("retained") is None:
        return []
    return [{"target": "cascade keeps >= 95 % of the single stage's GMV@50", "measured": f"{g['retained']:.3f}",
             "verdict": "met" if g["retained"] >= 0.95 else f"missed by {0.95 - g['retained']:.3f}"}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifacts", required=True)
    p.add_argument("--data", help="the world the bundle was trained on (test-day users)")
    p.add_argument("--out", default="docs/results/bench_e2e")
    p.add_argument("--scratch", default="/tmp/e2e-bench/load", help="server logs")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--peer-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--qps", type=float, default=50.0, help="fixed QPS (cascade); also the sweep's start")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--sweep-duration", type=float, default=10.0)
    p.add_argument("--sweep-steps", type=int, default=7)
    p.add_argument("--p99-bound", type=float, default=50.0)
    p.add_argument("--sat-qps", type=float, default=400.0, help="saturation run's offered QPS (cascade)")
    p.add_argument("--sat-duration", type=float, default=15.0)
    p.add_argument("--peer-qps", type=float, default=5.0, help="fixed QPS for the single-stage peer")
    p.add_argument("--peer-sweep-start", type=float, default=2.0)
    p.add_argument("--peer-sat-qps", type=float, default=60.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--configs", default="cascade_w1,single_stage_w1,cascade_w2",
                   help="comma-separated; empty: keep the load figures of OUT/results.json (e.g. to add --gmv-users)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeatable)")
    p.add_argument("--gmv-users", type=int, default=0, help="also GMV@50 vs truth on this many users (0 = skip)")
    a = p.parse_args(argv)
    if a.peer_child:
        return _peer_child(a.artifacts, a.port)

    from recstack import bench as RB

    out, scratch = Path(a.out), Path(a.scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    known = {"cascade_w1": ("cascade", 1, CASCADE), "cascade_w2": ("cascade", 2, CASCADE),
             "single_stage_w1": ("single", 1, SINGLE)}
    res = {"machine": RB.machine_info(), "loadavg_before": [round(x, 2) for x in os.getloadavg()],
           "command": shlex.join([".venv/bin/python", "tools/bench_e2e.py", *(argv or sys.argv[1:])]),
           "artifacts": a.artifacts, "data": a.data, "p99_bound_ms": a.p99_bound, "configs": []}
    try:
        import pyarrow.parquet as pq

        res["n_items"] = pq.ParquetFile(Path(a.data) / "items.parquet").metadata.num_rows
    except Exception:  # noqa: BLE001 - informational only
        res["n_items"] = None
    prev = {}
    if not a.configs:
        prev = json.loads((out / "results.json").read_text())
        res.update({k: prev[k] for k in ("machine", "loadavg_before", "command", "configs")})
        res["command_gmv"] = shlex.join([".venv/bin/python", "tools/bench_e2e.py", *(argv or sys.argv[1:])])
    for name in filter(None, a.configs.split(",")):
        kind, workers, sizes = known[name]
        try:
            res["configs"].append(bench_config(name, kind, workers, sizes, a, scratch))
        except Exception as e:  # noqa: BLE001 - keep the other configs' figures
            res["configs"].append({"name": name, "kind": kind, "workers": workers, "sizes": sizes, "error": repr(e)})
            print(f"{name}: {e!r}", file=sys.stderr)
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    res["loadavg_after"] = prev["loadavg_after"] if not a.configs else [round(x, 2) for x in os.getloadavg()]
    if a.gmv_users:
        res["gmv"] = gmv_retained(a.artifacts, a.data, scratch, a.gmv_users)
    res["targets"] = check_targets({c["name"]: c for c in res["configs"]}) + check_gmv(res.get("gmv"))
    res["notes"] = [
        "Stage sizes are set on each request (10,000 -> 500 -> 50 for the cascade; 10,000 -> 10,000 -> 50 for the "
        "single-stage peer) through recstack loadtest's --retrieval-size / --coarse-size.",
        "Throughput = OK responses per second while offered far above capacity (saturation run); "
        "RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED answers are not counted.",
        "The load generator shares the 2 cores with the server, so it takes CPU from it at high QPS.",
        *a.note,
    ]
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_report(out, res)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
