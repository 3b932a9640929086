"""`calibration_holdout`: the calibration shift fitted on a slice of the training rows that the
model never trained on, so that the mean prediction matches the label mean on unseen rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fine_rank.train as ftrain
from fine_rank.calibration import holdout_split
from recstack.config import ConfigError, apply_overrides
from recstack.data import load


def _table(n: int) -> dict[str, np.ndarray]:
    return {"click": np.ones(n, np.float32), "row": np.arange(n)}


def test_holdout_split_is_a_seeded_partition():
    fit, held = holdout_split(_table(200), 0.1, seed=3)
    assert len(held["row"]) == 20 and len(fit["row"]) == 180
    assert sorted(np.concatenate([fit["row"], held["row"]]).tolist()) == list(range(200))
    again, other = holdout_split(_table(200), 0.1, seed=3)[1], holdout_split(_table(200), 0.1, seed=4)[1]
    assert np.array_equal(again["row"], held["row"]) and not np.array_equal(other["row"], held["row"])
    with pytest.raises(ValueError, match="calibration_holdout=0.001 of 200 rows"):
        holdout_split(_table(200), 0.001, seed=0)


def test_config_refuses_a_fraction_outside_0_1_and_a_streamed_holdout():
    with pytest.raises(ConfigError, match="calibration_holdout must be in"):
        ftrain.Config(calibration_holdout=1.0)
    with pytest.raises(ConfigError, match="calibration_holdout needs the in-memory path"):
        ftrain.Config(calibration_holdout=0.1, stream_chunk_rows=1000)
    assert ftrain.Config().calibration_holdout == 0.0  # off by default


def test_the_shift_is_fitted_on_rows_the_model_never_trained_on(tiny_data, one_thread):
    data = load(tiny_data)
    rows = ftrain.clicked(ftrain.materialise(data.examples(data.train_days)))
    cfg = ftrain.Config(cvr_hidden=(32, 16), cvr_emb_dim=4, cvr_batch_size=128)
    held_out = ftrain.fit_task("cvr", apply_overrides(cfg, ["calibration_holdout=0.25"]), data.vocab, rows, seed=3)
    fit_rows, held = holdout_split(rows, 0.25, seed=3)
    # the same student, trained on the other rows only and not calibrated
    plain = ftrain.fit_task("cvr", apply_overrides(cfg, ["cvr_calibrate=none"]), data.vocab, fit_rows, seed=3)
    a, b = held_out.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "head.linear.bias")
    shift = held_out.stats["calibration_shift"]
    assert shift != 0.0 and float(a["head.linear.bias"] - b["head.linear.bias"]) == pytest.approx(shift, abs=1e-5)
    assert held_out.stats["calibration_rows"] == len(held["click"]) and held_out.stats["n_train"] == len(fit_rows["click"])
    # the target is every training row's purchase rate, met on the held-out slice
    rate = float(rows["purchase"].mean())
    assert held_out.stats["calibrated_to"] == pytest.approx(rate)
    assert np.mean(ftrain.predict(held_out.model, held)) == pytest.approx(rate, rel=1e-3)
