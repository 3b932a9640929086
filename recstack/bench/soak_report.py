"""The soak's results: the summary of a run (calls, failures, per-minute p99, RSS drift per
server life), its plot and its report (`recstack bench soak`, `recstack.bench.soak`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def summarise(tally, servers, duration_s: float, config: dict) -> dict:
    """The results of a run from its `Tally` and its `Server`s (recstack.bench.soak)."""
    per_minute = []
    lat = np.array(tally.latencies) if tally.latencies else np.zeros((0, 2))
    for m in range(int(np.ceil(duration_s / 60.0))):
        sel = lat[(lat[:, 0] >= 60 * m) & (lat[:, 0] < 60 * (m + 1)), 1] if len(lat) else np.zeros(0)
        per_minute.append({"minute": m, "rank_ok": int(len(sel)),
                           "p50_ms": float(np.percentile(sel, 50)) if len(sel) else None,
                           "p99_ms": float(np.percentile(sel, 99)) if len(sel) else None})
    lives = []
    for s in servers:
        for life in s.lives:
            lives.append({"server": life.name, "pid": life.pid, "ready_s": life.ready_s, "exit_code": life.exit_code,
                          "drain_s": life.drain_s, "rss_drift": life.drift(),
                          "rss_mb": [(round(t - tally.started, 1), round(r / 2**20, 1)) for t, r in life.rss]})
    failed = sum(c["failed"] for c in tally.calls.values())
    total = sum(c["ok"] + c["failed"] for c in tally.calls.values())
    drifts = [lf["rss_drift"]["drift"] for lf in lives if lf["rss_drift"]]
    return {
        "config": config,
        "calls": tally.calls,
        "total_calls": total,
        "failed_calls": failed,
        "failures": tally.failures,
        "events": tally.events,
        "per_minute": per_minute,
        "lives": lives,
        "max_abs_rss_drift": max((abs(d) for d in drifts), default=None),
        "targets": {"failed_calls_0": failed == 0,
                    "rss_drift_under_5pct": bool(drifts) and max(abs(d) for d in drifts) < 0.05},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    pm = [p for p in results["per_minute"] if p["p99_ms"] is not None]
    a1.plot([p["minute"] + 0.5 for p in pm], [p["p99_ms"] for p in pm], "o-", label="p99")
    a1.plot([p["minute"] + 0.5 for p in pm], [p["p50_ms"] for p in pm], "s--", label="p50")
    a1.set_ylabel("Rank latency, client side (ms)")
    a1.legend()
    for life in results["lives"]:
        if life["rss_mb"]:
            t, r = zip(*life["rss_mb"])
            a2.plot(np.array(t) / 60.0, r, label=f"{life['server']} pid {life['pid']}")
    a2.set_ylabel("server RSS (MiB)")
    a2.set_xlabel("minute")
    a2.legend(fontsize=7)
    for t, what in results["events"]:
        if what.startswith("SIGTERM"):
            for ax in (a1, a2):
                ax.axvline(t / 60.0, color="red", alpha=0.3)
    a1.set_title("soak: p99 per minute (red: SIGTERM + restart of one server)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict, mix: tuple, call_budget_s: float) -> str:
    """report.md; `mix` the traffic mix ((kind, share), ...) and `call_budget_s` a call's time budget."""
    c = results["config"]
    lines = [
        "# Soak: the service under reloads and restarts",
        "",
        f"Command: `{c['command']}`" if c["command"] else "",
        "",
        f"{c['minutes']:g} minutes; two `recstack serve` processes ({c['server_threads']} threads each, grace "
        f"{c['grace_s']:g} s) on a bundle of {c['n_items']} items / {c['n_users']} users; {c['client_threads']} client "
        f"threads at ~{c['qps']:g} calls/s in all (Rank {mix[0][1]:.0%}, health {mix[1][1]:.0%}, GetModelInfo "
        f"{mix[2][1]:.0%}, bad requests {mix[3][1]:.0%}); Reload of both servers every {c['reload_every_s']:g} s "
        f"alternating between two versions; SIGTERM + restart of one server every {c['restart_every_min']:g} min.",
        "",
        "A call **failed** when, after the client's retries (a call refused UNAVAILABLE by a server that is "
        f"draining or down is sent to the other one, within a {call_budget_s:g} s budget; the client routes to "
        "servers whose last health poll said SERVING), its outcome is not the expected one: Rank OK with the "
        "requested number of distinct items, finite scores and a known version; health answered; GetModelInfo OK; "
        "a bad request INVALID_ARGUMENT; Reload OK; SIGTERM followed by exit 0 within grace + 10 s; a restarted "
        "server SERVING within 120 s.",
        "",
        "## Calls",
        "",
        "| kind | ok | failed | retried on the other server |",
        "|---|---:|---:|---:|",
    ]
    for kind, v in sorted(results["calls"].items()):
        lines.append(f"| {kind} | {v['ok']} | {v['failed']} | {v['retried']} |")
    lines += ["", f"**Failed calls: {results['failed_calls']} of {results['total_calls']}** (target 0).", ""]
    if results["failures"]:
        lines += ["First failures:", ""] + [f"- t={f['t_s']} s {f['kind']}: {f['why']}" for f in results["failures"][:10]]
        lines.append("")
    lines += ["## Server lives (RSS drift: mean of the first vs the last minute, after a 30 s warm-up)", "",
              "| server | pid | ready after (s) | exit code | drain (s) | RSS first (MiB) | RSS last (MiB) | drift |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lf in results["lives"]:
        d = lf["rss_drift"]
        lines.append(f"| {lf['server']} | {lf['pid']} | {lf['ready_s'] or 0:.1f} | {lf['exit_code']} | "
                     f"{lf['drain_s'] or 0:.2f} | " + (f"{d['first_mb']:.1f} | {d['last_mb']:.1f} | {d['drift']:+.2%} |"
                                                        if d else "- | - | (life too short) |"))
    md = results["max_abs_rss_drift"]
    lines += ["", f"Largest RSS drift: {md:+.2%} (target < 5 %)." if md is not None else
              "No server life was long enough to measure RSS drift.", "",
              "## Rank latency per minute (client side, OK calls)", "", "| minute | calls | p50 ms | p99 ms |",
              "|---:|---:|---:|---:|"]
    for p in results["per_minute"]:
        lines.append(f"| {p['minute']} | {p['rank_ok']} | "
                     + (f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} |" if p["p99_ms"] is not None else "- | - |"))
    lines += ["", "![soak](soak.png)", ""]
    return "\n".join(lines)
