"""The benchmarks' reports: the model-cost plot (bench.png), the tables and the explanation of
the bounds shared by `bench models` and `bench all`, and each one's report.md. Numbers only,
every figure from the results dict; what they mean is for the notes a person writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recstack.bench import e2e_report
from recstack.evaluation import report as E

LABELS = {
    "inner_product_serving": "coarse: inner product, serving path (fused FAISS gather-dot, fvec_inner_products_by_idx)",
    "inner_product_int8": "coarse: inner product, int8 item vectors with per-row scales alone (fused numba gather-dot, recstack.quant)",
    "inner_product_int8_shortlist": "coarse: int8 scan + float32 re-score of the 1.5x shortlist + the cut to 500 "
                                    "(served when export's top-500 check passes)",
    "inner_product_numpy": "coarse: inner product, numpy gather + BLAS matvec",
    "inner_product_sorted_gather": "coarse: inner product, candidate ids sorted first (sort + gather + matvec)",
    "inner_product_contiguous": "coarse: inner product, contiguous block (matvec only)",
    "gather_only": "coarse: gather only (np.take into a buffer)",
    "memory_scan_sum": "memory scan of the same bytes (np.sum)",
    "memory_copy": "memory copy of the same bytes (np.copyto)",
    "teacher_dnn": "coarse: PFD+MD teacher DNN (torch eager)",
    "teacher_gemm_floor": "coarse: teacher's matrix products alone (floor)",
    "gemm_floor": "fine: CTR ranker's matrix products alone (floor)",
    "teacher_dnn_onnxruntime": "coarse: PFD+MD teacher DNN (ONNX Runtime, serving session options)",
    "torch_eager": "fine: CTR ranker, PyTorch eager",
    "onnxruntime": "fine: CTR ranker, ONNX Runtime",
    "onnxruntime_serving_session": "fine: CTR ranker, ONNX Runtime with the serving session options",
    "onnxruntime_intra_op_2": "fine: CTR ranker, ONNX Runtime, 2 intra-op threads (serving options otherwise)",
    "onnxruntime_int8_dynamic": "fine: CTR ranker, ONNX Runtime, int8 as served (fine_rank.serving_graph: BatchNorms folded, the user's block once, user and dense blocks float32; served when the export's quality checks pass)",
    "onnxruntime_int8_plain_graph": "fine: CTR ranker, ONNX Runtime, int8 dynamic quantization of the plain graph (every layer)",
}


def plot(path: Path, res: dict) -> Path:
    plt = E._plt()
    names, vals, colors = [], [], []
    for stage, color in (("coarse", "tab:blue"), ("fine", "tab:orange")):
        for k, v in res[stage]["timings_ms"].items():
            names.append(LABELS.get(k, k))
            vals.append(v["median"])
            colors.append("tab:gray" if k.startswith("memory") else color)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.5))
    y = np.arange(len(names))
    ax.barh(y, vals, color=colors)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.3g} ms", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per request (median, 1 thread, log scale)")
    c, f = res["coarse"], res["fine"]
    ax.set_title(f"coarse: {c['n_candidates']:,} candidates; fine: {f['n_candidates']} candidates\n"
                 f"{res['machine']['cpu_model']} ({res['machine']['nproc']} cores, load {res['machine']['loadavg_start']})",
                 fontsize=9)
    ax.set_xlim(right=max(vals) * 8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def _ms(x) -> str:
    return "n/a" if x is None else fmt_ms(x)


def _machine_line(mach: dict, shared_note: str = "") -> str:
    return (f"Machine: {mach['cpu_model']}, nproc {mach['nproc']} (cpu_count {mach['cpu_count']}), host `{mach['hostname']}`; "
            f"load average (1/5/15 min) at start {mach['loadavg_start']}, at end {mach['loadavg_end']}{shared_note}. "
            f"Python {mach['python']}, numpy {mach['numpy']} (BLAS: {', '.join(mach['blas']) or 'unknown'}), "
            f"torch {mach['torch']}, onnxruntime {mach['onnxruntime']}. {mach['platform']}. Transparent huge pages: "
            f"{mach['transparent_hugepages']} (numpy madvise huge pages: {mach['numpy_madvise_hugepage']}).")


def _timing_rows(timings: dict) -> list[list]:
    return [[LABELS.get(k, k), fmt_ms(v["median"]), fmt_ms(v["p10"]), fmt_ms(v["p90"]), v["repeats"]]
            for k, v in timings.items()]


def coarse_tables(c: dict) -> list[str]:
    """The coarse section's timing and ratio tables (shared by `bench models` and `bench all`)."""
    return [
        E.markdown_table(["path", "median ms", "p10 ms", "p90 ms", "repeats"], _timing_rows(c["timings_ms"])),
        "",
        E.markdown_table(["ratio", "value"], [[k, f"{v:.3g}"] for k, v in c["ratios"].items()]),
        "",
        f"Memory scan bandwidth (np.sum, 1 thread): {c['scan_gb_per_s']:.1f} GB/s. The PFD paper reports the inner "
        "product ~830x faster than its DNN teacher.",
    ]


