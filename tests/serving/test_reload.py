"""Bundles and reload: atomic publish, reload by version, warm before traffic, a failed load keeps
the old model and says why, and ten reloads under sustained load fail no RPC."""
from __future__ import annotations

import gc
import json
import re
import shutil
import threading
import time
import types
import weakref

import grpc
import pytest

from recstack import bundle as B
from recstack.serving import client
from recstack.serving.cascade import Cascade
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

ADMIN_TOKEN = "test-admin-token"  # the token these tests start their servers with
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def _resign(bdir, version):
    """Rewrite the manifest under a new version name (checksums of the files as they are now)."""
    m = json.loads((bdir / B.MANIFEST).read_text())
    B.write_manifest(bdir, version=version, files=list(m["files"]), configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m.get("snapshot", {})})


@pytest.fixture(scope="module")
def versions(tmp_path_factory, make_fake_bundle):
    """An artifacts root with v1 (current) and v2 (different weights), published with B.publish."""
    work = tmp_path_factory.mktemp("reload")
    make_fake_bundle(work / "build1", version="v1", seed=0)
    make_fake_bundle(work / "build2", version="v2", seed=1)
    root = work / "artifacts"
    B.publish(work / "build1/v1", root)
    B.publish(work / "build2/v2", root, switch_current=False)
    return root


def test_publish_is_atomic_and_versions_are_immutable(versions, tmp_path):
    assert B.read_current(versions) == "v1"  # v2 was published without switching
    assert sorted(p.name for p in versions.iterdir()) == ["current", "v1", "v2"]  # no staging left behind
    with pytest.raises(B.BundleError, match="already exists"):
        B.publish(versions / "v1", versions)
    # a bundle that fails verification is never renamed into place and `current` is untouched
    bad = tmp_path / "v3"
    shutil.copytree(versions / "v1", bad)
    _resign(bad, "v3")
    (bad / "fine/cvr.onnx").write_bytes(b"garbage")
    with pytest.raises(B.BundleError, match=r"'fine/cvr\.onnx'"):
        B.publish(bad, versions)
    assert not (versions / "v3").exists() and B.read_current(versions) == "v1"
    assert not [p for p in versions.iterdir() if p.name.startswith(".staging")]
    with pytest.raises(B.BundleError, match="differs"):
        B.publish(versions / "v2", tmp_path / "other", version="v9")


def test_new_bundle_is_warmed_before_it_takes_traffic(versions, monkeypatch):
    server, port, servicer = build_server(versions, max_workers=4, admin_token=ADMIN_TOKEN)
    warming, release = threading.Event(), threading.Event()
    real_warm = Cascade.warm_up

    def slow_warm(self):
        if self.version == "v2":
            warming.set()
            assert release.wait(20)
        real_warm(self)

    monkeypatch.setattr(Cascade, "warm_up", slow_warm)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, admin = pb_grpc.RankingServiceStub(ch), pb_grpc.ModelServiceStub(ch)
            reload = admin.Reload.future(pb.ReloadRequest(version="v2"), timeout=30, metadata=ADMIN_MD)
            assert warming.wait(20)
            for _ in range(5):  # while v2 warms, v1 serves
                assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v1"
            release.set()
            assert reload.result().model_version == "v2"
            assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v2"
    finally:
        release.set()
        server.stop(None)


