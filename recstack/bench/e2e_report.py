"""The end-to-end benchmark's targets and its report: `check_targets` (each target against what
`recstack.bench.e2e` measured, with its verdict) and `report_lines` (the markdown of one run)."""
from __future__ import annotations

TARGETS = {"p99_at_50qps_ms": 25.0, "best_qps_p99_50ms": 150.0, "throughput_ratio": 10.0, "gmv_retained": 0.95}


def _p(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def _sat(c: dict | None) -> float | None:
    return (c or {}).get("saturation", {}).get("achieved_qps") if c else None


def check_targets(configs: dict, gmv: dict | None = None) -> list[dict]:
    """-> rows {target, measured, verdict, met} for the end-to-end targets."""
    rows = []
    c1 = configs.get("cascade_w1") or {}
    best = max((c.get("sweep", {}).get("best_qps", 0.0) for n, c in configs.items() if n.startswith("cascade")),
               default=0.0)
    if c1.get("fixed"):
        p99 = c1["fixed"]["latency_ms"]["p99"]
        t = TARGETS["p99_at_50qps_ms"]
        met = p99 is not None and p99 <= t
        rows.append({"target": f"p99 <= {t:.0f} ms at {c1['fixed']['offered_qps']:.0f} QPS (1 worker)",
                     "measured": f"{_p(p99)} ms", "met": met,
                     "verdict": ("met" if met else f"missed by {p99 - t:.1f} ms ({p99 / t:.2f}x)" if p99
                                 else "missed (no OK calls)")})
    if any(n.startswith("cascade") and c.get("sweep") for n, c in configs.items()):
        t = TARGETS["best_qps_p99_50ms"]
        rows.append({"target": f"highest QPS with p99 <= 50 ms >= {t:.0f} (best of the cascade configs)",
                     "measured": f"{best:.1f} QPS", "met": best >= t,
                     "verdict": "met" if best >= t else f"missed by {t - best:.1f} QPS ({best / t:.2f} of target)"})
    t = TARGETS["throughput_ratio"]
    for peer, label in (("single_stage_w1", "single-stage"), ("teacher_coarse_w1", "teacher-as-coarse")):
        ca, pa = _sat(c1), _sat(configs.get(peer))
        if ca is None or pa is None:
            continue
        ratio = ca / pa if pa > 0 else float("inf")
        row = {"target": f"cascade vs {label} throughput (1 worker each, saturation OK QPS)",
               "measured": f"{ca:.1f} / {pa:.1f} = {ratio:.1f}x"}
        if peer == "single_stage_w1":
            row["target"] = f"cascade >= {t:.0f}x the {label} throughput (1 worker each, saturation OK QPS)"
            row.update(met=ratio >= t, verdict="met" if ratio >= t else f"missed: {ratio:.1f}x of {t:.0f}x")
        else:
            row.update(met=None, verdict="(no target: the peer the PFD paper compares against)")
        rows.append(row)
    single_cpu = ((configs.get("single_stage_w1") or {}).get("fixed") or {}).get("server_cpu_ms_per_ok")
    for name, c in configs.items():
        cpu = (c.get("fixed") or {}).get("server_cpu_ms_per_ok")
        if name.startswith("cascade") and c.get("workers") == 1 and cpu and single_cpu:
            ratio = single_cpu / cpu
            rows.append({"target": f"{name} >= {t:.0f}x the single-stage throughput in server CPU per answered request "
                                   f"(fixed-QPS runs, gRPC included)", "measured": f"{single_cpu:.1f} / {cpu:.1f} = {ratio:.1f}x",
                         "met": ratio >= t, "verdict": "met" if ratio >= t else f"missed: {ratio:.1f}x of {t:.0f}x"})
    g = TARGETS["gmv_retained"]
    kept = [("cascade", (gmv or {}).get("retained"))]
    kept += [(f"cascade at coarse {c}", x.get("retained")) for c, x in (gmv or {}).get("cascade_at", {}).items()]
    for label, r in kept:
        if r is not None:
            rows.append({"target": f"{label} keeps >= {g:.0%} of the single stage's GMV@50", "measured": f"{r:.3f}",
                         "met": r >= g, "verdict": "met" if r >= g else f"missed by {g - r:.3f}"})
    return rows


def gmv_lines(g: dict) -> list[str]:
    """Markdown for the GMV@50 part (`g`: `recstack.bench.e2e.gmv_retained`'s dict)."""
    lines = ["", f"GMV@{g['k']} against the world's truth ({g['n_users']} test-day users, i2i share {g['i2i_share']}; "
              "share of the oracle top-50's true expected GMV; in process through the serving code):", "",
              "| server | GMV@50 share | s.e. | oracle top-50 kept: retrieved / after coarse / served | "
              "ms / request in process |", "|---|---|---|---|---|"]
    rec = g.get("recall", {})

    def _rec(name: str) -> str:
        r = rec.get(name)
        return f"{r['recall_retrieval']:.3f} / {r['recall_coarse']:.3f} / {r['recall_served']:.3f}" if r else ""

    lines += [f"| cascade 10,000 -> 500 -> 50 | {g['cascade_gmv_share']:.4f} | {g['cascade_gmv_share_se']:.4f} | "
              f"{_rec('cascade')} | {g['cascade_ms_in_process']:.1f} |",
              f"| single stage 10,000 -> 10,000 -> 50 | {g['single_stage_gmv_share']:.4f} | "
              f"{g['single_stage_gmv_share_se']:.4f} | {_rec('single_stage')} | {g['single_stage_ms_in_process']:.1f} |"]
    for c, x in g.get("cascade_at", {}).items():
        lines.append(f"| cascade 10,000 -> {int(c):,} -> 50 | {x['gmv_share']:.4f} | {x['gmv_share_se']:.4f} | | "
                     f"{x['ms_in_process']:.1f} |")
    if "teacher_coarse_gmv_share" in g:
        lines.append(f"| teacher as coarse 10,000 -> 500 -> 50 | {g['teacher_coarse_gmv_share']:.4f} | "
                     f"{g['teacher_coarse_gmv_share_se']:.4f} | {_rec('teacher_coarse')} | "
                     f"{g['teacher_coarse_ms_in_process']:.1f} |")
    ratios = []
    if g.get("retained") is not None:
        ratios.append(f"cascade / single stage {g['retained']:.3f}")
    ratios += [f"cascade at coarse {c} / single stage {x['retained']:.3f}" for c, x in g.get("cascade_at", {}).items()
               if x.get("retained") is not None]
    if g.get("cascade_vs_teacher_coarse") is not None:
        ratios.append(f"cascade / teacher as coarse {g['cascade_vs_teacher_coarse']:.3f}")
    if ratios:
        lines += ["", "GMV@50 retained: " + "; ".join(ratios) + "."]
    return lines


def report_lines(res: dict, heading: str = "##") -> list[str]:
    """Markdown for the end-to-end part of a report (`res`: run_e2e's dict)."""
    h = heading
    lines = [f"{h} End to end through gRPC ({res['n_items']:,} items)" if res.get("n_items") else f"{h} End to end through gRPC",
             "", f"Bundle `{res['artifacts']}`, corpus `{res['data']}`; server and load generator on this host (loopback); "
             f"load average before {res['loadavg_before']}, after {res.get('loadavg_after')}.", "",
             "| config | sizes (retr -> coarse -> k) | offered QPS | achieved | p50 | p90 | p99 | max (ms) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        f, s = c.get("fixed"), c["sizes"]
        if not f:
            if c.get("error"):
                lines.append(f"| {c['name']} | | | | | | | | error: {c['error']} |")
            continue
        lat = f["latency_ms"]
        lines.append(f"| {c['name']} | {s['retrieval_size']} -> {s['coarse_size']} -> {s['k']} | {f['offered_qps']:.0f} | "
                     f"{f['achieved_qps']:.1f} | {_p(lat['p50'])} | {_p(lat['p90'])} | {_p(lat['p99'])} | "
                     f"{_p(lat['max'])} | {f['status']} |")
    lines += ["", "Per-stage server timings at the fixed QPS (ms, p50 / p99), and the server processes' CPU per "
              "answered request over that run (ms; gRPC and protobuf included, the load generator not):", "",
              "| config | features | retrieval | coarse | fine | total | server CPU / request |",
              "|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        st = (c.get("fixed") or {}).get("server_stage_ms") or {}
        if st:
            lines.append(f"| {c['name']} | " + " | ".join(f"{_p(st[s]['p50'])} / {_p(st[s]['p99'])}" for s in
                                                         ("features", "retrieval", "coarse", "fine", "total"))
                         + f" | {_p(c['fixed'].get('server_cpu_ms_per_ok'))} |")
    lines += ["", f"Sweep (highest offered QPS with p99 <= {res['p99_bound_ms']:.0f} ms) and saturation "
              "(offered far above capacity; throughput = OK answers per second):", "",
              "| config | best QPS | first failing | saturation: offered | achieved OK QPS | p99 (ms) | status |",
              "|---|---|---|---|---|---|---|"]
    for c in res["configs"]:
        sw, sa = c.get("sweep"), c.get("saturation")
        if sw and sa:
            lines.append(f"| {c['name']} | {sw['best_qps']:.1f} | {sw['first_failing_qps']} | {sa['offered_qps']:.0f} | "
                         f"{sa['achieved_qps']:.1f} | {_p(sa['latency_ms']['p99'])} | {sa['status']} |")
    lines += ["", "Sweep steps (offered -> p50 / p99 ms):", ""]
    for c in res["configs"]:
        if c.get("sweep"):
            runs = ", ".join(f"{r['offered_qps']:.1f} -> {_p(r['latency_ms']['p50'])} / {_p(r['latency_ms']['p99'])} "
                             f"{'ok' if r['passed'] else 'FAIL'}" for r in c["sweep"]["runs"])
            lines.append(f"- {c['name']}: {runs}")
    if res.get("gmv"):
        lines += gmv_lines(res["gmv"])
    c1 = next((c for c in res["configs"] if c["name"] == "cascade_w1" and c.get("fixed")), None)
    if c1 and c1["fixed"].get("server_stage_ms") and c1["fixed"]["latency_ms"]["p50"] is not None:
        lat, srv = c1["fixed"]["latency_ms"], c1["fixed"]["server_stage_ms"]["total"]
        lines += ["", f"cascade_w1 at {c1['fixed']['offered_qps']:.0f} QPS: client-side p50 / p99 {_p(lat['p50'])} / "
                  f"{_p(lat['p99'])} ms against the server's own total {_p(srv['p50'])} / {_p(srv['p99'])} ms: gRPC, "
                  f"queueing and the client add {lat['p50'] - srv['p50']:.1f} ms at p50 and "
                  f"{lat['p99'] - srv['p99']:.1f} ms at p99."]
    lines += ["", "End-to-end targets:", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in res["targets"]]
    return lines
