"""Latency of the Redis feature stores on this machine: a single redis-server (unix socket) and
a local three-node Redis Cluster (TCP), both with AOF fsynced on every write, started the way
the tests start them (tests/conftest.py).

    PYTHONPATH=. python tools/bench_feature_store.py [--reps 300]

Each rep appends a batch of 200 events over 50 users (seeded), then reads one user's history.
Then one cluster node is frozen (SIGSTOP: it hangs rather than refuses) and the time a read
and an append of its user take to fail is printed (the bound is StoreConfig.timeout_s).
"""
from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisCluster, RedisServer  # noqa: E402

from recstack.serving.store import Events, StoreConfig, StoreUnavailable, open_store  # noqa: E402
from recstack.serving.store.redis_store import user_key  # noqa: E402


def _batch(rng: np.random.Generator, t: float, n: int = 200, users: int = 50) -> Events:
    who = rng.integers(0, 10_000, users)[rng.integers(0, users, n)]
    return Events(who, rng.integers(0, 1000, n), rng.integers(0, 5, n), t + rng.random(n), rng.random(n) * 10)


def _run(name: str, url: str, reps: int) -> None:
    rng = np.random.default_rng(0)
    store = open_store(url, config=StoreConfig())
    store.append(_batch(rng, 1e9))  # connect and load the script before timing
    append, read = [], []
    for i in range(reps):
        b = _batch(rng, 1e9 + i)
        t0 = time.perf_counter()
        store.append(b)
        t1 = time.perf_counter()
        store.history(int(b.user_id[0]), 1e9 + reps)
        append.append(t1 - t0)
        read.append(time.perf_counter() - t1)
    for what, x in (("append 200 events / 50 users", append), ("history of one user", read)):
        ms = np.asarray(x) * 1e3
        print(f"{name:14s} {what:30s} p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms")
    store.close()


def _hung_node(cluster: RedisCluster) -> None:
    store = open_store(cluster.url, config=StoreConfig())
    user = next(u for u in range(1000) if cluster.node_of(user_key(u)) == 1)
    store.append(Events([user], [1], [0], [1e9], [0.0]))
    cluster.procs[1].send_signal(signal.SIGSTOP)
    try:
        calls = (("history", lambda: store.history(user, 1e9 + 1)),
                 ("append", lambda: store.append(Events([user], [2], [0], [1e9 + 1], [0.0]))))
        for what, call in calls:
            t0 = time.perf_counter()
            try:
                call()
                print(f"node frozen: {what} answered (unexpected)")
            except StoreUnavailable:
                print(f"node frozen: {what} StoreUnavailable after {time.perf_counter() - t0:.2f} s "
                      f"(timeout_s {store.config.timeout_s})")
    finally:
        cluster.procs[1].send_signal(signal.SIGCONT)
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    single = RedisServer(Path(tempfile.mkdtemp())).start()
    cluster = RedisCluster(Path(tempfile.mkdtemp())).create()
    try:
        _run("redis (unix)", single.url, args.reps)
        _run("redis-cluster", cluster.url, args.reps)
        _hung_node(cluster)
    finally:
        single.stop()
        cluster.close()


if __name__ == "__main__":
    main()
