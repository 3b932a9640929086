"""Hostile artifacts: truncated or bit-flipped model files, checksum mismatches, ONNX external data
leaving the bundle, `..` / absolute / symlinked paths: each refused with an error naming the file,
and nothing unpickled on the load path."""
from __future__ import annotations

import json
import pickle
import re
import shutil

import grpc
import numpy as np
import onnx
import pytest

from recstack import bundle as B
from recstack.serving.cascade import Cascade
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

ADMIN_TOKEN = "test-admin-token"  # the token these tests start their servers with
ADMIN_MD = (("authorization", f"Bearer {ADMIN_TOKEN}"),)

FILES = ["retrieval/user_tower.onnx", "fine/ctr.onnx", "retrieval/index.faiss", "coarse/item_vectors.npy",
         "retrieval/item_emb.npy", "features/items.parquet"]


@pytest.fixture(scope="module")
def good(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("good")
    return make_fake_bundle(root, version="vgood")


@pytest.fixture
def bundle(good, tmp_path):
    bdir = tmp_path / "vgood"
    shutil.copytree(good, bdir)
    return bdir


def _resign(bdir):
    m = json.loads((bdir / B.MANIFEST).read_text())
    files = [f for f in m["files"] if (bdir / f).exists()]
    B.write_manifest(bdir, version=m["version"], files=files, configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m.get("snapshot", {})})


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rel", FILES)
@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_file_fails_its_checksum_naming_the_file(bundle, rel, damage):
    (_truncate if damage == "truncate" else _flip)(bundle / rel)
    with pytest.raises(B.BundleError, match=rf"'{rel}'.*(sha256 mismatch|size \d+ bytes)"):
        Cascade.load(bundle)


@pytest.mark.parametrize("rel", FILES)
@pytest.mark.parametrize("keep", [0.0, 0.03, 0.5, 0.97])
def test_truncated_file_with_a_forged_manifest_is_refused_by_its_loader(bundle, rel, keep):
    """A manifest re-signed over the damaged file passes the checksums: the structural checks
    and the loaders must still refuse, naming the file."""
    _truncate(bundle / rel, keep)
    _resign(bundle)
    with pytest.raises(B.BundleError, match=rf"'{rel}'"):
        Cascade.load(bundle)


@pytest.mark.parametrize("rel", ["retrieval/index.faiss", "coarse/item_vectors.npy", "fine/cvr.onnx"])
def test_header_bit_flips_with_a_forged_manifest_are_refused(bundle, rel):
    for offset in range(0, 16):  # each byte of the header region, one at a time
        path = bundle / rel
        original = path.read_bytes()
        data = bytearray(original)
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        _resign(bundle)
        try:
            Cascade.load(bundle)
        except B.BundleError as e:
            assert rel in str(e), (offset, str(e))
        path.write_bytes(original)  # a flip that still loads (e.g. inside weights) is the checksum's job
    _resign(bundle)
    Cascade.load(bundle)


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_object_npy_is_refused_and_never_unpickled(bundle, tmp_path):
    marker = tmp_path / "unpickled"
    arr = np.empty(300, dtype=object)
    arr[:] = [_Payload(marker)] * 300
    np.save(bundle / "coarse/item_vectors.npy", arr, allow_pickle=True)
    assert b"__reduce__" not in (bundle / "coarse/item_vectors.npy").read_bytes()  # a real pickle stream though
    _resign(bundle)
    with pytest.raises(B.BundleError, match=r"'coarse/item_vectors\.npy'.*Python objects"):
        Cascade.load(bundle)
    assert not marker.exists()
    # and a pickle file renamed .npy
    (bundle / "coarse/item_vectors.npy").write_bytes(pickle.dumps(_Payload(marker)))
    _resign(bundle)
    with pytest.raises(B.BundleError, match=r"'coarse/item_vectors\.npy'.*not a valid \.npy"):
        Cascade.load(bundle)
    assert not marker.exists()


