"""Several bundles' cascades against the truth side by side, and the stage sizes worth serving
for a CPU budget: the Pareto front of GMV@k share vs server CPU ms per request.

    from recstack.evaluation.cascade_pareto import compare
    results = compare({"ctr": "art_ctr", "gmv": "art_gmv"}, "DATA_DIR", "OUT_DIR", n_users=300)

Each bundle runs `recstack.evaluation.cascade.run` on the same users and the same stage-size
grid (the full (retrieval, coarse) grid by default) into OUT_DIR/<name>/; the CPU cost of a
grid point is the mean `time.process_time` of one served request (`cpu_ms`: every stage of
`Cascade.rank_features`, single-threaded ONNX Runtime and FAISS, the evaluation's own oracle
scoring outside it). `pareto` keeps the points no other point beats on both axes;
`best_within` picks the best share a budget affords.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from recstack.evaluation import cascade as cascade_eval
from recstack.serving.cascade import _FINE_INPUTS, Cascade
from recstack.serving.fine import FineScorer


def pareto(rows: list[dict], x: str = "cpu_ms", y: str = "gmv_share") -> list[dict]:
    """The rows no other row dominates (x no larger and y no smaller, one of them strictly),
    sorted by x."""
    front = []
    for r in sorted(rows, key=lambda r: (r[x], -r[y])):
        if not front or r[y] > front[-1][y]:
            front.append(r)
    return front


def best_within(rows: list[dict], budget: float, x: str = "cpu_ms", y: str = "gmv_share") -> dict | None:
    """The row with the highest y among those with x <= budget (None when none fits)."""
    fits = [r for r in rows if r[x] <= budget]
    return max(fits, key=lambda r: (r[y], -r[x])) if fits else None


def open_cascade(bundle: str | Path, fine_precision: str | None = None) -> Cascade:
    """The bundle's served cascade; `fine_precision` ("fp32" / "int8") fixes the fine graph it
    runs (None: the bundle's choice, its int8 copy when shipped), so that bundles whose exports
    chose differently are compared on the same fine ranker."""
    cascade = Cascade.load(bundle)
    if fine_precision is not None:
        cascade.fine = FineScorer.load(cascade.bundle, _FINE_INPUTS, 1, precision=fine_precision)
    return cascade


def compare(bundles: dict[str, str | Path], data_dir: str | Path, out_dir: str | Path,
            settings: cascade_eval.Settings | None = None, *, fine_precision: str | None = None, **fields) -> dict:
    """Evaluate every bundle (name -> bundle or artifacts root) on the same users and grid
    (with `fine_precision`, on the same fine graph: see `open_cascade`); write
    OUT_DIR/<name>/results.json, OUT_DIR/results.json (every run, each one's Pareto front) and
    OUT_DIR/pareto.png. Returns the combined results."""
    settings = replace(settings or cascade_eval.Settings(full_grid=True, exhaustive=False), **fields)
    out = Path(out_dir)
    runs = {}
    for name, bundle in bundles.items():
        print(f"--- {name}: {bundle}", flush=True)
        cascade = open_cascade(bundle, fine_precision)
        runs[name] = cascade_eval.run(bundle, data_dir, out / name, settings, cascade=cascade)
        runs[name]["fine_precision"] = cascade.fine.precision
        runs[name]["pareto"] = [{k: r[k] for k in ("retrieval_size", "coarse_size", "i2i_share", "cpu_ms", "gmv_share")}
                                for r in pareto(runs[name]["configs"])]
    results = {"runs": runs, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                          for k, v in vars(settings).items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "pareto.png")
    return results


def plot(results: dict, path: Path) -> None:
    """GMV@k share vs CPU ms per request: every grid point of every run, its front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (name, run) in enumerate(results["runs"].items()):
        col = f"C{i}"
        rows = run["configs"]
        ax.scatter([r["cpu_ms"] for r in rows], [r["gmv_share"] for r in rows], color=col, s=14, alpha=0.5)
        front = run["pareto"]
        ax.plot([r["cpu_ms"] for r in front], [r["gmv_share"] for r in front], "-o", color=col, label=f"{name}: Pareto front")
        for r in front:
            ax.annotate(f"{r['retrieval_size']}/{r['coarse_size']}", (r["cpu_ms"], r["gmv_share"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points", color=col)
        ref = run["references"].get("fine_over_whole_corpus")
        if ref:
            ax.axhline(ref["gmv_share"], color=col, ls=":", lw=1, label=f"{name}: fine over the whole corpus")
    any_run = next(iter(results["runs"].values()))
    ax.set_xscale("log")
    ax.set_xlabel("server CPU ms per request (process_time of the served path, one request at a time)")
    ax.set_ylabel(f"GMV@{any_run['k']} share of the oracle's top {any_run['k']}")
    ax.set_title(f"{any_run['n_users']} users of day {any_run['day']}; labels: retrieval / coarse size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
