"""`recstack loadtest`: open loop (latency from the scheduled send time), bounded, HDR percentiles,
status counts, server stage timings, JSON + PNG output, sweep, loopback only."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from recstack.bench import loadtest as L
from recstack.serving.server import build_server


@pytest.fixture(scope="module")
def target(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("lt")
    make_fake_bundle(root)
    # room for every call the tests keep in flight (concurrency <= 8): a slow machine must
    # queue them, never shed one
    server, port, servicer = build_server(root, max_workers=2, max_queue=8)
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_run_reports_percentiles_status_and_stages(target, tmp_path):
    addr, _ = target
    res = L.run(addr, qps=40, duration_s=1.0, concurrency=8, max_requests=30, n_users=40,
                json_out=tmp_path / "r.json", plot=tmp_path / "r.png")
    assert res["sent"] == 30 and res["completed"] == 30 and res["status"] == {"OK": 30}  # max_requests bounds it
    lat = res["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert 0 < res["achieved_qps"] <= 45
    for stage in L.STAGES:
        assert res["server_stage_ms"][stage]["p50"] > 0
    assert res["server_stage_ms"]["total"]["p50"] <= lat["max"]
    assert json.loads((tmp_path / "r.json").read_text())["sent"] == 30
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "latency ms" in L.format_result(res)


def test_latency_is_measured_from_the_scheduled_send_time(target):
    """The server stalls 0.5 s on the first call; calls due during the stall must report the time
    they waited, not only their own service time (no coordinated omission)."""
    addr, servicer = target
    cascade = servicer.cascade
    real = cascade.retrieval_tower
    first = threading.Event()

    def stalling(feeds):
        if not first.is_set():
            first.set()
            time.sleep(0.5)
        return real(feeds)

    cascade.retrieval_tower = stalling
    try:
        res = L.run_once(addr, qps=20, duration_s=1.0, concurrency=1, n_users=40, keep_samples=True, debug=False)
    finally:
        cascade.retrieval_tower = real
    assert res["status"] == {"OK": 20}
    early = [(t, ms) for t, ms, _ in res["samples"] if t < 0.4]
    assert len(early) >= 7
    for t, ms in early:  # each waited at least until the stall ended
        assert ms >= (0.5 - t) * 1e3 - 30, (t, ms)
    assert res["late_sends"] >= 5  # concurrency 1: sends behind schedule were counted


def test_sweep_finds_a_passing_qps(target, tmp_path):
    addr, _ = target
    res = L.run(addr, qps=10, duration_s=0.4, concurrency=8, n_users=40, sweep=True, p99_bound_ms=5000, steps=3,
                plot=tmp_path / "s.png")
    assert [r["offered_qps"] for r in res["runs"]] == [10, 20, 40]  # all pass under a generous bound: doubling
    assert res["best_qps"] == 40 and all(r["passed"] for r in res["runs"])
    tight = L.sweep_qps(addr, 0.001, 10, 0.3, 4, n_users=40, steps=2)  # nothing passes a 1 us bound
    assert tight["best_qps"] == 0 and [r["offered_qps"] for r in tight["runs"]] == [10, 5]  # halving down
    assert tight["first_failing_qps"] == 5
    assert (tmp_path / "s.png").exists()


def test_users_from_the_test_day(tiny_data):
    users = L.test_day_users(tiny_data)
    world = json.loads(open(f"{tiny_data}/world.json").read())
    assert len(users) > 0 and users.min() >= 0 and users.max() < world["vocab"]["n_users"]
    pool, desc = L._user_pool(tiny_data, 10)
    assert np.array_equal(pool, users) and "test day" in desc


@pytest.mark.parametrize("bad", ["8.8.8.8:50051", "example.com:443", "10.0.0.1:1", "nohost", "1.2.3.4:x"])
def test_refuses_non_loopback_targets(bad):
    with pytest.raises(L.LoadTestError):
        L.check_loopback(bad)


def test_accepts_loopback_targets():
    assert L.check_loopback("127.0.0.1:1") == ("127.0.0.1", 1)
    assert L.check_loopback("localhost:2")[1] == 2
    assert L.main(["--target", "8.8.8.8:1", "--duration", "0.1"]) == 2


def test_stage_sizes_reach_the_server(target):
    addr, _ = target
    ok = L.run(addr, qps=40, duration_s=1.0, concurrency=4, max_requests=8, n_users=40, k=5,
               retrieval_size=50, coarse_size=20)
    assert ok["status"] == {"OK": 8}
    # coarse_size > retrieval_size is refused: proof that the sizes travel in every request
    bad = L.run(addr, qps=40, duration_s=1.0, concurrency=4, max_requests=8, n_users=40, k=5,
                retrieval_size=10, coarse_size=20)
    assert bad["status"] == {"INVALID_ARGUMENT": 8}
