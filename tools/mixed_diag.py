"""Where Rank's time goes under `recstack bench mixed`: the bench's two phases against a server
whose feature-store calls are timed one by one, with its access log kept, and (with Redis) a
redis-server started here with its latency monitor on.

    PYTHONPATH=. python tools/mixed_diag.py run --artifacts ART --data WORLD --out DIR --store redis
    PYTHONPATH=. python tools/mixed_diag.py analyse DIR

`run` writes DIR/res.json (the bench's figures plus Redis INFO commandstats / clients / stats
and LATENCY history), DIR/access.jsonl (one line per RPC: method, code, ms, end time) and
DIR/store_calls.txt (one line per store read / append: start time, ms, thread; per garbage
collection: its generation, start, wall and CPU ms; per Rank / LogEvents handler: start, CPU
ms). `analyse` prints, per phase, the server-side Rank time, the store's read and append times,
the handlers' CPU, the collections and the Rank refusals that followed a full one, the most
calls of each method in flight at once, and how many LogEvents were in flight when a Rank
was refused.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _instrumented_serve(argv: list[str]) -> int:
    """`recstack serve` with RedisStore / SQLiteStore reads and appends timed to $MIXED_DIAG_STORE_LOG."""
    from recstack.cli import main
    from recstack.serving.store import redis_store, sqlite

    out, lock = open(os.environ["MIXED_DIAG_STORE_LOG"], "a", buffering=1), threading.RLock()  # re-entered by the gc callback

    def timed(name, fn):
        def call(self, *a):
            t0, p0 = time.time(), time.perf_counter()
            try:
                return fn(self, *a)
            finally:
                with lock:
                    out.write(f"{name} {t0:.6f} {(time.perf_counter() - p0) * 1e3:.3f} {threading.current_thread().name}\n")
        return call

    for cls in (redis_store.RedisStore, sqlite.SQLiteStore):
        cls._recent, cls._append = timed("read", cls._recent), timed("append", cls._append)
    _time_handlers(out, lock)
    return main(["serve", *argv])


def _time_handlers(out, lock) -> None:
    """Log each garbage collection (generation, start, wall and CPU ms: the GIL is held
    throughout) and each Rank / LogEvents handler's CPU time in its own thread."""
    import gc

    from recstack.serving.server import RankingServicer

    started: dict = {}

    def on_gc(phase, info):
        if phase == "start":
            started.update(t=time.time(), p=time.perf_counter(), c=time.thread_time())
        elif started:
            with lock:
                out.write(f"gc{info['generation']} {started['t']:.6f} {(time.perf_counter() - started['p']) * 1e3:.3f} "
                          f"{(time.thread_time() - started['c']) * 1e3:.3f}\n")

    gc.callbacks.append(on_gc)

    def cpu_timed(name, fn):
        def call(self, request, context):
            t0, c0 = time.time(), time.thread_time()
            try:
                return fn(self, request, context)
            finally:
                with lock:
                    out.write(f"cpu_{name} {t0:.6f} {(time.thread_time() - c0) * 1e3:.3f}\n")
        return call

    RankingServicer.Rank = cpu_timed("Rank", RankingServicer.Rank)
    RankingServicer.LogEvents = cpu_timed("LogEvents", RankingServicer.LogEvents)


