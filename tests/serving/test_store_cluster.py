"""The feature store on a real three-node Redis Cluster: a user's keys in one slot, a batch
spanning every node, idempotent retries of an unacknowledged batch (per-user atomicity), and,
through gRPC, a stopped node degrading Rank and refusing LogEvents until it is back."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from recstack.serving import client
from recstack.serving.events import LivePath
from recstack.serving.server import build_server
from recstack.serving.store import Events, StoreConfig, StoreUnavailable, open_store
from recstack.serving.store.redis_cluster import parse_nodes
from recstack.serving.store.redis_store import user_key

CONFIG = StoreConfig(max_events=50, ttl_s=1000.0)


def _users_on_every_node(cluster, n: int = 3) -> list[int]:
    """The first user ids whose keys are served by each node in turn (one per node)."""
    found: dict[int, int] = {}
    u = 0
    while len(found) < n:
        found.setdefault(cluster.node_of(user_key(u)), u)
        u += 1
    return [found[i] for i in range(n)]


def _batch(users: list[int]) -> Events:
    """Three events per user, the last two identical (both must be kept)."""
    rows = [(u, item, ts) for u in users for item, ts in ((1, 100.0), (2, 101.0), (2, 101.0))]
    return Events([r[0] for r in rows], [r[1] for r in rows], np.zeros(len(rows)), [r[2] for r in rows],
                  np.full(len(rows), 2.5), request_id=tuple("req-1" for _ in rows))


def test_a_users_key_is_in_its_hash_tags_slot(redis_cluster):
    import redis

    with redis.Redis("127.0.0.1", redis_cluster.ports[0]) as r:
        for u in (0, 7, 12345, 2**40):
            assert r.execute_command("CLUSTER KEYSLOT", user_key(u)) == r.execute_command("CLUSTER KEYSLOT",
                                                                                          f"{{u:{u}}}")
    assert sorted(redis_cluster.node_of(user_key(u)) for u in _users_on_every_node(redis_cluster)) == [0, 1, 2]


def test_a_batch_over_every_node_is_written_once_however_often_it_is_sent(redis_cluster):
    users = _users_on_every_node(redis_cluster)
    store = open_store(redis_cluster.url, config=CONFIG)
    try:
        for _ in range(3):  # the client retrying a batch whose acknowledgement it never got
            store.append(_batch(users))
        for u in users:
            h = store.history(u, now=200.0)
            assert h.item_id.tolist() == [1, 2, 2] and h.dwell.tolist() == [2.5] * 3
            assert store.client.zcard(user_key(u)) == 3
        store.append(_batch(users[:1]).take(np.array([0])))  # one event again, as a batch of its own
        assert store.history(users[0], now=200.0).item_id.tolist() == [1, 2, 2]
    finally:
        store.close()


def test_a_batch_failing_on_one_node_is_unacknowledged_and_its_retry_writes_each_event_once(redis_cluster):
    users = _users_on_every_node(redis_cluster)
    store = open_store(redis_cluster.url, config=CONFIG)
    try:
        redis_cluster.stop(2)
        with pytest.raises(StoreUnavailable, match="append not acknowledged"):
            store.append(_batch(users))  # the users of nodes 0 and 1 may be written, node 2's are not
        with pytest.raises(StoreUnavailable, match="read failed"):
            store.history(users[2], now=200.0)
        redis_cluster.start(2)
        store.append(_batch(users))  # the client's retry of the whole batch
        for u in users:
            assert store.history(u, now=200.0).item_id.tolist() == [1, 2, 2]
    finally:
        store.close()


def test_a_cluster_down_at_start_is_unavailable_until_it_answers(redis_cluster):
    for i in range(3):
        redis_cluster.stop(i)
    store = open_store(redis_cluster.url, config=CONFIG)  # opening never needs the cluster up
    try:
        assert not store.ping()
        with pytest.raises(StoreUnavailable, match="no seed node answers"):
            store.append(_batch([1]))
        redis_cluster.start(0, 1, 2)
        assert store.ping()
        store.append(_batch([1]))
        assert store.history(1, now=200.0).item_id.tolist() == [1, 2, 2]
    finally:
        store.close()


@pytest.mark.parametrize("spec, message", [("redis-cluster://", "is not redis-cluster://HOST:PORT"),
                                           ("redis-cluster://h:1,h", "node 'h'"),
                                           ("redis-cluster://h:70000", "port in 1..65535")])
def test_bad_cluster_specs_are_one_line_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        open_store(spec)
    assert parse_nodes("redis-cluster://a:1, b:2") == [("a", 1), ("b", 2)]


def _rank(target: str, user_id: int):
    with grpc.insecure_channel(target) as ch:
        from recstack.v1 import ranking_pb2_grpc as pb_grpc

        return pb_grpc.RankingServiceStub(ch).Rank(client.make_request(user_id, 10), timeout=30)


def test_a_stopped_node_degrades_rank_and_refuses_events_until_it_returns(tmp_path, make_fake_bundle, redis_cluster):
    make_fake_bundle(tmp_path / "artifacts")
    user = 25  # make_fake_bundle: a profile, no snapshot behaviours
    node = redis_cluster.node_of(user_key(user))
    store = open_store(redis_cluster.url)
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=2, live=LivePath(store))
    target = f"127.0.0.1:{port}"
    try:
        client.log_events(target, [client.event(user, 5, time.time() - 1, "click", 3.0)])
        ok = _rank(target, user)
        assert not ok.degraded_features and ok.stage_counts.sequence_length == 1
        redis_cluster.stop(node)
        down = _rank(target, user)
        assert down.degraded_features and down.stage_counts.sequence_length == 0 and len(down.items) == 10
        with pytest.raises(grpc.RpcError) as err:
            client.log_events(target, [client.event(user, 6, time.time(), "click")])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "not acknowledged" in err.value.details()
        redis_cluster.start(node)
        back = _rank(target, user)
        assert not back.degraded_features and back.stage_counts.sequence_length == 1  # what was acknowledged
        client.log_events(target, [client.event(user, 6, time.time(), "click")])
        assert _rank(target, user).stage_counts.sequence_length == 2
    finally:
        server.stop(None)
        store.close()


def test_the_cluster_fixture_starts_afresh_on_fresh_ports_when_a_port_is_taken(redis_cluster, tmp_path, monkeypatch):
    import socket

    cls = type(redis_cluster)
    free_ports = cls._free_ports
    picked: list[list[int]] = []
    with socket.socket() as squatter:  # another process listening on a port the first attempt picks
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()

        def first_one_taken(n):
            ports = free_ports(n)
            if not picked:
                ports[1] = squatter.getsockname()[1]
            picked.append(ports)
            return ports

        monkeypatch.setattr(cls, "_free_ports", staticmethod(first_one_taken))
        cluster = cls(tmp_path).create()
        try:
            assert len(picked) == 2 and cluster.ports == picked[1]
            store = open_store(cluster.url, config=CONFIG)
            store.append(_batch([4]))
            assert store.history(4, now=200.0).item_id.tolist() == [1, 2, 2]
            store.close()
        finally:
            cluster.close()
