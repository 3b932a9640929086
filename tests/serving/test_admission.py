"""Rank's admission: a call is refused when its estimated queue wait does not fit its deadline
or the max queue wait, and always beyond the hard cap. No timing: the service-time estimate
and the clock are injected, and held calls are gated by events the test opens."""
from __future__ import annotations

import threading

import grpc
import pytest

from recstack.serving import client
from recstack.serving.admission import RankAdmission
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2_grpc as pb_grpc


def _admit_all(a: RankAdmission, time_remaining) -> tuple[int, str]:
    """Admit calls until one is refused -> (admitted, the refusal)."""
    n = 0
    while not (reason := a.try_admit(time_remaining)):
        n += 1
        assert n <= a.limit
    return n, reason


def test_a_fresh_queue_sheds_only_at_its_hard_cap():
    a = RankAdmission(2, 10)
    assert a.service_s == 0 and a.estimated_wait() == 0
    n, reason = _admit_all(a, 0.001)
    assert n == 10 and reason == "10 calls in flight (the queue's hard cap)"
    a.leave()
    assert a.admit(0.001) and not a.admit(0.001)  # a call that leaves frees its place


def test_a_queued_call_is_admitted_only_when_its_estimated_wait_and_service_fit_its_deadline():
    a = RankAdmission(2, 100, service_s=0.125)
    # waiting place k (1, 2, ...) is expected to wait 0.125 * k / 2 s, then to run 0.125 s:
    # within 1 s for k <= 14, so 2 running + 14 waiting are admitted
    n, reason = _admit_all(a, 1.0)
    assert n == 16
    assert reason == "estimated queue wait 938 ms + service 125 ms is over the call's remaining deadline 1000 ms"
    assert a.admit(2.0)  # a caller with a longer deadline still gets in
    assert a.admit(None) and a.admit(None)  # no deadline: only the hard cap (no max wait set)


def test_a_call_that_finds_a_slot_free_runs_whatever_its_deadline():
    a = RankAdmission(2, 100, service_s=10.0)
    assert a.admit(0.001) and a.admit(0.001)  # both slots free: no wait, the cascade's deadline checks decide
    assert a.try_admit(0.001).startswith("estimated queue wait 5000 ms + service 10000 ms")


def test_the_max_queue_wait_bounds_calls_without_a_deadline():
    a = RankAdmission(2, 100, max_wait_s=0.5, service_s=0.125)
    n, reason = _admit_all(a, None)  # wait 0.0625 * k <= 0.5 for k <= 8
    assert n == 10 and reason == "estimated queue wait 562 ms is over the server's max queue wait 500 ms"


def test_the_estimate_follows_the_service_times_reported():
    a = RankAdmission(1, 4, alpha=0.5)
    assert a.admit() and a.acquire(lambda: 1.0)
    a.release(0.2)  # the first measurement replaces the empty estimate
    assert a.service_s == pytest.approx(0.2)
    assert a.acquire(lambda: 1.0)
    a.release(0.1)
    assert a.service_s == pytest.approx(0.15)
    assert a.acquire(lambda: 1.0)
    a.release()  # no measurement: unchanged
    assert a.service_s == pytest.approx(0.15)


@pytest.mark.parametrize("kwargs", [dict(running=0, limit=4), dict(running=5, limit=4),
                                    dict(running=1, limit=4, max_wait_s=0), dict(running=1, limit=4, alpha=0),
                                    dict(running=1, limit=4, service_s=-1)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        RankAdmission(**kwargs)


class _Steps:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step: float):
        self.step, self.t = step, 0.0

    def __call__(self) -> float:
        self.t += self.step
        return self.t


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("admission")
    make_fake_bundle(root)
    return root


def test_the_server_measures_each_call_with_the_admissions_clock(artifacts):
    server, port, servicer = build_server(artifacts, max_workers=2)
    servicer.admission = RankAdmission(2, 8, clock=_Steps(0.25))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert len(pb_grpc.RankingServiceStub(ch).Rank(client.make_request(1, 5), timeout=30).items) == 5
        assert servicer.admission.service_s == 0.25  # read once before the work, once after
    finally:
        server.stop(None)


def test_the_server_sheds_a_call_that_cannot_be_answered_in_time_and_queues_one_that_can(artifacts, gated_server):
    with gated_server(artifacts, max_workers=1, max_queue=8) as g:
        servicer, stub, gate = g.servicer, g.stub, g.gate
        servicer.admission = RankAdmission(1, 9, service_s=3.0)  # a slot is held about 3 s per call
        running = stub.Rank.future(client.make_request(1, 5), timeout=60)
        assert gate.entered.wait(20)
        queued = stub.Rank.future(client.make_request(2, 5), timeout=60)  # wait 3 + 3 s <= 60 s: admitted
        pause = threading.Event()
        for _ in range(3000):  # until the second call is in the queue (polled, not timed)
            if servicer.admission.waiting == 1:
                break
            pause.wait(0.01)
        assert servicer.admission.waiting == 1
        for _ in range(5):  # 2nd in the queue: 6 s wait + 3 s > its 5 s deadline: refused at once
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(client.make_request(3, 5), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "remaining deadline" in e.value.details() and "retry with backoff" in e.value.details()
        assert servicer.admission.waiting == 1  # the refused calls were never queued
        gate.release.set()
        assert len(running.result().items) == 5 and len(queued.result().items) == 5
        assert servicer.metrics.value("recstack_requests_total", method="Rank", code="RESOURCE_EXHAUSTED") == 5
