"""The coarse and fine stages' quantised and merged files as served (recstack.serving.coarse,
recstack.serving.fine): int8 item vectors, CTR + CVR in one ONNX graph, and their refusals."""
from pathlib import Path

import numpy as np
import pytest

from recstack import bundle as B
from recstack.quant import quantise_rows
from recstack.serving.cascade import _FINE_INPUTS, Cascade, Query
from recstack.serving.fine import FineScorer


def _int8_coarse(bdir: Path) -> None:
    codes, scales = quantise_rows(np.load(bdir / "coarse/item_vectors.npy"))
    np.save(bdir / "coarse/item_codes.npy", codes)
    np.save(bdir / "coarse/item_scales.npy", scales)


QUERIES = [Query(user_id=0, num_results=10, retrieval_size=200, coarse_size=50),
           Query(user_id=25, num_results=10, retrieval_size=200, coarse_size=50)]


def test_merged_fine_graph_ranks_as_the_two_graphs_in_one_call(make_fake_bundle, merge_fine, relist, tmp_path, one_thread):
    legacy = Cascade.load(make_fake_bundle(tmp_path / "a"))
    bdir = make_fake_bundle(tmp_path / "b")
    merge_fine(bdir)
    relist(bdir, ["fine/ranker.onnx"], drop=("fine/ctr.onnx", "fine/cvr.onnx"))
    merged = Cascade.load(bdir)
    assert merged.fine.merged and merged.fine.precision == "fp32" and merged.fine.files["pcvr"] == "fine/ranker.onnx"

    calls = []
    session = merged.fine.models[0].session

    class Counting:
        def __getattr__(self, name):
            return getattr(session, name)

        def run(self, *a, **k):
            calls.append(1)
            return session.run(*a, **k)

    merged.fine.models[0].session = Counting()
    for q in QUERIES:
        a, b = legacy.rank(q), merged.rank(q)
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        np.testing.assert_allclose(b.pctr, a.pctr, rtol=1e-6)
        np.testing.assert_allclose(b.pcvr, a.pcvr, rtol=1e-6)
    assert len(calls) == len(QUERIES)  # one session call per request for both probabilities


def test_int8_item_vectors_serve_when_listed_and_score_like_float32(make_fake_bundle, relist, tmp_path, one_thread):
    fp32 = Cascade.load(make_fake_bundle(tmp_path / "a"))
    bdir = make_fake_bundle(tmp_path / "b")
    _int8_coarse(bdir)
    relist(bdir, ["coarse/item_codes.npy", "coarse/item_scales.npy"])
    int8 = Cascade.load(bdir)
    assert int8.coarse_vectors.precision == "int8" and fp32.coarse_vectors.precision == "fp32"
    assert int8.coarse_vectors.nbytes < fp32.coarse_vectors.nbytes / 3  # a quarter, plus one scale per row
    cands = np.arange(fp32.n_items, dtype=np.int64)[::-1].copy()
    user_vec = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    a = fp32.coarse_vectors.inner_products(cands, user_vec)
    b = int8.coarse_vectors.inner_products(cands, user_vec)
    # per-row steps of max|v| / 127 (|v| <= 5 here): the error stays within half a step per entry
    assert np.max(np.abs(a - b)) <= 0.5 * 5.0 / 127 * np.abs(user_vec).sum()
    assert np.corrcoef(a, b)[0, 1] > 0.999


def test_half_listed_int8_vectors_are_refused(make_fake_bundle, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    _int8_coarse(bdir)
    relist(bdir, ["coarse/item_codes.npy"])
    with pytest.raises(B.BundleError, match="only one of 'coarse/item_codes.npy' and 'coarse/item_scales.npy'"):
        Cascade.load(bdir, warm=False)


def test_int8_codes_of_the_wrong_shape_are_refused(make_fake_bundle, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    _int8_coarse(bdir)
    np.save(bdir / "coarse/item_codes.npy", np.load(bdir / "coarse/item_codes.npy")[:, :64])
    relist(bdir, ["coarse/item_codes.npy", "coarse/item_scales.npy"])
    with pytest.raises(B.BundleError, match=r"'coarse/item_codes.npy'.*expected int8"):
        Cascade.load(bdir, warm=False)


def test_merged_graph_without_the_two_outputs_is_refused(make_fake_bundle, merge_fine, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    merge_fine(bdir, outputs=("pctr", "prob"))
    relist(bdir, ["fine/ranker.onnx"])
    with pytest.raises(B.BundleError, match=r"'fine/ranker.onnx': outputs .*expected \['pctr', 'pcvr'\]"):
        Cascade.load(bdir, warm=False)


def test_int8_fine_graph_is_preferred_unless_fp32_is_asked_for(make_fake_bundle, merge_fine, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    merge_fine(bdir)
    merge_fine(bdir, name="fine/ranker_int8.onnx")  # the file's role, not its contents, is what is tested
    relist(bdir, ["fine/ranker.onnx", "fine/ranker_int8.onnx"])
    bundle = B.Bundle.open(bdir)
    assert FineScorer.load(bundle, _FINE_INPUTS, 1).files["pctr"] == "fine/ranker_int8.onnx"
    assert FineScorer.load(bundle, _FINE_INPUTS, 1, precision="fp32").files["pctr"] == "fine/ranker.onnx"
    relist(bdir, [], drop=("fine/ranker_int8.onnx",))
    with pytest.raises(B.BundleError, match="no 'fine/ranker_int8.onnx'"):
        FineScorer.load(B.Bundle.open(bdir), _FINE_INPUTS, 1, precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        FineScorer.load(B.Bundle.open(bdir), _FINE_INPUTS, 1, precision="fp16")
