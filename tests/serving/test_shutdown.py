"""The service under faults, process level: SIGTERM with calls in flight is never lost (the
single-process path, a worker's path and the parent that supervises workers, each 20 times,
with the signal taken by the main thread or by another one); an open health Watch does not
hold the drain; a port in use is one line on stderr and a non-zero exit; a worker binds the
shared port only once it is ready; the access log is JSON lines; /metrics can bind its own host."""
from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recstack.serving import client
from recstack.serving import process as P
from recstack.serving import server as S
from recstack.serving.cascade import Cascade
from recstack.v1 import ranking_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
RECSTACK = str(Path(sys.executable).parent / "recstack")
ROUNDS = 20
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("shutdown")
    make_fake_bundle(root, version="vdown")
    return root


# One process serves ROUNDS times in its main thread. In each round a client thread holds 4
# Rank calls in the cascade and opens a health Watch, then sends SIGTERM: in odd rounds to the
# process, in even rounds to the client thread itself (the C-level handler then runs on a thread
# that is not the main one, as it may when the kernel picks any thread of a busy server). It
# then lets the calls finish. The round passes when the server returns 0, every call is OK and
# the Watch saw NOT_SERVING and then its end. The grace period is long (60 s): a drain held by
# the Watch, or a lost signal, trips the watchdog instead.
_DRIVER = r"""
import json, logging, os, signal, sys, threading
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from recstack.serving import client, process as S
from recstack.serving.cascade import Cascade
from recstack.v1 import ranking_pb2_grpc as pb_grpc

artifacts, mode, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
logging.basicConfig(level=logging.INFO)
entered, release = threading.Semaphore(0), threading.Event()
real_rank = Cascade.rank

def rank(self, q, time_remaining=None):
    if time_remaining is not None:  # a served call (the warm-up passes none)
        entered.release()
        release.wait(30)
    return real_rank(self, q, time_remaining)

Cascade.rank = rank
opts = S.ServeOptions(threads=4, grace_s=60.0)
results = []

def drive(port, round_no, done):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=50)
        statuses = [next(watch).status]
        calls = [pb_grpc.RankingServiceStub(ch).Rank.future(client.make_request(u, 5), timeout=50) for u in range(4)]
        for _ in calls:
            assert entered.acquire(timeout=30), "a call never reached the cascade"
        if round_no % 2:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        release.set()
        codes = []
        for c in calls:
            try:
                codes.append("OK" if len(c.result().items) == 5 else "SHORT")
            except grpc.RpcError as e:
                codes.append(e.code().name)
        try:
            statuses += [r.status for r in watch]  # ends when the server closes the stream
        except grpc.RpcError as e:
            statuses.append(e.code().name)
    if not done.wait(30):
        print(json.dumps({"round": round_no, "lost": True}), flush=True)
        os._exit(3)
    results.append({"round": round_no, "codes": codes, "watch": statuses})

for round_no in range(rounds):
    entered, release, done = threading.Semaphore(0), threading.Event(), threading.Event()
    reservation = None
    if mode == "worker":  # as the parent of --workers does: the port reserved, the worker binds it when ready
        reservation = S._probe_bind("127.0.0.1", 0, reuse_port=True)
        port = reservation.getsockname()[1]
    else:
        port = 0
    thread = []
    ready = lambda bound: thread.append(threading.Thread(target=drive, args=(bound, round_no, done))) or thread[0].start()
    code = S._serve_one(artifacts, "127.0.0.1", port, opts, mode == "worker", 0, on_ready=ready)
    done.set()
    thread[0].join(60)
    results[-1]["code"] = code
    if reservation is not None:
        reservation.close()
print(json.dumps(results), flush=True)
"""


@pytest.mark.parametrize("mode", ["single", "worker"])
def test_sigterm_with_calls_in_flight_is_never_lost(artifacts, mode):
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(artifacts), mode, str(ROUNDS)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == ROUNDS
    for r in results:
        assert r["code"] == 0 and r["codes"] == ["OK"] * 4, r
        assert r["watch"] == [SERVING, NOT_SERVING], r
    drained = proc.stderr.count("draining")
    assert drained == ROUNDS, proc.stderr[-3000:]


