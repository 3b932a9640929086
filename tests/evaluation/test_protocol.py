import dataclasses
import json
from typing import ClassVar

import numpy as np
import pytest

from recstack.config import ConfigError
from recstack.evaluation import protocol as E
from recstack.evaluation import report as R


def test_paired_diff_ci():
    base = [0.70, 0.71, 0.69, 0.70]
    meth = [0.72, 0.73, 0.71, 0.725]
    d = E.paired_diff(meth, base)
    assert d["mean"] == pytest.approx(0.02125)
    assert 0 < d["ci95"][0] < d["mean"] < d["ci95"][1]
    noisy = E.paired_diff([0.70, 0.72, 0.69], [0.71, 0.70, 0.70])
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1]


def test_data_equivalent_multiplier():
    f, auc = [0.25, 0.5, 1.0, 2.0], [0.60, 0.62, 0.64, 0.66]
    assert E.data_equivalent_multiplier(f, auc, 0.64)["multiplier"] == pytest.approx(1.0)
    m = E.data_equivalent_multiplier(f, auc, 0.65)
    assert m["multiplier"] == pytest.approx(np.sqrt(2)) and not m["extrapolated"]
    m = E.data_equivalent_multiplier(f, auc, 0.68)
    assert m["extrapolated"] and m["multiplier"] == pytest.approx(4.0)


def test_frequency_buckets():
    train = np.array([1] * 50 + [2] * 30 + [3] * 15 + [4] * 5)
    got = E.frequency_buckets(train, np.array([1, 2, 3, 4, 99]), shares=(0.5, 0.3))
    assert got.tolist() == ["head", "torso", "tail", "tail", "tail"]


def test_select_lr_and_report_files(tmp_path):
    best, scores = E.select_lr(lambda lr: -abs(lr - 0.01), [0.001, 0.01, 0.1])
    assert best == 0.01 and len(scores) == 3
    R.write_results(tmp_path, {"x": np.float32(1.5), "a": np.arange(3)})
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 1.5, "a": [0, 1, 2]}
    deltas = [E.paired_diff([1, 2], [0, 1]), E.paired_diff([1, 1.1], [1, 1])]
    R.plot_bars_with_ci(tmp_path / "d.png", ["a", "b"], deltas, "t")
    R.plot_reliability(tmp_path / "r.png", {"m": {"mean_pred": [0.1, 0.2], "mean_label": [0.1, 0.25]}}, "t")
    R.plot_grouped_bars_with_ci(tmp_path / "g.png", ["a", "b"], {"head": deltas, "tail": deltas}, "t")
    R.plot_bars(tmp_path / "b.png", ["a", "b"], [1.0, 2.0], "t", "s")
    for name in ("d", "r", "g", "b"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000, name
    assert R.fmt_mean_std(E.mean_std([1.0, 2.0])) == "1.5000 ± 0.7071" and R.fmt_mean_std(None) == "–"


@dataclasses.dataclass(frozen=True)
class _Config:
    lr: float = 0.1  # a stage Config's field: the other keys --set accepts


@dataclasses.dataclass(frozen=True)
class _Plan(E.ExperimentPlan):
    lrs: tuple[float, ...] = (0.1, 0.2)
    EXPERIMENTS: ClassVar[tuple[str, ...]] = ("table",)
    MIN_SEEDS: ClassVar[int] = 2
    QUICK: ClassVar[dict] = {"lrs": (0.5,)}

    def choices(self):
        return {"methods": ("baseline", "pfd")}


def test_plan_splits_plan_keys_from_config_keys_and_checks_both():
    p = _Plan.from_cli("table", ["1", "2"], quick=True, workers=2, config=_Config,
                       overrides=["methods=pfd", "lr=0.3", "fractions=0.5,1", "workers=3"])
    assert p.seeds == (1, 2) and p.lrs == (0.5,) and p.methods == ("pfd",) and p.fractions == (0.5, 1.0)
    assert p.workers == 3 and p.overrides == ("lr=0.3",)
    assert _Plan.from_cli("table", (1, 2), config=_Config).lrs == (0.1, 0.2)  # not quick: the class default
    with pytest.raises(ConfigError, match="unknown setting 'lrate'.*valid keys: fractions, lrs, methods, workers.*lr"):
        _Plan.from_cli("table", (1, 2), overrides=["lrate=1"], config=_Config)


@pytest.mark.parametrize("kwargs,match", [
    (dict(experiment="other"), "unknown experiment 'other'"),
    (dict(seeds=(1,)), "seeds: the protocol needs >= 2"),
    (dict(overrides=["workers=0"]), "workers: must be >= 1"),
    (dict(overrides=["lrs="]), "lrs: need at least one positive"),
    (dict(overrides=["lrs=x"]), "lrs: expected float"),
    (dict(overrides=["fractions=1.5"]), r"fractions: each must be in \(0, 1\]"),
    (dict(overrides=["methods=pfd,oracle"]), r"methods: unknown name\(s\) \['oracle'\]; choose from \['baseline', 'pfd'\]"),
    (dict(overrides=["methods="]), "methods: unknown empty list"),
    (dict(overrides=["seeds=1,2"]), "unknown setting 'seeds'"),
    (dict(overrides=["lrs"]), "not key=value"),
])
def test_plan_refusals_name_the_field_and_the_valid_values(kwargs, match):
    args = {"experiment": "table", "seeds": (1, 2), "config": _Config, **kwargs}
    with pytest.raises(ConfigError, match=match):
        _Plan.from_cli(**args)


def test_select_by_mean_picks_the_best_mean_and_keeps_the_whole_curve():
    best, curve = E.select_by_mean({"lr=0.1": [0.70, 0.60, 0.62], "lr=0.05": [0.64, 0.66, 0.65]})
    assert best == "lr=0.05"  # the single best seed (0.70) is lr=0.1's; the mean is lr=0.05's
    assert curve["lr=0.1"]["per_seed"] == [0.70, 0.60, 0.62] and curve["lr=0.1"]["n"] == 3
    assert abs(curve["lr=0.05"]["mean"] - 0.65) < 1e-12
    assert E.select_by_mean({"a": [0.5], "b": [0.5]})[0] == "a"  # a tie keeps the first
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        E.select_by_mean({"a": [0.5, 0.6], "b": [0.5]})
    with pytest.raises(ValueError, match="no candidates"):
        E.select_by_mean({})