def _externalise(model_path, location):
    """Point the model's largest initializer at external data `location` (as onnx writes it)."""
    model = onnx.load(str(model_path))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data) or t.ByteSize())
    if not t.raw_data:
        from onnx import numpy_helper

        t.raw_data = numpy_helper.to_array(t).tobytes()
    n = len(t.raw_data)
    t.ClearField("float_data")
    t.ClearField("int64_data")
    t.raw_data = b""
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", "0"), ("length", str(n))):
        t.external_data.add(key=k, value=v)
    model_path.write_bytes(model.SerializeToString())
    return n


@pytest.mark.parametrize("location,why", [
    ("../../../secret.bin", "leaves the bundle"),
    ("/etc/passwd", "leaves the bundle"),
    ("weights.bin", "does not list"),
])
def test_onnx_external_data_outside_or_unlisted_is_refused(bundle, location, why):
    n = _externalise(bundle / "fine/ctr.onnx", location)
    (bundle / "fine/weights.bin").write_bytes(b"\0" * n)
    _resign(bundle)  # the manifest lists ctr.onnx (with its new checksum) but not weights.bin
    with pytest.raises(B.BundleError, match=rf"'fine/ctr\.onnx'.*{why}"):
        Cascade.load(bundle)


def test_onnx_external_data_symlinked_out_is_refused(bundle, tmp_path):
    n = _externalise(bundle / "fine/ctr.onnx", "weights.bin")
    (tmp_path / "outside.bin").write_bytes(b"\0" * n)
    (bundle / "fine/weights.bin").symlink_to(tmp_path / "outside.bin")
    _resign(bundle)  # lists ctr.onnx only: weights.bin is reached through the model
    with pytest.raises(B.BundleError, match=r"'fine/weights\.bin' resolves outside the bundle"):
        Cascade.load(bundle)