def test_failed_load_keeps_the_old_model_and_says_why(versions, tmp_path):
    root = tmp_path / "artifacts"
    shutil.copytree(versions, root)
    shutil.copytree(root / "v1", root / "vbad")
    _resign(root / "vbad", "vbad")
    with (root / "vbad/retrieval/index.faiss").open("r+b") as f:  # truncate after signing: the checksum catches it
        f.truncate(100)
    server, port, servicer = build_server(root, max_workers=2, admin_token=ADMIN_TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, admin = pb_grpc.RankingServiceStub(ch), pb_grpc.ModelServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                admin.Reload(pb.ReloadRequest(version="vbad"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "retrieval/index.faiss" in e.value.details() and "still serving" in e.value.details()
            info = admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=ADMIN_MD)
            assert info.model_version == "v1" and "retrieval/index.faiss" in info.last_load_error
            assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v1"
            with pytest.raises(grpc.RpcError) as e:
                admin.Reload(pb.ReloadRequest(version="v404"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert admin.Reload(pb.ReloadRequest(version="v2"), timeout=30, metadata=ADMIN_MD).last_load_error == ""
        text = servicer.metrics.text()
        assert 'recstack_reloads_total{result="failed"} 1.0' in text and 'recstack_model_info{version="v2"} 1.0' in text
        assert 'version="v1"' not in text.split("recstack_model_info")[-1]  # only the loaded version is exported
    finally:
        server.stop(None)


def test_ten_reloads_under_sustained_load_fail_no_rpc(versions):
    """4 client threads call Rank back to back (bounded: 4,000 calls) while the main thread
    reloads v1 <-> v2 ten times: no call fails, every response names v1 or v2, and after each
    reload returns, new calls see the new version."""
    server, port, servicer = build_server(versions, max_workers=4, max_queue=16, admin_token=ADMIN_TOKEN)
    stop = threading.Event()
    results: list[tuple[str, str]] = []  # (status, version)
    lock = threading.Lock()

    def hammer(seed):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            i = 0
            while not stop.is_set() and i < 1000:
                i += 1
                try:
                    v = stub.Rank(client.make_request((seed * 7 + i) % 40, 10, debug=False), timeout=10).model_version
                    out = ("OK", v)
                except grpc.RpcError as e:
                    out = (e.code().name, e.details())
                with lock:
                    results.append(out)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    try:
        for t in threads:
            t.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            admin, stub = pb_grpc.ModelServiceStub(ch), pb_grpc.RankingServiceStub(ch)
            for i in range(10):
                target = "v2" if i % 2 == 0 else "v1"
                assert admin.Reload(pb.ReloadRequest(version=target), timeout=30, metadata=ADMIN_MD).model_version == target
                assert stub.Rank(client.make_request(3, 5), timeout=10).model_version == target
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop(None)
    failed = [r for r in results if r[0] != "OK"]
    assert not failed, failed[:5]
    seen = {v for _, v in results}
    assert seen <= {"v1", "v2"} and seen == {"v1", "v2"}, seen
    assert len(results) >= 40


def _set_version(bdir, value):
    """Write `value` as the manifest's version (by hand: write_manifest refuses a bad one)."""
    m = json.loads((bdir / B.MANIFEST).read_text())
    m["version"] = value
    (bdir / B.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("value,why", [(7, "non-empty string"), ("", "non-empty string"), (None, "non-empty string"),
                                       ("v1", "differs from the bundle's directory name"),
                                       ("../v1", "invalid bundle version name")])
def test_manifest_version_is_checked_on_reload_and_at_startup(versions, tmp_path, value, why):
    root = tmp_path / "artifacts"
    shutil.copytree(versions, root)
    shutil.copytree(root / "v2", root / "vodd")
    _set_version(root / "vodd", value)
    server, port, servicer = build_server(root, max_workers=2, admin_token=ADMIN_TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub, admin = pb_grpc.RankingServiceStub(ch), pb_grpc.ModelServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                admin.Reload(pb.ReloadRequest(version="vodd"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "manifest.json" in e.value.details() and why in e.value.details()
            assert stub.Rank(client.make_request(1, 5), timeout=10).model_version == "v1"  # the old model serves
            assert admin.GetModelInfo(pb.GetModelInfoRequest(), timeout=5, metadata=ADMIN_MD).model_version == "v1"
    finally:
        server.stop(None)
    B.write_current(root, "vodd")
    with pytest.raises(B.BundleError, match=re.escape(why)):  # and a server never starts on it
        build_server(root, max_workers=1)


def test_a_reload_frees_the_previous_model_and_trims_the_heap_once_its_last_call_ends(versions, monkeypatch):
    """Nothing in the server keeps the old model once its calls are done, and the heap is trimmed
    right then (RSS over many reloads is measured by `recstack bench soak`)."""
    from recstack.serving import server as S

    trims = []
    monkeypatch.setattr(S, "trim_heap", lambda: trims.append(1))
    server, port, servicer = build_server(versions, max_workers=2)
    entered, release = threading.Event(), threading.Event()
    old_cascade = servicer.cascade

    def held_rank(self, *a, **k):
        entered.set()
        assert release.wait(20)
        return Cascade.rank(self, *a, **k)

    old_cascade.rank = types.MethodType(held_rank, old_cascade)  # the old model's own calls are held
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            held = pb_grpc.RankingServiceStub(ch).Rank.future(client.make_request(1, 5), timeout=30)
            assert entered.wait(10)
            old = weakref.ref(old_cascade)
            del old_cascade
            servicer.reload("v2")
            assert old() is not None and trims == []  # a call still runs on the old model
            release.set()
            assert held.result().model_version == "v1"
        deadline = time.monotonic() + 10
        while trims != [1] and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert trims == [1] and old() is None and servicer.cascade.version == "v2"
        assert servicer.heap.due  # thawed at the reload (the old model's cycles were collectable) ...
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert pb_grpc.RankingServiceStub(ch).Rank(client.make_request(1, 5), timeout=30).model_version == "v2"
        assert not servicer.heap.due and gc.get_freeze_count() > 0  # ... and frozen again by the next call
    finally:
        release.set()
        server.stop(None)


def test_a_loaded_model_is_kept_out_of_full_collections_and_new_cycles_are_still_collected(versions):
    server, port, servicer = build_server(versions, max_workers=1)
    try:
        assert not servicer.heap.due and gc.get_freeze_count() > 0  # the model is in the permanent generation
        frozen = gc.get_freeze_count()
        servicer.reload("v2")  # nothing runs on v1: it is freed and the heap frozen again at once
        assert not servicer.heap.due and servicer.cascade.version == "v2" and gc.get_freeze_count() > 0

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle made after the freeze
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None and gc.get_freeze_count() <= 2 * frozen
    finally:
        server.stop(None)
