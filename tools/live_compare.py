"""Compare `recstack live` runs made on the same simulated world, request by request.

    python tools/live_compare.py --runs plain=runs/live_a,distil=runs/live_b --base plain \
        --world runs/live_a/world --out docs/results/live/compare

Every run replays the same seeded sessions of each arm (the same users and times), so each
request's expected GMV under the truth (the sum of true pCTR x pCVR x price over the items it
served, read back from the arm's impression log) pairs across runs by session id: per arm and
day, run − base with a 95 % normal interval over the day's paired requests, and over the days a
paired t interval of the daily means.

Also per run, arm and day, the served fine heads against the truth on the items served (CTR:
mean predicted / mean true pCTR; CVR weighted by the true pCTR, as
`recstack.pipeline.replay.calibration_vs_truth`), and once per world the frozen day-0 fine heads
scored on the simulator's own log of each live day (its own exposure policy and full browsing,
no recstack server in the loop): whether the world itself drifts from the day-0 models.

Writes `compare.json` and `compare.png` into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from recstack.evaluation.protocol import paired_diff
from recstack.pipeline import warm
from recstack.pipeline.live_data import day_rows
from recstack.pipeline.replay import calibration_vs_truth
from recstack.world.truth import Truth


def served(run: Path, arm: str, day: dict) -> dict[str, np.ndarray]:
    """The impression-log rows an arm served on a live day's replay."""
    rep = json.loads((run / "days" / f"d{day['live_day']:02d}" / "replay.json").read_text())
    return day_rows(run / "arms" / arm / "live_log", rep.get("prefix", f"replay-d{day['world_day']}-"), rep["since"])


def per_request_gmv(rows: dict, truth: Truth, world_day: int) -> dict[str, float]:
    """replayed session ("s<id>", the request id's last part: the runs' prefixes may differ) ->
    the expected GMV of what its request served, under the truth."""
    g = truth.expected_gmv(np.asarray(rows["user_id"]), np.asarray(rows["item_id"])[:, None], world_day)[:, 0]
    sessions = np.array([r.rsplit("-", 1)[-1] for r in np.asarray(rows["request_id"]).astype(str).tolist()])
    keys, inv = np.unique(sessions, return_inverse=True)
    return dict(zip(keys.tolist(), np.bincount(inv, weights=g).tolist()))


def truth_calibration(rows: dict, truth: Truth, world_day: int) -> dict:
    u, i = np.asarray(rows["user_id"]), np.asarray(rows["item_id"])[:, None]
    p, q = truth.pctr(u, i, world_day)[:, 0], truth.pcvr(u, i, world_day)[:, 0]
    pc, pv = np.asarray(rows["pctr"], np.float64), np.asarray(rows["pcvr"], np.float64)
    return calibration_vs_truth(pc.sum(), p.sum(), (p * pv).sum(), (p * q).sum())


def paired_day(base: dict[str, float], other: dict[str, float]) -> dict:
    common = sorted(set(base) & set(other))
    d = np.array([other[k] - base[k] for k in common])
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"n": len(common), "base": float(np.mean([base[k] for k in common])),
            "run": float(np.mean([other[k] for k in common])), "diff": float(d.mean()),
            "ci95": [float(d.mean() - 1.96 * se), float(d.mean() + 1.96 * se)]}


