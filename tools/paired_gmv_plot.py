"""Plot the paired GMV@50 share differences of `tools/paired_gmv.py` results: one point per
results file (its label: the file name), with its 95 % interval.

    python tools/paired_gmv_plot.py OUT.png A.json B.json ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
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
