"""retrieval/index.py and retrieval/bench.py: factory strings, the default by corpus size, shards, the bench."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from recstack.evaluation.metrics import recall_vs_exact
from recstack.bench import index_sweep as bench
from retrieval import index as index_lib
from retrieval.index import ShardedIndex, build, default_spec, merge_top_k, resolve, search_params


def unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(prev)


def test_default_by_corpus_size():
    assert default_spec(20_000) == {"factory": "Flat", "nprobe": None, "ef_search": None}
    assert default_spec(index_lib.EXACT_MAX_ITEMS)["factory"] == "Flat"
    big = default_spec(1_000_000)
    assert big["factory"] == "IVF4096,Flat" and big["nprobe"] == index_lib.DEFAULT_IVF_NPROBE
    assert default_spec(100_000_000)["factory"] == "IVF32768,Flat"  # 4 sqrt(1e8) = 40000 -> 2^15
    assert default_spec(10**10)["factory"] == "IVF65536,Flat"  # capped
    assert resolve("auto", 500) == default_spec(500)
    assert resolve("IVF64,Flat", 500, nprobe=7) == {"factory": "IVF64,Flat", "nprobe": 7, "ef_search": None}
    assert resolve("HNSW16", 500, nprobe=7, ef_search=99) == {"factory": "HNSW16", "nprobe": None, "ef_search": 99}


@pytest.mark.parametrize("factory,knobs,min_recall", [
    ("Flat", {}, 1.0),
    ("IVF32,Flat", {"nprobe": 32}, 1.0),  # probing every list is exact
    ("IVF32,PQ8x4fs", {"nprobe": 32}, 0.3),  # 4-byte fast-scan codes: approximate scores
    ("HNSW16", {"ef_search": 128}, 0.9),
])
def test_factories_build_inner_product_indexes_with_item_ids(factory, knobs, min_recall):
    rng = np.random.default_rng(0)
    emb, q = unit(rng, 3000, 16), unit(rng, 50, 16)
    index = build(emb, factory, **knobs)
    assert index.ntotal == 3000 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    for key, value in knobs.items():
        assert search_params(index)[key] == value
    _, got = index.search(q, 20)
    recall = recall_vs_exact(got, q, emb, [20])[20].mean()
    assert recall >= min_recall - 1e-9, recall
    # the index round-trips through its file format with its search knobs
    back = faiss.deserialize_index(faiss.serialize_index(index))
    assert search_params(back) == search_params(index)
    assert index_lib.memory_bytes(index) > 0


def test_ivf_training_uses_a_sample_and_bad_input_is_refused():
    rng = np.random.default_rng(1)
    emb = unit(rng, 5000, 8)
    index = build(emb, "IVF16,Flat", nprobe=16, max_train=1000)  # trained on 1000 rows, holds all 5000
    assert index.ntotal == 5000
    with pytest.raises(ValueError, match="factory"):
        build(emb, "NoSuchIndex")
    with pytest.raises(ValueError, match="NaN"):
        build(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="inverted lists"):
        build(emb[:10], "IVF16,Flat")
    with pytest.raises(ValueError, match="ids"):
        build(emb, "Flat", ids=np.arange(3))


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_two_shards_give_the_same_top_k_as_one_index(factory):
    rng = np.random.default_rng(2)
    emb, q = unit(rng, 2001, 16), unit(rng, 40, 16)  # odd size: shards of unequal length
    knobs = {"nprobe": 8} if "IVF" in factory else {}  # every list probed: each shard is exact
    one = build(emb, "Flat")
    two = ShardedIndex.build(emb, 2, factory, **knobs)
    assert two.ntotal == 2001 and [s.ntotal for s in two.shards] == [1001, 1000]
    k = 100
    s1, i1 = one.search(q, k + 1)  # one more: a tie at rank k is a tie with the first item left out
    s2, i2 = two.search(q, k)
    np.testing.assert_allclose(s2, s1[:, :k], rtol=0, atol=1e-5)
    # ids equal at every rank whose score is not float-tied with a neighbour's
    gap = np.abs(np.diff(s1, axis=1)) > 1e-5  # (Q, k)
    clear = gap[:, :k].copy()
    clear[:, 1:] &= gap[:, : k - 1]
    i1 = i1[:, :k]
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(i2[clear], i1[clear])
    # each shard holds global ids of its own residue class
    for s, shard in enumerate(two.shards):
        _, ids = shard.search(q[:3], 10)
        assert (ids % 2 == s).all()


def test_shards_smaller_than_k_and_padding_merge():
    rng = np.random.default_rng(3)
    emb = unit(rng, 30, 8)
    sharded = ShardedIndex.build(emb, 4, "Flat")
    s, i = sharded.search(emb[:2], 50)  # more than the corpus
    assert (i[:, :30] >= 0).all() and (i[:, 30:] == -1).all() and np.isneginf(s[:, 30:]).all()
    assert sorted(i[0, :30].tolist()) == list(range(30))
    # merge: -1 from one shard never wins over a real hit of another; ties break by item id
    scores = [np.array([[0.9, 0.5, -1e9]], np.float32), np.array([[0.5, 0.1, 0.0]], np.float32)]
    ids = [np.array([[4, 8, -1]]), np.array([[2, 6, -1]])]
    ms, mi = merge_top_k(scores, ids, 5)
    assert mi.tolist() == [[4, 2, 8, 6, -1]]
    np.testing.assert_allclose(ms[0, :4], [0.9, 0.5, 0.5, 0.1])


def test_bench_sweeps_and_picks_the_fastest_point_above_target(tmp_path):
    rng = np.random.default_rng(4)
    emb, q = unit(rng, 4000, 16), unit(rng, 60, 16)
    sweep = (("IVF32,Flat", "nprobe", (1, 4, 32)), ("HNSW16", "ef_search", (100, 200)), ("Bogus", "nprobe", (1,)))
    res = bench.run(tmp_path, item_emb=emb, queries=q, k=100, n_timed=20, sweep=sweep, target_recall=0.9, build_threads=1)
    assert (tmp_path / "recall_latency.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["k"] == 100
    pts = res["points"]
    assert {p["factory"] for p in pts} == {"IVF32,Flat", "HNSW16"}  # the bad factory string is skipped
    ivf = {p["value"]: p for p in pts if p["factory"] == "IVF32,Flat"}
    assert ivf[32]["recall@100"] == pytest.approx(1.0)  # all lists probed = exact
    assert ivf[1]["recall@100"] < ivf[4]["recall@100"] <= ivf[32]["recall@100"]
    chosen = res["serving_default"]
    ok = [p for p in pts if p["recall@100"] >= 0.9]
    assert chosen["p50_ms"] == min(p["p50_ms"] for p in ok) and chosen["recall@100"] >= 0.9
    assert res["exact"]["p50_ms"] > 0 and all(p["speedup_vs_exact"] > 0 for p in pts)
    # a second query set over the same index: the default must clear the target on both
    hard = emb[rng.choice(len(emb), 60, replace=False)]
    res2 = bench.run(tmp_path / "items", item_emb=emb, queries=hard, k=100, n_timed=20, sweep=sweep[:1], target_recall=0.9,
                     build_threads=1, plot=False)
    both = bench.combine({"users": res, "items": res2}, tmp_path / "both", target_recall=0.9)
    ch = both["serving_default"]
    assert ch["factory"] == "IVF32,Flat" and set(ch["per_query_set"]) == {"users", "items"}
    assert all(v["recall@100"] >= 0.9 for v in ch["per_query_set"].values())
    assert (tmp_path / "both" / "recall_latency.png").stat().st_size > 0