@pytest.mark.parametrize("rel", ["../outside.npy", "/tmp/outside.npy", "coarse/../../outside.npy"])
def test_manifest_paths_leaving_the_bundle_are_refused(bundle, rel):
    m = json.loads((bundle / B.MANIFEST).read_text())
    m["files"][rel] = m["files"].pop("coarse/item_vectors.npy")
    (bundle / B.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(B.BundleError, match=rf"'{rel}'"):
        Cascade.load(bundle)


def test_symlink_out_of_the_bundle_is_refused(bundle, tmp_path):
    outside = tmp_path / "outside.npy"
    shutil.copy(bundle / "coarse/item_vectors.npy", outside)  # identical bytes: the checksum alone would pass
    (bundle / "coarse/item_vectors.npy").unlink()
    (bundle / "coarse/item_vectors.npy").symlink_to(outside)
    with pytest.raises(B.BundleError, match=r"'coarse/item_vectors\.npy' resolves outside the bundle"):
        Cascade.load(bundle)


def test_hostile_bundle_reload_over_grpc_names_the_file(good, tmp_path):
    root = tmp_path / "art"
    B.publish(good, root)
    shutil.copytree(good, tmp_path / "vevil")
    _truncate(tmp_path / "vevil/retrieval/index.faiss", 0.5)
    _resign(tmp_path / "vevil")
    m = json.loads((tmp_path / "vevil" / B.MANIFEST).read_text())
    m["version"] = "vevil"
    (tmp_path / "vevil" / B.MANIFEST).write_text(json.dumps(m))
    shutil.copytree(tmp_path / "vevil", root / "vevil")
    server, port, _ = build_server(root, max_workers=2, admin_token=ADMIN_TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ModelServiceStub(ch).Reload(pb.ReloadRequest(version="vevil"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "retrieval/index.faiss" in e.value.details() and "Traceback" not in e.value.details()
            resp = pb_grpc.RankingServiceStub(ch).Rank(pb.RankRequest(user_id=1, num_results=3), timeout=10)
            assert resp.model_version == "vgood"
    finally:
        server.stop(None)


def test_nothing_on_the_load_path_unpickles(good, monkeypatch):
    """Loading a good bundle never calls pickle (np.load with allow_pickle, torch.load, ...)."""
    def no_pickle(*a, **k):
        raise AssertionError("unpickling on the load path")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    cascade = Cascade.load(good)
    assert cascade.version == "vgood"


# -- numerical sanity: a diverged model is refused, naming its file ---------------------------------


def _poison(bundle, rel):
    """Put NaN into a model file the way an honest export of a diverged model would."""
    path = bundle / rel
    if rel.endswith(".npy"):
        arr = np.load(path)
        arr[len(arr) // 2] = np.nan  # one row, far from anything the warm-up probes may read
        np.save(path, arr)
    elif rel.endswith(".faiss"):
        import faiss

        emb = np.load(bundle / "retrieval/item_emb.npy")
        emb[7] = np.nan
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        faiss.write_index(index, str(path))
    else:
        from onnx import numpy_helper

        model = onnx.load(str(path))
        t = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
        values = numpy_helper.to_array(t).copy()
        values.flat[0] = np.nan
        t.CopyFrom(numpy_helper.from_array(values, t.name))
        onnx.save(model, str(path))
    _resign(bundle)


NAN_FILES = ["coarse/item_vectors.npy", "retrieval/item_emb.npy", "retrieval/index.faiss", "coarse/user_tower.onnx",
             "retrieval/user_tower.onnx", "fine/ctr.onnx", "fine/cvr.onnx"]


@pytest.mark.parametrize("rel", NAN_FILES)
def test_a_model_file_with_nan_is_refused_naming_it(bundle, rel):
    _poison(bundle, rel)
    with pytest.raises(B.BundleError, match=rf"'{re.escape(rel)}'.*NaN or infinite"):
        Cascade.load(bundle)


def test_a_nan_bundle_reloaded_over_grpc_keeps_the_old_model(good, tmp_path):
    root = tmp_path / "art"
    B.publish(good, root)
    shutil.copytree(good, tmp_path / "vnan")
    m = json.loads((tmp_path / "vnan" / B.MANIFEST).read_text())
    m["version"] = "vnan"
    (tmp_path / "vnan" / B.MANIFEST).write_text(json.dumps(m))
    _poison(tmp_path / "vnan", "coarse/item_vectors.npy")
    shutil.copytree(tmp_path / "vnan", root / "vnan")
    server, port, _ = build_server(root, max_workers=2, admin_token=ADMIN_TOKEN)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ModelServiceStub(ch).Reload(pb.ReloadRequest(version="vnan"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "coarse/item_vectors.npy" in e.value.details() and "NaN" in e.value.details()
            resp = pb_grpc.RankingServiceStub(ch).Rank(pb.RankRequest(user_id=1, num_results=3), timeout=10)
            assert resp.model_version == "vgood" and all(np.isfinite(it.coarse_score) for it in resp.items)
    finally:
        server.stop(None)


class _Out:
    """Stands in for a stage model: returns `value` in the shape the real one gives."""

    def __init__(self, model, value):
        self.model, self.value = model, value

    def __call__(self, feeds):
        out = self.model(feeds)
        return np.full_like(out, self.value)


@pytest.mark.parametrize("attr,value,rel", [
    ("retrieval_tower", np.nan, "retrieval/user_tower.onnx"),
    ("coarse_tower", np.inf, "coarse/user_tower.onnx"),
    ("ctr", np.nan, "fine/ctr.onnx"),
    ("cvr", 1.5, "fine/cvr.onnx"),
])
def test_warm_up_checks_every_stage_output(good, attr, value, rel):
    """Finite files can still give non-finite outputs (an overflow inside the graph): the
    warm-up's probe requests check each stage's and refuse the bundle, naming the file."""
    cascade = Cascade.load(good, warm=False)
    if attr in ("ctr", "cvr"):  # the two-graph layout's models: fine.models [ctr, cvr]
        i = ("ctr", "cvr").index(attr)
        cascade.fine.models[i] = _Out(cascade.fine.models[i], value)
    else:
        setattr(cascade, attr, _Out(getattr(cascade, attr), value))
    with pytest.raises(B.BundleError, match=rf"'{re.escape(rel)}'"):
        cascade.warm_up()


def test_warm_up_checks_the_retrieval_scores(good, monkeypatch):
    cascade = Cascade.load(good, warm=False)
    real_search = cascade.index.search

    class NanScores:
        def search(self, x, k):
            d, i = real_search(x, k)
            return np.full_like(d, np.nan), i

    monkeypatch.setattr(cascade, "index", NanScores())
    with pytest.raises(B.BundleError, match=r"'retrieval/index\.faiss'.*retrieval scores"):
        cascade.warm_up()


# -- optional: an HMAC-signed manifest, so a re-hashed forgery is refused too -----------------------

KEY = b"bundle-signing-key"


def _sign(bdir, key=KEY):
    m = json.loads((bdir / B.MANIFEST).read_text())
    files = [f for f in m["files"] if (bdir / f).exists()]
    B.write_manifest(bdir, version=m["version"], files=files, configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m.get("snapshot", {})}, signing_key=key)


def test_a_signed_bundle_loads_with_its_key(bundle):
    _sign(bundle)
    assert Cascade.load(bundle, key=KEY).version == "vgood"
    assert Cascade.load(bundle).version == "vgood"  # a server without a key does not check signatures


@pytest.mark.parametrize("forgery", ["unsigned", "other key", "re-hashed", "signature kept"])
def test_with_a_key_a_forged_bundle_is_refused(bundle, forgery):
    _sign(bundle)
    if forgery == "unsigned":
        _resign(bundle)  # checksums only
        why = "not signed"
    elif forgery == "other key":
        _sign(bundle, b"another key")
        why = "does not match"
    else:
        vecs = np.load(bundle / "coarse/item_vectors.npy")
        np.save(bundle / "coarse/item_vectors.npy", -vecs)  # a plausible, finite, malicious model
        signature = json.loads((bundle / B.MANIFEST).read_text())[B.SIGNATURE]
        _resign(bundle)  # the checksums now match the forged file
        if forgery == "signature kept":
            m = json.loads((bundle / B.MANIFEST).read_text())
            m[B.SIGNATURE] = signature
            (bundle / B.MANIFEST).write_text(json.dumps(m))
            why = "does not match"
        else:
            why = "not signed"
    with pytest.raises(B.BundleError, match=rf"manifest\.json.*{why}"):
        Cascade.load(bundle, key=KEY)


def test_reload_with_a_key_refuses_a_forged_bundle_and_keeps_serving(good, tmp_path):
    src = tmp_path / "vsigned"
    shutil.copytree(good, src)
    m = json.loads((src / B.MANIFEST).read_text())
    m["version"] = "vsigned"
    (src / B.MANIFEST).write_text(json.dumps(m))
    _sign(src)
    root = tmp_path / "art"
    B.publish(src, root)
    shutil.copytree(root / "vsigned", root / "vforged")
    m = json.loads((root / "vforged" / B.MANIFEST).read_text())
    m["version"] = "vforged"  # changes the signed content: the signature no longer matches
    (root / "vforged" / B.MANIFEST).write_text(json.dumps(m))
    server, port, _ = build_server(root, max_workers=2, admin_token=ADMIN_TOKEN, bundle_key=KEY)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.ModelServiceStub(ch).Reload(pb.ReloadRequest(version="vforged"), timeout=30, metadata=ADMIN_MD)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "signature" in e.value.details()
            resp = pb_grpc.RankingServiceStub(ch).Rank(pb.RankRequest(user_id=1, num_results=3), timeout=10)
            assert resp.model_version == "vsigned"
    finally:
        server.stop(None)


def test_a_bundle_built_for_other_interacted_features_is_refused(bundle):
    """A bundle whose models take another list of interacted features (an older recstack's
    seven) is refused at load, naming the manifest field, never served with misfit inputs."""
    m = json.loads((bundle / B.MANIFEST).read_text())
    schema = dict(m["feature_schema"], interacted=m["feature_schema"]["interacted"][:7])
    B.write_manifest(bundle, version=m["version"], files=m["files"], configs=m["configs"], feature_schema=schema,
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m.get("snapshot", {})})
    with pytest.raises(B.BundleError, match=r"feature_schema\.interacted has 7 fields"):
        Cascade.load(bundle)
