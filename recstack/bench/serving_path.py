"""The serving path measured in process on a bundle and real test-day users: the retrieval
index's recall / latency point against exact search, the served cascade's per-stage time and
a cProfile of it, and the coarse stage as served (inner product vs the teacher as coarse)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def _test_day_users(data_dir: str | Path, n: int, seed: int) -> tuple[object, dict]:
    from recstack.data import load
    from recstack.evaluation.cascade import requests

    data = load(data_dir)
    return data, requests(data, data.test_day, n, seed)


def _queries(cascade, req: dict) -> np.ndarray:
    """The bundle's retrieval tower on each request, one call per request -> (N, D) float32."""
    return np.concatenate([cascade.retrieval_tower({"user_feats": req["user_feats"][i:i + 1],
                                                    "seq_items": req["seq_items"][i:i + 1],
                                                    "seq_extras": req["seq_extras"][i:i + 1]})
                           for i in range(len(req["user_id"]))]).astype(np.float32)


def _recall_point(cascade, exact, q: np.ndarray, k: int) -> dict:
    from recstack.evaluation.metrics import recall_vs_exact

    t_ann, t_ex, found = [], [], []
    for i in range(len(q)):
        t0 = time.perf_counter()
        _, a = cascade.index.search(q[i:i + 1], k)
        t1 = time.perf_counter()
        exact.search(q[i:i + 1], k)
        t2 = time.perf_counter()
        t_ann.append((t1 - t0) * 1e3)
        t_ex.append((t2 - t1) * 1e3)
        found.append(a[0])
    rec = recall_vs_exact(np.stack(found), q, cascade.item_emb, [k])[k]  # ties with the k-th count
    return {
        "k": k, "recall": float(np.mean(rec)), "recall_min": float(np.min(rec)),
        "ann_ms_p50": float(np.median(t_ann)), "ann_ms_p99": float(np.percentile(t_ann, 99)),
        "exact_ms_p50": float(np.median(t_ex)), "exact_ms_p99": float(np.percentile(t_ex, 99)),
        "speedup_p50": float(np.median(t_ex) / np.median(t_ann)),
    }


def bench_retrieval_point(cascade, data_dir: str | Path, n_queries: int = 200, ks: tuple[int, ...] = (1000, 10_000),
                          seed: int = 0) -> dict:
    """The served index (its type and search parameters as loaded by the cascade) against exact
    inner-product search over the bundle's item embeddings, on real test-day queries (the bundle's
    retrieval tower on the requests of `n_queries` users): recall@k and ms per single-query call,
    both single-threaded, in the same run, for each k."""
    import faiss

    if cascade.item_emb is None:
        raise ValueError("bench retrieval point: the bundle has no retrieval/item_emb.npy (exact search needs it)")
    _, req = _test_day_users(data_dir, n_queries, seed)
    q = _queries(cascade, req)
    exact = faiss.IndexFlatIP(cascade.item_emb.shape[1])
    exact.add(np.ascontiguousarray(cascade.item_emb, dtype=np.float32))
    faiss.omp_set_num_threads(1)
    out = {"index": type(faiss.downcast_index(cascade.index)).__name__, "search_params": dict(cascade.search_params),
           "n_items": int(cascade.n_items), "dim": int(q.shape[1]), "n_queries": int(len(q)), "points": []}
    for k in ks:
        out["points"].append(_recall_point(cascade, exact, q, min(k, cascade.n_items)))
    del exact
    return out


