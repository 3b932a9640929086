"""Open-loop load test of the ranking service (`recstack loadtest`).

    res = run("127.0.0.1:50051", qps=100, duration_s=10, concurrency=64, users="data/small")
    res["latency_ms"]["p99"], res["achieved_qps"], res["status"]   # {"OK": 998, "RESOURCE_EXHAUSTED": 2}
    run(..., sweep=True, p99_bound_ms=50)  # the highest QPS whose p99 stays under the bound

Open loop: request i is due at t0 + i / qps whatever happened to the earlier ones, and its
latency is measured from that scheduled time, so a server that falls behind shows its queueing
in the percentiles instead of slowing the load down (no coordinated omission). `concurrency`
bounds the calls outstanding; a call that has to wait for a slot still counts its wait.
Bounded: at most `max_requests` calls and `duration_s` of sending (then up to `timeout_s` for
the last answers). Percentiles come from an HDR histogram (1 us .. 1 h, 3 significant digits).
Loopback targets only.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

STAGES = ("features", "retrieval", "coarse", "fine", "total")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
_MAX_US = 3_600_000_000  # 1 h


class LoadTestError(ValueError):
    pass


def check_loopback(target: str) -> tuple[str, int]:
    """"host:port" -> (host, port), refusing any host that resolves to a non-loopback address."""
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise LoadTestError(f"target {target!r}: expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise LoadTestError(f"target {target!r}: cannot resolve {host!r}: {e}") from None
    bad = sorted(a for a in addrs if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if not addrs or bad:
        where = f"{host!r} resolves to {', '.join(bad)}" if bad != [host] else f"{host} is not a loopback address"
        raise LoadTestError(f"target {target}: {where}; the load tester only sends to this machine (127.0.0.0/8, ::1) "
                            "so that it cannot flood a shared server by mistake. To load a server you may load, run "
                            f"`recstack loadtest --target 127.0.0.1:{port}` on that server's machine")
    return host, int(port)


def check_reachable(target: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the target, when nothing accepts a TCP connection there."""
    host, port = check_loopback(target)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise LoadTestError(f"target {target}: cannot connect ({reason}); is `recstack serve` running on port {port}?") from None


