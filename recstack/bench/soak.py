"""Soak test of the service under its own faults (`recstack bench soak`).

    res = run("artifacts", "docs/results/soak", minutes=30)   # report.md, results.json, soak.png

Two `recstack serve` processes (A and B) serve two versions of one bundle (the given one, and a
copy under a second version name). For `minutes`, client threads send mixed traffic at about
`qps` calls/s in all: Rank with varied sizes, users (known and cold-start) and request
behaviours; health Check; GetModelInfo; and bad requests. Every `reload_every_s` both servers
are told to Reload the other version; every `restart_every_min` one server (A, then B, ...)
gets SIGTERM, must drain and exit 0, and is started again.

The client behaves as a production client of two replicas behind a health-checked balancer:
it sends to the servers whose health said SERVING at the last poll (every 0.25 s), round
robin, and a call refused as UNAVAILABLE (a server that is draining or gone) is sent again to
the other server, within the call's 2 s budget. So calls refused while a server is down on
purpose are not failures; what counts as **failed**:

  - a Rank that does not end OK with the requested number of distinct items, finite scores
    and a version of one of the two bundles (after the retries above);
  - a health Check that does not answer (either status is an answer; UNAVAILABLE from a server
    that is stopping is retried like a Rank);
  - a GetModelInfo that does not end OK; a bad request that does not end INVALID_ARGUMENT;
  - a Reload that does not end OK; a SIGTERM after which the server does not exit 0 within
    its grace period + 10 s; a restarted server that is not SERVING within 120 s.

RSS drift is measured per server life (start to SIGTERM, or to the end): the mean RSS of the
first minute after a 30 s warm-up against the mean of the last minute, sampled every 2 s
from /proc (Linux). p99 per minute is the client-side latency of Rank calls that ended OK.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recstack.bench.soak_report import plot, report, summarise

ADMIN_TOKEN_ENV = "RECSTACK_ADMIN_TOKEN"
CALL_BUDGET_S = 2.0  # a call's whole time, retries included
HEALTH_POLL_S = 0.25
RSS_EVERY_S = 2.0
RSS_WARMUP_S = 30.0
RSS_WINDOW_S = 60.0
MIX = (("rank", 0.70), ("health", 0.12), ("model_info", 0.08), ("bad", 0.10))


def _rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def prepare_versions(artifacts: str | Path, scratch: Path) -> tuple[Path, list[str]]:
    """An artifacts root under `scratch` holding the bundle twice: `soak-a` and `soak-b` (the same
    files, hard-linked where the filesystem allows, under two version names)."""
    from recstack import bundle as B

    src = B.resolve_bundle(artifacts)
    B.verify_bundle(src)
    root = scratch / "artifacts"
    names = ["soak-a", "soak-b"]
    for name in names:
        dst = root / name
        try:
            shutil.copytree(src, dst, copy_function=os.link)
        except OSError:
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)
        manifest_path = dst / B.MANIFEST
        m = json.loads(manifest_path.read_text())
        m["version"] = name
        manifest_path.unlink()  # a hard link: never write through it into the source bundle
        manifest_path.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    B.write_current(root, names[0])
    return root, names


@dataclass
class Life:
    """One run of one server process."""

    name: str
    started: float
    pid: int
    port: int = 0
    ready_s: float | None = None
    stopped: float | None = None
    exit_code: int | None = None
    drain_s: float | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)

    def drift(self) -> dict | None:
        if not self.rss:
            return None
        t0 = self.started + (self.ready_s or 0.0) + RSS_WARMUP_S
        end = self.rss[-1][0]
        first = [r for t, r in self.rss if t0 <= t < t0 + RSS_WINDOW_S]
        last = [r for t, r in self.rss if end - RSS_WINDOW_S < t <= end]
        if not first or not last or end - t0 < 2 * RSS_WINDOW_S:
            return None
        a, b = float(np.mean(first)), float(np.mean(last))
        return {"first_mb": a / 2**20, "last_mb": b / 2**20, "drift": (b - a) / a,
                "life_s": (self.stopped or end) - self.started}


class Server:
    """A `recstack serve` subprocess on a free port (read back from its log), restartable."""

    def __init__(self, name: str, artifacts: Path, scratch: Path, token: str, threads: int, grace_s: float):
        self.name, self.artifacts, self.scratch, self.token = name, artifacts, scratch, token
        self.threads, self.grace_s = threads, grace_s
        self.proc: subprocess.Popen | None = None
        self.life: Life | None = None
        self.lives: list[Life] = []
        self.target: str | None = None  # None while down
        self.lock = threading.Lock()

    def start(self, timeout_s: float = 120.0) -> bool:
        n = len(self.lives)
        err = self.scratch / f"{self.name}-{n}.stderr"
        out = self.scratch / f"{self.name}-{n}.access.jsonl"
        env = dict(os.environ, **{ADMIN_TOKEN_ENV: self.token})
        cmd = [sys.executable, "-m", "recstack.cli", "serve", "--artifacts", str(self.artifacts), "--port", "0",
               "--threads", str(self.threads), "--grace", str(self.grace_s)]
        with open(err, "w") as ferr, open(out, "w") as fout:
            self.proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, env=env)
        self.life = Life(self.name, time.monotonic(), self.proc.pid)
        self.lives.append(self.life)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            m = re.search(r"listening on [^\s:]+:(\d+)", err.read_text())
            if m:
                self.life.port = int(m.group(1))
                if self._serving(f"127.0.0.1:{self.life.port}"):
                    self.life.ready_s = time.monotonic() - self.life.started
                    with self.lock:
                        self.target = f"127.0.0.1:{self.life.port}"
                    return True
            time.sleep(0.2)
        return False

    @staticmethod
    def _serving(target: str) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(target) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return r.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def stop(self) -> bool:
        """SIGTERM and wait for the drain: True when it exits 0 within grace + 10 s."""
        life, proc = self.life, self.proc
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(self.grace_s + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
            code = code if code else -9
        with self.lock:
            self.target = None
        life.stopped, life.exit_code, life.drain_s = time.monotonic(), code, time.monotonic() - t0
        return code == 0

    def sample_rss(self) -> None:
        life = self.life
        if life is not None and life.stopped is None:
            rss = _rss_bytes(life.pid)
            if rss:
                life.rss.append((time.monotonic(), rss))


class Balancer:
    """Client-side routing over the servers whose last health poll said SERVING."""

    def __init__(self, servers: list[Server]):
        self.servers = servers
        self.ready: list[str] = []
        self._i = 0
        self._lock = threading.Lock()
        self._channels: dict[str, object] = {}

    def channel(self, target: str):
        import grpc

        with self._lock:
            ch = self._channels.get(target)
            if ch is None:
                ch = self._channels[target] = grpc.insecure_channel(target)
            return ch

    def poll(self) -> None:
        ready = []
        for s in self.servers:
            with s.lock:
                target = s.target
            if target and Server._serving(target):
                ready.append(target)
        with self._lock:
            self.ready = ready

    def pick(self, avoid: set[str]) -> str | None:
        with self._lock:
            options = [t for t in self.ready if t not in avoid] or [t for t in self.ready]
            if not options:
                return None
            self._i += 1
            return options[self._i % len(options)]

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()


@dataclass
class Tally:
    started: float
    calls: dict = field(default_factory=dict)  # kind -> {"ok", "failed", "retried"}
    failures: list = field(default_factory=list)  # first 50
    latencies: list = field(default_factory=list)  # (t since start, ms) of OK Rank calls
    events: list = field(default_factory=list)  # (t, what)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, ok: bool, retried: bool, why: str = "", ms: float | None = None) -> None:
        with self.lock:
            c = self.calls.setdefault(kind, {"ok": 0, "failed": 0, "retried": 0})
            c["ok" if ok else "failed"] += 1
            c["retried"] += int(retried)
            if not ok and len(self.failures) < 50:
                self.failures.append({"t_s": round(time.monotonic() - self.started, 2), "kind": kind, "why": why[:300]})
            if ok and ms is not None:
                self.latencies.append((time.monotonic() - self.started, ms))

    def event(self, what: str) -> None:
        with self.lock:
            self.events.append((round(time.monotonic() - self.started, 2), what))


def _client_call(kind: str, rng: np.random.Generator, bal: Balancer, token: str, n_users: int, n_items: int,
                 versions: set[str]) -> tuple[bool, bool, str, float | None]:
    """One call with retries across servers -> (ok, retried, why, ms for an OK Rank)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recstack.serving import client
    from recstack.v1 import ranking_pb2 as pb
    from recstack.v1 import ranking_pb2_grpc as pb_grpc

    t0 = time.perf_counter()
    deadline = time.monotonic() + CALL_BUDGET_S
    if kind == "rank":
        k = int(rng.choice([5, 10, 20, 50]))
        retrieval = int(rng.choice([0, 200, 500, 1000]))
        retrieval = min(retrieval, n_items) if retrieval else 0
        coarse = min(int(rng.choice([0, 50, 100, 200])), retrieval or 10**9)
        k = min(k, coarse or k, retrieval or k, n_items)
        user = int(rng.integers(0, n_users)) if rng.random() < 0.85 else n_users + int(rng.integers(0, 1000))
        behaviours = [client.behaviour(int(rng.integers(0, n_items)), float(rng.uniform(0, 86400)),
                                       "purchase" if rng.random() < 0.1 else "click", float(rng.exponential(20)))
                      for _ in range(int(rng.integers(0, 6)) if rng.random() < 0.3 else 0)]
        req = client.make_request(user, k, behaviours, debug=False, retrieval_size=retrieval, coarse_size=coarse)
    elif kind == "bad":
        req = rng.choice(3)
        req = (pb.RankRequest(user_id=-1, num_results=5) if req == 0 else
               pb.RankRequest(user_id=1, num_results=50, coarse_size=10) if req == 1 else
               client.make_request(1, 5, [client.behaviour(n_items + 5)]))
    tried: set[str] = set()
    retried = False
    why = "no server SERVING"
    while time.monotonic() < deadline:
        target = bal.pick(tried)
        if target is None:
            time.sleep(0.05)
            continue
        left = max(0.05, deadline - time.monotonic())
        ch = bal.channel(target)
        try:
            if kind == "rank":
                resp = pb_grpc.RankingServiceStub(ch).Rank(req, timeout=left)
                ids = [it.item_id for it in resp.items]
                good = (len(ids) == req.num_results and len(set(ids)) == len(ids) and resp.model_version in versions
                        and all(np.isfinite(it.score) for it in resp.items))
                return good, retried, "" if good else f"bad answer: {len(ids)} items, version {resp.model_version!r}", \
                    (time.perf_counter() - t0) * 1e3
            if kind == "health":
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=left)
                return True, retried, "", None
            if kind == "model_info":
                info = pb_grpc.ModelServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=left,
                                                                 metadata=client.admin_metadata(token))
                good = info.model_version in versions
                return good, retried, "" if good else f"version {info.model_version!r}", None
            try:
                pb_grpc.RankingServiceStub(ch).Rank(req, timeout=left)
                return False, retried, "a bad request answered OK", None
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    return True, retried, "", None
                raise
        except grpc.RpcError as e:
            why = f"{e.code().name}: {e.details()}"
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                return False, retried, why, None
            tried.add(target)  # draining or gone: the other replica, as a balancer would
            retried = True
    return False, retried, f"no answer within {CALL_BUDGET_S} s ({why})", None


