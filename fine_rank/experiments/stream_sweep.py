"""The streaming protocol's model selection: each row of a table chooses its learning rate (and,
for rows with a SEAD auxiliary tower, its auxiliary-loss weight) by the mean next-day AUC over a
validation window of scored days, averaged over the first seeds; the test window (the last
scored days, after the validation window) is reported with the chosen setting only.

    valid, test = windows(eval_days=(2, ..., 12), valid_days=3, last_days=4)  # (6, 7, 8), (9, ..., 12)
    best, scores = choose(grid, {setting: runs}, valid)

A streamed run trains through every day once, so the same run gives the validation and the test
window's scores; the choice reads the validation window's days alone (`window_score`), which a
test holds. LR x2 is not swept: it runs at twice the baseline's chosen LR.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from recstack.config import ConfigError
from recstack.evaluation import report as R

from fine_rank.experiments.plan import Method


@dataclass(frozen=True)
class Setting:
    """One point of a row's grid: the LR and (rows with an auxiliary tower) the aux-loss weight."""

    lr: float
    aux_weight: Optional[float] = None  # None: the row has no auxiliary loss to weigh

    def key(self) -> str:
        """A file-name-safe name, e.g. `lr0.002_aux0.3`."""
        return f"lr{self.lr:g}" + ("" if self.aux_weight is None else f"_aux{self.aux_weight:g}")

    def overrides(self, task: str) -> list[str]:
        out = [f"{task}_lr={self.lr}"]
        if self.aux_weight is not None:
            out.append(f"sead_weight={self.aux_weight}")
        return out

    def record(self) -> dict:
        return {"lr": self.lr, "aux_weight": self.aux_weight}


def has_aux(method: Method) -> bool:
    """Whether the row trains a SEAD auxiliary tower (its loss weight is then swept too)."""
    return any(c.startswith(f"{method.task}_sead=") and not c.endswith("=none") for c in method.changes)


def grid(method: Method, lrs: Sequence[float], aux_weights: Sequence[float]) -> tuple[Setting, ...]:
    """The settings `method` is swept over, in a fixed order (LR-major)."""
    if method.lr_times_baseline:
        raise ValueError(f"{method.name} is not swept: it runs at {method.lr_times_baseline}x the baseline's chosen LR")
    weights = tuple(aux_weights) if has_aux(method) else (None,)
    return tuple(Setting(float(lr), None if w is None else float(w)) for lr in lrs for w in weights)


def windows(eval_days: Sequence[int], valid_days: int, last_days: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(validation window, test window) of scored days: the test window is the last `last_days`
    scored days, the validation window the `valid_days` just before it (disjoint by construction)."""
    days = tuple(int(d) for d in eval_days)
    if valid_days < 1 or last_days < 1:
        raise ConfigError(f"valid_days and last_days must be >= 1, got {valid_days} and {last_days}")
    if valid_days + last_days > len(days):
        raise ConfigError(f"valid_days + last_days = {valid_days + last_days} exceeds the {len(days)} scored days "
                          f"{list(days)}; simulate more days or shorten a window")
    return days[len(days) - last_days - valid_days: len(days) - last_days], days[len(days) - last_days:]


def window_score(run: dict, days: Sequence[int], metric: str = "auc") -> float:
    """Mean of `metric` over the scored days `days` of one streamed run (its other days unread)."""
    wanted = set(int(d) for d in days)
    vals = [c[metric] for c in run["curve"] if int(c["eval_day"]) in wanted]
    if len(vals) != len(wanted):
        raise ValueError(f"run {run.get('method')} seed {run.get('seed')}: scored days {sorted(wanted)} "
                         f"not all in its curve")
    return float(np.mean(vals))


def choose(settings: Sequence[Setting], runs: dict[Setting, list[dict]], valid: Sequence[int],
           metric: str = "auc") -> tuple[Setting, dict[str, float]]:
    """The setting with the highest validation-window score averaged over its runs (seeds); a
    tie goes to the earlier setting of `settings`. -> (chosen, {setting key: score})."""
    if not settings:
        raise ValueError("choose needs at least one setting")
    scores = {s.key(): float(np.mean([window_score(r, valid, metric) for r in runs[s]])) for s in settings}
    best = settings[0]
    for s in settings[1:]:
        if scores[s.key()] > scores[best.key()]:
            best = s
    return best, scores


def section(record: dict) -> list[str]:
    """The report's sweep table: each row's validation-window score per setting, the choice."""
    body = []
    for row, r in record["rows"].items():
        c = Setting(**r["chosen"]).key()
        scores = ", ".join(f"{k} {v:.4f}" for k, v in r["validation_scores"].items()) or (
            "not swept: twice the baseline's LR" if row.endswith("/lr2x") else "not swept: sead_max's setting"
            if r["chosen"]["aux_weight"] is not None else "not swept: the baseline's LR")
        body.append([row, c, scores])
    return [f"## The sweep: validation days {record['validation_days']}, seeds {record['select_seeds']}, "
            f"metric `{record['metric']}` (the test days {record['test_days']} never enter it)\n",
            R.markdown_table(["row", "chosen", "validation-window score per setting"], body), ""]
