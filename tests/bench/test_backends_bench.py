"""`recstack bench backends` on a tiny corpus: with every IVF list probed both backends are exact:
recall@k against exact search is 1.0 for each, and the report names both."""
from __future__ import annotations

from recstack.bench.backends import report_lines, retrieval_side_by_side, synthetic_corpus


def test_side_by_side_exact_when_every_list_is_probed(tmp_path, milvus_lite):
    emb, queries = synthetic_corpus(6000, 16, 8, clusters=20)
    db = tmp_path / "bench.db"
    res = retrieval_side_by_side(emb, queries, str(db), k=50, nlist=128, nprobe=128, seeds=2)
    assert res["faiss"]["recall_at_k"] == 1.0 and res["milvus"]["recall_at_k"] == 1.0
    assert res["rows_per_call"] == 3 and res["n_items"] == 6000
    assert 0 < res["faiss"]["p50_ms"] <= res["faiss"]["p99_ms"] and 0 < res["milvus"]["p50_ms"] <= res["milvus"]["p99_ms"]
    full = {"command": "bench", "machine": {"cpus": 2, "load_avg_at_start": [1.0], "load_avg_at_end": [1.0]},
            "retrieval": res}
    text = "\n".join(report_lines(full))
    assert "| faiss | IVF128,Flat nprobe=128 | 1.000 |" in text and "| milvus | IVF_FLAT nlist=128 nprobe=128 | 1.000 |" in text
    milvus_lite.stop(f"milvus://{db}/bench")
