"""Plot the paired GMV@50 share differences of `tools/paired_gmv.py` results: one point per
results file (its label: the file name), with its 95 % interval.

    python tools/paired_gmv_plot.py OUT.png A.json B.json ...
    python tools/paired_gmv_plot.py --pareto OUT.png A.json

`--pareto`: one file's arms as GMV@50 share (95 % interval) against the mean server CPU ms per
request (what bounds a server's throughput), each labelled with its name and coarse size; the
arms whose names differ only in their trailing digits (plain500, plain200) joined by a line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto(out: Path, results: Path) -> None:
    """GMV@50 share against the mean CPU ms per request, one point per arm of `results`."""
    arms = json.loads(results.read_text())["bundles"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[tuple[float, float]]] = {}
    for name, a in arms.items():
        x, y = a["cpu_ms_mean"], a["gmv_share"]
        ax.errorbar([x], [y], yerr=[a["gmv_share_ci95"]], fmt="o", capsize=3, color="C0" if a["sizes"][1] < a["sizes"][0] else "C3")
        ax.annotate(f"{name} ({a['sizes'][1]:,})", (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        families.setdefault(name.rstrip("0123456789"), []).append((x, y))
    for pts in families.values():
        if len(pts) > 1:
            pts.sort()
            ax.plot(*zip(*pts), lw=0.8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("server CPU ms per request (mean, in process; log scale)")
    ax.set_ylabel("GMV@50 share of the oracle top 50")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--pareto":
        pareto(Path(args[1]), Path(args[2]))
        return 0
    if len(args) < 2 or args[0].startswith("--"):
        print(__doc__)
        return 2
    out, files = Path(args[0]), [Path(a) for a in args[1:]]
    labels, diffs, cis = [], [], []
    for f in files:
        r = json.loads(f.read_text())
        for name, p in r["paired"].items():
            labels.append(f"{f.stem} (day {r['day']}): {name} - {r['paired_vs']}")
            diffs.append(p["gmv_share_diff"])
            cis.append(p["ci95"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    y = list(range(len(labels)))[::-1]
    ax.errorbar(diffs, y, xerr=cis, fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("paired difference in GMV@50 share (95 % interval)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
