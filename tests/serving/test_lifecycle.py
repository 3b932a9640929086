"""Lifecycle, overload and deadlines: NOT_SERVING until loaded and warm; a bounded queue answered
with RESOURCE_EXHAUSTED at once; deadlines and cancellations stop the cascade between
stages; SIGTERM -> NOT_SERVING at once, in-flight calls complete, exit 0; N worker processes
share one port."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recstack.serving import client
from recstack.serving.cascade import Cascade
from recstack.serving.server import create_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("life")
    make_fake_bundle(root)
    return root


def test_not_serving_until_loaded_and_warm(artifacts, monkeypatch):
    warming, release = threading.Event(), threading.Event()
    real_warm = Cascade.warm_up

    def slow_warm(self):
        warming.set()
        assert release.wait(20)
        real_warm(self)

    monkeypatch.setattr(Cascade, "warm_up", slow_warm)
    server, port, servicer = create_server(artifacts, max_workers=2)
    loader = threading.Thread(target=servicer.load, args=(artifacts,))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = pb_grpc.RankingServiceStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(client.make_request(1, 5), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            loader.start()
            assert warming.wait(20)  # loaded, not yet warm: still NOT_SERVING
            for service in ("", "recstack.v1.RankingService"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == NOT_SERVING
            release.set()
            loader.join(30)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
            assert stub.Rank(client.make_request(1, 5), timeout=5).model_version
    finally:
        release.set()
        server.stop(None)


def test_bounded_queue_answers_resource_exhausted_at_once(artifacts, gated_server):
    with gated_server(artifacts, max_workers=1, max_queue=2) as g:
        stub, servicer, gate = g.stub, g.servicer, g.gate
        held = [stub.Rank.future(client.make_request(1, 5), timeout=30)]
        assert gate.entered.wait(10)  # 1 running
        held += [stub.Rank.future(client.make_request(2, 5), timeout=30) for _ in range(2)]  # 2 queued
        _wait_for(lambda: servicer.metrics.value("recstack_queue_depth") == 2)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(client.make_request(3, 5), timeout=5)
            # refused at once, never queued: a queued call could only end by its deadline,
            # since the running call is held until the test releases it
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert gate.calls == 1 and servicer.metrics.value("recstack_queue_depth") == 2
        gate.release.set()
        for f in held:
            assert len(f.result().items) == 5  # the accepted calls all complete


@contextlib.contextmanager
def _gated_retrieval(artifacts, gated_server):
    """A server whose retrieval stage blocks until `gate.release` (coarse passes, counting calls)."""
    with gated_server(artifacts, max_workers=2) as g:
        coarse = g.gate_stage("coarse")
        coarse.release.set()
        yield g.stub, g.servicer, g.gate, coarse


def test_deadline_passed_in_a_stage_skips_the_later_stages(artifacts, gated_server):
    with _gated_retrieval(artifacts, gated_server) as (stub, servicer, gate, coarse):
        fut = stub.Rank.future(client.make_request(1, 5), timeout=0.3)
        assert gate.entered.wait(10)
        with pytest.raises(grpc.RpcError) as e:
            fut.result()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_for(lambda: gate.context.time_remaining() <= 0)  # the server's deadline passed too
        gate.release.set()  # the retrieval stage finishes after the caller's deadline...
        _wait_for(lambda: _count(servicer, "DEADLINE_EXCEEDED") == 1)
        assert coarse.calls == 0  # ...and the coarse and fine stages never run


def test_cancelled_call_stops(artifacts, gated_server):
    with _gated_retrieval(artifacts, gated_server) as (stub, servicer, gate, coarse):
        fut = stub.Rank.future(client.make_request(1, 5), timeout=30)
        assert gate.entered.wait(10)
        assert fut.cancel()
        _wait_for(lambda: not gate.context.is_active())  # the server has seen the cancellation
        gate.release.set()
        _wait_for(lambda: _count(servicer, "CANCELLED") == 1)
        assert coarse.calls == 0


def _count(servicer, code: str) -> float:
    return servicer.metrics.value("recstack_requests_total", method="Rank", code=code) or 0.0


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# -- processes: SIGTERM and workers ---------------------------------------------------------------

_SLOW_SERVER = r"""
import sys, time
from pathlib import Path
from recstack.serving import process
from recstack.serving.cascade import Cascade

