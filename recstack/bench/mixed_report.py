"""The markdown of `recstack bench mixed` (recstack.bench.mixed): its mixed.json as a report."""
from __future__ import annotations


def _ms(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _rank_row(name: str, r: dict) -> str:
    lat = r["latency_ms"]
    failed = r["sent"] - r["status"].get("OK", 0)
    return (f"| {name} | {r['offered_qps']:.0f} | {r['achieved_qps']:.1f} | {r['sent']} | {failed} | "
            f"{_ms(lat['p50'])} | {_ms(lat['p90'])} | {_ms(lat['p99'])} | {_ms(lat['max'])} |")


def _phases(p: dict | None) -> str:
    return "-" if not p else ", ".join(str(p[k]) for k in ("rank_only_start", "mixed_start", "end"))


def _cpu_line(c: dict | None) -> str:
    if not c:
        return ""
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return ("CPU cores used on average (from /proc): the server "
            f"{f(c['rank_only'].get('server'))} in phase 1, {f(c['mixed'].get('server'))} in phase 2; the load "
            f"tester and event sender process {f(c['rank_only'].get('client'))} and {f(c['mixed'].get('client'))}.")


def _warmup(w: dict | None) -> str:
    if not w:
        return "No warm-up: phase 1 started on the fresh server."
    return (f"Before phase 1, {w['duration_s']:g} s of the same Rank load warmed the fresh server up (not in the table "
            f"below): {w['sent']} calls, status {w['status']}, p99 {_ms(w['latency_ms']['p99'])} ms.")


def report(res: dict) -> str:
    cfg, ev, t = res["config"], res["events"], res["targets"]
    back, size = res.get("readback") or {}, res.get("store_size") or {}
    p99 = t["rank_p99_ms"]
    ratio = p99["mixed"] / p99["rank_only"] if p99["rank_only"] and p99["mixed"] else None
    lines = [
        "# Mixed load: Rank under event ingestion",
        "",
        f"Command: `{res.get('command') or 'recstack bench mixed'}`",
        "",
        f"One `recstack serve` process (4 RPC threads) on `{res['artifacts']}`, feature store `{res['store']}`, "
        f"impression log off. Phase 1: Rank alone at {cfg['qps']:g} QPS for {cfg['duration_s']:g} s (open loop, "
        f"users from the test day of `{res['data']}`). Phase 2, right after, same server: the same Rank load with "
        f"LogEvents beside it at {cfg['events_per_s']:g} events/s in batches of {cfg['batch']} "
        f"({cfg['events_per_s'] / cfg['batch']:g} calls/s). Latencies are client-side, from each call's scheduled "
        "send time.",
        "",
        f"Load conditions: {res.get('cpus')} CPUs, shared with other work; load average (1/5/15 min) "
        f"{res.get('loadavg_before')} before and {res.get('loadavg_after')} after. The load tester, the event "
        "sender and the server all ran on this machine. Load average at the start of phase 1, of phase 2 and at "
        f"the end: {_phases(res.get('loadavg_phases'))}.",
        "",
        "## Rank",
        "",
        _warmup(res.get("warmup")),
        "",
        "| phase | offered QPS | achieved QPS | calls | failed | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        _rank_row("Rank only", res["rank_only"]),
        _rank_row("Rank + LogEvents", res["mixed"]),
        "",
        f"p99 under mixed load / p99 under Rank-only load: {'-' if ratio is None else f'{ratio:.2f}'}.",
        "",
        _cpu_line(res.get("cpu_cores_used")),
        "",
        "## LogEvents",
        "",
        "| offered events/s | calls | failed | events sent | acknowledged | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {ev['offered_events_per_s']:g} | {ev['calls_sent']} | {ev['failed_calls']} | {ev['events_sent']} | "
        f"{ev['events_acknowledged']} | {_ms(ev['latency_ms']['p50'])} | {_ms(ev['latency_ms']['p90'])} | "
        f"{_ms(ev['latency_ms']['p99'])} | {_ms(ev['latency_ms']['max'])} |",
        "",
        f"Status counts: {ev['status']}; refused attempts sent again: {ev.get('retried', {})}; late sends (more "
        f"than 1 ms after their due time): {ev['late_sends']}.",
        "",
        "## The store afterwards",
        "",
        f"Acknowledged events looked up: {back.get('acknowledged', '-')}; expected readable (newest "
        f"{back.get('per_user_bound', '-')} per user): {back.get('expected_readable', '-')}; readable: "
        f"{back.get('readable', '-')}; missing: {back.get('missing', '-')}.",
        f"Store size after the run: {size}. Server exit code after SIGTERM: {res.get('server_exit')}.",
        "",
        "## Targets",
        "",
        f"- 0 failed calls: {'met' if t['zero_failed_calls'] else 'NOT met'} (Rank failed "
        f"{t['rank_failed_calls']}, LogEvents failed {t['log_events_failed_calls']})",
        f"- every acknowledged event readable: {'met' if t['acknowledged_all_readable'] else 'NOT met'}",
        f"- Rank p99: {_ms(p99['rank_only'])} ms alone, {_ms(p99['mixed'])} ms under mixed load (reported, no bound)",
        "",
    ]
    return "\n".join(lines)
