"""recstack.quant: per-row int8 item vectors and the fused gather-dot that serves them."""
import numpy as np
import pytest

from recstack.quant import (int8_inner_products_by_idx, quantise_rows, shortlist_size, shortlist_top, top_positions,
                            topk_overlap)


def _vectors(n=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) * rng.uniform(0.1, 5.0, (n, 1))).astype(np.float32)


def test_quantise_rows_round_trips_within_half_a_step():
    vecs = _vectors()
    vecs[7] = 0.0  # a zero row: scale 0, codes 0, reconstructed exactly
    codes, scales = quantise_rows(vecs)
    assert codes.dtype == np.int8 and codes.shape == vecs.shape and scales.dtype == np.float32 and scales.shape == (300,)
    assert scales[7] == 0.0 and not codes[7].any()
    err = np.abs(codes.astype(np.float32) * scales[:, None] - vecs)
    assert np.all(err <= scales[:, None] / 2 * (1 + 1e-5) + 1e-12)
    # each row's largest entry is exact (it sets the scale) and uses the full range
    assert np.all(np.abs(codes[np.arange(300) != 7]).max(axis=1) == 127)


@pytest.mark.parametrize("bad, match", [(np.zeros(4, np.float32), "shape"),
                                        (np.array([[1.0, np.nan]], np.float32), "NaN or infinite")])
def test_quantise_rows_refuses_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        quantise_rows(bad)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 257])  # around the kernel's 4-row blocks
def test_fused_product_equals_the_dequantised_matvec(n):
    vecs = _vectors()
    codes, scales = quantise_rows(vecs)
    rng = np.random.default_rng(n)
    ids = rng.integers(0, len(vecs), n)  # repeats allowed, any order
    query = rng.standard_normal(vecs.shape[1]).astype(np.float32)
    got = int8_inner_products_by_idx(codes, scales, ids, query)
    ref = (codes[ids].astype(np.float64) * scales[ids, None].astype(np.float64)) @ query.astype(np.float64)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max(initial=1.0)))


def test_fused_product_refuses_wrong_dtypes_and_shapes():
    codes, scales = quantise_rows(_vectors())
    ids, q = np.arange(3), np.zeros(24, np.float32)
    with pytest.raises(ValueError, match="codes must be"):
        int8_inner_products_by_idx(codes.astype(np.int16), scales, ids, q)
    with pytest.raises(ValueError, match="scales must be"):
        int8_inner_products_by_idx(codes, scales[:-1], ids, q)
    with pytest.raises(ValueError, match="query shape"):
        int8_inner_products_by_idx(codes, scales, ids, q[:-1])


def test_topk_overlap():
    ref = np.arange(10, dtype=np.float64)  # top-3: items 9, 8, 7
    cand = ref.copy()
    cand[7] = -1.0  # item 7 falls out, item 6 comes in
    assert topk_overlap(ref, ref, 3) == 1.0
    assert topk_overlap(ref, cand, 3) == pytest.approx(2 / 3)
    assert topk_overlap(ref, cand, 50) == 1.0  # k clipped to N: the same set
    assert topk_overlap(np.zeros(0), np.zeros(0), 5) == 1.0


def test_shortlist_size_is_the_factor_times_the_cut_within_bounds():
    assert shortlist_size(500, 10_000) == 750 and shortlist_size(500, 600) == 600 and shortlist_size(3, 10, 1.0) == 3
    assert shortlist_size(5, 100, 1.01) == 6  # rounded up
    with pytest.raises(ValueError, match="shortlist factor must be >= 1"):
        shortlist_size(5, 100, 0.9)


def test_shortlist_top_keeps_the_exact_top_when_the_shortlist_holds_it():
    rng = np.random.default_rng(3)
    exact = rng.standard_normal(1000).astype(np.float32)
    approx = exact + rng.uniform(-0.05, 0.05, 1000).astype(np.float32)  # near-ties reorder at the cut
    assert topk_overlap(exact, approx, 100) < 1.0
    calls = []

    def rescore(pos):
        calls.append(len(pos))
        return exact[pos]

    pos, scores = shortlist_top(approx, 100, 200, rescore)
    assert calls == [200]  # only the shortlist is re-scored
    np.testing.assert_array_equal(np.sort(pos), np.sort(np.argsort(-exact)[:100]))
    np.testing.assert_array_equal(scores, exact[pos])


def test_shortlist_top_refuses_rescores_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"exact scores shape \(3,\), expected \(4,\)"):
        shortlist_top(np.arange(10, dtype=np.float32), 2, 4, lambda p: np.zeros(3, np.float32))


def test_top_positions_keeps_all_in_order_when_the_cut_is_not_smaller():
    s = np.array([0.3, 0.9, 0.1], np.float32)
    np.testing.assert_array_equal(top_positions(s, 5), [0, 1, 2])
    assert set(top_positions(s, 2)) == {0, 1} and len(top_positions(s, 0)) == 0