def _profile(cascade, queries: list, top: int) -> tuple[list[dict], float]:
    """cProfile of the cascade on `queries` -> (the `top` functions by own time, ms per request;
    the total own time per request)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for q in queries:
        cascade.rank(q)
    prof.disable()
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        rows.append({"function": f"{Path(fname).name}:{line}({func})" if line else func,
                     "calls_per_request": nc / len(queries), "own_ms_per_request": tt * 1e3 / len(queries),
                     "cum_ms_per_request": ct * 1e3 / len(queries)})
    rows.sort(key=lambda r: -r["own_ms_per_request"])
    return rows[:top], sum(r["own_ms_per_request"] for r in rows)


def bench_serving_path(cascade, data_dir: str | Path, n_requests: int = 200, sizes: dict | None = None,
                       seed: int = 0, profile_top: int = 18) -> dict:
    """The serving cascade in process on real test-day users (features from the bundle's store, as
    the server computes them): per-stage ms (p50/p99/mean), the CPU per request (process time,
    one request at a time) and a cProfile of the same requests (the functions with the most own
    time, ms per request)."""
    from recstack.serving.cascade import Query

    sizes = sizes or {"retrieval_size": 10_000, "coarse_size": 500, "k": 50}
    _, req = _test_day_users(data_dir, n_requests, seed)
    queries = [Query(user_id=int(u), num_results=sizes["k"], retrieval_size=sizes["retrieval_size"],
                     coarse_size=sizes["coarse_size"]) for u in req["user_id"]]
    for q in queries[:10]:  # warm-up
        cascade.rank(q)
    stages: dict[str, list[float]] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for q in queries:
        for k, v in cascade.rank(q).timings_ms.items():
            stages.setdefault(k, []).append(v)
    cpu_ms = (time.process_time() - c0) * 1e3 / len(queries)  # the process's CPU, all its threads
    wall_ms = (time.perf_counter() - t0) * 1e3 / len(queries)
    top, total = _profile(cascade, queries, profile_top)
    return {
        "n_requests": len(queries), "sizes": sizes, "wall_ms_per_request": wall_ms, "cpu_ms_per_request": cpu_ms,
        "precision": {"coarse": cascade.coarse_vectors.precision, "coarse_reason": cascade.coarse_vectors.reason,
                      "fine": cascade.fine.precision},
        "stage_ms": {k: {"p50": float(np.median(v)), "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v))}
                     for k, v in stages.items()},
        "profile_top": top, "profile_total_ms_per_request": total,
    }


def bench_coarse_stage_served(cascade, teacher_cascade, data_dir: str | Path, n_requests: int, sizes: dict,
                              seed: int = 0) -> dict:
    """The coarse stage as served at `sizes` (retrieval_size candidates of real requests): the
    cascade's `select_coarse` (user tower + fused inner product + the cut) vs the teacher-as-coarse
    peer's (item features + interacted features + teacher DNN in ONNX Runtime + the cut), same
    candidates."""
    from recstack.serving.cascade import Query

    _, req = _test_day_users(data_dir, n_requests, seed)
    work = []
    for u in req["user_id"]:
        q = Query(user_id=int(u), num_results=sizes["k"], retrieval_size=sizes["retrieval_size"],
                  coarse_size=sizes["coarse_size"])
        seq_items, seq_extras, _ = cascade.sequence(q)
        uf = cascade.users.feats(np.array([q.user_id], dtype=np.int64))
        tr: dict = {}
        cascade.rank_features(q, uf, seq_items, seq_extras, trace=tr)
        work.append(({"user_feats": uf, "seq_items": seq_items, "seq_extras": seq_extras}, tr["retrieved"]))
    out = {}
    for name, c in (("inner_product", cascade), ("teacher_dnn", teacher_cascade)):
        xs = []
        c.select_coarse(*work[0], sizes["coarse_size"])
        for tin, cands in work:
            t0 = time.perf_counter()
            c.select_coarse(tin, cands, sizes["coarse_size"])
            xs.append((time.perf_counter() - t0) * 1e3)
        out[name] = {"p50": float(np.median(xs)), "p99": float(np.percentile(xs, 99)), "mean": float(np.mean(xs))}
    out["speedup_p50"] = out["teacher_dnn"]["p50"] / out["inner_product"]["p50"]
    out["n_requests"] = len(work)
    out["candidates_mean"] = float(np.mean([len(c) for _, c in work]))
    return out
