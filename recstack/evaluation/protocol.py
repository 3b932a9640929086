"""The experiment protocol shared by every table (DESIGN §6): seeds, paired confidence
intervals against the baseline, data-equivalent multipliers, gains by id frequency, and the
report files (`report.md`, `results.json`, PNG plots).

The statistics are plain and documented: a paired t-interval over seeds (each seed trains
every method on the same data and initial seed), and a data-equivalent multiplier read off the
baseline's AUC-vs-data curve by interpolation in log(data).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy import stats


def mean_std(xs: Sequence[float]) -> dict:
    xs = np.asarray(xs, dtype=np.float64)
    return {"mean": float(xs.mean()), "std": float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, "n": int(len(xs))}


def paired_diff(method: Sequence[float], baseline: Sequence[float], level: float = 0.95) -> dict:
    """Mean of method - baseline over paired runs (same seed) with a t confidence interval."""
    d = np.asarray(method, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if len(d) < 2:
        return {"mean": float(d.mean()), "ci95": [float("nan"), float("nan")], "n": int(len(d))}
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "n": int(len(d))}


def data_equivalent_multiplier(fractions: Sequence[float], baseline_auc: Sequence[float], target_auc: float) -> dict:
    """How much more data the baseline needs to reach `target_auc`.

    `fractions` (e.g. 0.25, 0.5, 1, 2) and the baseline's mean AUC at each. Interpolates
    linearly in log(fraction) on the monotone envelope of the curve; beyond the largest
    fraction it extrapolates from the last two points and says so.
    """
    f = np.asarray(fractions, dtype=np.float64)
    a = np.maximum.accumulate(np.asarray(baseline_auc, dtype=np.float64)[np.argsort(f)])
    f = np.sort(f)
    lf = np.log(f)
    if target_auc <= a[0]:
        return {"multiplier": float(f[0]), "extrapolated": False, "note": "at or below the smallest data size"}
    if target_auc <= a[-1]:
        i = int(np.searchsorted(a, target_auc))
        lo, hi = i - 1, i
        w = 0.0 if a[hi] == a[lo] else (target_auc - a[lo]) / (a[hi] - a[lo])
        return {"multiplier": float(np.exp(lf[lo] + w * (lf[hi] - lf[lo]))), "extrapolated": False}
    slope = (a[-1] - a[-2]) / (lf[-1] - lf[-2]) if len(a) > 1 else 0.0
    if slope <= 0:
        return {"multiplier": float("inf"), "extrapolated": True, "note": "baseline curve is flat at the largest size"}
    return {"multiplier": float(np.exp(lf[-1] + (target_auc - a[-1]) / slope)), "extrapolated": True}


def frequency_buckets(train_ids: np.ndarray, eval_ids: np.ndarray, shares: tuple[float, float] = (0.2, 0.5)) -> np.ndarray:
    """Label each evaluation row head / torso / tail by its id's frequency in training.

    Ids are ranked by training count; the most frequent ids holding the first `shares[0]` of
    training rows are head, the next `shares[1]` torso, the rest tail (ids
    never seen in training are tail). Returns (N,) array of "head" / "torso" / "tail".
    """
    ids, counts = np.unique(train_ids, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    cum = np.cumsum(counts[order]) / counts.sum()
    label_sorted = np.where(cum <= shares[0], "head", np.where(cum <= shares[0] + shares[1], "torso", "tail"))
    lookup = dict(zip(ids[order].tolist(), label_sorted.tolist()))
    return np.array([lookup.get(i, "tail") for i in np.asarray(eval_ids).tolist()])


def select_lr(score: Callable[[float], float], lrs: Iterable[float]) -> tuple[float, dict]:
    """The learning rate with the best validation score; `score(lr)` trains on the days before
    the validation day and returns its validation AUC. The test day is never touched here."""
    scores = {float(lr): float(score(lr)) for lr in lrs}
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, scores


# --- report files ---------------------------------------------------------------------------


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
    lo, hi = d["ci95"]
    return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


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


def plot_bars_with_ci(path: str | Path, names: Sequence[str], deltas: Sequence[dict], title: str, ylabel: str = "AUC − baseline") -> Path:
    """Paired differences to the baseline with their 95 % CIs, one bar per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names) + 2), 3.5))
    means = [d["mean"] for d in deltas]
    err = np.array([[d["mean"] - d["ci95"][0], d["ci95"][1] - d["mean"]] for d in deltas]).T
    ax.bar(range(len(names)), means, yerr=np.nan_to_num(err), capsize=4, color=["tab:green" if d["ci95"][0] > 0 else "tab:gray" for d in deltas])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
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