def _target_rows(targets: list[dict]) -> list[list]:
    return [[r["name"], f"{r['op']} {r['goal']:g}", f"{r['measured']:.4g}", "yes" if r["met"] else "**no**",
             "" if r["met"] else f"{r['shortfall_factor']:.3g}x"] for r in targets]


def bounds_text(res: dict) -> list[str]:
    """Numbers-only explanation of the bounds (every figure comes from `res`)."""
    c, f = res["coarse"], res["fine"]
    m = {k: v["median"] for k, v in c["timings_ms"].items()}
    fm = {k: v["median"] for k, v in f["timings_ms"].items()}
    r = c["ratios"]
    best = r["teacher_vs_memory_scan"]
    return [
        f"- Coarse, random access: the serving path (fused FAISS gather-dot) takes {m['inner_product_serving']:.3g} ms for "
        f"{c['n_candidates']:,} rows = {m['inner_product_serving'] * 1e6 / c['n_candidates']:.0f} ns per row, against "
        f"{m['inner_product_numpy']:.3g} ms for numpy's gather + matvec ({r['fused_speedup_vs_numpy_gather']:.2f}x); "
        f"the copy-gather alone (np.take) takes {m['gather_only']:.3g} ms ({c['gather_gb_per_s']:.2g} GB/s against {c['scan_gb_per_s']:.3g} GB/s for a "
        f"sequential scan): each candidate is a {c['dim'] * 4}-byte row at a random place in a "
        f"{c['corpus_items'] * c['dim'] * 4 / 1e6:.0f} MB table, so the gather is random access (cache and TLB misses "
        f"once the table outgrows the caches) rather than a streaming read. The matvec on the already gathered, contiguous block takes "
        f"{m['inner_product_contiguous']:.3g} ms = {r['contiguous_vs_memory_scan']:.2f}x the scan of the same bytes. "
        f"Sorting the candidate ids before the gather: {m['inner_product_sorted_gather']:.3g} ms "
        f"({r['sorted_gather_vs_memory_scan']:.2f}x the scan).",
        f"- Coarse, teacher: the PFD+MD DNN runs {c['teacher_mlp_gflop']:.3g} GFLOP of matrix products per request "
        f"({c['teacher_gflop_per_s']:.3g} GFLOP/s end to end; the matrix products alone take {m['teacher_gemm_floor']:.4g} ms "
        f"of its {m['teacher_dnn']:.4g} ms). A path exactly as fast as the memory scan of the "
        f"gathered bytes would be {best:.0f}x faster than this teacher here (teacher / memory scan)"
        + (f": the 1000x goal would need the inner product to run {1000 / best:.2g}x faster than a plain scan of "
           "its own input, on this machine with these sizes." if best < 1000 else "."),
        f"- Fine: the CTR ranker's MLP is {f['mlp_gflop'] * 1e3:.3g} MFLOP at {f['n_candidates']} candidates; its matrix "
        f"products alone take {fm['gemm_floor']:.3g} ms in torch ({f['gflop_per_s']['gemm_floor']:.3g} GFLOP/s), eager runs the "
        f"whole model in {fm['torch_eager']:.3g} ms ({f['ratios']['eager_vs_gemm_floor']:.2f}x the floor) and ONNX Runtime in "
        f"{fm['onnxruntime']:.3g} ms ({f['ratios']['ort_vs_gemm_floor']:.2f}x the floor; target: within 1.1x). Eager's "
        "overhead over the fp32 matrix products is the most an fp32 runtime can remove, so the target of fine ranking "
        ">= 2x eager at equal quality needs cheaper FLOPs" + _int8_text(f) + ".",
    ]


