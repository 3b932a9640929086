"""The coarse and fine stages' quantised and merged files as served (recstack.serving.coarse,
recstack.serving.fine): int8 item vectors, CTR + CVR in one ONNX graph, and their refusals."""
import re
from pathlib import Path

import numpy as np
import pytest

from recstack import bundle as B
from recstack.quant import INT8_METHOD, quantise_rows
from recstack.serving.cascade import _FINE_INPUTS, Cascade, Query
from recstack.serving.fine import FineScorer


CODES = ["coarse/item_codes.npy", "coarse/item_scales.npy"]


def _int8_coarse(bdir: Path, check: dict | None = None, relist_codes=None) -> None:
    """Write the fake bundle's int8 codes; with `relist_codes`, list them and record `check` as
    the exporter's int8 ranking check (default: a passed check of the served method)."""
    codes, scales = quantise_rows(np.load(bdir / "coarse/item_vectors.npy"))
    np.save(bdir / "coarse/item_codes.npy", codes)
    np.save(bdir / "coarse/item_scales.npy", scales)
    if relist_codes is not None:
        m = B.read_manifest(bdir)
        m["stages"]["coarse"].setdefault("meta", {})["item_vectors_int8"] = check if check is not None else {
            "served": True, "method": INT8_METHOD, "shortlist_factor": 1.5, "reason": "test: passed"}
        B.write_manifest(bdir, version=m["version"], files=m["files"], configs=m["configs"],
                         feature_schema=m["feature_schema"], vocab=m["vocab"], stages=m["stages"],
                         extra={"snapshot": m["snapshot"]})
        relist_codes(bdir, CODES)


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


def test_int8_item_vectors_serve_the_float32_cut(make_fake_bundle, relist, tmp_path, one_thread):
    fp32 = Cascade.load(make_fake_bundle(tmp_path / "a"))
    bdir = make_fake_bundle(tmp_path / "b")
    _int8_coarse(bdir, relist_codes=relist)
    int8 = Cascade.load(bdir)
    assert int8.coarse_vectors.precision == "int8" and fp32.coarse_vectors.precision == "fp32"
    assert int8.coarse_vectors.shortlist_factor == 1.5 and "test: passed" in int8.coarse_vectors.reason
    rng = np.random.default_rng(0)
    for _ in range(20):
        cands = rng.permutation(fp32.n_items)[:300].astype(np.int64)
        user_vec = rng.standard_normal(int8.coarse_vectors.dim).astype(np.float32)
        pa, sa = fp32.coarse_vectors.top(cands, user_vec, 50)
        pb, sb = int8.coarse_vectors.top(cands, user_vec, 50)
        # the shortlist (75 by the int8 scores) holds float32's top 50: the same cut, float32 scores
        np.testing.assert_array_equal(np.sort(pa), np.sort(pb))
        np.testing.assert_array_equal(sb, fp32.coarse_vectors.inner_products(cands[pb], user_vec))
    for q in QUERIES:  # and the served rankings are float32's
        a, b = fp32.rank(q), int8.rank(q)
        np.testing.assert_array_equal(a.item_ids, b.item_ids)
        np.testing.assert_allclose(b.coarse_scores, a.coarse_scores, rtol=1e-5)  # FAISS's row order may round apart


def test_cut_keeps_everything_in_order_when_it_is_not_smaller(make_fake_bundle, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    _int8_coarse(bdir, relist_codes=relist)
    vectors = Cascade.load(bdir, warm=False).coarse_vectors
    cands = np.array([7, 3, 11], np.int64)
    user_vec = np.ones(vectors.dim, np.float32)
    pos, scores = vectors.top(cands, user_vec, 3)
    np.testing.assert_array_equal(pos, [0, 1, 2])
    np.testing.assert_allclose(scores, vectors.vectors[cands] @ user_vec, rtol=1e-5)


@pytest.mark.parametrize("check, why", [
    (None, "item_vectors_int8 missing"),
    ({"served": True, "method": "int8_only"}, "used method 'int8_only'"),
    ({"served": False, "method": INT8_METHOD, "reason": "overlap 0.98 < 0.99"}, "did not pass .overlap 0.98"),
])
def test_int8_codes_without_a_passed_check_of_this_method_serve_float32(make_fake_bundle, relist, tmp_path, check, why,
                                                                        caplog):
    bdir = make_fake_bundle(tmp_path)
    _int8_coarse(bdir, check=check if check is not None else {}, relist_codes=relist)
    if check is None:  # no record of the check at all
        m = B.read_manifest(bdir)
        del m["stages"]["coarse"]["meta"]["item_vectors_int8"]
        B.write_manifest(bdir, version=m["version"], files=m["files"], configs=m["configs"],
                         feature_schema=m["feature_schema"], vocab=m["vocab"], stages=m["stages"],
                         extra={"snapshot": m["snapshot"]})
    with caplog.at_level("WARNING", logger="recstack.serving"):
        vectors = Cascade.load(bdir, warm=False).coarse_vectors
    assert vectors.precision == "fp32" and vectors.codes is None
    assert re.search(why, vectors.reason) and re.search(why, caplog.text)


def test_int8_codes_that_are_not_the_vectors_are_refused(make_fake_bundle, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    _int8_coarse(bdir)
    codes = np.load(bdir / "coarse/item_codes.npy")
    np.save(bdir / "coarse/item_codes.npy", codes[::-1].copy())  # another row's codes in each row
    _int8_coarse_check_only(bdir, relist)
    with pytest.raises(B.BundleError, match="'coarse/item_codes.npy': codes x scales differ from 'coarse/item_vectors.npy'"):
        Cascade.load(bdir, warm=False)


def test_a_bad_shortlist_factor_is_refused(make_fake_bundle, relist, tmp_path):
    bdir = make_fake_bundle(tmp_path)
    _int8_coarse(bdir, check={"served": True, "method": INT8_METHOD, "shortlist_factor": 0.5}, relist_codes=relist)
    with pytest.raises(B.BundleError, match="shortlist_factor 0.5: expected a number >= 1"):
        Cascade.load(bdir, warm=False)


def _int8_coarse_check_only(bdir: Path, relist) -> None:
    """Record a passed check and list the codes already on disk (not rewritten)."""
    m = B.read_manifest(bdir)
    m["stages"]["coarse"].setdefault("meta", {})["item_vectors_int8"] = {
        "served": True, "method": INT8_METHOD, "shortlist_factor": 1.5, "reason": "test: passed"}
    B.write_manifest(bdir, version=m["version"], files=m["files"], configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m["snapshot"]})
    relist(bdir, CODES)


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
    _int8_coarse_check_only(bdir, relist)
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
