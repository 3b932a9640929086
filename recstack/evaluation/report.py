"""The report files every experiment writes (DESIGN §6): `results.json`, the Markdown tables of
`report.md`, and the PNG plots. Pure formatting: the statistics are in `protocol`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


def write_results(out: str | Path, results: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=_json_default))
    return path


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    def fmt(x):
        return f"{x:.4f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_ci(d: dict) -> str:
    """A paired difference as `+mean [+lo, +hi]`."""
    lo, hi = d["ci95"]
    return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def fmt_mean_std(d: dict | None, missing: str = "–") -> str:
    """A `mean_std` summary as `mean ± std`; `missing` where there is none (no teacher, say)."""
    return missing if d is None or d.get("mean") is None else f"{d['mean']:.4f} ± {d['std']:.4f}"


# --- plots --------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path, title: str, xlabel: str | None = None, ylabel: str | None = None, legend: bool = False) -> Path:
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return Path(path)


def _ci_errors(deltas: Sequence[dict]) -> np.ndarray:
    """(2, N) error-bar lengths below and above each paired mean (0 where the interval is NaN)."""
    return np.nan_to_num(np.array([[d["mean"] - d["ci95"][0], d["ci95"][1] - d["mean"]] for d in deltas]).T)


def plot_bars_with_ci(path: str | Path, names: Sequence[str], deltas: Sequence[dict], title: str, ylabel: str = "AUC − baseline") -> Path:
    """Paired differences to the baseline with their 95 % CIs, one bar per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names) + 2), 3.5))
    means = [d["mean"] for d in deltas]
    ax.bar(range(len(names)), means, yerr=_ci_errors(deltas), capsize=4, color=["tab:green" if d["ci95"][0] > 0 else "tab:gray" for d in deltas])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    return _finish(fig, ax, path, title, ylabel=ylabel)


def plot_paired_seeds(path: str | Path, contrasts: dict[str, dict], title: str, ylabel: str = "Δ AUC (paired)") -> Path:
    """Paired contrasts, one column each: every seed's difference as a dot (labelled by its
    position in `per_seed`) and the mean with its 95 % CI. `contrasts[name]` holds "per_seed",
    "mean" and "ci95"."""
    plt = _plt()
    names = list(contrasts)
    fig, ax = plt.subplots(figsize=(max(4, 1.3 * len(names) + 2), 3.8))
    for k, name in enumerate(names):
        c = contrasts[name]
        d = np.asarray(c["per_seed"], dtype=np.float64)
        x = k - 0.15 + 0.3 * np.arange(len(d)) / max(1, len(d) - 1)  # seeds spread left to right, in order
        ax.scatter(x, d, s=14, color="tab:blue", alpha=0.7)
        clear = c["ci95"][0] > 0 or c["ci95"][1] < 0
        ax.errorbar([k + 0.28], [c["mean"]], yerr=_ci_errors([c]), fmt="D", capsize=5,
                    color="tab:green" if clear else "tab:gray")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    return _finish(fig, ax, path, title, ylabel=ylabel)


def plot_grouped_bars_with_ci(path: str | Path, names: Sequence[str], groups: dict[str, Sequence[dict]], title: str,
                              ylabel: str = "AUC − baseline") -> Path:
    """Paired differences with 95 % CIs, one cluster per method and one bar per group
    (`groups[label]` holds each method's difference, in the order of `names`)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.81 / max(1, len(groups))
    for k, (label, deltas) in enumerate(groups.items()):
        offset = (k - (len(groups) - 1) / 2) * width
        ax.bar(np.arange(len(names)) + offset, [d["mean"] for d in deltas], width=width, yerr=_ci_errors(deltas),
               capsize=2, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    return _finish(fig, ax, path, title, ylabel=ylabel, legend=True)


def plot_bars(path: str | Path, names: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> Path:
    """One plain bar per name (a cost, say)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(range(len(names)), list(values), color="tab:blue")
    ax.set_xticks(range(len(names)), list(names), rotation=30, ha="right")
    return _finish(fig, ax, path, title, ylabel=ylabel)


def plot_reliability(path: str | Path, curves: dict[str, dict], title: str) -> Path:
    """Reliability diagrams: `curves[name] = recstack.evaluation.metrics.reliability(...)`."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    hi = 0.0
    for name, c in curves.items():
        ax.plot(c["mean_pred"], c["mean_label"], marker="o", ms=3, label=name)
        hi = max(hi, max(c["mean_pred"] + c["mean_label"]))
    ax.plot([0, hi], [0, hi], color="black", lw=0.8, ls="--", label="perfect")
    return _finish(fig, ax, path, title, "mean prediction", "observed rate", legend=True)


def plot_curves(path: str | Path, xs: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str, logx: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    if logx:
        ax.set_xscale("log")
    return _finish(fig, ax, path, title, xlabel, ylabel, legend=True)


def plot_lines_with_ci(path: str | Path, xs: Sequence[float], series: dict[str, Sequence[dict]], title: str,
                       xlabel: str, ylabel: str = "Δ AUC (paired)") -> Path:
    """Paired differences along an axis (training days, say): one line per series, each point its
    mean with the 95 % CI as an error bar; `series[name]` holds one paired_diff dict per x (None
    where the series has no point)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for k, (name, ds) in enumerate(series.items()):
        pts = [(x, d) for x, d in zip(xs, ds) if d is not None]
        if not pts:
            continue
        shift = (k - (len(series) - 1) / 2) * 0.04  # small horizontal offsets keep the error bars apart
        ax.errorbar([x + shift for x, _ in pts], [d["mean"] for _, d in pts], yerr=_ci_errors([d for _, d in pts]),
                    marker="o", ms=4, capsize=3, label=name)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(xs))
    return _finish(fig, ax, path, title, xlabel, ylabel, legend=True)
