"""The retrieval backend interface: the FAISS backend's one batched search (a k per row), the Milvus
backend's versioned collection (refused at load on any mismatch), the request deadline
bounding the remote call, and the degraded answer (popularity, flagged, counted) when the
backend is down — through a real gRPC channel, never an error status."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from recstack.bundle import Bundle, BundleError
from recstack.pipeline.publish import PublishError, publish_bundle
from recstack.serving import client
from recstack.serving.candidates import FaissBackend, embedding_version, parse_backend_uri, popularity_order
from recstack.serving.cascade import RETRIEVAL_DEADLINE_SHARE, SOURCE_POPULAR, Cascade, Query
from recstack.serving.milvus_backend import collection_name
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
SLOW_OK = {"retrieval_timeout_s": 120.0}  # answers, not latency, are under test


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, make_cascade_bundle) -> Path:
    return make_cascade_bundle(tmp_path_factory.mktemp("arts"))


@pytest.fixture(scope="module")
def published(bundle, milvus_lite, tmp_path_factory) -> str:
    return milvus_lite(bundle, tmp_path_factory.mktemp("milvus"))


def _q(items=(5, 17), r=100) -> Query:
    items = np.asarray(items, np.int64)
    return Query(user_id=0, num_results=20, retrieval_size=r, coarse_size=50, item_ids=items,
                 seconds_ago=np.arange(1.0, len(items) + 1), kinds=np.zeros(len(items), np.int8),
                 dwell=np.full(len(items), 10.0, np.float32))


def test_backend_uris_parse_or_name_the_problem():
    assert parse_backend_uri("faiss") == ("faiss", "", "")
    assert parse_backend_uri("milvus://milvus.internal:19530/items") == ("milvus", "http://milvus.internal:19530", "items")
    assert parse_backend_uri("milvus:///data/v.db/items") == ("milvus", "/data/v.db", "items")
    for bad, why in (("redis://x:1/items", "expected 'faiss'"), ("milvus://host:1/", "no collection"),
                     ("milvus://host:1/a/b", "just /COLLECTION"), ("milvus:///data/v/items", "must end in .db")):
        with pytest.raises(ValueError, match=why):
            parse_backend_uri(bad)


def test_faiss_searches_ann_and_i2i_rows_in_one_call(bundle):
    cas = Cascade.load(bundle, i2i_share=0.3, i2i_seeds=2)
    calls = []
    real = cas.retrieval.search

    def spy(queries, k, timeout_s=None):
        calls.append((queries.shape, k))
        return real(queries, k, timeout_s)

    cas.retrieval.search = spy
    res = cas.rank(_q(items=(5, 17, 40)))
    # the user vector (k = 100) and both seeds, each asked for its share: ceil(2 * 30 / 2) + 1
    assert calls == [((3, cas.retrieval.dim), [100, 31, 31])]
    assert {"ann", "i2i"} <= set(res.sources) and not res.degraded_retrieval


def test_a_k_per_row_answers_as_the_largest_k_cut_per_row(bundle):
    """Asking each row only for its own k changes no answer: each row's ids are the first k of
    the search for the largest k, -1 past them; a wrong count or a negative k is refused."""
    backend = Cascade.load(bundle).retrieval
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(4, backend.dim)).astype(np.float32)
    ks = [100, 31, 31, 0]
    got = backend.search(queries, ks)
    full = backend.index.search(queries, 100)[1]
    assert got.shape == (4, 100)
    for row, k in enumerate(ks):
        np.testing.assert_array_equal(got[row, :k], full[row, :k])
        assert (got[row, k:] == -1).all()
    np.testing.assert_array_equal(backend.search(queries, 100), full)
    with pytest.raises(ValueError, match="one per query row"):
        backend.search(queries, [100, 31])
    with pytest.raises(ValueError, match="must be >= 0"):
        backend.search(queries, [100, 31, -1, 2])


def test_the_batched_search_answers_as_one_search_per_row(bundle):
    """Stacking the user vector and the seeds' vectors in one FAISS call changes no answer: the
    ids of each row are those of a search of that row alone, and the rankings are the same."""
    cas = Cascade.load(bundle, i2i_share=0.3, i2i_seeds=2)
    batched = cas.retrieval.search
    index = cas.retrieval.index

    def one_call_per_row(queries, k, timeout_s=None):
        ks = np.broadcast_to(np.asarray(k), (len(queries),))
        out = np.full((len(queries), int(ks.max())), -1, np.int64)
        for i, (row, kk) in enumerate(zip(queries, ks)):
            out[i, :kk] = index.search(np.ascontiguousarray(row[None], np.float32), int(kk))[1]
        return out

    for q in (_q(items=(5, 17, 40)), _q(items=(3,), r=400), _q(items=())):
        seq_items, _, _ = cas.sequence(q)
        queries = np.concatenate([np.ones((1, cas.retrieval.dim), np.float32),
                                  np.asarray(cas.item_emb[cas.recent_items(seq_items)], np.float32)])
        ks = [q.retrieval_size] + [7] * (len(queries) - 1)
        np.testing.assert_array_equal(batched(queries, ks), one_call_per_row(queries, ks))
        a = cas.rank(q)
        cas.retrieval.search = one_call_per_row
        try:
            b = cas.rank(q)
        finally:
            cas.retrieval.search = batched
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        assert a.sources == b.sources and a.counts == b.counts


def test_milvus_serves_the_faiss_answers(bundle, published):
    faiss_cas, milvus_cas = Cascade.load(bundle), Cascade.load(bundle, retrieval_backend=published, **SLOW_OK)
    assert milvus_cas.index is None and isinstance(faiss_cas.retrieval, FaissBackend)
    for q in (_q(), _q(items=()), _q(items=(3,), r=400)):
        a, b = faiss_cas.rank(q), milvus_cas.rank(q)
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        assert a.sources == b.sources and not b.degraded_retrieval


def test_a_bundle_loads_only_against_its_own_embedding_version(bundle, published, tmp_path, make_cascade_bundle):
    other = make_cascade_bundle(tmp_path / "other", seed=1)  # other embeddings, same collection name
    with pytest.raises(BundleError, match=r"no collection 'items_v[0-9a-f]{16}' for this bundle's embeddings.*"
                                          r"published versions: \['items_v"):
        Cascade.load(other, retrieval_backend=published, **SLOW_OK)
    # a collection of the right name whose publishing never finished (no version property) is refused
    db = published[len("milvus://"):].rpartition("/")[0]
    name = collection_name("half", embedding_version(Bundle.open(bundle)))
    c = MilvusClient(db)
    schema = c.create_schema(auto_id=False)
    schema.add_field("item_id", DataType.INT64, is_primary=True)
    schema.add_field("emb", DataType.FLOAT_VECTOR, dim=16)
    params = c.prepare_index_params()
    params.add_index("emb", index_type="FLAT", metric_type="IP")
    c.create_collection(name, schema=schema, index_params=params)
    c.close()
    with pytest.raises(BundleError, match="holds embedding version None .*did not finish"):
        Cascade.load(bundle, retrieval_backend=f"milvus://{db}/half", **SLOW_OK)
    with pytest.raises(BundleError, match="cannot connect"):
        Cascade.load(bundle, retrieval_backend="milvus://127.0.0.1:1/items", **SLOW_OK)
    with pytest.raises(PublishError, match="expected a milvus:// URI"):
        publish_bundle(bundle, "faiss")


def test_the_request_deadline_bounds_the_remote_call(bundle, published):
    cas = Cascade.load(bundle, retrieval_backend=published, retrieval_timeout_s=0.05)
    seen = []
    real = cas.retrieval.search

    def spy(queries, k, timeout_s=None):
        seen.append(timeout_s)
        return real(queries, k, 120.0)  # the real call, unhurried: only the bound it was given is checked

    cas.retrieval.search = spy
    cas.rank(_q(), time_remaining=lambda: 0.04)  # share of what is left
    cas.rank(_q(), time_remaining=lambda: 10.0)  # the backend's own cap
    cas.rank(_q())  # no deadline: the cap
    assert seen == pytest.approx([RETRIEVAL_DEADLINE_SHARE * 0.04, 0.05, 0.05])


def test_backend_down_degrades_to_popularity_flagged_and_counted(tmp_path, make_cascade_bundle, milvus_lite):
    bdir = make_cascade_bundle(tmp_path / "arts")
    uri = milvus_lite(bdir, tmp_path)
    server, port, servicer = build_server(bdir, max_workers=2,
                                          cascade_options={"retrieval_backend": uri, **SLOW_OK})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            ok = stub.Rank(client.make_request(user_id=0, k=10), timeout=120)
            assert not ok.degraded_retrieval and len(ok.items) == 10
            milvus_lite.stop(uri)  # the vector store goes away while the replica serves
            resp = stub.Rank(client.make_request(user_id=0, k=10), timeout=120)
            assert resp.degraded_retrieval and len(resp.items) == 10
            assert {it.source for it in resp.items} == {SOURCE_POPULAR}
            popular = set(servicer.cascade.popular[:1000].tolist())  # retrieval_size default 1000
            assert {it.item_id for it in resp.items} <= popular
        m = servicer.metrics
        assert m.value("recstack_degraded_retrieval_total") == 1.0
        assert m.value("recstack_requests_total", method="Rank", code="OK") == 2.0
    finally:
        server.stop(None)


def test_popularity_order_counts_then_ids():
    np.testing.assert_array_equal(popularity_order(np.array([3, 1, 3, 2, 1, 3]), 5), [3, 1, 2, 0, 4])


def test_the_faiss_server_never_loads_pymilvus(bundle):
    code = ("import sys; from recstack.serving.server import build_server; "
            f"s, _, _ = build_server({str(bundle)!r}); s.stop(None); print('pymilvus' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_a_publish_that_lost_rows_fails_and_is_refused_at_load(bundle, published, monkeypatch):
    """Rows are written by upsert (a resent batch replaces its ids), and the count is checked
    before the collection is marked complete: a batch that never arrived fails the publish."""
    db = published[len("milvus://"):].rpartition("/")[0]
    real = MilvusClient.upsert
    calls = []

    def upsert_losing_the_first_batch(self, name, rows, *a, **kw):
        calls.append(len(rows))
        if len(calls) == 1:
            return {"upsert_count": 0}
        return real(self, name, rows, *a, **kw)

    monkeypatch.setattr(MilvusClient, "upsert", upsert_losing_the_first_batch)
    with pytest.raises(PublishError, match=r"holds \d+ rows after publishing \d+ item vectors"):
        publish_bundle(bundle, f"milvus://{db}/lossy")
    monkeypatch.undo()
    with pytest.raises(BundleError, match="did not finish"):
        Cascade.load(bundle, retrieval_backend=f"milvus://{db}/lossy", **SLOW_OK)
    # publishing the same version again (every batch sent, some twice) gives a complete collection
    sent_twice = []

    def upsert_twice(self, name, rows, *a, **kw):
        sent_twice.append(len(rows))
        real(self, name, rows, *a, **kw)
        return real(self, name, rows, *a, **kw)

    monkeypatch.setattr(MilvusClient, "upsert", upsert_twice)
    publish_bundle(bundle, f"milvus://{db}/lossy")
    monkeypatch.undo()
    cascade = Cascade.load(bundle, retrieval_backend=f"milvus://{db}/lossy", **SLOW_OK)
    assert sent_twice and cascade is not None