def check_writable(path: str | Path | None, flag: str) -> None:
    """Before a run: `path` can be written (its folder exists, it is not a folder itself), so
    that the results are not lost at the end of the run."""
    if path is None:
        return
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise LoadTestError(f"{flag} {path}: is a folder, expected a file name")
    if not parent.is_dir():
        raise LoadTestError(f"{flag} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LoadTestError(f"{flag} {path}: the folder {parent} is not writable")


def test_day_users(data_dir: str | Path) -> np.ndarray:
    """The user ids of the impressions of the world's test day (the last day), one per impression,
    so busy users are drawn as often as they were served."""
    import pyarrow.parquet as pq

    data_dir = Path(data_dir)
    if not (data_dir / "world.json").is_file():
        raise LoadTestError(f"--data {data_dir}: no world.json (is this a `recstack simulate` output folder?)")
    world = json.loads((data_dir / "world.json").read_text())
    n_days = int(world.get("n_days") or world.get("config", {}).get("n_days"))
    path = data_dir / "impressions" / f"day={n_days:02d}.parquet"
    if not path.exists() and (data_dir / "impressions" / f"day={n_days:02d}").is_dir():
        path = data_dir / "impressions" / f"day={n_days:02d}"  # sharded layout: pyarrow reads the folder's parts
    if not path.exists():
        days = sorted((data_dir / "impressions").glob("day=*.parquet"))
        if not days:
            raise LoadTestError(f"{data_dir}: no impressions/day=NN.parquet")
        path = days[-1]
    return pq.read_table(path, columns=["user_id"]).column("user_id").to_numpy().astype(np.int64)


def _histogram():
    from hdrh.histogram import HdrHistogram

    return HdrHistogram(1, _MAX_US, 3)


def _summary(h) -> dict:
    if h.get_total_count() == 0:
        return {k: None for k in (*PERCENTILES, "max", "mean")}
    out = {k: h.get_value_at_percentile(p) / 1e3 for k, p in PERCENTILES.items()}
    out["max"] = h.get_max_value() / 1e3
    out["mean"] = h.get_mean_value() / 1e3
    return out


def _user_pool(users, n_users: int) -> tuple[np.ndarray | None, str]:
    if users is None:
        return None, f"uniform over [0, {n_users})"
    if isinstance(users, (str, Path)):
        return test_day_users(users), f"test day of {users}"
    arr = np.asarray(users, dtype=np.int64)
    if arr.ndim != 1 or not len(arr):
        raise LoadTestError("users: expected a data dir or a non-empty 1-D sequence of ids")
    return arr, f"{len(arr)} given ids"


class _Recorder:
    """What the answers of one run add up to: latency histograms (OK and errors), per-stage
    server timings, status counts, model versions; and the slots bounding the calls outstanding."""

    def __init__(self, concurrency: int, debug: bool, keep_samples: bool):
        self.debug, self.keep_samples = debug, keep_samples
        self.lat, self.err_lat, self.stage_h = _histogram(), _histogram(), {s: _histogram() for s in STAGES}
        self.status: dict[str, int] = {}
        self.versions: dict[str, int] = {}  # model_version of the OK responses (a reload under load shows here)
        self.samples: list[tuple[float, float, str]] = []  # (scheduled offset s, latency ms, code)
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(concurrency)
        self.outstanding = 0
        self.t0 = 0.0

    def finish(self, scheduled: float, fut) -> None:
        """A call's answer, `scheduled` its due time: latency counts from then."""
        now = time.perf_counter()
        code = fut.code()
        name = code.name if code is not None else "CANCELLED"
        ms = (now - scheduled) * 1e3
        with self.lock:
            self.status[name] = self.status.get(name, 0) + 1
            if name == "OK":
                self.lat.record_value(max(1, int(ms * 1e3)))
                resp = fut.result()
                self.versions[resp.model_version] = self.versions.get(resp.model_version, 0) + 1
                if self.debug:
                    t = resp.timings
                    for s in STAGES:
                        self.stage_h[s].record_value(max(1, int(getattr(t, f"{s}_ms") * 1e3)))
            else:
                self.err_lat.record_value(max(1, int(ms * 1e3)))
            if self.keep_samples:
                self.samples.append((scheduled - self.t0, ms, name))
            self.outstanding -= 1
        self.slots.release()


def _stubs(target: str, tls_ca: str | None, connections: int, stack: contextlib.ExitStack) -> list:
    """One RankingService stub per connection, each channel ready (entered on `stack`)."""
    import grpc

    from recstack.serving.client import channel as make_channel
    from recstack.v1 import ranking_pb2_grpc as pb_grpc

    # several connections, round robin: `serve --workers N` spreads connections (not calls) over its processes
    channels = [make_channel(target, tls_ca, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)]
    for ch in channels:
        stack.enter_context(ch)
        try:
            grpc.channel_ready_future(ch).result(timeout=10)
        except grpc.FutureTimeoutError:
            raise LoadTestError(f"target {target}: the port accepts connections but no gRPC server answered "
                                "within 10 s (TLS mismatch? try --tls-ca, or check the port)") from None
    return [pb_grpc.RankingServiceStub(ch) for ch in channels]


def _send(stubs: list, reqs: list, rec: _Recorder, qps: float, duration_s: float,
          timeout_s: float) -> tuple[int, int, float, float]:
    """Send `reqs` open loop (request i due at t0 + i / qps) and wait for the answers ->
    (sent, late sends, when sending ended, elapsed s)."""
    t0 = time.perf_counter() + 0.05
    rec.t0 = t0
    stop_at = t0 + duration_s
    sent = late_sends = 0
    for i in range(len(reqs)):
        due = t0 + i / qps
        if due >= stop_at:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if not rec.slots.acquire(timeout=max(0.0, stop_at + timeout_s - time.perf_counter())):
            break  # every slot stuck past the run's end: stop sending
        if time.perf_counter() - due > 1e-3:
            late_sends += 1
        with rec.lock:
            rec.outstanding += 1
        fut = stubs[i % len(stubs)].Rank.future(reqs[i], timeout=timeout_s)
        fut.add_done_callback(lambda f, due=due: rec.finish(due, f))
        sent += 1
    send_end = time.perf_counter()
    deadline = send_end + timeout_s + 1.0
    while time.perf_counter() < deadline:
        with rec.lock:
            if rec.outstanding == 0:
                break
        time.sleep(0.005)
    return sent, late_sends, send_end - t0, max(send_end, time.perf_counter()) - t0


def run_once(target: str, qps: float, duration_s: float, concurrency: int, users=None, max_requests: int | None = None,
             *, k: int = 10, timeout_s: float = 2.0, debug: bool = True, n_users: int = 1000, seed: int = 0,
             tls_ca: str | None = None, keep_samples: bool = False, connections: int = 4,
             retrieval_size: int = 0, coarse_size: int = 0) -> dict:
    """One open-loop run at `qps`; see the module docstring. Returns the figures as a dict."""
    from recstack.v1 import ranking_pb2 as pb

    if not (qps > 0 and duration_s > 0 and concurrency >= 1 and connections >= 1 and timeout_s > 0):
        raise LoadTestError(f"need qps > 0, duration > 0, concurrency >= 1, connections >= 1 and timeout > 0; got qps "
                            f"{qps}, duration {duration_s}, concurrency {concurrency}, connections {connections}, "
                            f"timeout {timeout_s}")
    if max_requests is not None and max_requests < 1:
        raise LoadTestError(f"max_requests must be >= 1, got {max_requests}")
    pool, pool_desc = _user_pool(users, n_users)
    check_reachable(target)
    n = int(math.ceil(qps * duration_s))
    if max_requests is not None:
        n = min(n, int(max_requests))
    rng = np.random.default_rng(seed)
    user_ids = pool[rng.integers(0, len(pool), n)] if pool is not None else rng.integers(0, n_users, n)

    rec = _Recorder(concurrency, debug, keep_samples)
    with contextlib.ExitStack() as stack:
        stubs = _stubs(target, tls_ca, connections, stack)
        reqs = [pb.RankRequest(user_id=int(u), num_results=k, debug=debug, retrieval_size=retrieval_size,
                               coarse_size=coarse_size) for u in user_ids]
        sent, late_sends, send_s, elapsed = _send(stubs, reqs, rec, qps, duration_s, timeout_s)

    status = rec.status
    ok = status.get("OK", 0)
    completed = sum(status.values())
    res = {
        "target": target, "offered_qps": float(qps), "duration_s": float(duration_s), "concurrency": int(concurrency),
        "k": k, "users": pool_desc, "sent": sent, "completed": completed, "unanswered": sent - completed,
        "achieved_qps": ok / elapsed if elapsed > 0 else 0.0, "send_rate": sent / max(send_s, 1e-9),
        "late_sends": late_sends, "elapsed_s": elapsed, "status": dict(sorted(status.items())),
        "error_rate": (completed - ok) / completed if completed else 0.0,
        "latency_ms": _summary(rec.lat),
        "error_latency_ms": _summary(rec.err_lat),
        "versions": dict(sorted(rec.versions.items())),
        "server_stage_ms": {s: _summary(h) for s, h in rec.stage_h.items()} if debug else {},
    }
    if keep_samples:
        res["samples"] = rec.samples
    return res


def sweep_qps(target: str, p99_bound_ms: float, start_qps: float, duration_s: float, concurrency: int, users=None,
              *, max_error_rate: float = 0.001, steps: int = 8, max_requests: int | None = None,
              progress: Callable[[int, int, dict], None] | None = None, **kw) -> dict:
    """Find the highest offered QPS whose p99 <= `p99_bound_ms` (and error rate <= max_error_rate):
    double from `start_qps` until a run fails, then bisect; at most `steps` runs.
    `progress(i, steps, run)` is called after each run (i from 1)."""
    runs: list[dict] = []
    good, bad = 0.0, math.inf
    qps = float(start_qps)
    for _ in range(steps):
        r = run_once(target, qps, duration_s, concurrency, users, max_requests, **kw)
        p99 = r["latency_ms"]["p99"]
        r["passed"] = p99 is not None and p99 <= p99_bound_ms and r["error_rate"] <= max_error_rate
        runs.append(r)
        if progress is not None:
            progress(len(runs), steps, r)
        if r["passed"]:
            good = max(good, qps)
        else:
            bad = min(bad, qps)
        qps = qps * 2 if math.isinf(bad) else (good + bad) / 2 if good else bad / 2
        if not math.isinf(bad) and good and (bad - good) / bad < 0.1:
            break
    return {"p99_bound_ms": p99_bound_ms, "best_qps": good, "first_failing_qps": None if math.isinf(bad) else bad,
            "runs": runs}


def plot_result(res: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if "runs" in res:  # a sweep: p50/p99 against offered QPS
        runs = sorted(res["runs"], key=lambda r: r["offered_qps"])
        q = [r["offered_qps"] for r in runs]
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in ("p50", "p99"):
            ax.plot(q, [r["latency_ms"][key] or np.nan for r in runs], marker="o", label=key)
        ax.axhline(res["p99_bound_ms"], color="k", ls="--", lw=1, label=f"bound {res['p99_bound_ms']} ms")
        ax.set_xlabel("offered QPS")
        ax.set_ylabel("latency (ms, from scheduled send)")
        ax.set_title(f"sweep: best {res['best_qps']:.0f} QPS with p99 <= bound")
        ax.legend()
    else:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        s = res.get("samples") or []
        ok = [(t, ms) for t, ms, c in s if c == "OK"]
        err = [(t, ms) for t, ms, c in s if c != "OK"]
        if ok:
            a1.scatter(*zip(*ok), s=3, label="OK")
        if err:
            a1.scatter(*zip(*err), s=6, c="r", label="error")
        a1.set_xlabel("scheduled send time (s)")
        a1.set_ylabel("latency (ms)")
        a1.set_yscale("log")
        a1.legend()
        lat = res["latency_ms"]
        keys = [k for k in (*PERCENTILES, "max") if lat.get(k) is not None]
        a2.bar(keys, [lat[k] for k in keys])
        a2.set_ylabel("latency (ms)")
        a2.set_title(f"{res['offered_qps']:.0f} QPS offered, {res['achieved_qps']:.0f} achieved")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # same suffix: it picks the format
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run(target: str, qps: float, duration_s: float = 10.0, concurrency: int = 64, users=None,
        max_requests: int | None = None, json_out: str | Path | None = None, plot: str | Path | None = None,
        sweep: bool = False, p99_bound_ms: float = 50.0, progress: Callable[[int, int, dict], None] | None = None,
        **kw) -> dict:
    """An open-loop run at `qps` (or, with `sweep`, the search for the highest QPS with p99 <=
    `p99_bound_ms`, starting at `qps`). `users`: a simulated data dir (its test day's users),
    a sequence of ids, or None (uniform over `n_users`). Writes `json_out` / `plot` (PNG) when given,
    checked writable before the run, each whole or not at all. `progress`: see `sweep_qps`.
    Other keywords: k, timeout_s, debug, n_users, seed, tls_ca, connections (see `run_once`)."""
    check_writable(json_out, "--json")
    check_writable(plot, "--plot")
    if sweep:
        res = sweep_qps(target, p99_bound_ms, qps, duration_s, concurrency, users, max_requests=max_requests,
                        progress=progress, **kw)
    else:
        res = run_once(target, qps, duration_s, concurrency, users, max_requests, keep_samples=plot is not None, **kw)
    if plot:
        plot_result(res, plot)
    res.pop("samples", None)
    if json_out:
        tmp = Path(json_out).with_name(f".{Path(json_out).name}.tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, json_out)
    return res


def format_result(res: dict) -> str:
    if "runs" in res:
        lines = [f"{'offered':>8} {'achieved':>9} {'p50':>8} {'p99':>8} {'errors':>7}  pass"]
        for r in res["runs"]:
            lat = r["latency_ms"]
            f = lambda v: f"{v:8.2f}" if v is not None else f"{'-':>8}"  # noqa: E731
            lines.append(f"{r['offered_qps']:8.0f} {r['achieved_qps']:9.1f} {f(lat['p50'])} {f(lat['p99'])} "
                         f"{r['error_rate']:7.2%}  {'yes' if r['passed'] else 'no'}")
        lines.append(f"best QPS with p99 <= {res['p99_bound_ms']} ms: {res['best_qps']:.0f}")
        return "\n".join(lines)
    lat = res["latency_ms"]
    lines = [f"{res['sent']} sent, {res['completed']} answered in {res['elapsed_s']:.1f}s: offered {res['offered_qps']:.0f} QPS, "
             f"achieved {res['achieved_qps']:.1f} QPS (OK)   users: {res['users']}",
             "status: " + ", ".join(f"{k} {v}" for k, v in res["status"].items())]
    if lat["p50"] is not None:
        lines.append("latency ms (from scheduled send): " + "  ".join(f"{k} {lat[k]:.2f}" for k in (*PERCENTILES, "max")))
    for s, v in res.get("server_stage_ms", {}).items():
        if v["p50"] is not None:
            lines.append(f"  server {s:<9} p50 {v['p50']:.2f}  p99 {v['p99']:.2f}  mean {v['mean']:.2f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `recstack loadtest` flags (the CLI calls this, then `main_from_args`)."""
    p.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT (loopback only)")
    p.add_argument("--qps", type=float, default=50.0, help="offered rate (the sweep's starting point)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending per run")
    p.add_argument("--concurrency", type=int, default=64, help="most calls outstanding")
    p.add_argument("--max-requests", type=int, default=None, help="at most this many calls per run")
    p.add_argument("--data", default=None, help="simulated data dir: draw users from its test day (default: uniform ids)")
    p.add_argument("--n-users", type=int, default=1000, help="uniform ids in [0, N) when --data is not given")
    p.add_argument("-k", type=int, default=10, help="num_results per request")
    p.add_argument("--retrieval-size", type=int, default=0, help="retrieval_size per request (0 = server default)")
    p.add_argument("--coarse-size", type=int, default=0, help="coarse_size per request (0 = server default)")
    p.add_argument("--timeout", type=float, default=2.0, help="per-call deadline (s)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results here (JSON)")
    p.add_argument("--plot", default=None, metavar="FILE", help="write a PNG latency plot here")
    p.add_argument("--sweep", action="store_true", help="find the highest QPS with p99 <= --p99-bound-ms")
    p.add_argument("--p99-bound-ms", type=float, default=50.0, help="the sweep's latency bound on p99")
    p.add_argument("--tls-ca", default=None, help="PEM file: use TLS and verify the server against it")
    p.add_argument("--connections", type=int, default=4, help="TCP connections, round robin (workers share by connection)")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw of user ids")


def _print_step(i: int, steps: int, r: dict) -> None:
    """One stderr line per sweep run, as it finishes."""
    p99 = r["latency_ms"]["p99"]
    print(f"sweep {i}/{steps}: offered {r['offered_qps']:.0f} QPS, achieved {r['achieved_qps']:.1f}, p99 "
          f"{'-' if p99 is None else f'{p99:.2f} ms'}, errors {r['error_rate']:.2%}: {'pass' if r['passed'] else 'fail'}",
          file=sys.stderr, flush=True)


def main_from_args(args: argparse.Namespace) -> int:
    try:
        res = run(args.target, args.qps, args.duration, args.concurrency, users=args.data, max_requests=args.max_requests,
                  json_out=args.json, plot=args.plot, sweep=args.sweep, p99_bound_ms=args.p99_bound_ms, k=args.k,
                  retrieval_size=args.retrieval_size, coarse_size=args.coarse_size,
                  timeout_s=args.timeout, n_users=args.n_users, seed=args.seed, tls_ca=args.tls_ca,
                  connections=args.connections, progress=_print_step if args.sweep else None)
    except LoadTestError as e:
        print(f"recstack loadtest: error: {e}", file=sys.stderr)
        return 2
    print(format_result(res))
    for flag, path in (("results", args.json), ("plot", args.plot)):
        if path:
            print(f"wrote {flag}: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recstack loadtest", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
