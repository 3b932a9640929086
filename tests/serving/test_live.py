"""The live path through gRPC: LogEvents -> the next Rank sees the events; bad batches refused
whole; a failing store degrades Rank (and says so) and LogEvents answers UNAVAILABLE, until it
recovers; training and serving build identical features from the same history."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from recstack import data as D
from recstack.serving import client
from recstack.serving.cascade import Cascade, Query
from recstack.serving.events import LivePath
from recstack.serving.server import build_server
from recstack.serving.store import Events, StoreConfig, open_store
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

PROFILE_ONLY_USER = 25  # make_fake_bundle: a profile, no snapshot behaviours


def test_training_and_serving_build_identical_features_from_one_history(tiny_data, tiny_bundle, tmp_path):
    """The same event history through the trainer's batch and through the server's store +
    cascade (at the impression's time) gives identical tensors, interacted features included."""
    data = D.load(tiny_data)
    ex = data.examples(data.test_day)
    batch = ex.batch(np.arange(len(ex)))
    seq_len = (batch["seq_items"][:, :, 0] > 0).sum(1)
    counted = batch["interacted"].sum(1) > 0
    rows = [int(np.argmax(seq_len)), int(np.flatnonzero(counted & (seq_len < 50))[0]),
            int(np.flatnonzero(batch["interacted"][:, -1] > 0)[0])]  # a full sequence, a short one, favourites / carts
    cascade = Cascade.load(tiny_bundle, warm=False)  # the tiny corpus, an empty snapshot
    import pyarrow.parquet as pq

    ev = pq.read_table(f"{tiny_data}/events.parquet").to_pydict()
    ev = {k: np.asarray(v) for k, v in ev.items()}
    for i, row in enumerate(rows):
        user, ts = int(batch["user_id"][row]), float(ex.imps["ts"][row])
        store = open_store(str(tmp_path / f"fs{i}.sqlite3"), config=StoreConfig(max_events=10_000, ttl_s=1e9))
        mine = (ev["user_id"] == user) & (ev["ts"] < ts)  # what the server had been told by then
        store.append(Events(ev["user_id"][mine], ev["item_id"][mine], ev["kind"][mine], ev["ts"][mine], ev["dwell"][mine]))
        q = Query(user_id=user, num_results=1, retrieval_size=1, coarse_size=1, now=ts, history=store.history(user, ts))
        seq_items, seq_extras, _ = cascade.sequence(q)
        np.testing.assert_array_equal(seq_items[0], batch["seq_items"][row])
        np.testing.assert_array_equal(seq_extras[0], batch["seq_extras"][row])
        # the interacted features: every kind over the whole history, at the impression's time
        np.testing.assert_array_equal(cascade.interacted_for(q)(batch["item_id"][row : row + 1]),
                                      batch["interacted"][row : row + 1])
        store.close()
    assert seq_len[rows[0]] == 50 and batch["interacted"][rows[1:]].min(1).max() >= 0 and counted[rows[1:]].all()


@pytest.fixture
def served(tmp_path, make_fake_bundle):
    make_fake_bundle(tmp_path / "artifacts")
    store = open_store("", artifacts_root=tmp_path / "artifacts")
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=2, live=LivePath(store))
    yield {"target": f"127.0.0.1:{port}", "servicer": servicer, "store": store}
    server.stop(None)
    store.close()


def _rank(target, user_id, **kw):
    return client.rank(target, user_id, k=10, **kw)


def test_logged_events_reach_the_next_rank(served):
    target, now = served["target"], time.time()
    before = _rank(target, PROFILE_ONLY_USER)
    assert before.stage_counts.sequence_length == 0 and "i2i" not in [it.source for it in before.items]
    events = [client.event(PROFILE_ONLY_USER, 3, now - 60, "click", 12.0),
              client.event(PROFILE_ONLY_USER, 7, now - 30, "purchase"),
              # kept by the store, not in the sequence; older than the browse window, so they do not
              # trigger the browse source (which would take i2i's place)
              client.event(PROFILE_ONLY_USER, 9, now - 7300, "view", 4.0),
              client.event(PROFILE_ONLY_USER, 11, now - 7200, "cart", request_id="abc-1")]
    assert client.log_events(target, events).accepted == 4
    after = _rank(target, PROFILE_ONLY_USER)
    assert after.stage_counts.sequence_length == 2 and not after.degraded_features
    assert "i2i" in [it.source for it in after.items]  # the clicked items seed item-to-item retrieval
    assert len(served["store"].history(PROFILE_ONLY_USER, time.time())) == 4
    other = _rank(target, PROFILE_ONLY_USER + 1)
    assert other.stage_counts.sequence_length == 0  # nobody else's