class _Driver:
    """One soak: two servers, client threads sending the traffic mix, a background thread
    polling health and sampling RSS, and the main thread's schedule of Reloads and restarts."""

    def __init__(self, servers: list[Server], names: list[str], token: str, versions: set[str], tally: Tally):
        self.servers, self.names, self.token, self.versions, self.tally = servers, names, token, versions, tally
        self.bal = Balancer(servers)
        self.stop = threading.Event()
        self.reloads, self.restarts = 0, 0

    def traffic(self, i: int, seed: int, client_threads: int, qps: float, n_users: int, n_items: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        kinds, weights = [k for k, _ in MIX], np.array([w for _, w in MIX])
        period = client_threads / qps
        next_t = time.monotonic() + rng.uniform(0, period)
        while not self.stop.is_set():
            now = time.monotonic()
            if now < next_t:
                self.stop.wait(next_t - now)
                continue
            next_t += period
            kind = str(rng.choice(kinds, p=weights / weights.sum()))
            ok, retried, why, ms = _client_call(kind, rng, self.bal, self.token, n_users, n_items, self.versions)
            self.tally.add(kind, ok, retried, why, ms if kind == "rank" else None)

    def background(self) -> None:
        last_rss = 0.0
        while not self.stop.is_set():
            self.bal.poll()
            if time.monotonic() - last_rss >= RSS_EVERY_S:
                last_rss = time.monotonic()
                for s in self.servers:
                    s.sample_rss()
            self.stop.wait(HEALTH_POLL_S)

    def reload_all(self) -> None:
        """Reload both servers to the other version (a server down for a restart is skipped)."""
        import grpc

        from recstack.serving import client
        from recstack.v1 import ranking_pb2 as pb
        from recstack.v1 import ranking_pb2_grpc as pb_grpc

        self.reloads += 1
        version = self.names[self.reloads % 2]
        for s in self.servers:
            with s.lock:
                target = s.target
            if target is None:
                continue
            try:
                with grpc.insecure_channel(target) as ch:
                    got = pb_grpc.ModelServiceStub(ch).Reload(pb.ReloadRequest(version=version), timeout=60,
                                                              metadata=client.admin_metadata(self.token))
                self.tally.add("reload", got.model_version == version, False, f"now {got.model_version!r}")
            except grpc.RpcError as e:
                self.tally.add("reload", False, False, f"{s.name}: {e.code().name}: {e.details()}")
        self.tally.event(f"reload {version}")

    def stop_server(self, s: Server, label: str = "") -> None:
        self.tally.event(f"SIGTERM {s.name}{label}")
        ok = s.stop()
        self.tally.add("sigterm", ok, False, f"{s.name} exited {s.life.exit_code} after {s.life.drain_s:.1f} s")

    def restart_next(self) -> None:
        """SIGTERM one server (they take turns), wait for its drain, start it again."""
        s = self.servers[self.restarts % 2]
        self.restarts += 1
        self.stop_server(s)
        ok = s.start()
        self.tally.add("restart", ok, False, f"{s.name} not SERVING within 120 s")
        self.tally.event(f"{s.name} SERVING again" if ok else f"{s.name} failed to start")

    def schedule(self, t_start: float, duration_s: float, reload_every_s: float, restart_every_min: float) -> None:
        next_reload = t_start + reload_every_s
        next_restart = t_start + restart_every_min * 60.0 if restart_every_min > 0 else float("inf")
        while (now := time.monotonic()) < t_start + duration_s:
            if now >= next_reload:
                self.reload_all()
                next_reload += reload_every_s
            elif now >= next_restart:
                self.restart_next()
                next_restart += restart_every_min * 60.0
            else:
                time.sleep(min(0.5, max(0.0, min(next_reload, next_restart) - now)))

    def finish(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        for t in threads:
            t.join(30)
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                self.stop_server(s, " (end)")
        self.bal.close()


def _start_servers(artifacts: str | Path, scratch: Path, server_threads: int, grace_s: float):
    root, names = prepare_versions(artifacts, scratch)
    token = os.urandom(16).hex()
    servers = [Server(n, root, scratch, token, server_threads, grace_s) for n in ("A", "B")]
    for s in servers:
        if not s.start():
            raise RuntimeError(f"server {s.name} did not start; see {scratch}/{s.name}-0.stderr")
    return servers, names, token


def run(artifacts: str | Path, out: str | Path, *, minutes: float = 30.0, qps: float = 40.0, client_threads: int = 4,
        reload_every_s: float = 60.0, restart_every_min: float = 5.0, server_threads: int = 4, grace_s: float = 10.0,
        scratch: str | Path | None = None, seed: int = 0, command: str = "") -> dict:
    """Run the soak; write report.md, results.json and soak.png under `out`; return the results."""
    from recstack.serving import client

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="recstack-soak-"))
    scratch.mkdir(parents=True, exist_ok=True)
    tally = Tally(time.monotonic())
    servers, names, token = _start_servers(artifacts, scratch, server_threads, grace_s)
    info = client.model_info(servers[0].target, admin_token=token)
    n_users, n_items = int(info.n_users), int(info.n_items)
    drv = _Driver(servers, names, token, set(names), tally)
    drv.bal.poll()
    duration_s = minutes * 60.0
    t_start = tally.started = time.monotonic()
    threads = [threading.Thread(target=drv.traffic, args=(i, seed, client_threads, qps, n_users, n_items), daemon=True)
               for i in range(client_threads)]
    threads.append(threading.Thread(target=drv.background, daemon=True))
    for t in threads:
        t.start()
    try:
        drv.schedule(t_start, duration_s, reload_every_s, restart_every_min)
    finally:
        drv.finish(threads)
    results = summarise(tally, servers, duration_s, dict(
        minutes=minutes, qps=qps, client_threads=client_threads, reload_every_s=reload_every_s,
        restart_every_min=restart_every_min, server_threads=server_threads, grace_s=grace_s, seed=seed,
        artifacts=str(artifacts), n_users=n_users, n_items=n_items, command=command, scratch=str(scratch)))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "soak.png")
    (out / "report.md").write_text(report(results, MIX, CALL_BUDGET_S))
    return results


