"""Bundle manifests: round trip, checksum verification, path safety, the `current` pointer."""
from __future__ import annotations

import json
import os

import pytest

from recstack import bundle as B


def _make_bundle(root, version="v1", files=None):
    bdir = root / version
    files = files or {"retrieval/a.bin": b"abc", "features/users.parquet": b"\x00" * 100}
    for rel, data in files.items():
        (bdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (bdir / rel).write_bytes(data)
    manifest = B.write_manifest(
        bdir, version=version, files=list(files), configs={"retrieval": {"dim": 8}},
        feature_schema={"seq_len": 50}, vocab={"n_items": 3}, stages={"retrieval": {"meta": {"nprobe": 4}}},
        extra={"snapshot": {"time": 86400.0}},
    )
    return bdir, manifest


def test_manifest_round_trip(tmp_path):
    bdir, written = _make_bundle(tmp_path)
    manifest = B.verify_bundle(bdir)
    assert manifest == written
    assert manifest["format_version"] == B.FORMAT_VERSION and manifest["version"] == "v1"
    assert manifest["files"]["retrieval/a.bin"] == {
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "bytes": 3}
    assert manifest["snapshot"] == {"time": 86400.0}
    b = B.Bundle.open(bdir)
    assert b.version == "v1" and b.stage("retrieval")["meta"]["nprobe"] == 4
    assert b.path("retrieval/a.bin").read_bytes() == b"abc"
    with pytest.raises(B.BundleError, match="does not list 'retrieval/other.bin'"):
        b.path("retrieval/other.bin")
    with pytest.raises(B.BundleError, match="no stage 'coarse'"):
        b.stage("coarse")


def test_checksum_mismatch_is_refused_naming_the_file(tmp_path):
    bdir, _ = _make_bundle(tmp_path)
    (bdir / "retrieval/a.bin").write_bytes(b"abd")  # same size, different content
    with pytest.raises(B.BundleError, match=r"'retrieval/a\.bin': sha256 mismatch"):
        B.Bundle.open(bdir)
    (bdir / "retrieval/a.bin").write_bytes(b"abcd")
    with pytest.raises(B.BundleError, match=r"'retrieval/a\.bin': size 4 bytes, manifest says 3"):
        B.verify_bundle(bdir)
    (bdir / "retrieval/a.bin").unlink()
    with pytest.raises(B.BundleError, match=r"'retrieval/a\.bin' is missing"):
        B.verify_bundle(bdir)


def test_malformed_manifests_are_refused(tmp_path):
    bdir, manifest = _make_bundle(tmp_path)
    (bdir / B.MANIFEST).write_text("{not json")
    with pytest.raises(B.BundleError, match="cannot parse"):
        B.read_manifest(bdir)
    (bdir / B.MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(B.BundleError, match="format_version 99"):
        B.read_manifest(bdir)
    del manifest["vocab"]
    (bdir / B.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(B.BundleError, match="missing keys \\['vocab'\\]"):
        B.read_manifest(bdir)
    with pytest.raises(B.BundleError, match="does not exist"):
        B.read_manifest(tmp_path / "nowhere")


@pytest.mark.parametrize("rel", ["../escape.bin", "a/../../escape.bin", "/etc/passwd", "a//b", "./a", "a\\b", "C:/x", ""])
def test_unsafe_paths_are_refused(tmp_path, rel):
    with pytest.raises(B.BundleError, match="invalid bundle path"):
        B.safe_path(tmp_path, rel)


def test_manifest_listing_an_escaping_path_is_refused(tmp_path):
    bdir, manifest = _make_bundle(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"x")
    manifest["files"]["../outside.bin"] = B.file_entry(tmp_path / "outside.bin")  # a checksum that matches
    (bdir / B.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(B.BundleError, match=r"'\.\./outside\.bin'"):
        B.verify_bundle(bdir)


def test_symlink_leaving_the_bundle_is_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"secret")
    bdir, _ = _make_bundle(tmp_path)
    (bdir / "retrieval/link.bin").symlink_to(outside)
    with pytest.raises(B.BundleError, match="resolves outside the bundle"):
        B.safe_path(bdir, "retrieval/link.bin")
    with pytest.raises(B.BundleError, match="resolves outside the bundle"):
        B.write_manifest(bdir, version="v1", files=["retrieval/link.bin"], configs={}, feature_schema={}, vocab={}, stages={})
    # a symlinked directory too
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.bin").write_bytes(b"x")
    (bdir / "coarse").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(B.BundleError, match="resolves outside the bundle"):
        B.safe_path(bdir, "coarse/f.bin")
    # a symlink that stays inside is fine
    (bdir / "retrieval/alias.bin").symlink_to(bdir / "retrieval/a.bin")
    assert B.safe_path(bdir, "retrieval/alias.bin") == (bdir / "retrieval/a.bin").resolve()


def test_current_pointer(tmp_path):
    _make_bundle(tmp_path, "v20260101-000000")
    v2, _ = _make_bundle(tmp_path, "v20260102-000000")
    with pytest.raises(B.BundleError, match="neither a bundle"):
        B.resolve_bundle(tmp_path)
    B.write_current(tmp_path, "v20260101-000000")
    assert B.resolve_bundle(tmp_path) == (tmp_path / "v20260101-000000").resolve()
    B.write_current(tmp_path, "v20260102-000000")
    assert (tmp_path / B.CURRENT).read_text() == "v20260102-000000\n"
    assert B.Bundle.open(tmp_path).version == "v20260102-000000"
    assert B.resolve_bundle(v2) == v2.resolve()  # a bundle dir is accepted directly
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # the atomic write leaves no temp file
    with pytest.raises(B.BundleError, match="not a bundle"):
        B.write_current(tmp_path, "v-missing")
    for bad in ("../v1", "a/b", "..", ""):
        (tmp_path / B.CURRENT).write_text(bad)
        with pytest.raises(B.BundleError, match="invalid bundle version name"):
            B.resolve_bundle(tmp_path)
    (tmp_path / B.CURRENT).write_text("v-gone\n")
    with pytest.raises(B.BundleError, match="points at 'v-gone'"):
        B.resolve_bundle(tmp_path)
    with pytest.raises(B.BundleError, match="does not exist"):
        B.resolve_bundle(tmp_path / "nope")


def test_new_version_format():
    import datetime as dt

    v = B.new_version(dt.datetime(2026, 11, 28, 12, 15, 0, tzinfo=dt.timezone.utc))
    assert v == "v20261128-121500" and B.check_version_name(v) == v


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW8"])
def test_index_with_a_non_finite_vector_is_refused(factory):
    import faiss
    import numpy as np

    from recstack.serving.loading import check_index_finite

    x = np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32)
    index = faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    assert check_index_finite(index, "retrieval/index.faiss")
    y = x.copy()
    y[17, 3] = np.inf  # (a NaN row would not even be filed in an inverted list)
    index = faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(y)
    with pytest.raises(B.BundleError, match=r"'retrieval/index\.faiss': 1 NaN or infinite"):
        check_index_finite(index, "retrieval/index.faiss")


def test_npy_with_nan_is_refused_and_an_integer_one_is_not_checked(tmp_path):
    import numpy as np

    np.save(tmp_path / "a.npy", np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(B.BundleError, match=r"'x/a\.npy': 1 NaN or infinite"):
        B.check_npy_finite(tmp_path / "a.npy", "x/a.npy")
    np.save(tmp_path / "b.npy", np.arange(5))
    B.check_npy_finite(tmp_path / "b.npy", "x/b.npy")
    np.save(tmp_path / "c.npy", np.zeros((0, 4), np.float32))
    B.check_npy_finite(tmp_path / "c.npy", "x/c.npy", (0, 4))
