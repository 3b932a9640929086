"""The serving cascade and gRPC server against a FAKE bundle (tiny random ONNX models + snapshot).

The fake models follow the ONNX signatures of docs/ARCHITECTURE.md, so these tests exercise the
server, validation and feature wiring without depending on training.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import faiss
import grpc
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recstack import bundle as B
from recstack import features as FE
from recstack.serving import client
from recstack.serving.cascade import Cascade, DeadlineExceeded, Query
from recstack.serving.server import build_server
from recstack.serving.validate import ServingLimits, ValidationError, validate_rank_request
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

COLD_USER = 10_000
ADMIN_TOKEN = "test-admin-token"
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    make_fake_bundle(root)
    return root


@pytest.fixture(scope="module")
def served(artifacts, fake_vocab):
    server, port, servicer = build_server(artifacts, max_workers=4, admin_token=ADMIN_TOKEN)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"stub": pb_grpc.RankingServiceStub(channel), "admin": pb_grpc.ModelServiceStub(channel),
           "channel": channel, "servicer": servicer, "port": port, "vocab": fake_vocab}
    channel.close()
    server.stop(None)


def _rank(served, **kw) -> pb.RankResponse:
    behaviours = kw.pop("behaviours", ())
    return served["stub"].Rank(client.make_request(behaviours=behaviours, **kw), timeout=10)


def _assert_invariants(resp: pb.RankResponse, n: int, vocab: FE.Vocab) -> None:
    ids = [it.item_id for it in resp.items]
    assert len(ids) == n and len(set(ids)) == n
    assert all(0 <= i < vocab.n_items for i in ids)
    scores = np.array([it.score for it in resp.items])
    assert np.all(np.diff(scores) <= 0), "not sorted by score descending"
    for it in resp.items:
        assert 0 < it.pctr < 1 and 0 < it.pcvr < 1 and it.price > 0
        assert it.score == pytest.approx(it.pctr * it.pcvr * it.price, rel=1e-6)
        assert it.source in ("ann", "i2i")  # candidate sources of the cascade


# -- through a real gRPC channel -----------------------------------------------------------------


@pytest.mark.parametrize("user_id,k", [(0, 10), (3, 1), (25, 50), (7, 200)])
def test_rank_invariants(served, user_id, k):
    resp = _rank(served, user_id=user_id, k=k)
    _assert_invariants(resp, k, served["vocab"])
    assert resp.model_version == "v20260101-000000" and not resp.cold_start
    assert resp.stage_counts.retrieved == served["vocab"].n_items  # default 1000 capped by the 300-item corpus
    assert resp.stage_counts.coarse == 200 and resp.stage_counts.returned == k
    t = resp.timings
    assert t.total_ms > 0 and t.total_ms >= t.retrieval_ms + t.coarse_ms + t.fine_ms


def test_defaults_and_debug_off(served):
    resp = _rank(served, user_id=1, k=None, debug=False)
    _assert_invariants(resp, 10, served["vocab"])
    assert not resp.HasField("timings") and not resp.HasField("stage_counts")
    small = _rank(served, user_id=1, k=None, retrieval_size=5)  # defaults shrink to fit
    _assert_invariants(small, 5, served["vocab"])
    assert (small.stage_counts.retrieved, small.stage_counts.coarse) == (5, 5)


def test_cold_start_is_flagged_and_uses_request_behaviours(served):
    cold = _rank(served, user_id=COLD_USER, k=10)
    _assert_invariants(cold, 10, served["vocab"])
    assert cold.cold_start and cold.stage_counts.sequence_length == 0
    beh = [client.behaviour(i, 60.0 * i, "click" if i % 2 else "purchase", 12.0) for i in range(1, 6)]
    warm = _rank(served, user_id=COLD_USER, k=10, behaviours=beh)
    _assert_invariants(warm, 10, served["vocab"])
    assert warm.cold_start and warm.stage_counts.sequence_length == 5
    assert [it.item_id for it in warm.items] != [it.item_id for it in cold.items]  # the sequence matters
    known = _rank(served, user_id=25, k=10)  # a profile but no behaviours: not a cold start
    assert not known.cold_start and known.stage_counts.sequence_length == 0
    full = _rank(served, user_id=0, k=10, behaviours=beh)  # 60 in the snapshot + 5 -> 50
    assert full.stage_counts.sequence_length == 50


def test_exhaustive_ranking_matches_an_independent_computation(served, artifacts, monkeypatch):
    """retrieval = coarse = whole corpus: the response must be the corpus sorted by
    pctr x pcvr x price, with features rebuilt here from the snapshot files (the server's clock
    held at the snapshot's time, so its behaviours are aged exactly as the files say)."""
    cascade = served["servicer"].cascade
    monkeypatch.setattr(cascade, "clock", lambda: cascade.snapshot.time)
    vocab = served["vocab"]
    n = vocab.n_items
    beh = [client.behaviour(3, 30.0, "click", 5.0), client.behaviour(7, 10.0, "purchase", 50.0)]
    resp = _rank(served, user_id=4, k=n, retrieval_size=n, coarse_size=n, behaviours=beh)
    _assert_invariants(resp, n, served["vocab"])
    bdir = B.resolve_bundle(artifacts)

    users = pq.read_table(bdir / B.SNAPSHOT_USERS).to_pydict()
    items = pq.read_table(bdir / B.SNAPSHOT_ITEMS).to_pydict()
    beh_tab = pq.read_table(bdir / B.SNAPSHOT_BEHAVIOURS).to_pydict()
    mine = [i for i, u in enumerate(beh_tab["user_id"]) if u == 4]
    rows = [(beh_tab["seconds_ago"][i], beh_tab["item_id"][i], beh_tab["kind"][i], beh_tab["dwell"][i]) for i in mine]
    rows += [(30.0, 3, 0, 5.0), (10.0, 7, 1, 50.0)]
    rows = sorted(rows, key=lambda r: r[0])[: FE.SEQ_LEN]
    L = FE.SEQ_LEN
    pad = lambda col, fill: np.array([[r[col] for r in rows] + [fill] * (L - len(rows))])
    item_table = FE.ItemTable(items["category"], items["shop"], items["brand"], items["price_bucket"], items["price"],
                             vocab.log_price_mean, vocab.log_price_std)
    seq_items, seq_extras = FE.sequence_tensors(pad(1, -1), pad(0, 0.0) / 3600, pad(3, 0.0), pad(2, 0),
                                               np.arange(L)[None] < len(rows), item_table)
    all_items = np.arange(n)
    item_feats = item_table.feats(all_items)
    user_row = np.array([[5, users["age_bucket"][4] + 1, users["gender"][4] + 1, users["activity"][4] + 1]], np.int64)
    # the interacted features: every behaviour of the user's whole history (not only the 50 the
    # sequence keeps) whose second lies in the window before the request's second
    hist = [(beh_tab["seconds_ago"][i], beh_tab["item_id"][i], beh_tab["kind"][i]) for i in mine]
    hist += [(30.0, 3, 0), (10.0, 7, 1)]
    now = cascade.snapshot.time
    counts = np.zeros((n, len(FE.INTERACTED_SPEC)), np.float32)
    for ago, item, kind in hist:
        sec = np.floor(now - ago)
        for j, (_, col, kinds, hours) in enumerate(FE.INTERACTED_SPEC):
            if kind in kinds and np.floor(now) - hours * 3600 < sec < np.floor(now):
                counts[:, j] += item_feats[:, col] == item_table.feats(np.array([item]))[0, col]
    fine_in = {"user_feats": np.repeat(user_row, n, 0), "item_feats": item_feats, "item_dense": item_table.dense(all_items),
               "interacted": np.log1p(counts)}
    assert fine_in["interacted"].max() > 0  # the wiring is tested with non-trivial interacted features
    pctr = ort.InferenceSession(str(bdir / "fine/ctr.onnx")).run(None, fine_in)[0].astype(np.float64)
    pcvr = ort.InferenceSession(str(bdir / "fine/cvr.onnx")).run(None, fine_in)[0].astype(np.float64)
    score = pctr * pcvr * np.asarray(items["price"], np.float32).astype(np.float64)
    got = np.array([it.item_id for it in resp.items])
    np.testing.assert_allclose([it.pctr for it in resp.items], pctr[got], rtol=0, atol=1e-6)
    np.testing.assert_allclose([it.pcvr for it in resp.items], pcvr[got], rtol=0, atol=1e-6)
    np.testing.assert_allclose([it.score for it in resp.items], np.sort(score)[::-1], rtol=1e-6)

    # the coarse score is the inner product of the coarse user vector and the item vector
    tower_in = {"user_feats": user_row, "seq_items": seq_items, "seq_extras": seq_extras}
    user_vec = ort.InferenceSession(str(bdir / "coarse/user_tower.onnx")).run(None, tower_in)[0][0]
    coarse = np.load(bdir / "coarse/item_vectors.npy") @ user_vec
    np.testing.assert_allclose([it.coarse_score for it in resp.items], coarse[got], rtol=1e-5, atol=1e-5)

    # with a smaller coarse_size, only the top coarse survivors reach the fine ranker. The server's
    # coarse scores agree with these to 1e-5 (above), so items within 2e-5 of the 30th best are
    # ties that either computation may order either way: any of them is a right survivor.
    resp30 = _rank(served, user_id=4, k=30, retrieval_size=n, coarse_size=30, behaviours=beh)
    survivors = np.array([it.item_id for it in resp30.items])
    assert len(set(survivors.tolist())) == 30
    assert (coarse[survivors] >= np.sort(coarse)[::-1][29] - 2e-5).all()


@pytest.mark.parametrize("kw,field", [
    ({"user_id": -1}, "user_id"),
    ({"k": 0}, "num_results"),
    ({"k": -3}, "num_results"),
    ({"k": 501}, "num_results"),
    ({"k": 50, "coarse_size": 20}, "num_results"),
    ({"retrieval_size": -1}, "retrieval_size"),
    ({"retrieval_size": 10_001}, "retrieval_size"),
    ({"coarse_size": -5}, "coarse_size"),
    ({"coarse_size": 2_001}, "coarse_size"),
    ({"retrieval_size": 100, "coarse_size": 150}, "coarse_size"),
    ({"behaviours": [{"item_id": -1}]}, "recent_behaviours[0].item_id"),
    ({"behaviours": [{"item_id": 1}, {"item_id": 300}]}, "recent_behaviours[1].item_id"),
    ({"behaviours": [{"item_id": 1, "seconds_ago": -1.0}]}, "recent_behaviours[0].seconds_ago"),
    ({"behaviours": [{"item_id": 1, "seconds_ago": float("inf")}]}, "recent_behaviours[0].seconds_ago"),
    ({"behaviours": [{"item_id": 1, "dwell_seconds": float("nan")}]}, "recent_behaviours[0].dwell_seconds"),
    ({"behaviours": [{"item_id": 1, "dwell_seconds": -2.0}]}, "recent_behaviours[0].dwell_seconds"),
    ({"behaviours": [{"item_id": 1, "kind": 7}]}, "recent_behaviours[0].kind"),
    ({"behaviours": [{"item_id": 1}] * 51}, "recent_behaviours"),
])
def test_invalid_requests_are_invalid_argument_naming_the_field(served, kw, field):
    kw = {"user_id": 1, **kw}
    with pytest.raises(grpc.RpcError) as e:
        _rank(served, **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field + ":"), e.value.details()


def test_health_and_reflection(served):
    health = health_pb2_grpc.HealthStub(served["channel"])
    for service in ("", "recstack.v1.RankingService", "recstack.v1.ModelService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(served["channel"])
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"recstack.v1.RankingService", "recstack.v1.ModelService", "grpc.health.v1.Health"} <= names
    (answer,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="recstack.v1.RankRequest")]))
    assert answer.file_descriptor_response.file_descriptor_proto  # a generic client can build requests