def compare(runs: dict[str, Path], base: str, world: Path) -> dict:
    truth = Truth.load(world)
    days = {name: json.loads((run / "results.json").read_text())["days"] for name, run in runs.items()}
    gmv, calib = {}, {}
    for name, run in runs.items():
        for arm in ("A", "B"):
            for day in days[name]:
                rows = served(run, arm, day)
                gmv[(name, arm, day["world_day"])] = per_request_gmv(rows, truth, day["world_day"])
                calib.setdefault(name, {}).setdefault(arm, {})[str(day["world_day"])] = truth_calibration(
                    rows, truth, day["world_day"])
    world_days = sorted({d["world_day"] for d in days[base]})
    paired = {}
    for name in runs:
        if name == base:
            continue
        for arm in ("A", "B"):
            per_day = {str(d): paired_day(gmv[(base, arm, d)], gmv[(name, arm, d)]) for d in world_days
                       if (name, arm, d) in gmv}
            over = paired_diff([v["run"] for v in per_day.values()], [v["base"] for v in per_day.values()])
            paired.setdefault(f"{name} - {base}", {})[arm] = {"days": per_day, "over_days": over}
    return {"runs": {k: str(v) for k, v in runs.items()}, "base": base, "world": str(world),
            "paired_expected_gmv": paired, "truth_calibration": calib,
            "frozen_on_the_simulated_log": frozen_on_world(runs[base], world, world_days)}


def frozen_on_world(run: Path, world: Path, world_days: list[int]) -> dict:
    """The day-0 fine heads on the simulator's own log of each live day."""
    ckpt = run / "runs" / "day00" / "fine" / "checkpoint.pt"
    out = {}
    for d in world_days:
        s = warm.score_stage("fine", ckpt, world, days=[d])
        out[str(d)] = {k: float(s[k]) for k in ("ctr_auc", "ctr_calibration", "cvr_auc", "cvr_calibration")}
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for j, (name, arms) in enumerate(res["paired_expected_gmv"].items()):
        for k, (arm, v) in enumerate(arms.items()):
            x = np.array([int(d) for d in v["days"]]) + (j * 2 + k) * 0.08 - 0.12
            m = np.array([r["diff"] for r in v["days"].values()])
            err = np.array([[r["diff"] - r["ci95"][0] for r in v["days"].values()],
                            [r["ci95"][1] - r["diff"] for r in v["days"].values()]])
            ax1.errorbar(x, m, yerr=err, fmt="o-" if arm == "A" else "s--", capsize=3, color=f"C{2 * j + k}",
                         label=f"{name}, arm {arm} ({'frozen' if arm == 'A' else 'retrained'})")
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(title="E[GMV] per request, paired by request (95% CI)", xlabel="world day (live)", ylabel="difference")
    ax1.legend(fontsize=7)
    for j, (name, arms) in enumerate(res["truth_calibration"].items()):
        for arm, by_day in arms.items():
            x = [int(d) for d in by_day]
            ax2.plot(x, [v["ctr"] for v in by_day.values()], "o-" if arm == "A" else "s--", color=f"C{j}",
                     label=f"{name}, arm {arm}")
    sim = res["frozen_on_the_simulated_log"]
    ax2.plot([int(d) for d in sim], [v["ctr_calibration"] for v in sim.values()], "k^:",
             label="frozen day-0 head on the simulator's own log")
    ax2.axhline(1, color="grey", lw=0.8)
    ax2.set(title="fine CTR head: mean prediction / truth on what was served", xlabel="world day (live)",
            ylabel="calibration")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="NAME=DIR,NAME=DIR,...: `recstack live --out` folders")
    ap.add_argument("--base", required=True, help="the run every other is compared to")
    ap.add_argument("--world", required=True, help="the world folder the runs replayed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    runs = {k: Path(v) for k, v in (item.split("=", 1) for item in a.runs.split(","))}
    if a.base not in runs:
        raise SystemExit(f"--base: {a.base!r} is not one of --runs ({', '.join(runs)})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = compare(runs, a.base, Path(a.world))
    (out / "compare.json").write_text(json.dumps(res, indent=2))
    plot(res, out / "compare.png")
    for name, arms in res["paired_expected_gmv"].items():
        for arm, v in arms.items():
            o = v["over_days"]
            print(f"{name}, arm {arm}: E[GMV]/request {o['mean']:+.3f} [{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}] "
                  f"(paired by day, n={o['n']})")
    print(f"wrote {out / 'compare.json'}, {out / 'compare.png'}")


if __name__ == "__main__":
    main()
