"""An online A/B test of two served bundles against the world's truth: `recstack replay --split`.

    report = replay_split({"A": "127.0.0.1:50051", "B": "127.0.0.1:50052"}, "data/small", ReplayConfig(day=4))

Two designs, each with the difference B − A and its 95 % interval per metric (E[GMV], GMV,
CTR, conversions per request):

- `paired` (the default, possible only because the users are simulated): every sampled session
  is sent to both arms at the same moment, each arm's clicks and purchases drawn from the truth on
  its own list and sent back to its own server (each arm's feature store lives its own history).
  The difference is taken per session, so the user, the time and the day's intent cancel: a
  paired t interval over sessions answered by both.
- `users`: what a live A/B test can do: the users are split by a fixed hash of their id
  (`replay.user_arm`), each arm serves only its half; the arms' samples are independent, so
  the interval is Welch's.
"""
from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np

from recstack.pipeline.replay import ReplayConfig, mean_ci, replay

METRICS = ("expected_gmv", "gmv", "ctr", "conversions", "clicks")
DESIGNS = ("paired", "users")


def parse_split(text: str) -> dict[str, str]:
    """"A=HOST:PORT,B=HOST:PORT" -> {"A": "HOST:PORT", "B": "HOST:PORT"} (exactly two arms)."""
    arms: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, target = part.partition("=")
        if not sep or not name.strip() or not target.strip():
            raise ValueError(f"--split: expected NAME=HOST:PORT, got {part!r}")
        if name.strip() in arms:
            raise ValueError(f"--split: arm {name.strip()!r} named twice")
        arms[name.strip()] = target.strip()
    if len(arms) != 2:
        raise ValueError(f"--split: expected two arms (A=HOST:PORT,B=HOST:PORT), got {len(arms)}")
    return arms


def _welch(b: np.ndarray, a: np.ndarray) -> dict:
    from scipy import stats

    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = float(np.sqrt(va + vb))
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb > 0 else 1.0
    d = float(b.mean() - a.mean())
    half = float(stats.t.ppf(0.975, dof) * se)
    return {"mean": d, "ci_low": d - half, "ci_high": d + half, "n_a": len(a), "n_b": len(b)}


def difference(ra: dict, rb: dict, design: str) -> dict:
    """B − A per metric from two replay reports made with keep_rows."""
    out = {}
    if design == "paired":
        ia = {s: i for i, s in enumerate(ra["rows"]["session"])}
        both = [(ia[s], j) for j, s in enumerate(rb["rows"]["session"]) if s in ia]
        ja, jb = (np.array([p[k] for p in both], np.int64) for k in (0, 1))
        for m in METRICS:
            d = np.asarray(rb["rows"][m])[jb] - np.asarray(ra["rows"][m])[ja] if both else np.zeros(0)
            out[m] = mean_ci(d)
    else:
        for m in METRICS:
            out[m] = _welch(np.asarray(rb["rows"][m], float), np.asarray(ra["rows"][m], float))
    return out


def replay_split(targets: dict[str, str], data_dir: str, cfg: ReplayConfig = ReplayConfig(),
                 design: str = "paired") -> dict:
    """Replay `cfg.day` against both arms at once -> {"design", "arms": {name: report}, "difference"}."""
    if design not in DESIGNS:
        raise ValueError(f"design: expected one of {DESIGNS}, got {design!r}")
    names = list(targets)
    if len(names) != 2:
        raise ValueError(f"replay_split: two arms, got {names}")
    reports: dict[str, dict] = {}
    errors: list[BaseException] = []

    def run(i: int, name: str) -> None:
        rc = replace(cfg, arm=0, arms=1) if design == "paired" else replace(cfg, arm=i, arms=2)
        try:
            reports[name] = replay(targets[name], data_dir, rc, keep_rows=True)
        except BaseException as e:  # noqa: BLE001 - surfaced below, after both threads end
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, n), name=f"replay-{n}") for i, n in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    a, b = (reports[n] for n in names)
    diff = difference(a, b, design)
    for r in reports.values():
        del r["rows"]
    return {"design": design, "arms": reports, "names": names, "difference": diff}


def format_split(r: dict) -> str:
    a, b = r["names"]
    lines = [f"A/B replay ({r['design']}): {a} = {r['arms'][a]['target']}, {b} = {r['arms'][b]['target']}"]
    for name in r["names"]:
        x = r["arms"][name]
        lines.append(f"  {name}: {x['requests']} requests, {x['events_sent']} events sent, failed {x['failed'] or 0}")
    lines.append(f"{'per request':<14}{a:>10}{b:>10}{b + ' - ' + a:>12}{'95% CI':>24}")
    for m in METRICS:
        d = r["difference"][m]
        lines.append(f"{m:<14}{r['arms'][a]['per_request'][m]['mean']:>10.4f}{r['arms'][b]['per_request'][m]['mean']:>10.4f}"
                     f"{d['mean']:>+12.4f}   [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]")
    return "\n".join(lines)
