"""results.json of `recstack bench backends` -> report.md lines: the vectors, the retrieval
table, the Milvus collection's costs, the engine breakdown of a milvus-lite call, then the
end-to-end table (when the run had a bundle)."""
from __future__ import annotations


def _f(x, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _retrieval(res: dict) -> list[str]:
    r, fi, mc = res["retrieval"], res["faiss_index"], res["milvus_collection"]
    lines = [f"## Retrieval: {r['calls']} calls on FAISS, the first {r['milvus_calls']} also on Milvus; "
             f"{r['rows_per_call']:.2f} rows per call on average (user + seeds), k = {r['k']}", "",
             f"| backend | index | p50 ms / call | p99 ms / call | max ms | user recall@{r['k']} | "
             f"seed recall@{r['k']} | build s | cold load s |", "|---|---|---|---|---|---|---|---|---|"]
    build = {"faiss": fi["build_seconds"], "milvus": mc["publish_seconds"]}
    milvus = (f"IVF_FLAT nlist={mc['nlist']} nprobe={fi['nprobe']}" if mc.get("index_type", "IVF_FLAT") == "IVF_FLAT"
              else f"{mc['index_type']} (exact)")
    index = {"faiss": f"{fi['factory']} nprobe={fi['nprobe']}", "milvus": milvus}
    load = {"faiss": None, "milvus": mc["load_seconds"]}
    for b in ("faiss", "milvus"):
        x = r[b]
        lines.append(f"| {b} | {index[b]} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['max_ms']:.1f} | "
                     f"{x['user_recall_at_k_same_calls']:.3f} | {x['seed_recall_at_k_same_calls']:.3f} | "
                     f"{_f(build[b])} | {_f(load[b])} |")
    lines += ["", f"Recall on the same {r['milvus_calls']} calls for both; FAISS over all {r['calls']} calls: user recall "
                  f"{r['faiss']['user_recall_at_k_all_calls']:.3f}. FAISS and Milvus share "
                  f"{r['user_top_k_overlap_faiss_milvus']:.3f} of their user top-{r['k']} on average.", ""]
    mem = lambda m: f"{m['rss_mb']:.0f} MB (peak {m['peak_mb']:.0f} MB)"  # noqa: E731
    lines += [f"milvus-lite server: {mem(mc['memory_after_publish'])} after publishing, "
              f"{mem(mc['memory_after_load'])} after a restart and a cold load, "
              f"{mem(mc['memory_after_searches'])} after the searches. Restart until answering: "
              f"{mc['restart_seconds']:.1f} s; loading the collection: {mc['load_seconds']:.1f} s"
              + (f"; the collection was reused from {mc['reused_data']} (published by an earlier run on the same vectors)."
                 if mc.get("reused_data") else ".")]
    return lines


def _engine(res: dict) -> list[str]:
    e = res["milvus_engine"]
    segs = ", ".join(f"{s['rows']:,} rows" + (f" (IVF {s['emb']['nlist']} lists)" if (s.get("emb") or {}).get("nlist") else "")
                     for s in e["segments"])
    lines = ["", f"## Inside a milvus-lite call ({e['calls']} of the same calls, the engine in process, no gRPC)", "",
             f"Segments: {segs}. Engine alone: p50 {e['wall_ms_per_call']['p50']:.0f} ms per call "
             f"(the gRPC call above: p50 {res['retrieval']['milvus']['p50_ms']:.0f} ms). Under cProfile (which slows "
             "Python code more than numpy's or FAISS's):", "", "| step | ms per call |", "|---|---|"]
    lines += [f"| {label} | {ms:.0f} |" for label, ms in e["profiled_ms_per_call"].items() if ms > 0]  # 0: not this index
    return lines


def _e2e(res: dict) -> list[str]:
    e = res["e2e"]
    lines = ["", f"## End to end: `recstack serve` over {e['artifacts']}, retrieval timeout 50 ms", "",
             "| backend | best QPS with p99 <= 50 ms | runs (offered QPS: p99 ms) | OK answers | degraded answers | ready s |",
             "|---|---|---|---|---|---|"]
    for b in ("faiss", "milvus"):
        x = e[b]
        runs = ", ".join(f"{r_['offered_qps']:.1f}: {r_['latency_ms']['p99']}" for r_ in x["runs"])
        lines.append(f"| {b} | {x['best_qps']:.1f} | {runs} | {x['ok_answers']} | {x['degraded_answers']:.0f} | "
                     f"{x['ready_seconds']:.0f} |")
    return lines


def report_lines(res: dict) -> list[str]:
    m, v = res["machine"], res["vectors"]
    lines = ["# Retrieval backends side by side", "", f"`{res['command']}`", "",
             f"Machine: {m['cpus']} CPUs, shared; load average {m['load_avg_at_start'][0]:.1f} at the start, "
             f"{m['load_avg_at_end'][0]:.1f} at the end (other jobs).", "",
             f"Vectors: {v['n_items']:,} items x {v['dim']} ({v['source']}); embedding version {v['version'][:16]}...", ""]
    lines += _retrieval(res) + _engine(res)
    if res.get("e2e"):
        lines += _e2e(res)
    return lines
