"""`recstack bench backends` on a small synthetic corpus, milvus-lite in its own process: with
every IVF list probed both backends are exact (recall@k 1.0 against exact search), the
collection is built with the lists asked for, a second run on the same vectors reuses it, and
the report names both backends."""
from __future__ import annotations

import json

from recstack.bench.backends import content_version, run
from recstack.bench.backends_data import seeds_of, synthetic_corpus

import numpy as np


def test_seeds_are_distinct_newest_first_and_capped():
    seq = np.zeros((2, 6, 5), np.int64)
    seq[0, :, 0] = [4, 9, 4, 0, 2, 7]  # model ids (raw + 1), 0 = empty slot
    got = seeds_of(seq, seeds=3)
    assert got[0].tolist() == [3, 8, 1] and got[1].tolist() == []


def test_content_version_is_the_npy_files_sha256(tmp_path):
    from recstack.bundle import sha256_file

    emb = synthetic_corpus(300, 8, 1).item_emb
    np.save(tmp_path / "e.npy", emb, allow_pickle=False)
    assert content_version(emb) == sha256_file(tmp_path / "e.npy")


def test_side_by_side_exact_when_every_list_is_probed(tmp_path):
    kw = dict(n_items=3000, n_queries=6, milvus_queries=4, probe_calls=2, k=50, nlist=16, nprobe=16,
              scratch=tmp_path / "scratch", command="bench")
    res = run(tmp_path / "out", **kw)
    r = res["retrieval"]
    assert r["calls"] == 6 and r["milvus_calls"] == 4 and r["faiss"]["calls"] == 6 and r["milvus"]["calls"] == 4
    for b in ("faiss", "milvus"):
        assert r[b]["user_recall_at_k_same_calls"] == 1.0 and r[b]["seed_recall_at_k_same_calls"] == 1.0
        assert 0 < r[b]["p50_ms"] <= r[b]["p99_ms"] <= r[b]["max_ms"]
    assert res["faiss_index"]["nlist"] == 16
    mc = res["milvus_collection"]
    assert mc["publish_seconds"] > 0 and mc["load_seconds"] > 0 and mc["memory_after_load"]["rss_mb"] > 0
    assert [s["emb"]["nlist"] for s in res["milvus_engine"]["segments"]] == [16]  # the lists asked for
    assert set(res["milvus_engine"]["profiled_ms_per_call"]) >= {"engine search, all", "of which FAISS itself"}
    text = (tmp_path / "out/report.md").read_text()
    assert "| faiss | IVF16,Flat nprobe=16 |" in text and "| milvus | IVF_FLAT nlist=16 nprobe=16 |" in text
    assert json.loads((tmp_path / "out/results.json").read_text())["vectors"]["n_items"] == 3000
    again = run(tmp_path / "out2", **kw)  # same vectors, same scratch: the collection is reused
    assert again["milvus_collection"]["publish_seconds"] is None
    assert again["retrieval"]["milvus"]["user_recall_at_k_same_calls"] == 1.0