# `_supervise` with stand-ins for the worker processes (objects with multiprocessing.Process's
# is_alive / pid / exitcode / join / kill), each a small process that exits 0 on SIGTERM. The
# stand-in waits in short sleeps, not in signal.pause(): a SIGTERM that lands after the
# interpreter's last signal check but before pause() blocks would leave it paused for good,
# and the supervisor would then (rightly) kill it and report a failed drain.
_PARENT_DRIVER = r"""
import json, os, signal, subprocess, sys, threading
from recstack.serving import process as S

CHILD = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
         "print('ready', flush=True)\nwhile True: time.sleep(0.05)")

class StandIn:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid
    def is_alive(self):
        return self.proc.poll() is None
    @property
    def exitcode(self):
        return self.proc.poll()
    def join(self, timeout=None):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    def kill(self):
        self.proc.kill()

codes = []
for round_no in range(int(sys.argv[1])):
    procs = [StandIn(), StandIn()]
    signals = S.StopSignals()
    def send():
        if round_no % 2:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
    t = threading.Thread(target=send)
    t.start()
    try:
        codes.append(S._supervise(procs, signals, grace_s=30.0))
    finally:
        signals.restore()
    t.join()
print(json.dumps(codes), flush=True)
"""


def test_workers_parent_never_loses_sigterm():
    proc = subprocess.run([sys.executable, "-c", _PARENT_DRIVER, str(ROUNDS)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [0] * ROUNDS


def test_an_open_watch_does_not_hold_the_drain(artifacts):
    server, port, servicer = S.build_server(artifacts, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert next(watch).status == SERVING
            servicer.begin_drain()
            assert [r.status for r in watch] == [NOT_SERVING]  # told, then the stream ends (status OK)
            # a Watch opened during the drain is answered and ended at once
            late = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=120)
            assert [r.status for r in late] == [NOT_SERVING]
            stopped = server.stop(60)
            assert stopped.wait(30)  # nothing left to wait for: not the 60 s grace
    finally:
        server.stop(None)


# -- the port --------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_on_a_port_in_use_is_one_line_and_non_zero(artifacts, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([RECSTACK, "serve", "--artifacts", str(artifacts), "--port", str(port),
                            "--workers", str(workers)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and "Traceback" not in r.stderr


def test_a_worker_binds_the_shared_port_only_once_ready(artifacts, monkeypatch):
    warming, release = threading.Event(), threading.Event()
    real_warm = Cascade.warm_up

    def slow_warm(self):
        warming.set()
        assert release.wait(30)
        real_warm(self)

    monkeypatch.setattr(Cascade, "warm_up", slow_warm)
    reservation = P._probe_bind("127.0.0.1", 0, reuse_port=True)  # as the parent of --workers holds it
    port = reservation.getsockname()[1]
    built = queue.Queue()
    loader = threading.Thread(target=lambda: built.put(S.create_server(
        artifacts, "127.0.0.1", port, 2, reuse_port=True, load_first=True)))
    loader.start()
    server = None
    try:
        assert warming.wait(30)
        with pytest.raises(ConnectionRefusedError):  # loading: nothing listens on the port yet
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        release.set()
        server, bound, servicer = built.get(timeout=60)
        assert bound == port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:  # the first call after binding is served
            assert pb_grpc.RankingServiceStub(ch).Rank(client.make_request(1, 5), timeout=10).model_version == "vdown"
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    finally:
        release.set()
        loader.join(60)
        if server is not None:
            server.stop(None)
        reservation.close()


# -- the console script: access log, metrics host ---------------------------------------------------


def _lines(stream, out: queue.Queue):
    for line in stream:
        out.put(line)
    out.put(None)


def _wait_line(lines: queue.Queue, pattern: str, seen: list, timeout=60.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "".join(seen)[-3000:]
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m


def test_access_log_is_json_lines_and_metrics_bind_their_own_host(artifacts):
    proc = subprocess.Popen([RECSTACK, "serve", "--artifacts", str(artifacts), "--port", "0", "--metrics-port", "0",
                             "--metrics-host", "127.0.0.2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    err: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True).start()
    seen: list = []
    try:
        mport = int(_wait_line(err, r"metrics on http://127\.0\.0\.2:(\d+)/metrics", seen).group(1))
        port = int(_wait_line(err, r"listening on 127\.0\.0\.1:(\d+)", seen).group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            stub.Rank(client.make_request(1, 5), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Rank(client.make_request(-1, 5), timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.2:{mport}/metrics", timeout=10) as r:
            assert 'recstack_requests_total{code="OK",method="Rank"} 1.0' in r.read().decode()
        with pytest.raises(urllib.error.URLError):  # not on the gRPC host
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    records = [json.loads(line) for line in out.splitlines()]  # every stdout line is one JSON object
    assert [r["code"] for r in records] == ["OK", "INVALID_ARGUMENT"]
    assert all(r["method"] == "Rank" and r["ts"].endswith("+00:00") and r["request_id"] for r in records)