def _int8_text(f: dict) -> str:
    q = f.get("variant_parity_max_abs_diff", {}).get("onnxruntime_int8_dynamic")
    t = f["timings_ms"].get("onnxruntime_int8_dynamic")
    if not isinstance(q, float) or t is None:
        return " (int8 not measured here)"
    return (f": int8 dynamic quantization runs in {t['median']:.3g} ms "
            f"({f['timings_ms']['torch_eager']['median'] / t['median']:.2f}x eager) and moves the probabilities by up "
            f"to {q:.2e}; equal quality is decided at export, on the trained models: test-day AUC within 0.0005 and "
            "calibration within 0.5 % of float32's, and the served top-50 overlapping float32's by >= 95 % on 1,000 "
            "users (else the bundle serves float32)")


def _write(out: Path, lines: list[str], res: dict, bounds_heading: str, notes=()) -> Path:
    """lines + the bounds section (and notes) + the model-cost plot -> out/report.md."""
    lines = lines + [bounds_heading, "", *bounds_text(res), *[f"- {n}" for n in notes], "",
                     "![model costs](bench.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------ `bench models`


def write_report(out: Path, res: dict) -> Path:
    mach, c, f = res["machine"], res["coarse"], res["fine"]
    lines = [
        "# Model-cost benchmark: coarse inner product vs teacher DNN vs memory scan; fine ONNX Runtime vs eager",
        "",
        f"Command: `{res['settings']['command']}`" if res["settings"].get("command") else "",
        "",
        _machine_line(mach),
        "",
        f"Threads: {res['settings']['threads']}. Each figure is the median over the timed repeats after warm-up "
        f"(repeats: {res['settings']['repeats']}); p10/p90 alongside. Wall time of the whole run: {res['settings']['wall_s']:.1f} s."
        + (" **Quick mode (small sizes): not the standard report.**" if res["settings"]["quick"] else ""),
        "",
        f"Models: coarse — {res['models']['coarse']['source']}; fine — {res['models']['fine']['source']}. "
        f"Vocabulary: {res['models']['vocab_source']} ({res['models']['n_items']:,} items). "
        "The costs measured here do not depend on the weights' values.",
        "",
        "## Targets",
        "",
        E.markdown_table(["target", "goal", "measured", "met", "missed by"], _target_rows(res["targets"])),
        "",
        "`missed by` is the factor between the goal and the measured value (e.g. 2x: the measured speed-up is half the goal).",
        "",
        f"## Coarse: {c['n_candidates']:,} candidates of one request",
        "",
        f"Item vectors: {c['corpus_items']:,} x {c['dim']} {c['dtype']} (the corpus), candidates drawn without replacement in "
        f"random (retrieval-like) order; the gathered block is {c['gathered_bytes'] / 1e6:.1f} MB. "
        "Serving path exactly as `recstack/serving/cascade.py` (`inner_products_by_idx`: FAISS reads each candidate's "
        "row in place and dots it with the user vector, no gathered copy, no BLAS call); numpy's "
        "`item_vectors[cands] @ user_vec` beside it. "
        f"Teacher: `coarse_rank.model.DNNTeacher` (PFD+MD, hidden {res['models']['coarse']['teacher_hidden']}, "
        f"{c['teacher_params']:,} parameters incl. the shared embeddings), eval mode, eager, `torch.no_grad()`, all "
        "candidates in one batch; the user's inputs are broadcast (the behaviour sequence is encoded once per request) "
        "and the interacted features are handed in precomputed (the teacher is not charged for computing them).",
        "",
        *coarse_tables(c),
        "",
        f"## Fine: CTR ranker on {f['n_candidates']} candidates of one request",
        "",
        f"`fine_rank.model.Ranker` (embedding dim {res['models']['fine']['emb_dim']}, hidden {res['models']['fine']['hidden']}) "
        "exported with `recstack.training.onnx.export_onnx` (opset 17) and run with `onnx_session(threads=1)`; eager is "
        "`model(**inputs)` under `torch.no_grad()`. Both are handed the same numpy inputs each call.",
        "",
        E.markdown_table(["runtime", "median ms", "p10 ms", "p90 ms", "repeats"], _timing_rows(f["timings_ms"])),
        "",
        f"ONNX Runtime / eager speed-up: {f['ratios']['fine_ort_speedup_vs_eager']:.2f}x; parity (max abs diff of the "
        f"probabilities): {f['parity_max_abs_diff']:.2e}.",
        "",
    ]
    return _write(out, lines, res, "## What bounds the measured ratios")


# ------------------------------------------------------------------ `bench all`


def _all_header(res: dict) -> list[str]:
    mach, st = res["machine"], res["settings"]
    t = res["models"]["teacher"]
    tm = t.get("metrics", {})
    return [
        "# recstack bench: coarse, fine, retrieval, serving path and end to end, in one run",
        "",
        f"Command: `{st['command']}`" if st.get("command") else "",
        "",
        _machine_line(mach, " (the machine is shared: compare ratios measured in this run)"),
        "",
        f"Threads: {st['threads']}; FAISS 1 OpenMP thread. Model figures are medians over the repeats after warm-up "
        f"(repeats: {st['repeats']}), the paths of one table timed round-robin (one call of each per round) so that "
        f"the machine's load changes hit them alike. Wall time of the whole run: {st['wall_s'] / 60:.1f} min."
        + (" **Quick mode (small sizes, seconds-long load runs): not the standard report.**" if st["quick"] else ""),
        "",
        f"Bundle: `{st['artifacts']}` on `{st['data_dir']}` ({res['models']['n_items']:,} items). Teacher (PFD+MD, "
        f"hidden {t['hidden']}, {t['manner']}): `{t['path']}`, {t['max_steps']} training steps"
        + (f", test-day AUC {tm['teacher_auc']:.4f}" if "teacher_auc" in tm else "")
        + f"; exported to ONNX with parity {t['onnx']['parity_max_abs_diff']:.2e} on its logits.",
        "",
        "## Targets",
        "",
        E.markdown_table(["target", "goal", "measured", "met", "missed by"], _target_rows(res["targets"]) + [
            [r["target"], "", r["measured"], "" if r.get("met") is None else ("yes" if r["met"] else "**no**"),
             "" if r.get("met") in (None, True) else r["verdict"]] for r in res["e2e"]["targets"]]),
        "",
    ]


def _changes_lines(s: dict) -> list[str]:
    """A before / after table, for results that carry one (`serving.changes`, written by the
    benchmark of an earlier commit); current runs measure the serving path as it is."""
    if not s.get("changes"):
        return []
    return ["Before / after of the serving path's changes, as recorded in these results:", "",
            E.markdown_table(["change", "before ms / request", "after ms / request", "speed-up"],
                             [[name, _ms(v["before_ms_per_request"]), _ms(v["after_ms_per_request"]), f"{v['speedup']:.2f}x"]
                              for name, v in s["changes"].items()]), ""]


def _serving_section(res: dict) -> list[str]:
    s, cs = res["serving"], res["coarse_stage_served"]
    return [
        "## Serving path in process",
        "",
        f"Per-stage time of the served cascade on the bundle ({s['n_requests']} test-day users, one request at a time, "
        f"{s['sizes']['retrieval_size']:,} -> {s['sizes']['coarse_size']} -> {s['sizes']['k']}; "
        f"{s['wall_ms_per_request']:.1f} ms wall per request"
        + (f", {s['cpu_ms_per_request']:.1f} ms CPU per request (process time, all threads; target <= 6 ms)"
           if "cpu_ms_per_request" in s else "")
        + (f"; coarse {s['precision']['coarse']} ({s['precision']['coarse_reason']}), fine {s['precision']['fine']}"
           if "precision" in s else "") + "):",
        "",
        E.markdown_table(["stage", "p50 ms", "p99 ms", "mean ms"],
                         [[k.replace("_ms", ""), _ms(v["p50"]), _ms(v["p99"]), _ms(v["mean"])] for k, v in s["stage_ms"].items()]),
        "",
        "Profile (cProfile over the same requests; the functions with the most own time, ms per request):",
        "",
        E.markdown_table(["function", "calls / request", "own ms", "cumulative ms"],
                         [[f"`{r['function']}`", f"{r['calls_per_request']:.1f}", f"{r['own_ms_per_request']:.3f}",
                           f"{r['cum_ms_per_request']:.3f}"] for r in s["profile_top"]]),
        "",
        *_changes_lines(s),
        f"Coarse stage as served ({cs['n_requests']} requests, {cs['candidates_mean']:,.0f} candidates on average): "
        f"inner product (user tower + fused product) p50 {_ms(cs['inner_product']['p50'])} ms / p99 "
        f"{_ms(cs['inner_product']['p99'])} ms; teacher DNN as coarse (item + interacted features, ONNX Runtime) p50 "
        f"{_ms(cs['teacher_dnn']['p50'])} ms / p99 {_ms(cs['teacher_dnn']['p99'])} ms: {cs['speedup_p50']:.0f}x.",
        "",
    ]


def _fine_parity(f: dict, k: str) -> str:
    if k == "onnxruntime":
        return f"{f['parity_max_abs_diff']:.2e}"
    v = f["variant_parity_max_abs_diff"].get(k)
    return f"{v:.2e}" if isinstance(v, float) else ""


def _models_sections(res: dict) -> list[str]:
    c, f = res["coarse"], res["fine"]
    return [
        f"## Coarse: {c['n_candidates']:,} candidates of one request",
        "",
        f"Item vectors: {c['corpus_items']:,} x {c['dim']} {c['dtype']}, candidates drawn without replacement in random "
        f"(retrieval-like) order; the gathered block is {c['gathered_bytes'] / 1e6:.1f} MB. The serving path is "
        "`recstack.serving.cascade.inner_products_by_idx`; numpy's `item_vectors[cands] @ user_vec` beside it. "
        "Teacher: the trained PFD+MD `DNNTeacher`, all candidates in one batch, the user's inputs broadcast (the "
        "behaviour sequence encoded once) and the interacted features handed in precomputed; in torch eager "
        "(`torch.no_grad()`) and exported to ONNX Runtime (serving session options).",
        "",
        *coarse_tables(c),
        "",
        f"## Fine: CTR ranker on {f['n_candidates']} candidates of one request",
        "",
        f"`fine_rank.model.Ranker` (embedding dim {res['models']['fine']['emb_dim']}, hidden {res['models']['fine']['hidden']}), "
        f"{res['models']['fine']['source']}; exported with `recstack.training.onnx.export_onnx` (opset 17); eager is "
        "`model(**inputs)` under `torch.no_grad()`; same numpy inputs each call.",
        "",
        E.markdown_table(["runtime", "median ms", "p10 ms", "p90 ms", "parity (max abs diff)"],
                         [[LABELS.get(k, k), fmt_ms(v["median"]), fmt_ms(v["p10"]), fmt_ms(v["p90"]), _fine_parity(f, k)]
                          for k, v in f["timings_ms"].items()]),
        "",
        f"ONNX Runtime / eager: {f['ratios']['fine_ort_speedup_vs_eager']:.2f}x; parity {f['parity_max_abs_diff']:.2e}."
        + "".join(f" {k}: {v}." for k, v in f["variant_parity_max_abs_diff"].items() if isinstance(v, str)),
        "",
    ]


def _retrieval_section(rv: dict) -> list[str]:
    return [
        "## Retrieval: the serving default's recall / latency point",
        "",
        f"The bundle's index ({rv['index']}, {rv['search_params'] or 'no search parameters'}) over {rv['n_items']:,} "
        f"items (dim {rv['dim']}) against exact inner-product search (IndexFlatIP) on the same item embeddings; "
        f"{rv['n_queries']} real test-day queries (the bundle's retrieval tower), one query per call, 1 thread, same run.",
        "",
        E.markdown_table(["k", "recall@k (mean)", "min", "ANN p50 / p99 ms", "exact p50 / p99 ms", "speed-up (p50)"],
                         [[f"{p['k']:,}", f"{p['recall']:.4f}", f"{p['recall_min']:.3f}",
                           f"{_ms(p['ann_ms_p50'])} / {_ms(p['ann_ms_p99'])}",
                           f"{_ms(p['exact_ms_p50'])} / {_ms(p['exact_ms_p99'])}", f"{p['speedup_p50']:.1f}x"]
                          for p in rv["points"]]),
        "",
    ]


def write_report_all(out: Path, res: dict) -> Path:
    lines = [
        *_all_header(res),
        *_serving_section(res),
        *_models_sections(res),
        *_retrieval_section(res["retrieval"]),
        *e2e_report.report_lines(res["e2e"]),
        "",
        "Plots: `bench.png` (model costs), `<config>_fixed.png` and `<config>_sweep.png` (latency over time at the "
        "fixed QPS; the sweep).",
        "",
    ]
    return _write(out, lines, res, "## What bounds the measured figures", res.get("notes", []))
