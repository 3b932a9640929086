"""Score (the fine stage on given candidates) and external ids, through a real gRPC channel.

Score runs the same fine stage as Rank, so on Rank's own survivors it returns Rank's numbers;
a bundle with an id map speaks the data's own ids (string or int64) both ways."""
from __future__ import annotations

import json
import logging

import grpc
import numpy as np
import pytest

from recstack import bundle as B
from recstack import bundle_files
from recstack import ids as IDS
from recstack.serving.cascade import DeadlineExceeded, Query
from recstack.serving.scoring import score_candidates
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc


def _with_ids(bdir, users=None, items=None):
    """Add id files to a fake bundle and rewrite its manifest (checksums included)."""
    m = B.read_manifest(bdir)
    files = list(m["files"])
    for rel, ext in ((bundle_files.IDS_USERS, users), (bundle_files.IDS_ITEMS, items)):
        if ext is not None:
            IDS.write_external(bdir / rel, ext)
            files.append(rel)
    B.write_manifest(bdir, version=m["version"], files=files, configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m["snapshot"]})
    return bdir


def _serve(root):
    server, port, servicer = build_server(root, max_workers=2)
    servicer.port = port  # for the client test, which dials its own channel
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, pb_grpc.RankingServiceStub(channel), servicer


@pytest.fixture(scope="module")
def plain(make_fake_bundle, tmp_path_factory):
    """A fake bundle without an id map (internal ids are the external ones)."""
    root = tmp_path_factory.mktemp("score_plain")
    make_fake_bundle(root)
    server, channel, stub, servicer = _serve(root)
    yield stub, servicer
    channel.close()
    server.stop(None)


STRING_USERS = np.array([f"user-{i:03d}" for i in range(30)], dtype=object)
STRING_ITEMS = np.array([f"sku/{(i * 7919) % 1000}" for i in range(300)], dtype=object)


@pytest.fixture(scope="module")
def keyed(make_fake_bundle, tmp_path_factory):
    """The same fake bundle with string external ids for users and items."""
    root = tmp_path_factory.mktemp("score_keyed")
    _with_ids(make_fake_bundle(root), STRING_USERS, STRING_ITEMS)
    server, channel, stub, servicer = _serve(root)
    yield stub, servicer
    channel.close()
    server.stop(None)


BEHAVIOURS = [pb.Behaviour(item_id=5, seconds_ago=600.0, dwell_seconds=20.0),
              pb.Behaviour(item_id=17, seconds_ago=7200.0, kind=pb.BEHAVIOUR_KIND_PURCHASE)]


@pytest.mark.parametrize("user_id", [3, 25, 999])  # with behaviours, a profile only, a cold start
def test_score_on_ranks_survivors_returns_ranks_numbers_in_the_given_order(plain, user_id):
    stub, _ = plain
    ranked = stub.Rank(pb.RankRequest(user_id=user_id, num_results=20, recent_behaviours=BEHAVIOURS), timeout=30)
    order = [it.item_id for it in ranked.items][::-1] + [ranked.items[0].item_id]  # reversed, one repeat
    scored = stub.Score(pb.ScoreRequest(user_id=user_id, item_ids=order, recent_behaviours=BEHAVIOURS), timeout=30)
    assert [it.item_id for it in scored.items] == order
    assert [it.item_key for it in scored.items] == [str(i) for i in order]
    by_id = {it.item_id: it for it in ranked.items}
    for it in scored.items:
        ref = by_id[it.item_id]
        assert (it.pctr, it.pcvr, it.price, it.score) == (ref.pctr, ref.pcvr, ref.price, ref.score)
    assert scored.cold_start == ranked.cold_start == (user_id >= 30)
    assert scored.model_version == ranked.model_version


def test_the_client_calls_score_by_key(keyed):
    from recstack.serving import client

    _, servicer = keyed
    server_port = servicer.port
    resp = client.score(f"127.0.0.1:{server_port}", user_key="user-004", item_keys=list(STRING_ITEMS[[9, 2]]),
                        behaviours=[{"item_id": 5, "seconds_ago": 60.0}], debug=True)
    assert [it.item_key for it in resp.items] == list(STRING_ITEMS[[9, 2]]) and resp.timings.fine_ms > 0


def test_score_sees_the_request_behaviours(plain):
    stub, _ = plain
    items = [5, 17, 100]
    bare = stub.Score(pb.ScoreRequest(user_id=999, item_ids=items), timeout=30)
    seen = stub.Score(pb.ScoreRequest(user_id=999, item_ids=items, recent_behaviours=BEHAVIOURS), timeout=30)
    # the clicked item's interacted features change, so its score does
    assert bare.items[0].score != seen.items[0].score