def _redis(workdir: Path):
    import redis

    sock = workdir / "redis.sock"
    proc = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700", "--dir",
                             str(workdir), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                             "--latency-monitor-threshold", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            redis.Redis(unix_socket_path=str(sock)).ping()
            return proc, f"unix://{sock}", redis.Redis(unix_socket_path=str(sock))
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def run(args) -> None:
    import pyarrow.parquet as pq

    from recstack.bench import loadtest as LT
    from recstack.bench import mixed as M
    from recstack.serving.store import open_store

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rproc = rc = None
    if args.store == "redis":
        (out / "redis").mkdir(exist_ok=True)
        rproc, spec, rc = _redis(out / "redis")
    else:
        spec = str(out / "feature_store.sqlite3")
    env = dict(os.environ, MIXED_DIAG_STORE_LOG=str(out / "store_calls.txt"))
    err_path = out / "serve.stderr"
    with open(err_path, "w") as err, open(out / "access.jsonl", "w") as access:
        proc = subprocess.Popen([sys.executable, __file__, "serve", "--artifacts", args.artifacts, "--port", "0",
                                 "--threads", "4", "--feature-store", spec, "--impression-log", "none"],
                                stdout=access, stderr=err, env=env)
    while not (m := re.search(r"listening on [^\s:]+:(\d+)", err_path.read_text())):
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {err_path}")
        time.sleep(0.2)
    users = LT.test_day_users(args.data)
    n_items = pq.ParquetFile(Path(args.data) / "items.parquet").metadata.num_rows
    store = open_store(spec)
    res = M.measure(f"127.0.0.1:{m.group(1)}", users, n_items, M.MixedConfig(duration_s=args.duration), store,
                    server_pid=proc.pid)
    store.close()
    if rc is not None:
        res["redis"] = {"commandstats": rc.info("commandstats"), "clients": rc.info("clients"), "stats": rc.info("stats"),
                        "latency_history": {ev: rc.execute_command("LATENCY", "HISTORY", ev)
                                            for ev in ("aof-fsync-always", "command", "fast-command")}}
    proc.terminate()
    proc.wait(30)
    if rproc is not None:
        rproc.terminate()
        rproc.wait(30)
    (out / "res.json").write_text(json.dumps(res, indent=1, default=str))


def _pct(x) -> str:
    return "n=%d p50 %.1f p90 %.1f p99 %.1f max %.1f" % ((len(x),) + tuple(np.percentile(x, [50, 90, 99, 100])))


def analyse(args) -> None:
    d = Path(args.dir)
    calls = []  # (start, end, method, code)
    for line in open(d / "access.jsonl"):
        a = json.loads(line)
        end = dt.datetime.fromisoformat(a["ts"]).timestamp()
        calls.append((end - a["ms"] / 1e3, end, a["method"], a["code"], a["ms"]))
    store = [ln.split() for ln in open(d / "store_calls.txt")] if (d / "store_calls.txt").exists() else []
    t_mixed = min((c[0] for c in calls if c[2] == "LogEvents"), default=float("inf"))
    for phase, keep in (("warm-up + Rank only", lambda t: t < t_mixed), ("mixed", lambda t: t >= t_mixed)):
        rank = [c for c in calls if c[2] == "Rank" and keep(c[0])]
        print(phase, dict(collections.Counter(c[3] for c in rank)))
        print("  Rank server ms", _pct([c[4] for c in rank if c[3] == "OK"]))
        for name in ("read", "append", "cpu_Rank", "cpu_LogEvents", "gc0", "gc1", "gc2"):
            ms = [float(s[2]) for s in store if s[0] == name and keep(float(s[1]))]
            if ms:
                print(f"  {name} ms", _pct(ms), "sum %.0f" % sum(ms))
        span = [c[0] for c in calls if keep(c[0])]
        gc2 = [float(s[1]) for s in store if s[0] == "gc2" and keep(float(s[1]))]
        late = [c for c in rank if c[3] == "RESOURCE_EXHAUSTED"]
        if span:
            print("  seconds %.0f; Rank refused within 0.5 s after a gen-2 collection: %d of %d" % (
                max(span) - min(span), sum(1 for c in late if any(0 <= c[0] - g < 0.5 for g in gc2)), len(late)))
    edges = sorted([(c[0], 1, c[2]) for c in calls] + [(c[1], -1, c[2]) for c in calls])
    now, most = collections.Counter(), collections.Counter()
    for _, step, method in edges:
        now[method] += step
        most[method] = max(most[method], now[method])
        most["all"] = max(most["all"], sum(now.values()))
    print("most in flight at once", dict(most))
    events = [c for c in calls if c[2] == "LogEvents"]
    refused = [c for c in calls if c[2] == "Rank" and c[3] == "RESOURCE_EXHAUSTED" and c[0] >= t_mixed]
    print("LogEvents in flight when a mixed-phase Rank was refused",
          dict(collections.Counter(sum(1 for e in events if e[0] <= r[0] < e[1]) for r in refused)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(_instrumented_serve(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--artifacts", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--store", choices=("redis", "sqlite"), default="redis")
    r.add_argument("--duration", type=float, default=60.0)
    a = sub.add_parser("analyse")
    a.add_argument("dir")
    args = ap.parse_args()
    (run if args.cmd == "run" else analyse)(args)


if __name__ == "__main__":
    main()
