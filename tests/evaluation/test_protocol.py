import json

import numpy as np
import pytest

from recstack.evaluation import protocol as E


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
    E.write_results(tmp_path, {"x": np.float32(1.5), "a": np.arange(3)})
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 1.5, "a": [0, 1, 2]}
    E.plot_bars_with_ci(tmp_path / "d.png", ["a", "b"], [E.paired_diff([1, 2], [0, 1]), E.paired_diff([1, 1.1], [1, 1])], "t")
    E.plot_reliability(tmp_path / "r.png", {"m": {"mean_pred": [0.1, 0.2], "mean_label": [0.1, 0.25]}}, "t")
    assert (tmp_path / "d.png").stat().st_size > 1000 and (tmp_path / "r.png").stat().st_size > 1000
