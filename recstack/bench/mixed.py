"""Mixed load on the live path (`recstack bench mixed`): Rank under event ingestion.

    res = run("artifacts", "data/small", out, qps=50, events_per_s=200, duration_s=60)

One server (`recstack serve`, started here on a free port with a fresh feature store) gets,
in this order: Rank alone at `qps` for `duration_s` (recstack.bench.loadtest's open-loop
load, unchanged), then the same Rank load again with an open-loop `LogEvents` sender beside
it at `events_per_s`, in batches of `batch` events. So the two Rank p99s compare one server
with and without ingestion, measured minutes apart on the same machine.

The events are realistic: users drawn from the world's test day (as often as they were
served), items uniform over the corpus, kinds view / click / favourite / cart / purchase in
funnel proportions, a dwell time for views and clicks (exponential), timestamped with the
wall clock when the batch is sent. Batch i is due at t0 + i * batch / events_per_s whatever
happened to the earlier ones; its latency counts from then (no coordinated omission). A batch
the server refuses before acknowledging it (RESOURCE_EXHAUSTED: ingestion over its bound;
UNAVAILABLE: the store failed, nothing acknowledged) is sent again, as a client should, after a
doubling backoff, until its deadline (`timeout_s` after its due time); the retries are counted
per code, and a batch is failed only when its last answer is not OK.

After the run every acknowledged event is looked up in the store: an acknowledged event is
never lost, so `readable` must equal `expected_readable` (the acknowledged events within the
store's per-user bound, StoreConfig.max_events newest per user).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recstack import features as F
from recstack.bench import loadtest as LT
from recstack.bench.timing import cpu_seconds

# kind -> (share of events, mean dwell in seconds; 0 = no dwell): a shopping funnel
KIND_MIX = {"view": (0.60, 8.0), "click": (0.25, 35.0), "favourite": (0.05, 0.0), "cart": (0.06, 0.0),
            "purchase": (0.04, 0.0)}
RETRY_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE")  # refused, nothing acknowledged: the batch is sent again
RETRY_BACKOFF_S = (0.01, 0.2)  # the first retry's wait, doubling up to the second


@dataclass(frozen=True)
class MixedConfig:
    qps: float = 50.0  # Rank calls per second, both phases
    events_per_s: float = 200.0  # events per second in the mixed phase
    batch: int = 10  # events per LogEvents call
    duration_s: float = 60.0  # seconds of sending per phase
    warmup_s: float = 10.0  # Rank at `qps` before phase 1 (a fresh server's first calls), reported apart
    concurrency: int = 64  # most Rank calls outstanding (loadtest's bound)
    event_concurrency: int = 16  # most LogEvents calls outstanding
    k: int = 10  # num_results per Rank
    timeout_s: float = 2.0  # each call's deadline
    seed: int = 0

    def __post_init__(self):
        if not (self.qps > 0 and self.events_per_s > 0 and self.duration_s > 0 and self.timeout_s > 0):
            raise ValueError("MixedConfig: qps, events_per_s, duration_s and timeout_s must be > 0")
        if not self.warmup_s >= 0:
            raise ValueError(f"MixedConfig.warmup_s: must be >= 0, got {self.warmup_s}")
        if self.batch < 1 or self.concurrency < 1 or self.event_concurrency < 1 or self.k < 1:
            raise ValueError("MixedConfig: batch, concurrency, event_concurrency and k must be >= 1")


def draw_events(rng: np.random.Generator, users: np.ndarray, n_items: int, n: int) -> dict[str, np.ndarray]:
    """`n` events (no timestamps): user_id, item_id, kind (F.EVENT_KINDS index), dwell."""
    names = list(KIND_MIX)
    share = np.array([KIND_MIX[k][0] for k in names])
    pick = rng.choice(len(names), size=n, p=share / share.sum())
    mean_dwell = np.array([KIND_MIX[k][1] for k in names])[pick]
    return {"user_id": users[rng.integers(0, len(users), n)].astype(np.int64),
            "item_id": rng.integers(0, n_items, n).astype(np.int64),
            "kind": np.array([F.EVENT_KINDS.index(names[i]) for i in pick], np.int64),
            "dwell": np.round(rng.exponential(1.0, n) * mean_dwell, 3)}


class EventSender:
    """Sends LogEvents batches open loop in a thread; `result()` once joined."""

    def __init__(self, target: str, users: np.ndarray, n_items: int, cfg: MixedConfig):
        self.target, self.cfg = target, cfg
        self.n = int(np.ceil(cfg.events_per_s * cfg.duration_s / cfg.batch))  # batches
        self.draw = draw_events(np.random.default_rng(cfg.seed + 1), np.asarray(users), n_items, self.n * cfg.batch)
        self.lat, self.status, self.retried = LT._histogram(), {}, {}
        self.acked: list[tuple[int, float]] = []  # (batch index, the timestamp its events carry)
        self.sent = self.late = 0
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(cfg.event_concurrency)
        self.outstanding = 0
        self.thread = threading.Thread(target=self._run, name="event-sender", daemon=True)
        self.error: BaseException | None = None

    def _attempt(self, stub, i: int, ts: float, due: float, request, backoff: float) -> None:
        left = due + self.cfg.timeout_s - time.perf_counter()
        fut = stub.LogEvents.future(request, timeout=max(left, 1e-3))
        fut.add_done_callback(lambda f: self._finish(stub, i, ts, due, request, backoff, f))

    def _finish(self, stub, i: int, ts: float, due: float, request, backoff: float, fut) -> None:
        code = fut.code()
        name = code.name if code is not None else "CANCELLED"
        if name in RETRY_CODES and time.perf_counter() + backoff < due + self.cfg.timeout_s:
            with self.lock:
                self.retried[name] = self.retried.get(name, 0) + 1
            timer = threading.Timer(backoff, self._attempt,
                                    (stub, i, ts, due, request, min(2 * backoff, RETRY_BACKOFF_S[1])))
            timer.daemon = True
            timer.start()
            return
        ms = (time.perf_counter() - due) * 1e3
        if name == "OK" and fut.result().accepted != self.cfg.batch:
            name = "OK_SHORT"  # acknowledged fewer events than sent: a failed call
        with self.lock:
            self.status[name] = self.status.get(name, 0) + 1
            if name == "OK":
                self.lat.record_value(max(1, int(ms * 1e3)))
                self.acked.append((i, ts))
            self.outstanding -= 1
        self.slots.release()

    def _batch(self, i: int, ts: float):
        from recstack.v1 import ranking_pb2 as pb

        d, b = self.draw, self.cfg.batch
        rows = range(i * b, (i + 1) * b)
        return pb.LogEventsRequest(events=[
            pb.Event(user_id=int(d["user_id"][r]), item_id=int(d["item_id"][r]), kind=int(d["kind"][r]),
                     timestamp=ts, dwell_seconds=float(d["dwell"][r]), request_id=f"mixed-{i}") for r in rows])

    def _run(self) -> None:
        try:
            self._send()
        except BaseException as e:  # reported by result(), never swallowed
            self.error = e

    def _send(self) -> None:
        from recstack.serving.client import channel
        from recstack.v1 import ranking_pb2_grpc as pb_grpc

        cfg = self.cfg
        with channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = pb_grpc.EventServiceStub(ch)
            t0 = time.perf_counter() + 0.05
            stop_at = t0 + cfg.duration_s
            for i in range(self.n):
                due = t0 + i * cfg.batch / cfg.events_per_s
                if due >= stop_at:
                    break
                if due > time.perf_counter():
                    time.sleep(due - time.perf_counter())
                if not self.slots.acquire(timeout=max(0.0, stop_at + cfg.timeout_s - time.perf_counter())):
                    break
                self.late += time.perf_counter() - due > 1e-3
                ts = time.time()
                with self.lock:
                    self.outstanding += 1
                self._attempt(stub, i, ts, due, self._batch(i, ts), RETRY_BACKOFF_S[0])
                self.sent += 1
            deadline = time.perf_counter() + cfg.timeout_s + 1.0
            while time.perf_counter() < deadline and self.outstanding:
                time.sleep(0.005)

    def start(self) -> None:
        self.thread.start()

    def result(self) -> dict:
        self.thread.join()
        if self.error is not None:
            raise self.error
        ok = self.status.get("OK", 0)
        return {"batch": self.cfg.batch, "offered_events_per_s": self.cfg.events_per_s, "calls_sent": self.sent,
                "calls_answered": sum(self.status.values()), "late_sends": int(self.late),
                "status": dict(sorted(self.status.items())), "retried": dict(sorted(self.retried.items())),
                "failed_calls": self.sent - ok,
                "events_sent": self.sent * self.cfg.batch, "events_acknowledged": ok * self.cfg.batch,
                "latency_ms": LT._summary(self.lat)}

    def acknowledged(self) -> dict[str, np.ndarray]:
        """The acknowledged events: user_id, item_id, kind, ts."""
        b = self.cfg.batch
        idx = np.array(sorted(self.acked), dtype=np.float64).reshape(-1, 2)
        rows = (idx[:, 0].astype(np.int64)[:, None] * b + np.arange(b)).ravel()
        return {"user_id": self.draw["user_id"][rows], "item_id": self.draw["item_id"][rows],
                "kind": self.draw["kind"][rows], "ts": np.repeat(idx[:, 1], b)}


def check_readable(store, acked: dict[str, np.ndarray]) -> dict:
    """Look every acknowledged event up in `store` -> {acknowledged, expected_readable, readable,
    missing}. Per user, the newest StoreConfig.max_events are expected (the store's bound)."""
    bound = store.config.max_events
    expected = readable = 0
    now = float(acked["ts"].max()) if len(acked["ts"]) else time.time()
    users = acked["user_id"]
    for u in np.unique(users).tolist():
        mine = np.flatnonzero(users == u)
        mine = mine[np.argsort(acked["ts"][mine], kind="stable")][-bound:]
        h = store.history(u, now + 1.0)
        have: dict[tuple, int] = {}
        for key in zip(h.item_id.tolist(), h.kind.tolist(), h.ts.tolist()):
            have[key] = have.get(key, 0) + 1
        for r in mine.tolist():
            key = (int(acked["item_id"][r]), int(acked["kind"][r]), float(acked["ts"][r]))  # the exact double sent
            expected += 1
            if have.get(key, 0) > 0:
                have[key] -= 1
                readable += 1
    return {"acknowledged": int(len(users)), "per_user_bound": bound, "expected_readable": expected,
            "readable": readable, "missing": expected - readable}


def store_size(spec: str) -> dict:
    """What the store holds after the run: rows and bytes on disk (SQLite), keys and memory (Redis)."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        import redis

        c = redis.Redis.from_url(spec)
        return {"kind": "redis", "keys": int(c.dbsize()), "used_memory_bytes": int(c.info("memory")["used_memory"])}
    import sqlite3

    path = Path(spec[len("sqlite:"):] if spec.startswith("sqlite:") else spec)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    files = [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()]
    return {"kind": "sqlite", "rows": int(rows), "bytes": int(sum(p.stat().st_size for p in files))}


def _cpu(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _cpu_used(a: dict, b: dict, seconds: float) -> dict:
    """CPU cores each process used on average between two `_cpu` readings `seconds` apart."""
    return {k: None if a[k] is None or b[k] is None else round((b[k] - a[k]) / seconds, 3) for k in a}


def measure(target: str, users: np.ndarray, n_items: int, cfg: MixedConfig, store=None,
            server_pid: int | None = None) -> dict:
    """Rank alone, then Rank with the event sender beside it, against `target`; with `store`
    (the server's feature store, opened here too) every acknowledged event is looked up; with
    `server_pid`, the CPU cores the server and this (client) process used in each phase."""
    kw = dict(k=cfg.k, timeout_s=cfg.timeout_s, debug=False, seed=cfg.seed)
    warmup = LT.run_once(target, cfg.qps, cfg.warmup_s, cfg.concurrency, users, **kw) if cfg.warmup_s else None
    pids = {"server": server_pid, "client": os.getpid()} if server_pid else {"client": os.getpid()}
    marks = []  # (load average, CPU seconds, time) at each phase's start and at the end

    def mark() -> None:
        marks.append((_loadavg(), _cpu(pids), time.perf_counter()))

    mark()
    rank_only = LT.run_once(target, cfg.qps, cfg.duration_s, cfg.concurrency, users, **kw)
    mark()
    sender = EventSender(target, users, n_items, cfg)
    sender.start()
    mixed = LT.run_once(target, cfg.qps, cfg.duration_s, cfg.concurrency, users, **kw)
    events = sender.result()
    mark()
    (l0, c0, t0), (l1, c1, t1), (l2, c2, t2) = marks
    out = {"config": asdict(cfg), "warmup": warmup, "rank_only": rank_only, "mixed": mixed, "events": events,
           "loadavg_phases": {"rank_only_start": l0, "mixed_start": l1, "end": l2},
           "cpu_cores_used": {"rank_only": _cpu_used(c0, c1, t1 - t0), "mixed": _cpu_used(c1, c2, t2 - t1)}}
    if store is not None:
        out["readback"] = check_readable(store, sender.acknowledged())
    return out


def targets(res: dict) -> dict:
    """The issue's targets: 0 failed calls of either kind, every acknowledged event readable."""
    failed_rank = {ph: res[ph]["sent"] - res[ph]["status"].get("OK", 0) for ph in ("rank_only", "mixed")}
    back = res.get("readback")
    return {"rank_failed_calls": failed_rank, "log_events_failed_calls": res["events"]["failed_calls"],
            "zero_failed_calls": not any(failed_rank.values()) and res["events"]["failed_calls"] == 0,
            "acknowledged_all_readable": back is not None and back["missing"] == 0,
            "rank_p99_ms": {ph: res[ph]["latency_ms"]["p99"] for ph in ("rank_only", "mixed")}}


def start_server(artifacts: str | Path, store_spec: str, scratch: Path, threads: int = 4,
                 timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    """`recstack serve` on a free port with `store_spec` -> (process, "127.0.0.1:PORT") once it listens."""
    err = scratch / "serve.stderr"
    cmd = [sys.executable, "-m", "recstack.cli", "serve", "--artifacts", str(artifacts), "--port", "0",
           "--threads", str(threads), "--feature-store", store_spec, "--impression-log", "none"]
    with open(err, "w") as ferr:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ferr)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"listening on [^\s:]+:(\d+)", err.read_text())
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"recstack serve did not listen within {timeout_s:.0f} s (exit {proc.returncode}); see {err}")