gate = Path(sys.argv[5])
real_rank = Cascade.rank
def rank(self, q, time_remaining=None):
    if q.user_id == 7:  # the test's slow call: says it is in, then waits until the test lets it go
        (gate / "entered").touch()
        deadline = time.monotonic() + 30
        while not (gate / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return real_rank(self, q, time_remaining)
Cascade.rank = rank
sys.exit(process.serve(sys.argv[1], port=int(sys.argv[2]), workers=int(sys.argv[3]), grace_s=float(sys.argv[4]),
                       admin_token="life-token"))
"""


def _start(artifacts, workers, grace_s, gate):
    """A server on any free port (port 0; with workers the parent reserves one) -> (process, "host:port")."""
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SERVER, str(artifacts), "0", str(workers), str(grace_s), str(gate)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pattern = r"started \d+ serving processes on (\S+:\d+)" if workers > 1 else r"listening on (\S+:\d+)"
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen, deadline = [], time.monotonic() + 60
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "".join(seen)[-3000:]
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            proc.log = seen  # the rest of stderr keeps being read into `seen`, so the pipe never fills
            threading.Thread(target=lambda: [seen.append(x) for x in iter(lines.get, None)], daemon=True).start()
            return proc, m.group(1)


def _wait_serving(target, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "".join(proc.log)[-3000:]
        try:
            with grpc.insecure_channel(target) as ch:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become SERVING")


def test_sigterm_not_serving_at_once_then_drains_and_exits_0(artifacts, tmp_path):
    proc, target = _start(artifacts, 1, 5.0, tmp_path)
    try:
        _wait_serving(target, proc)
        with grpc.insecure_channel(target) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == SERVING
            slow = pb_grpc.RankingServiceStub(ch).Rank.future(client.make_request(7, 5), timeout=30)
            _wait_for(lambda: (tmp_path / "entered").exists())  # the slow call is in flight
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING  # watchers are told at once: while a call is still held
            assert not slow.done()
            watch.cancel()
            (tmp_path / "release").touch()
            resp = slow.result()  # the in-flight call completes within the grace period
            assert len(resp.items) == 5
        code = proc.wait(15)
        assert code == 0, "".join(proc.log)[-3000:]
        assert time.monotonic() - t0 < 5.0 + 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_share_one_port_and_exit_0(artifacts, tmp_path):
    proc, target = _start(artifacts, 2, 5.0, tmp_path)
    try:
        _wait_serving(target, proc)
        pids, deadline = set(), time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:
            # a fresh channel is a fresh connection: the kernel spreads them over the processes
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                try:
                    info = pb_grpc.ModelServiceStub(ch).GetModelInfo(
                        pb.GetModelInfoRequest(), timeout=5, metadata=(("authorization", "Bearer life-token"),))
                    pids.add(info.pid)
                except grpc.RpcError as e:  # a worker binds only once ready: never UNAVAILABLE
                    raise AssertionError(e) from None
        assert len(pids) == 2 and proc.pid not in pids and os.getpid() not in pids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, "".join(proc.log)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- probes are never shed; every shed, cancelled and abandoned call is counted ---------------------


def test_health_and_admin_are_never_shed_and_every_shed_is_counted(artifacts, gated_server):
    admin_md = (("authorization", "Bearer life-token"),)
    with gated_server(artifacts, max_workers=1, max_queue=1, admin_token="life-token") as g:
        stub, servicer, gate = g.stub, g.servicer, g.gate
        health, admin = health_pb2_grpc.HealthStub(g.channel), pb_grpc.ModelServiceStub(g.channel)
        held = [stub.Rank.future(client.make_request(1, 5), timeout=30)]
        assert gate.entered.wait(10)
        held.append(stub.Rank.future(client.make_request(2, 5), timeout=30))  # queued: the bound is full
        _wait_for(lambda: servicer.metrics.value("recstack_queue_depth") == 1)
        shed = [stub.Rank.future(client.make_request(3, 5), timeout=10) for _ in range(30)]
        probes = [health.Check.future(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(30)]
        infos = [admin.GetModelInfo.future(pb.GetModelInfoRequest(), timeout=10, metadata=admin_md) for _ in range(10)]
        assert all(p.result().status == SERVING for p in probes)  # a busy server is alive and ready
        assert all(i.result().model_version for i in infos)
        codes = [f.exception().code() for f in shed]
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 30
        gate.release.set()
        assert all(len(f.result().items) == 5 for f in held)
        assert _count(servicer, "RESOURCE_EXHAUSTED") == 30  # counted where the client saw them
        text = servicer.metrics.text()
        assert 'recstack_requests_total{code="RESOURCE_EXHAUSTED",method="Rank"} 30.0' in text
        assert 'recstack_requests_total{code="OK",method="GetModelInfo"} 10.0' in text


def test_a_call_cancelled_while_queued_is_counted_and_leaves_the_queue(artifacts, gated_server):
    with gated_server(artifacts, max_workers=1, max_queue=1) as g:
        stub, servicer, gate = g.stub, g.servicer, g.gate
        running = stub.Rank.future(client.make_request(1, 5), timeout=30)
        assert gate.entered.wait(10)
        queued = stub.Rank.future(client.make_request(2, 5), timeout=30)
        _wait_for(lambda: servicer.metrics.value("recstack_queue_depth") == 1)
        assert queued.cancel()
        _wait_for(lambda: _count(servicer, "CANCELLED") == 1)  # counted, and its place is free again
        assert servicer.metrics.value("recstack_queue_depth") == 0
        again = stub.Rank.future(client.make_request(3, 5), timeout=30)
        _wait_for(lambda: servicer.metrics.value("recstack_queue_depth") == 1)
        gate.release.set()
        assert len(running.result().items) == 5 and len(again.result().items) == 5
        assert gate.calls == 2  # the cancelled call never ran


def _deadline_passes_in_the_gate(g) -> None:
    """Rank a call with a 0.5 s deadline held in `g.gate` until the server too sees the deadline
    passed, then let it go: the client gets DEADLINE_EXCEEDED and the server counts it."""
    fut = g.stub.Rank.future(client.make_request(1, 5), timeout=0.5)
    assert g.gate.entered.wait(10)
    with pytest.raises(grpc.RpcError) as e:
        fut.result()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the server's deadline comes from the grpc-timeout header, so it can pass a moment
    # after the client's: release only once the server too sees it passed
    _wait_for(lambda: g.gate.context.time_remaining() <= 0)
    g.gate.release.set()
    _wait_for(lambda: _count(g.servicer, "DEADLINE_EXCEEDED") == 1)


@pytest.mark.parametrize("held", ["ctr", "cvr"])
def test_a_call_finished_after_its_deadline_is_not_logged_ok(artifacts, held, caplog, gated_server):
    """Held in pCTR: the check before pCVR stops it. Held in pCVR, the last model: it finishes,
    and is still logged and counted DEADLINE_EXCEEDED, since nobody reads the answer."""
    with caplog.at_level(logging.INFO, logger="recstack.access"), gated_server(artifacts, held, max_workers=2) as g:
        if held == "ctr":  # the two-graph layout: pCVR runs after pCTR, counting its calls
            cvr = g.gate_stage("cvr")
            cvr.release.set()
        _deadline_passes_in_the_gate(g)
        assert _count(g.servicer, "OK") == 0
        if held == "ctr":
            assert cvr.calls == 0
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "recstack.access"]
        assert [x["code"] for x in lines] == ["DEADLINE_EXCEEDED"]


def test_an_answer_nobody_reads_is_not_logged_as_an_impression(artifacts, tmp_path, gated_server):
    """Held in pCVR past its deadline: the call ends DEADLINE_EXCEEDED and the impression log
    gets no row for it (nothing was shown); the next answered call is logged."""
    import pyarrow.parquet as pq

    from recstack.serving.events import LivePath

    live = LivePath(None, log_dir=tmp_path / "log")
    try:
        with gated_server(artifacts, "cvr", max_workers=2, live=live) as g:
            _deadline_passes_in_the_gate(g)
            answered = g.stub.Rank(client.make_request(2, 5), timeout=30)
    finally:
        live.close()
    rows = pq.read_table(sorted((tmp_path / "log").rglob("impressions*.parquet"))).to_pydict()
    assert set(rows["user_id"]) == {2} and len(rows["user_id"]) == len(answered.items)