def test_logged_views_trigger_the_browse_source(served):
    target, now = served["target"], time.time()
    sizes = {"retrieval_size": 50, "coarse_size": 50}  # every retrieved candidate is returned
    before = client.rank(target, PROFILE_ONLY_USER, k=50, **sizes)
    assert "browse" not in [it.source for it in before.items]
    views = [client.event(PROFILE_ONLY_USER, item, now - 60 + i, "view", 8.0) for i, item in enumerate((4, 140, 260))]
    assert client.log_events(target, views).accepted == 3
    after = client.rank(target, PROFILE_ONLY_USER, k=50, **sizes)
    cascade = served["servicer"].cascade
    category = cascade.categories.item_category
    browsed = set(category[cascade.ids.items.internal_of_ints([4, 140, 260])].tolist())
    got = cascade.ids.items.internal_of_ints([it.item_id for it in after.items if it.source == "browse"])
    assert len(got) == 10  # round(0.2 x 50): the browsed categories hold enough items
    assert set(category[got].tolist()) <= browsed
    assert after.stage_counts.sequence_length == 0  # views are not clicks: no sequence, no i2i


def test_the_snapshot_is_aged_at_request_time(served):
    cascade = served["servicer"].cascade
    q = Query(user_id=0, num_results=5, retrieval_size=50, coarse_size=20)
    t0 = cascade.snapshot.time
    hours_now = np.expm1(cascade.sequence(Query(**{**q.__dict__, "now": t0}))[1][0, :, 0])
    hours_later = np.expm1(cascade.sequence(Query(**{**q.__dict__, "now": t0 + 86400.0}))[1][0, :, 0])
    np.testing.assert_allclose(hours_later - hours_now, 24.0, atol=1e-3)


_NOW = 1.9e9  # a fixed clock for the validation cases (far beyond any event below but the future ones)


