"""recstack/metrics.py: recall of an ANN index against exact search, ties counted."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from recstack.evaluation.metrics import exact_kth_scores, recall_vs_exact


def unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_an_item_tied_with_the_kth_is_a_hit():
    corpus = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6], [0.0, 1.0]], np.float32)  # rows 1 and 2 tie
    q = np.array([[1.0, 0.0]], np.float32)
    for tied in (1, 2):  # whichever of the tied pair an index returns at rank 2
        assert recall_vs_exact(np.array([[0, tied]]), q, corpus, [2])[2].tolist() == [1.0]
    assert recall_vs_exact(np.array([[0, 3]]), q, corpus, [2])[2].tolist() == [0.5]  # below the 2nd best: a miss
    assert recall_vs_exact(np.array([[0, -1]]), q, corpus, [2])[2].tolist() == [0.5]  # FAISS padding: a miss
    assert recall_vs_exact(np.array([[1, 1]]), q, corpus, [2])[2].tolist() == [0.5]  # a repeated id counts once
    kth = exact_kth_scores(q, corpus, [1, 2, 9])
    assert sorted(kth) == [1, 2, 4]  # k capped at the corpus size
    assert [float(kth[k][0]) for k in (1, 2, 4)] == pytest.approx([1.0, 0.8, 0.0])


def test_scores_one_rounding_apart_are_ties_but_real_gaps_are_not():
    rng = np.random.default_rng(0)
    corpus = unit(rng, 50, 16)
    q = corpus[:1]
    order = np.argsort(-(q.astype(np.float64) @ corpus.T.astype(np.float64))[0])
    near = corpus[order[4]] * np.float32(1 + 2**-23)  # the 5th best, one float32 ulp further out
    twin = np.vstack([corpus, near[None]])  # row 50 now beats row order[4] by about a rounding error
    top5 = np.concatenate([order[:4], [order[4]]])[None]
    assert recall_vs_exact(top5, q, twin, [5])[5].tolist() == [1.0]
    sixth = np.concatenate([order[:4], [order[5]]])[None]  # a genuinely worse item
    assert recall_vs_exact(sixth, q, twin, [5])[5].tolist() == [0.8]


@pytest.mark.parametrize("n_queries", [5, 64])  # FAISS's own kernel below 20 queries, BLAS above
def test_exact_index_scores_one_on_a_corpus_full_of_ties(n_queries):
    """Items that share every attribute embed identically: a Flat index may return any of a tied
    group at the cut, in any order, and is still exact."""
    rng = np.random.default_rng(1)
    base = unit(rng, 40, 32)
    corpus = base[rng.integers(0, 40, 2000)]  # every vector ~50 times
    q = unit(rng, n_queries, 32)
    index = faiss.IndexFlatIP(32)
    index.add(corpus)
    _, found = index.search(q, 120)
    rec = recall_vs_exact(found, q, corpus, [10, 50, 120])
    assert all(r.tolist() == [1.0] * n_queries for r in rec.values())
    # and the same corpus searched by a coarse IVF is measured below 1
    ivf = faiss.index_factory(32, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(corpus)
    ivf.add(corpus)
    _, found = ivf.search(q, 120)
    assert recall_vs_exact(found, q, corpus, [120])[120].mean() < 1.0


def test_found_must_hold_k_ids_per_query():
    corpus = unit(np.random.default_rng(2), 10, 4)
    with pytest.raises(ValueError, match="found"):
        recall_vs_exact(np.zeros((1, 3), np.int64), corpus[:1], corpus, [5])
