"""The wide-k scan of an IVF-Flat index (recstack.serving.ivf_scan) against FAISS's own search
of the same index: the same items, best first; and the FAISS backend's use of it."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from recstack.serving.candidates import FaissBackend
from recstack.serving.ivf_scan import WIDE_K, IvfScan


@pytest.fixture(scope="module")
def ivf() -> tuple[faiss.IndexIVFFlat, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(6000, 8)).astype(np.float32)
    quantizer = faiss.IndexFlatIP(8)
    index = faiss.IndexIVFFlat(quantizer, 8, 16, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    index.nprobe = 5
    return index, x


def test_the_scan_returns_faiss_answer_for_a_wide_k(ivf):
    index, x = ivf
    scan = IvfScan.of(index)
    assert scan is not None
    queries = x[[3, 77, 1234]] + np.float32(0.25)
    for q in queries:
        for k in (1, 50, 400):
            d, want = index.search(q[None], k)
            got = scan.search(q, k)
            n = int((want[0] >= 0).sum())
            assert len(got) == n == len(np.unique(got))
            scores = (x[got].astype(np.float64) @ q.astype(np.float64))
            assert (np.diff(scores) <= 1e-5).all()  # best first (up to float rounding)
            np.testing.assert_allclose(scores, d[0][:n], rtol=0, atol=1e-4)  # the same scores, rank by rank
            # the same items, except where two scores sit within rounding of the k-th
            clear = d[0][:n] > d[0][n - 1] + 1e-4
            assert np.isin(want[0][:n][clear], got).all()


def test_a_k_past_the_probed_vectors_returns_all_of_them(ivf):
    index, x = ivf
    q = x[10]
    got = IvfScan.of(index).search(q, 10**6)
    _, lists = index.quantizer.search(q[None], index.nprobe)
    assert len(got) == sum(index.invlists.list_size(int(lst)) for lst in lists[0]) == len(np.unique(got))


def test_other_index_types_keep_faiss_search():
    assert IvfScan.of(faiss.IndexFlatIP(4)) is None
    l2 = faiss.IndexIVFFlat(faiss.IndexFlatL2(4), 4, 2, faiss.METRIC_L2)
    assert IvfScan.of(l2) is None


def test_the_backend_scans_only_wide_rows_and_pads_each_row_past_its_k(ivf):
    index, x = ivf
    backend = FaissBackend(index)
    k_wide = WIDE_K + 5
    q = np.ascontiguousarray(x[[5, 6, 7]])
    out = backend.search(q, [k_wide, 30, 0])
    assert out.shape == (3, k_wide)
    row0 = out[0][out[0] >= 0]
    np.testing.assert_array_equal(row0, IvfScan.of(index).search(q[0], k_wide))  # the same code, the same answer
    np.testing.assert_array_equal(out[1, :30], index.search(q[1:2], 30)[1][0])  # narrow rows: faiss itself
    assert (out[1, 30:] == -1).all() and (out[2] == -1).all()