def test_model_info(served):
    info = served["admin"].GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=ADMIN_MD)
    assert info.model_version == "v20260101-000000" and info.n_items == served["vocab"].n_items and info.n_users == served["vocab"].n_users
    assert info.limits.retrieval_size_default == 1000 and info.limits.num_results_max == 500
    assert json.loads(info.manifest_json)["version"] == info.model_version and info.loaded_at


def test_uncaught_exception_is_internal_not_unknown(served, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(served["servicer"].cascade, "rank", boom)
    with pytest.raises(grpc.RpcError) as e:
        _rank(served, user_id=1, k=5)
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in e.value.details() and "request id" in e.value.details()


def test_reload_swaps_version_and_refuses_a_bad_bundle(artifacts, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(B.resolve_bundle(artifacts), root / "v1")
    for version in ("v1", "v2", "v3"):
        if version != "v1":
            shutil.copytree(root / "v1", root / version)
        m = json.loads((root / version / B.MANIFEST).read_text())
        B.write_manifest(root / version, version=version, files=list(m["files"]), configs=m["configs"],
                         feature_schema=m["feature_schema"], vocab=m["vocab"], stages=m["stages"])
    B.write_current(root, "v1")
    with (root / "v3/coarse/item_vectors.npy").open("r+b") as f:  # corrupt v3 after its manifest was written
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    server, port, servicer = build_server(root, max_workers=2, admin_token=ADMIN_TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, admin = pb_grpc.RankingServiceStub(ch), pb_grpc.ModelServiceStub(ch)
            assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v1"
            assert admin.Reload(pb.ReloadRequest(version="v2"), timeout=30, metadata=ADMIN_MD).model_version == "v2"
            assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v2"
            with pytest.raises(grpc.RpcError) as e:
                admin.Reload(pb.ReloadRequest(version="v3"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "coarse/item_vectors.npy" in e.value.details() and "sha256" in e.value.details()
            assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v2"  # still serving
            with pytest.raises(grpc.RpcError) as e:
                admin.Reload(pb.ReloadRequest(version="../v1"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("version:")
            assert admin.Reload(pb.ReloadRequest(), timeout=30, metadata=ADMIN_MD).model_version == "v1"  # follows `current`
    finally:
        server.stop(None)


def test_bad_bundle_is_refused_at_startup(artifacts, tmp_path):
    bdir = tmp_path / "bad"
    shutil.copytree(B.resolve_bundle(artifacts), bdir)
    (bdir / "fine/ctr.onnx").write_bytes((bdir / "fine/ctr.onnx").read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(B.BundleError, match=r"'fine/ctr\.onnx': sha256 mismatch"):
        build_server(bdir)


def test_overload_is_resource_exhausted(artifacts, fake_vocab, monkeypatch):
    server, port, servicer = build_server(artifacts, max_workers=1, max_concurrent_rpcs=1)
    entered, release = threading.Event(), threading.Event()
    real_rank = servicer.cascade.rank

    def slow_rank(*a, **k):
        entered.set()
        release.wait(10)
        return real_rank(*a, **k)

    monkeypatch.setattr(servicer.cascade, "rank", slow_rank)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            first = stub.Rank.future(client.make_request(1, 5), timeout=20)
            assert entered.wait(10)  # the first call holds the only slot
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(client.make_request(2, 5), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            _assert_invariants(first.result(), 5, fake_vocab)
    finally:
        release.set()
        server.stop(None)


def test_format_table(served):
    resp = client.rank(f"127.0.0.1:{served['port']}", user_id=2, k=3)
    text = client.format_table(resp)
    lines = text.splitlines()
    assert lines[0].split() == ["rank", "item", "score", "pctr", "pcvr", "price", "coarse", "source"]
    assert lines[2].split()[:2] == ["1", str(resp.items[0].item_id)] and len(lines) == 2 + 3 + 3
    assert "model v20260101-000000" in text and "timings ms:" in text and "retrieved 300" in text


# -- the cascade and validation, in-process ----------------------------------------------------


def test_sequence_merges_newest_first_and_truncates(served):
    cascade = served["servicer"].cascade
    q = Query(user_id=0, num_results=5, retrieval_size=50, coarse_size=20, item_ids=np.array([250, 251]),
              seconds_ago=np.array([0.0, 1e9]), kinds=np.array([1, 0], np.int8), dwell=np.array([3.0, 4.0], np.float32))
    seq_items, seq_extras, cold = cascade.sequence(q)
    assert seq_items.shape == (1, FE.SEQ_LEN, 5) and seq_extras.shape == (1, FE.SEQ_LEN, 3) and not cold
    assert seq_items[0, 0, 0] == 251 and seq_extras[0, 0, 2] == 1.0  # item 250 (+1), a purchase, just now
    assert 252 not in seq_items[0, :, 0]  # 1e9 s ago: older than the 50 newest, truncated away
    hours = np.expm1(seq_extras[0, :, 0])
    assert np.all(np.diff(hours) >= -1e-3)  # newest first
    q_cold = Query(user_id=COLD_USER, num_results=5, retrieval_size=50, coarse_size=20)
    seq_items, seq_extras, cold = cascade.sequence(q_cold)
    assert cold and not seq_items.any() and not seq_extras.any()


def test_deadline_is_checked_between_stages(served):
    cascade = served["servicer"].cascade
    with pytest.raises(DeadlineExceeded, match="retrieval"):
        cascade.rank(Query(user_id=1, num_results=5, retrieval_size=50, coarse_size=20), time_remaining=lambda: 0.0)


def test_size_resolution():
    lim = ServingLimits()
    q = validate_rank_request(pb.RankRequest(user_id=1), lim, n_items=5000)
    assert (q.retrieval_size, q.coarse_size, q.num_results) == (1000, 200, 10)
    q = validate_rank_request(pb.RankRequest(user_id=1), lim, n_items=50)  # capped by the corpus
    assert (q.retrieval_size, q.coarse_size, q.num_results) == (50, 50, 10)
    q = validate_rank_request(pb.RankRequest(user_id=1, num_results=40, coarse_size=40), lim, n_items=30)
    assert (q.retrieval_size, q.coarse_size, q.num_results) == (30, 30, 30)
    q = validate_rank_request(pb.RankRequest(user_id=1, num_results=300), lim, n_items=5000)  # defaults stretch
    assert (q.retrieval_size, q.coarse_size, q.num_results) == (1000, 300, 300)
    q = validate_rank_request(pb.RankRequest(user_id=1, coarse_size=1500), lim, n_items=5000)
    assert (q.retrieval_size, q.coarse_size, q.num_results) == (1500, 1500, 10)
    with pytest.raises(ValidationError, match="^coarse_size: must be <= retrieval_size \\(1000\\)"):
        validate_rank_request(pb.RankRequest(user_id=1, retrieval_size=1000, coarse_size=1500), lim, n_items=5000)
    with pytest.raises(ValidationError, match="^num_results: must be <= coarse_size \\(100\\)"):
        validate_rank_request(pb.RankRequest(user_id=1, retrieval_size=100, num_results=150), lim, n_items=5000)
    with pytest.raises(ValueError, match="num_results_default"):
        ServingLimits(num_results_default=0)


def test_serving_does_not_import_training_code():
    code = ("import sys, recstack.serving.server, recstack.serving.client; "
            "bad = [m for m in ('torch', 'retrieval', 'coarse_rank', 'fine_rank', 'recstack.data', 'recstack.pipeline.export') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_ivf_search_params_and_no_padding_leak(artifacts, tmp_path):
    """An IVF index with nprobe from the retrieval meta: FAISS pads short results with -1,
    which must never reach the ranking."""
    src = B.resolve_bundle(artifacts)
    bdir = tmp_path / "ivf"
    shutil.copytree(src, bdir)
    item_emb = np.load(bdir / "retrieval/item_emb.npy")
    index = faiss.index_factory(16, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(item_emb)
    index.add(item_emb)
    faiss.write_index(index, str(bdir / "retrieval/index.faiss"))
    m = json.loads((bdir / B.MANIFEST).read_text())
    m["stages"]["retrieval"]["meta"].update(nprobe=1, ef_search=64)  # ef_search does not apply to IVF: skipped
    B.write_manifest(bdir, version="ivf", files=list(m["files"]), configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"])
    cascade = Cascade.load(bdir)
    assert cascade.search_params == {"nprobe": 1} and faiss.extract_index_ivf(cascade.index).nprobe == 1
    res = cascade.rank(Query(user_id=3, num_results=10, retrieval_size=300, coarse_size=200))
    assert 0 < res.counts["retrieved"] < 300  # one list of 16 cannot hold the whole corpus
    assert res.item_ids.min() >= 0 and len(set(res.item_ids.tolist())) == len(res.item_ids) == 10


_GENERIC_CLIENT = r'''
import json, sys
import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

# like grpcurl: no generated code, everything discovered through server reflection
assert "recstack.v1" not in sys.modules
channel = grpc.insecure_channel(sys.argv[1])
db = ProtoReflectionDescriptorDatabase(channel)
assert "recstack.v1.RankingService" in db.get_services()
pool = descriptor_pool.DescriptorPool(db)
method = pool.FindServiceByName("recstack.v1.RankingService").FindMethodByName("Rank")
Req = message_factory.GetMessageClass(method.input_type)
Resp = message_factory.GetMessageClass(method.output_type)
call = channel.unary_unary("/recstack.v1.RankingService/Rank",
                           request_serializer=Req.SerializeToString, response_deserializer=Resp.FromString)
resp = call(json_format.Parse('{"user_id": 3, "num_results": 4, "debug": true}', Req()), timeout=10)
print(json_format.MessageToJson(resp))
'''


def test_generic_reflection_client_discovers_and_calls(served):
    """A client with no generated code (as grpcurl) finds the service by reflection and calls Rank."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _GENERIC_CLIENT, f"127.0.0.1:{served['port']}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    resp = json.loads(out.stdout)
    assert len(resp["items"]) == 4 and resp["modelVersion"]
    for it in resp["items"]:
        assert it["score"] == pytest.approx(it["pctr"] * it["pcvr"] * it["price"], rel=1e-6)
