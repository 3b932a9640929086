"""The bundle export's served top-50 check of an int8 fine graph (recstack.pipeline.fine_check)."""
import shutil

import numpy as np
import pytest

from recstack import bundle as B
from recstack.pipeline.export import check_int8_fine
from recstack.pipeline.fine_check import served_top_overlap


@pytest.fixture
def two_graph_bundle(make_fake_bundle, merge_fine, relist, tmp_path):
    """A fake bundle whose "int8" graph is a byte copy of the float32 one: same ranking."""
    bdir = make_fake_bundle(tmp_path)
    merge_fine(bdir)
    shutil.copy(bdir / "fine/ranker.onnx", bdir / "fine/ranker_int8.onnx")
    relist(bdir, ["fine/ranker.onnx", "fine/ranker_int8.onnx"], drop=("fine/ctr.onnx", "fine/cvr.onnx"))
    return bdir


def test_identical_graphs_overlap_fully(two_graph_bundle, one_thread):
    n_users = B.read_manifest(two_graph_bundle)["vocab"]["n_users"]
    res = served_top_overlap(two_graph_bundle, users=8, k=10)
    assert res["passed"] and res["users"] == min(8, n_users)
    assert res["mean_overlap"] == res["worst_overlap"] == 1.0


def test_the_defaults_are_read_when_called(two_graph_bundle, one_thread, monkeypatch):
    from recstack.pipeline import fine_check

    monkeypatch.setattr(fine_check, "USERS", 3)
    monkeypatch.setattr(fine_check, "TOP_K", 7)
    monkeypatch.setattr(fine_check, "MIN_OVERLAP", 0.5)
    res = served_top_overlap(two_graph_bundle)
    assert (res["users"], res["top_k"], res["min_overlap"]) == (3, 7, 0.5)


def test_a_failed_check_removes_the_int8_graph_and_says_why(two_graph_bundle, one_thread):
    files = list(B.read_manifest(two_graph_bundle)["files"])
    meta = {"int8": {"kept": True, "reason": "held-out AUC and calibration within bounds"}}
    assert check_int8_fine(two_graph_bundle, files, meta, min_overlap=1.01)  # no ranking can pass this bound
    assert "fine/ranker_int8.onnx" not in files and not (two_graph_bundle / "fine/ranker_int8.onnx").exists()
    assert not meta["int8"]["kept"] and "served top-50 overlap with float32 1.0000 < 1.01" in meta["int8"]["reason"]
    assert np.isclose(meta["int8"]["served_top"]["mean_overlap"], 1.0)


def test_no_int8_graph_no_check(make_fake_bundle, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    meta = {}
    assert not check_int8_fine(bdir, list(B.read_manifest(bdir)["files"]), meta)
    assert meta == {}
