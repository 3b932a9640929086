"""Event ingestion is bounded apart from Rank: LogEvents calls stuck on the feature store (a
slow fsync, a held lock) take neither Rank's admission places nor its threads, nor the
probes'; beyond their own bound they are refused at once with nothing written, and the
calls that were held are acknowledged, and readable, once the store lets them through.

No timing: the store blocks each write on a gate the test opens, and the test waits for
states (a write entered, a call queued), never for durations."""
from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recstack.serving import client
from recstack.serving.events import LivePath
from recstack.serving.server import PROBE_THREADS, build_server
from recstack.serving.store.sqlite import SQLiteStore
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

STATE_WAIT_S = 60.0  # how long a state may take to be reached on a loaded machine (a bound, not a timing)


class GatedStore(SQLiteStore):
    """SQLite whose writes wait for `gate` to open; `entered` counts the writes begun."""

    def __init__(self, path):
        super().__init__(path)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def _append(self, events):
        self.entered.release()
        if not self.gate.wait(STATE_WAIT_S):
            raise AssertionError("the test never opened the store's gate")
        super()._append(events)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + STATE_WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached: {what}")
        time.sleep(0.01)


@pytest.fixture
def gated(tmp_path, make_fake_bundle):
    make_fake_bundle(tmp_path / "artifacts")
    store = GatedStore(tmp_path / "fs.sqlite3")
    # Rank: 1 running + 2 waiting; LogEvents: 1 writing + 1 waiting
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=1, max_queue=2, ingest_threads=1,
                                          max_ingest_queue=1, live=LivePath(store))
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"target": f"127.0.0.1:{port}", "servicer": servicer, "store": store, "channel": ch,
           "events": pb_grpc.EventServiceStub(ch)}
    store.gate.set()
    ch.close()
    server.stop(None)
    store.close()


def _batch(user: int, item: int) -> pb.LogEventsRequest:
    """One click by `user` (ids from 30 up have no snapshot history: the store holds only what is logged)."""
    return pb.LogEventsRequest(events=[client.event(user, item, time.time(), "click", request_id=f"iso-{user}-{item}")])


def _hold_ingestion(g) -> list:
    """One LogEvents writing (held at the gate) and one queued behind it: ingestion is full."""
    held = [g["events"].LogEvents.future(_batch(33, 7), timeout=STATE_WAIT_S)]
    assert g["store"].entered.acquire(timeout=STATE_WAIT_S), "the first LogEvents never reached the store"
    held.append(g["events"].LogEvents.future(_batch(34, 8), timeout=STATE_WAIT_S))
    _wait_for(lambda: g["servicer"].ingest.waiting == 1, "the second LogEvents queued")
    return held


def test_rank_is_admitted_while_ingestion_is_full_and_over_its_bound_logevents_is_refused(gated):
    g = gated
    held = _hold_ingestion(g)
    with pytest.raises(grpc.RpcError) as refused:
        g["events"].LogEvents(_batch(35, 9), timeout=STATE_WAIT_S)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "LogEvents" in refused.value.details()
    # Rank, several times over its own running bound, is served while both LogEvents are held
    for user in range(5):
        assert len(client.rank(g["target"], user, k=5, timeout=STATE_WAIT_S).items) == 5
    probe = health_pb2_grpc.HealthStub(g["channel"]).Check(health_pb2.HealthCheckRequest(service=""), timeout=STATE_WAIT_S)
    assert probe.status == health_pb2.HealthCheckResponse.SERVING
    assert g["servicer"].admission.waiting == 0 and not any(f.done() for f in held)
    g["store"].gate.set()
    assert [f.result().accepted for f in held] == [1, 1]  # acknowledged once written ...
    now = time.time() + 1.0
    assert [int(x) for x in g["store"].history(33, now).item_id] == [7]  # ... and readable
    assert [int(x) for x in g["store"].history(34, now).item_id] == [8]
    assert len(g["store"].history(35, now)) == 0  # the refused batch wrote nothing


def test_many_stuck_logevents_cannot_take_the_threads_rank_and_probes_need(gated):
    """More LogEvents calls than the whole server has threads: all but the bound are refused
    at once, and Rank and health are answered while the store holds the others."""
    g = gated
    held = _hold_ingestion(g)
    s = g["servicer"]
    n_threads = s.admission.limit + s.ingest.limit + PROBE_THREADS
    extra = [g["events"].LogEvents.future(_batch(40 + i, i), timeout=STATE_WAIT_S) for i in range(2 * n_threads)]
    codes = []
    for f in extra:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * len(extra)
    ranks = [pb_grpc.RankingServiceStub(g["channel"]).Rank.future(client.make_request(u, k=5), timeout=STATE_WAIT_S)
             for u in range(s.admission.limit)]  # Rank's whole bound at once: none is shed
    assert [len(f.result().items) for f in ranks] == [5] * len(ranks)
    g["store"].gate.set()
    assert [f.result().accepted for f in held] == [1, 1]


class SlowReadStore(SQLiteStore):
    """SQLite whose reads of `slow_user` wait for `gate` (a store stalled by an fsync, for one call)."""

    slow_user = 3

    def __init__(self, path):
        super().__init__(path)
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def _recent(self, user_id, since):
        if user_id == self.slow_user:
            self.entered.release()
            if not self.gate.wait(STATE_WAIT_S):
                raise AssertionError("the test never opened the store's gate")
        return super()._recent(user_id, since)


def test_a_rank_waiting_on_the_store_holds_no_running_slot(tmp_path, make_fake_bundle):
    """One running slot: a Rank whose store read is stalled waits outside it, so the next Rank
    is ranked meanwhile; the stalled one is answered once the store answers."""
    make_fake_bundle(tmp_path / "artifacts")
    store = SlowReadStore(tmp_path / "fs.sqlite3")
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=1, max_queue=2, live=LivePath(store))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            stalled = stub.Rank.future(client.make_request(store.slow_user, k=5), timeout=STATE_WAIT_S)
            assert store.entered.acquire(timeout=STATE_WAIT_S), "the stalled Rank never read the store"
            assert len(stub.Rank(client.make_request(4, k=5), timeout=STATE_WAIT_S).items) == 5
            assert not stalled.done()
            store.gate.set()
            assert len(stalled.result().items) == 5
    finally:
        store.gate.set()
        server.stop(None)
        store.close()