def _loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: they say how busy it was)."""
    return [round(x, 2) for x in os.getloadavg()]


def run(artifacts: str | Path, data_dir: str | Path, out: str | Path, cfg: MixedConfig = MixedConfig(),
        store_spec: str = "", scratch: str | Path | None = None, command: str = "") -> dict:
    """Start a server on `artifacts` (a fresh SQLite store in `scratch` unless `store_spec`),
    measure, stop it (SIGTERM, drained) and write `out`/mixed.json and `out`/mixed.md."""
    import tempfile

    from recstack import bundle as B
    from recstack.bench.mixed_report import report
    from recstack.serving.store import open_store

    import pyarrow.parquet as pq

    # the inputs are checked before anything is created or started
    users = LT.test_day_users(data_dir)  # refuses a folder that is not a simulated world
    if not (Path(data_dir) / "items.parquet").is_file():
        raise ValueError(f"--data {data_dir}: no items.parquet (the corpus the events' items are drawn from)")
    n_items = pq.ParquetFile(Path(data_dir) / "items.parquet").metadata.num_rows
    B.resolve_bundle(artifacts)  # refuses a path that holds no bundle before a server is started on it
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(scratch or tempfile.mkdtemp(prefix="recstack-mixed-"))
    scratch.mkdir(parents=True, exist_ok=True)
    spec = store_spec or str(scratch / "feature_store.sqlite3")
    load_before = _loadavg()
    proc, target = start_server(artifacts, spec, scratch)
    try:
        store = open_store(spec)
        res = measure(target, users, n_items, cfg, store, server_pid=proc.pid)
        store.close()
    finally:
        proc.terminate()
        proc.wait(30)
    res.update({"artifacts": str(artifacts), "data": str(data_dir), "store": spec, "store_size": store_size(spec),
                "server_exit": proc.returncode, "loadavg_before": load_before, "loadavg_after": _loadavg(),
                "cpus": os.cpu_count(), "command": command})
    res["targets"] = targets(res)
    (out / "mixed.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "mixed.md").write_text(report(res))
    return res
