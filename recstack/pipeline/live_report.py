"""The live loop's figures: one line per day as it runs, the summary over the days, the plot.

Per day and arm the replay gives per-request means with 95 % t intervals (expected GMV under the
truth, realised GMV, CTR, conversions). The arms serve disjoint users, so the day's B − A
difference gets a Welch interval from the two means, standard deviations and counts; over the
days, `paired_diff` pairs each day's two arms (the same day, the same world state).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

from recstack.evaluation.protocol import paired_diff

METRICS = ("expected_gmv", "gmv", "ctr", "conversions")
AUC_KEYS = (("retrieval", "auc"), ("coarse", "auc"), ("fine", "ctr_auc"), ("fine", "cvr_auc"))
CALIBRATION_KEYS = ("ctr_calibration", "cvr_calibration")  # the fine heads' mean prediction / label rate


def _ctr_cvr(ctr: float, cvr: float) -> str:
    """"CTR 1.02, CVR 0.97", "n/a" for a ratio that is not finite."""
    return ", ".join(f"{name} {v:.2f}" if math.isfinite(v) else f"{name} n/a" for name, v in (("CTR", ctr), ("CVR", cvr)))


def calibration(auc: dict, model: str) -> str:
    """"CTR 1.02, CVR 0.97": the fine heads' calibration on the day's log, "n/a" where not scored."""
    return _ctr_cvr(*(auc[model]["fine"].get(k, math.nan) for k in CALIBRATION_KEYS))


def truth_calibration(by_arm: dict | None) -> str:
    """"A CTR 1.32, CVR 0.89; B CTR 0.97, CVR 0.92": each arm's served heads against the world's
    true probabilities on the items it served (the replay's `calibration_vs_truth`); "n/a"
    where the replay did not record it."""
    arms = by_arm or {}
    return "; ".join(f"{arm} " + _ctr_cvr(*((arms.get(arm) or {}).get(k, math.nan) for k in ("ctr", "cvr")))
                     for arm in ("A", "B"))


def welch(b: dict, a: dict, level: float = 0.95) -> dict:
    """B − A with a Welch t interval, from two `mean_ci` dicts of independent samples."""
    va, vb = a["sd"] ** 2 / a["n"], b["sd"] ** 2 / b["n"]
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (a["n"] - 1) + vb ** 2 / (b["n"] - 1)) if va + vb > 0 else 1.0
    half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
    d = b["mean"] - a["mean"]
    return {"mean": d, "ci95": [d - half, d + half]}


def failed_calls(day: dict) -> int:
    """Every failed call of the day: both arms' Rank and LogEvents, and the Reload probe's."""
    n = sum(sum(r["failed"].values()) for r in day["arms"].values())
    return n + sum(day["reload"]["probe_failed"].values())


def day_line(day: dict, resumed: bool = False) -> str:
    a, b = (day["arms"][x]["per_request"]["expected_gmv"] for x in ("A", "B"))
    diff = welch(b, a)
    auc = day["auc"]
    return (f"day {day['world_day']:>2} (live {day['live_day']}){' [done before]' if resumed else ''}: "
            f"E[GMV]/req A {a['mean']:.3f} B {b['mean']:.3f} (B-A {diff['mean']:+.3f} "
            f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]) | AUC on B's log, served/frozen: "
            f"fine ctr {auc['served']['fine']['ctr_auc']:.3f}/{auc['frozen']['fine']['ctr_auc']:.3f} "
            f"coarse {auc['served']['coarse']['auc']:.3f}/{auc['frozen']['coarse']['auc']:.3f} | "
            f"fine calibration served {calibration(auc, 'served')}, against the truth "
            f"{truth_calibration({x: day['arms'][x].get('calibration_vs_truth') for x in ('A', 'B')})} | "
            f"trained on {day['trained']['fine']['rows']} rows | {day['version']} reloaded under "
            f"{day['reload']['probe_calls']} probe calls, {failed_calls(day)} failed | {day['timings_s']['total']:.0f}s")


def summarise(days: list[dict], meta: dict) -> dict:
    """results.json: per-day rows, the differences, the paired difference over days."""
    rows = []
    for day in days:
        arms = {arm: {m: day["arms"][arm]["per_request"][m] for m in METRICS} for arm in ("A", "B")}
        rows.append({"live_day": day["live_day"], "world_day": day["world_day"], "arms": arms,
                     "requests": {arm: day["arms"][arm]["requests"] for arm in ("A", "B")},
                     "diff_b_minus_a": {m: welch(arms["B"][m], arms["A"][m]) for m in METRICS},
                     "truth_calibration": {arm: day["arms"][arm].get("calibration_vs_truth") for arm in ("A", "B")},
                     "auc": day["auc"], "trained_rows": {s: day["trained"][s].get("rows") for s in day["trained"]},
                     "logged_rows": day["logged_rows"], "served_mix": day.get("served_mix"), "version": day["version"],
                     "reload": day["reload"],
                     "failed_calls": failed_calls(day), "timings_s": day["timings_s"]})
    over_days = {m: paired_diff([r["arms"]["B"][m]["mean"] for r in rows], [r["arms"]["A"][m]["mean"] for r in rows])
                 for m in METRICS} if rows else {}
    return {**meta, "days": rows, "over_days_b_minus_a": over_days,
            "failed_calls_total": int(sum(r["failed_calls"] for r in rows))}


def plot(summary: dict, path: str | Path) -> Path:
    """Online E[GMV] per request per day with 95 % CIs for both arms; next-day AUC per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["days"]
    x = np.array([r["world_day"] for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, off, color, label in (("A", -0.08, "C0", "A: frozen day-0 bundle"), ("B", 0.08, "C1", "B: retrained daily")):
        m = [r["arms"][arm]["expected_gmv"] for r in rows]
        mean = np.array([v["mean"] for v in m])
        err = np.array([[v["mean"] - v["ci_low"] for v in m], [v["ci_high"] - v["mean"] for v in m]])
        ax1.errorbar(x + off, mean, yerr=err, fmt="o-", capsize=3, color=color, label=label)
    ax1.set(title="online GMV per request, expected under the truth (95% CI)", xlabel="world day (live)",
            ylabel="E[GMV] / request", xticks=x)
    ax1.legend(fontsize=7)
    for i, (stage, key) in enumerate(AUC_KEYS):
        name = f"{stage} {key.replace('_auc', '').upper() if stage == 'fine' else ''}".strip()
        ax2.plot(x, [r["auc"]["served"][stage][key] for r in rows], "o-", color=f"C{i}", label=f"{name}: served (B)")
        ax2.plot(x, [r["auc"]["frozen"][stage][key] for r in rows], "s--", color=f"C{i}", alpha=0.6,
                 label=f"{name}: frozen day 0")
    ax2.set(title="AUC on the day's B log, before training on it", xlabel="world day (live)", ylabel="AUC", xticks=x)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def markdown(summary: dict) -> str:
    """The per-day table of report.md: both arms' per-request figures, B − A, next-day AUCs."""
    def ci(v: dict) -> str:
        return f"{v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"

    def d(v: dict) -> str:
        return f"{v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"

    lines = ["| day | requests A / B | E[GMV]/req A | E[GMV]/req B | B − A E[GMV] | GMV/req B − A | CTR A / B | "
             "conv./req A / B | AUC served / frozen: retrieval, coarse, fine CTR, fine CVR | "
             "fine calibration (mean pred / rate), served; frozen | served heads against the truth (mean pred / true p) | "
             "rows trained | reload: probe calls, failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["days"]:
        a, b, diff = r["arms"]["A"], r["arms"]["B"], r["diff_b_minus_a"]
        aucs = ", ".join(f"{r['auc']['served'][s][k]:.3f} / {r['auc']['frozen'][s][k]:.3f}" for s, k in AUC_KEYS)
        lines.append(f"| {r['world_day']} | {r['requests']['A']} / {r['requests']['B']} | {ci(a['expected_gmv'])} | "
                     f"{ci(b['expected_gmv'])} | {d(diff['expected_gmv'])} | {d(diff['gmv'])} | "
                     f"{a['ctr']['mean']:.4f} / {b['ctr']['mean']:.4f} | {a['conversions']['mean']:.4f} / "
                     f"{b['conversions']['mean']:.4f} | {aucs} | {calibration(r['auc'], 'served')}; "
                     f"{calibration(r['auc'], 'frozen')} | {truth_calibration(r.get('truth_calibration'))} | {r['trained_rows']['fine']} | "
                     f"{r['reload']['probe_calls']}, {r['failed_calls']} |")
    return "\n".join(lines)


def concentration(log_dir: str | Path, prefix: str, since: float) -> dict:
    """What one arm served in a day's replay (the rows of request ids starting with `prefix`,
    logged at or after `since`): distinct items, the share of the
    impressions on its 100 most shown items, and the mean item price: a feedback loop that
    narrows what is shown shows up here first."""
    from recstack.pipeline.live_data import day_rows

    rows = day_rows(log_dir, prefix, since)
    items = rows.get("item_id", np.zeros(0, np.int64))
    if not len(items):
        return {"impressions": 0}
    counts = np.sort(np.bincount(items))[::-1]
    sources, n_source = np.unique(rows["source"].astype(str), return_counts=True)
    return {"impressions": int(len(items)), "distinct_items": int((counts > 0).sum()),
            "top100_share": float(counts[:100].sum() / len(items)), "mean_price": float(np.mean(rows["price"])),
            "mean_pctr": float(np.mean(rows["pctr"])), "mean_pcvr": float(np.mean(rows["pcvr"])),
            "sources": {str(k): float(v / len(items)) for k, v in zip(sources, n_source)}}