@pytest.mark.parametrize("request_kw,field", [
    ({}, "item_ids: at least one candidate"),
    ({"item_ids": [1], "item_keys": ["1"]}, "item_keys: name the candidates by item_ids or by item_keys, not both"),
    ({"item_ids": [1, 300]}, "item_ids[1]: unknown item 300"),
    ({"item_ids": [-2]}, "item_ids[0]: must be >= 0"),
    ({"item_keys": ["3", "03"]}, "item_keys[1]: unknown item key '03'"),
    ({"item_ids": list(range(300)) * 7}, "item_ids: at most 2000 candidates"),
    ({"item_ids": [1], "recent_behaviours": [pb.Behaviour(item_key="nope")]}, "recent_behaviours[0].item_key: unknown"),
    ({"item_ids": [1], "recent_behaviours": [pb.Behaviour(item_id=3, dwell_seconds=-1)]},
     "recent_behaviours[0].dwell_seconds: must be >= 0"),
])
def test_bad_score_requests_are_invalid_argument_naming_the_field(plain, request_kw, field):
    stub, _ = plain
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(pb.ScoreRequest(user_id=1, **request_kw), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def test_score_is_shed_when_the_admission_is_full_and_counted_and_logged(make_fake_bundle, tmp_path, caplog):
    make_fake_bundle(tmp_path)
    server, channel, stub, servicer = _serve(tmp_path)  # its own server: fresh metrics
    taken = 0
    while servicer.admission.admit():  # fill the bound as concurrent calls would
        taken += 1
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(user_id=1, item_ids=[1]), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for _ in range(taken):
            servicer.admission.leave()
    with caplog.at_level(logging.INFO, logger="recstack.access"):
        stub.Score(pb.ScoreRequest(user_key="7", item_ids=[1, 2]), timeout=30)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "recstack.access"]
    assert [(x["method"], x["code"], x["candidates"], x["user_key"]) for x in lines] == [("Score", "OK", 2, "7")]
    assert servicer.metrics.value("recstack_requests_total", method="Score", code="RESOURCE_EXHAUSTED") == 1
    assert servicer.metrics.value("recstack_requests_total", method="Score", code="OK") == 1
    channel.close()
    server.stop(None)


def test_score_checks_the_deadline_between_the_models(plain):
    _, servicer = plain
    cascade = servicer.cascade
    q = Query(user_id=1, num_results=2, retrieval_size=2, coarse_size=2)
    with pytest.raises(DeadlineExceeded, match="before the features stage"):
        score_candidates(cascade, q, np.array([1, 2]), time_remaining=lambda: 0.0)
    calls = iter([1.0, 1.0, 0.0])  # features, fine, then spent before pCVR
    with pytest.raises(DeadlineExceeded, match="fine pCVR"):
        score_candidates(cascade, q, np.array([1, 2]), time_remaining=lambda: next(calls))


def test_string_ids_in_and_out(keyed, plain):
    stub, _ = keyed
    plain_stub, _ = plain
    resp = stub.Rank(pb.RankRequest(user_key="user-003", num_results=10, recent_behaviours=[
        pb.Behaviour(item_key=STRING_ITEMS[5], seconds_ago=600.0, dwell_seconds=20.0),
        pb.Behaviour(item_id=17, seconds_ago=7200.0, kind=pb.BEHAVIOUR_KIND_PURCHASE)]), timeout=30)
    ref = plain_stub.Rank(pb.RankRequest(user_id=3, num_results=10, recent_behaviours=BEHAVIOURS), timeout=30)
    assert not resp.cold_start
    # string ids: item_key is the external id, item_id the internal index
    assert [it.item_key for it in resp.items] == [STRING_ITEMS[it.item_id] for it in ref.items]
    assert [it.item_id for it in resp.items] == [it.item_id for it in ref.items]
    assert [it.score for it in resp.items] == [it.score for it in ref.items]
    keys = [it.item_key for it in resp.items][::-1]
    scored = stub.Score(pb.ScoreRequest(user_key="user-003", item_keys=keys, recent_behaviours=BEHAVIOURS), timeout=30)
    assert [it.item_key for it in scored.items] == keys
    assert [it.score for it in scored.items] == [it.score for it in resp.items][::-1]
    assert stub.Rank(pb.RankRequest(user_key="someone-new"), timeout=30).cold_start
    with pytest.raises(grpc.RpcError) as e:
        stub.Rank(pb.RankRequest(user_key="user-003", recent_behaviours=[pb.Behaviour(item_key="sku/none")]), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "recent_behaviours[0].item_key: unknown item key 'sku/none'"


def test_int_ids_in_and_out(make_fake_bundle, tmp_path, plain):
    users = 1_000_000 + 13 * np.arange(30, dtype=np.int64)
    items = 10**12 - 3 * np.arange(300, dtype=np.int64)
    _with_ids(make_fake_bundle(tmp_path), users, items)
    server, channel, stub, _ = _serve(tmp_path)
    try:
        plain_stub, _ = plain
        ref = plain_stub.Rank(pb.RankRequest(user_id=3, num_results=10), timeout=30)
        for req in (pb.RankRequest(user_id=int(users[3]), num_results=10),
                    pb.RankRequest(user_key=str(users[3]), num_results=10)):
            resp = stub.Rank(req, timeout=30)
            assert not resp.cold_start
            assert [it.item_id for it in resp.items] == [int(items[it.item_id]) for it in ref.items]
            assert [it.item_key for it in resp.items] == [str(items[it.item_id]) for it in ref.items]
        assert stub.Rank(pb.RankRequest(user_id=3), timeout=30).cold_start  # an internal index is not an external id
        scored = stub.Score(pb.ScoreRequest(user_id=int(users[3]), item_ids=[int(items[7])],
                                            recent_behaviours=[pb.Behaviour(item_id=int(items[5]))]), timeout=30)
        assert scored.items[0].item_id == int(items[7])
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(pb.ScoreRequest(user_id=int(users[3]), item_ids=[7]), timeout=30)
        assert e.value.details() == "item_ids[0]: unknown item 7"
    finally:
        channel.close()
        server.stop(None)


def test_a_bundle_with_a_bad_id_map_is_refused_naming_the_file(make_fake_bundle, tmp_path):
    users = np.array([f"u{i % 29}" for i in range(30)], dtype=object)  # u0 twice
    _with_ids(make_fake_bundle(tmp_path), users=users)
    with pytest.raises(B.BundleError, match=r"bundle file 'ids/users.parquet': external id 'u0' names 2 rows"):
        build_server(tmp_path)