@pytest.mark.parametrize("bad, field", [
    ({"kind": 9}, "events[1].kind"),
    ({"item_id": 300}, "events[1].item_id"),
    ({"item_id": -1}, "events[1].item_id"),
    ({"user_id": -4}, "events[1].user_id"),
    ({"timestamp": float("nan")}, "events[1].timestamp"),
    ({"timestamp": float("inf")}, "events[1].timestamp"),
    ({"timestamp": _NOW + 86400}, "events[1].timestamp"),
    ({"dwell_seconds": float("nan")}, "events[1].dwell_seconds"),
    ({"dwell_seconds": -1.0}, "events[1].dwell_seconds"),
])
def test_a_bad_event_refuses_the_whole_batch(served, bad, field):
    served["servicer"].cascade.clock = lambda: _NOW
    good = {"user_id": 26, "item_id": 1, "kind": 0, "timestamp": _NOW - 100, "dwell_seconds": 1.0}
    req = pb.LogEventsRequest(events=[pb.Event(**good), pb.Event(**{**good, **bad})])
    with grpc.insecure_channel(served["target"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EventServiceStub(ch).LogEvents(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith(field)
    assert len(served["store"].history(26, _NOW)) == 0  # the good event was not written either


def test_an_empty_batch_is_invalid(served):
    with grpc.insecure_channel(served["target"]) as ch:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.EventServiceStub(ch).LogEvents(pb.LogEventsRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("events:")


def test_store_outage_degrades_rank_and_refuses_events_until_it_recovers(tmp_path, make_fake_bundle, redis_server):
    make_fake_bundle(tmp_path / "artifacts")
    store = open_store(redis_server.url)
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=2, live=LivePath(store))
    target, now = f"127.0.0.1:{port}", time.time()
    try:
        client.log_events(target, [client.event(0, 5, now - 1, "click", 3.0)])
        ok = _rank(target, 0, behaviours=[client.behaviour(8, 2.0)])
        assert not ok.degraded_features and ok.stage_counts.sequence_length == 50
        redis_server.stop()
        down = _rank(target, 0, behaviours=[client.behaviour(8, 2.0)])
        # still answered: the request's behaviour and the snapshot's (user 0 has 60)
        assert down.degraded_features and down.stage_counts.sequence_length == 50 and len(down.items) == 10
        cold = _rank(target, PROFILE_ONLY_USER, behaviours=[client.behaviour(8, 2.0)])
        assert cold.degraded_features and cold.stage_counts.sequence_length == 1
        assert servicer.metrics.value("recstack_degraded_features_total") == 2
        with pytest.raises(grpc.RpcError) as err:
            client.log_events(target, [client.event(0, 6, now, "click")])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not acknowledged" in err.value.details()
        redis_server.start()
        back = _rank(target, PROFILE_ONLY_USER)
        assert not back.degraded_features
        client.log_events(target, [client.event(PROFILE_ONLY_USER, 6, time.time(), "click")])
        assert _rank(target, PROFILE_ONLY_USER).stage_counts.sequence_length == 1
    finally:
        server.stop(None)
        store.close()


def test_the_snapshot_clock_is_the_bundle_export_time():
    from recstack.bundle import BundleError
    from recstack.serving.cascade import snapshot_time

    assert snapshot_time({"created": "2026-01-01T00:00:00+00:00"}) == 1767225600.0
    assert snapshot_time({"created": "2026-01-01T00:00:00"}) == 1767225600.0  # no zone: UTC, as export writes it
    with pytest.raises(BundleError, match="created"):
        snapshot_time({"created": "yesterday"})


def test_the_snapshot_clock_is_the_datas_last_event_when_its_times_are_absolute():
    from recstack.bundle import BundleError
    from recstack.serving.cascade import snapshot_time

    m = {"created": "2026-01-01T00:00:00+00:00", "snapshot": {"time": 345600.0, "epoch": 1.8e9}}
    assert snapshot_time(m) == 1.8e9
    for bad in ("soon", float("nan"), -1.0, True):
        with pytest.raises(BundleError, match="snapshot.epoch"):
            snapshot_time({**m, "snapshot": {"epoch": bad}})


def test_a_server_on_a_virtual_clock_ages_and_logs_at_that_clock(tmp_path, make_fake_bundle):
    """--clock-file: a request's time (what the user's events are aged at, and the impression
    log's ts) is the file's, and LogEvents checks "not in the future" against it; the file moves,
    the server follows."""
    from recstack.data.live_log import read_log
    from recstack.serving.clock import FileClock, set_clock
    from recstack.v1 import ranking_pb2_grpc as pb_grpc

    make_fake_bundle(tmp_path / "artifacts")
    clock = tmp_path / "clock"
    t0 = 2.5e9  # years ahead of the wall clock: only the file says what time it is
    set_clock(clock, t0)
    store = open_store("", artifacts_root=tmp_path / "artifacts")
    live = LivePath(store, tmp_path / "log", roll_s=0.05)
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=2, live=live,
                                          cascade_options={"clock": FileClock(clock)})
    target = f"127.0.0.1:{port}"

    def rank(request_id: str):
        with client.channel(target) as ch:
            return pb_grpc.RankingServiceStub(ch).Rank(client.make_request(PROFILE_ONLY_USER, 10), timeout=10,
                                                       metadata=(("x-request-id", request_id),))

    try:
        u = PROFILE_ONLY_USER
        client.log_events(target, [client.event(u, 3, t0 - 3600.0, "click")])  # an hour ago on the file's clock
        with pytest.raises(grpc.RpcError, match="timestamp"):  # a day ahead of the file's clock
            client.log_events(target, [client.event(u, 4, t0 + 86400.0, "click")])
        assert rank("at-t0").stage_counts.sequence_length == 1
        assert servicer.cascade.clock() == t0
        set_clock(clock, t0 + 7200.0)
        assert servicer.cascade.clock() == t0 + 7200.0
        rank("at-t0-plus-2h")
    finally:
        server.stop(None)
        live.close()
    imps = read_log(tmp_path / "log", "impressions")
    ts = dict(zip(imps["request_id"].tolist(), imps["ts"].tolist()))
    assert ts["at-t0"] == t0 and ts["at-t0-plus-2h"] == t0 + 7200.0
