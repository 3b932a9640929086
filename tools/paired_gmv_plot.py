"""Plot the paired GMV@50 share differences of `tools/paired_gmv.py` results: one point per
results file (its label: the file name), with its 95 % interval.

    python tools/paired_gmv_plot.py OUT.png A.json B.json ...
    python tools/paired_gmv_plot.py --pareto OUT.png A.json

`--pareto`: one file's arms against its first arm (the single stage, say): the share of its
GMV@50 kept against the CPU speed-up per request (what bounds a server's throughput); arms whose
names differ only in their trailing digits (plain500, plain200) joined by a line.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def pareto(out: Path, results: Path, target: tuple[float, float] = (10.0, 0.95)) -> None:
    """Each arm of `results` against its first arm (the reference, e.g. the single stage): the
    GMV@50 share kept (ratio of means, paired bootstrap 95 % interval) against the CPU speed-up
    (the reference's mean CPU ms per request over the arm's). Arms whose names differ only in
    their trailing digits form one line, labelled by coarse size; dashed: the `target` corner."""
    r = json.loads(results.read_text())
    arms, ref = r["bundles"], r["paired_vs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families: dict[str, list[tuple[float, float, float, float, int]]] = {}
    for name, p in r["paired"].items():
        a = arms[name]
        x = arms[ref]["cpu_ms_mean"] / a["cpu_ms_mean"]
        families.setdefault(name.rstrip("0123456789").rstrip("_"), []).append(
            (x, p["ratio"], p["ratio"] - p["ratio_ci95"][0], p["ratio_ci95"][1] - p["ratio"], a["sizes"][1]))
    for i, (fam, pts) in enumerate(sorted(families.items())):
        pts.sort()
        xs, ys, lo, hi, cs = zip(*pts)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, lw=1, color=f"C{i}", label=fam)
        for x, y, c in zip(xs, ys, cs):
            ax.annotate(f"{c:,}", (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points", color=f"C{i}")
    ax.axvline(target[0], color="grey", ls="--", lw=0.8)
    ax.axhline(target[1], color="grey", ls="--", lw=0.8)
    ax.set_xlabel(f"CPU speed-up over {ref} (its mean CPU ms per request / the arm's, in process)")
    ax.set_ylabel(f"GMV@50 share kept of {ref}'s (paired, 95 %)")
    ax.set_title(f"{r['n_users']} test-day users (sample seed {r['seed']}); labels: coarse size", fontsize=9)
    ax.legend(fontsize=8)
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
