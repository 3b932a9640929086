"""The experiment protocol shared by every table (DESIGN §6): the checked plan of a run
(`ExperimentPlan`: seeds, learning-rate sweep, methods, data fractions), paired confidence
intervals against the baseline, data-equivalent multipliers and gains by id frequency. The
report files (`report.md`, `results.json`, PNG plots) are written by `report`.

The statistics are plain and documented: a paired t-interval over seeds (each seed trains
every method on the same data and initial seed), and a data-equivalent multiplier read off the
baseline's AUC-vs-data curve by interpolation in log(data).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Callable, ClassVar, Iterable, Optional, Sequence

import numpy as np
from scipy import stats

from recstack.config import ConfigError, apply_overrides


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


def select_by_mean(per_seed: dict[str, Sequence[float]]) -> tuple[str, dict]:
    """The candidate (an LR, an LR and a weight decay, ...) with the best mean validation
    score over seeds. `per_seed[label]` = the scores of that candidate, one per seed (the same
    seeds for every candidate) -> (best label, {label: mean_std plus per_seed}): the whole
    curve, for the report. Ties go to the first label in the given order."""
    if not per_seed:
        raise ValueError("select_by_mean: no candidates")
    n = {len(v) for v in per_seed.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"select_by_mean: every candidate needs the same, non-zero number of seeds, got {sorted(n)}")
    curve = {k: {**mean_std(v), "per_seed": [float(x) for x in v]} for k, v in per_seed.items()}
    best = max(curve, key=lambda k: curve[k]["mean"])  # max keeps the first of equal means
    return best, curve


# --- the plan of a run ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentPlan:
    """What one experiment runs, checked before anything trains.

    A stage subclasses it to set its defaults, its quick sizes and its own settings (the
    coarse ranker's day windows, say); `from_cli` builds one from the command line's
    `--seeds`, `--quick`, `--workers` and `--set key=value`, where a key is either a field of
    the plan or a field of the stage's training `Config` (applied to every method).
    """

    experiment: str = ""  # the table to run: one of the stage's EXPERIMENTS
    seeds: tuple[int, ...] = (1, 2, 3)  # training seeds; every method trains once per seed, so differences are paired
    quick: bool = False  # tiny models and sweeps: checks the pipeline, the numbers mean nothing
    workers: int = 1  # processes for independent fits, one thread each (the numbers equal a serial run's)
    lrs: tuple[float, ...] = ()  # the learning-rate sweep every method gets on the validation day
    fractions: tuple[float, ...] = ()  # shares of the training rows the baseline's data curve is trained on
    methods: Optional[tuple[str, ...]] = None  # the table's rows to run (None: all of them)
    overrides: tuple[str, ...] = ()  # key=value changes of the stage's Config, applied to every method

    EXPERIMENTS: ClassVar[tuple[str, ...]] = ()  # the stage's experiment names
    MIN_SEEDS: ClassVar[int] = 1
    QUICK: ClassVar[dict] = {}  # the field values `quick` starts from
    FLAGS: ClassVar[tuple[str, ...]] = ("experiment", "seeds", "quick", "overrides")  # set by their own arguments, never by --set

    def set_keys(self) -> tuple[str, ...]:
        """The plan fields `--set` may change in this experiment."""
        return tuple(f.name for f in dataclasses.fields(self) if f.name not in self.FLAGS)

    def choices(self) -> dict[str, tuple[str, ...]]:
        """The valid names of each list-of-names field (methods, ...) in this experiment."""
        return {}

    def validate(self) -> None:
        """Raise ConfigError naming the field and its valid values."""
        if self.EXPERIMENTS and self.experiment not in self.EXPERIMENTS:
            raise ConfigError(f"unknown experiment {self.experiment!r}; choose one of {self.EXPERIMENTS}")
        if len(self.seeds) < max(1, self.MIN_SEEDS):
            need = "at least one seed" if self.MIN_SEEDS <= 1 else (
                f"the protocol needs >= {self.MIN_SEEDS} seeds for paired intervals (3 or more for a report)")
            raise ConfigError(f"seeds: {need}, got {list(self.seeds)}")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        if not self.lrs or min(self.lrs) <= 0:
            raise ConfigError(f"lrs: need at least one positive learning rate, got {list(self.lrs)}")
        if self.fractions and (min(self.fractions) <= 0 or max(self.fractions) > 1):
            raise ConfigError(f"fractions: each must be in (0, 1], got {list(self.fractions)}")
        for key, valid in self.choices().items():
            names = getattr(self, key)
            if names is None:
                continue
            bad = [n for n in names if n not in valid]
            if bad or not names:
                raise ConfigError(f"{key}: unknown {'name(s) ' + str(bad) if bad else 'empty list'}; choose from {list(valid)}")

    @classmethod
    def from_cli(cls, experiment: str, seeds: Sequence[int], quick: bool = False, workers: int = 1,
                 overrides: Sequence[str] = (), config: type | None = None, **fields):
        """The plan of `experiment` from the command line; `config` is the stage's Config
        class, whose fields are the other keys `--set` accepts (checked when applied).
        `fields` set plan fields before the overrides (a Python caller's arguments)."""
        plan = cls(experiment=experiment, seeds=tuple(int(s) for s in seeds), quick=bool(quick), workers=int(workers))
        plan = dataclasses.replace(plan, **{**(cls.QUICK if quick else {}), **fields})
        own = plan.set_keys()
        config_keys = [f.name for f in dataclasses.fields(config)] if config is not None else []
        hints = typing.get_type_hints(cls)
        mine, mappings, rest = [], {}, []
        for item in overrides:
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq:
                raise ConfigError(f"override {item!r} is not key=value")
            if key in own and typing.get_origin(hints[key]) is dict:
                mappings[key] = _parse_mapping(key, value)
            elif key in own:
                mine.append(f"{key}={value}")
            elif key in config_keys:
                rest.append(item)
            else:
                raise ConfigError(f"unknown setting {key!r} for the {experiment} experiment; valid keys: "
                                  f"{', '.join(sorted(own))} (the plan) and {', '.join(sorted(config_keys))} "
                                  f"(the stage's {getattr(config, '__name__', 'Config')})")
        plan = apply_overrides(plan, mine)  # parses each value as its field's type
        plan = dataclasses.replace(plan, overrides=tuple(rest), **mappings)
        plan.validate()
        return plan


def _parse_mapping(key: str, value: str) -> dict[str, float]:
    """`a:0.05,b:0.1` -> {"a": 0.05, "b": 0.1}."""
    out = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, colon, number = part.partition(":")
        try:
            out[name.strip()] = float(number)
        except ValueError:
            raise ConfigError(f"{key}: expected name:value pairs separated by commas, got {value!r}") from None
        if not colon:
            raise ConfigError(f"{key}: expected name:value pairs separated by commas, got {value!r}")
    return out
