"""Where a milvus-lite search call spends its time: the same calls the bench made over gRPC,
made again on the engine in this process (`milvus_lite.MilvusLite` on the server's data
folder, the server stopped), under cProfile.

    probe = engine_breakdown(data_dir, "items_v0123...", calls, k=1000, search_params={"nprobe": 48})

milvus-lite 3.x is an engine written in Python over per-segment FAISS indexes: a search
runs each segment's index, then merges, de-duplicates and materialises the hits in Python.
The probe separates the time inside FAISS from the Python around it, and the engine's time
from the gRPC call's (encoding, the loopback transfer and pymilvus' decoding are the rest).
"""
from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

import numpy as np

# (label, file suffix, function name) of the engine steps the report names; cumulative time
BUCKETS = (
    ("engine search, all", "engine/collection.py", "search"),
    ("dedup map over every row (pk -> max seq)", "search/executor_indexed.py", "_update_max_seqs"),
    ("per-row validity mask (dedup, deletes)", "search/executor_indexed.py", "_build_local_mask"),
    ("segment index search, IVF_FLAT (FAISS + per-hit loop)", "index/faiss_ivf_flat.py", "search"),
    ("segment index search, FLAT (numpy)", "index/brute_force.py", "search"),
    ("of which FAISS itself", "faiss/class_wrappers.py", "replacement_search"),
    ("hit materialisation (row -> dict)", "search/executor_indexed.py", "_materialize_record"),
)


def segments_of(col) -> list[dict]:
    """The collection's segments: rows, and the vector index each holds (type, IVF lists)."""
    out = []
    for seg in getattr(col, "_segment_cache", {}).values():
        row: dict = {"rows": int(seg.num_rows)}
        for field, index in getattr(seg, "indexes", {}).items():
            faiss_index = getattr(index, "_index", None)
            row[field] = {"index": type(index).__name__, "nlist": int(getattr(faiss_index, "nlist", 0)) or None}
        out.append(row)
    return sorted(out, key=lambda r: -r["rows"])


def _bucket_seconds(stats: pstats.Stats) -> dict[str, float]:
    found = {label: 0.0 for label, _, _ in BUCKETS}
    for (path, _, name), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, suffix, fn in BUCKETS:
            if name == fn and path.replace("\\", "/").endswith(suffix):
                found[label] += cum
    return found


def _top_own_time(stats: pstats.Stats, n: int, calls: int) -> list[dict]:
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]  # type: ignore[attr-defined]
    return [{"function": f"{Path(path).name}:{line}:{name}", "own_ms_per_call": tt / calls * 1e3,
             "cum_ms_per_call": cum / calls * 1e3} for (path, line, name), (_, _, tt, cum, _) in rows]


def engine_breakdown(data_dir: str | Path, collection: str, calls: list[np.ndarray], *, k: int,
                     search_params: dict, vector_field: str = "emb") -> dict:
    """Open, load and search the collection in process (one warm-up call first); -> {"load_seconds", "segments",
    "wall_ms_per_call": {p50, mean}, "profiled_ms_per_call": {bucket: ms}, "top_own_time": [...]}.
    The profiled pass is slower than the plain one (cProfile's overhead falls on Python code)."""
    from milvus_lite import MilvusLite

    db = MilvusLite(str(data_dir))
    try:
        t0 = time.perf_counter()
        col = db.get_collection(collection)
        col.load()
        load_s = time.perf_counter() - t0
        col.search(calls[0].tolist(), top_k=k, anns_field=vector_field, search_params=search_params)  # warm-up
        plain = []
        for rows in calls:
            t = time.perf_counter()
            col.search(rows.tolist(), top_k=k, anns_field=vector_field, search_params=search_params)
            plain.append((time.perf_counter() - t) * 1e3)
        prof = cProfile.Profile()
        prof.enable()
        for rows in calls:
            col.search(rows.tolist(), top_k=k, anns_field=vector_field, search_params=search_params)
        prof.disable()
        stats = pstats.Stats(prof)
        buckets = {label: s / len(calls) * 1e3 for label, s in _bucket_seconds(stats).items()}
        return {"load_seconds": load_s, "segments": segments_of(col), "calls": len(calls),
                "wall_ms_per_call": {"p50": float(np.percentile(plain, 50)), "mean": float(np.mean(plain))},
                "profiled_ms_per_call": buckets, "top_own_time": _top_own_time(stats, 12, len(calls))}
    finally:
        db.close()
