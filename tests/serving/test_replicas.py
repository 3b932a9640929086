"""Two `recstack serve` replicas behind a client-side round_robin channel (recstack.serving.balancer):
no call fails while one replica is drained with SIGTERM and started again on its address."""
from __future__ import annotations

import json
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
from recstack.serving.balancer import SERVICE_CONFIG, balanced_channel, target_of
from recstack.v1 import ranking_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 180.0  # the longest any step may take on a loaded machine before the test fails


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    make_fake_bundle(root)
    return root


class Replica:
    """One `recstack serve` process; its stderr is watched for lines, its stdout (the access
    log, one JSON line per call) is counted."""

    def __init__(self, artifacts: Path, port: int = 0, extra: tuple[str, ...] = ()):
        self.proc = subprocess.Popen([sys.executable, "-m", "recstack", "serve", "--artifacts", str(artifacts),
                                      "--port", str(port), "--threads", "2", "--grace", "30", *extra], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        self.ok_ranks = 0
        threading.Thread(target=self._pump_err, daemon=True).start()
        threading.Thread(target=self._count_out, daemon=True).start()
        self.port = int(self.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))

    def _pump_err(self):
        for line in self.proc.stderr:
            self.err.put(line)
        self.err.put(None)

    def _count_out(self):
        for line in self.proc.stdout:
            rec = json.loads(line)
            if rec.get("method") == "Rank" and rec.get("code") == "OK":
                self.ok_ranks += 1

    def wait_for(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + WAIT_S
        while True:
            line = self.err.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(self.stderr)[-3000:]
            self.stderr.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_S)


def test_targets_and_service_config():
    assert target_of(["127.0.0.1:1", "127.0.0.1:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert target_of(["[::1]:1"]) == "ipv6:[::1]:1"
    assert target_of("dns:///ranking:50051") == "dns:///ranking:50051"
    for bad in ([], ["127.0.0.1:1", "[::1]:2"], "ranking:50051"):
        with pytest.raises(ValueError, match="replicas"):
            target_of(bad)
    retry = SERVICE_CONFIG["methodConfig"][0]["retryPolicy"]
    assert retry["retryableStatusCodes"] == ["UNAVAILABLE"] and SERVICE_CONFIG["loadBalancingConfig"] == [{"round_robin": {}}]


def test_draining_and_restarting_a_replica_fails_no_call(artifacts):
    a, b = Replica(artifacts), Replica(artifacts)
    replicas = [a, b]
    calls, failures, stop = [0], [], threading.Event()

    def drive():
        with balanced_channel([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            while not stop.is_set():
                try:
                    stub.Rank(client.make_request(calls[0] % 50, 5), timeout=60)
                except grpc.RpcError as e:
                    failures.append(f"{e.code().name}: {e.details()}")
                calls[0] += 1

    def until(cond, what):
        deadline = time.monotonic() + WAIT_S
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; failures {failures[:3]}"
            time.sleep(0.05)

    drivers = [threading.Thread(target=drive) for _ in range(2)]
    try:
        for t in drivers:
            t.start()
        until(lambda: a.ok_ranks >= 20 and b.ok_ranks >= 20, "both replicas to serve")
        assert a.stop() == 0  # SIGTERM: NOT_SERVING, drain, exit 0, while calls keep coming
        a.wait_for("draining")
        served_by_b = b.ok_ranks
        until(lambda: b.ok_ranks >= served_by_b + 20, "the other replica to carry the load")
        a2 = Replica(artifacts, port=a.port)  # the same address the channel was given
        replicas.append(a2)
        until(lambda: a2.ok_ranks >= 20, "the restarted replica to take calls again")
    finally:
        stop.set()
        for t in drivers:
            t.join(WAIT_S)
        for r in replicas:
            if r.proc.poll() is None:
                r.stop()
    assert failures == [] and calls[0] >= 80


def test_a_draining_replica_keeps_serving_through_its_notice(artifacts):
    # a notice far longer than the test: what it checks cannot depend on how fast the machine is
    r = Replica(artifacts, extra=("--drain-notice", "600"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{r.port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            assert len(stub.Rank(client.make_request(1, 5), timeout=WAIT_S).items) == 5
            r.proc.send_signal(signal.SIGTERM)
            r.wait_for("draining")
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="recstack.v1.RankingService"), timeout=WAIT_S)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # told NOT_SERVING, yet a call that still comes is served, not cancelled
            assert len(stub.Rank(client.make_request(2, 5), timeout=WAIT_S).items) == 5
        assert r.proc.poll() is None
    finally:
        r.proc.kill()
        r.proc.wait(WAIT_S)
