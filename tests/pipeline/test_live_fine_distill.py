"""`recstack live --fine-distill MU`: day 0's coarse stage is trained again on the fine order of
a first day-0 bundle (the quickstart's second pass) before both arms get their day-0 bundle."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from recstack import bundle as B
from recstack.pipeline.live import LiveConfig, initial_bundle


def test_day0_serves_a_coarse_student_distilled_from_the_first_bundles_fine_order(live_config, tmp_path, one_thread, monkeypatch):
    import numpy as np
    import torch

    monkeypatch.setattr("coarse_rank.export.INT8_REQUESTS", 50)
    tiny = live_config.train_overrides
    overrides = {**tiny, "coarse": [*tiny["coarse"], "fine_distill_requests=8"]}
    cfg = replace(live_config, days=1, fine_distill=2.0, train_overrides=overrides)
    _, runs = initial_bundle(cfg, tmp_path, None)

    plain = torch.load(runs / "coarse_plain" / "checkpoint.pt", weights_only=False)["config"]
    distilled = torch.load(runs / "coarse" / "checkpoint.pt", weights_only=False)["config"]
    assert plain["fine_distill"] == 0.0 and distilled["fine_distill"] == 2.0
    with np.load(distilled["fine_targets"]) as z:  # built from the first bundle
        meta = json.loads(str(z["meta"]))
    assert meta["bundle"] == "plain" and meta["requests"] > 0
    # the distilled student is the plain one's config plus the pairs
    assert {k: v for k, v in distilled.items() if k not in ("fine_distill", "fine_targets")} == \
        {k: v for k, v in plain.items() if k not in ("fine_distill", "fine_targets")}
    # both arms serve day 0 with the distilled coarse stage; the first bundle is gone
    for arm in ("A", "B"):
        root = tmp_path / "arms" / arm
        assert B.read_current(root) == "day00"
        manifest = json.loads((root / "day00" / "manifest.json").read_text())
        assert manifest["configs"]["coarse"]["fine_distill"] == 2.0
    assert not (tmp_path / "day00_first").exists() and not (runs / "coarse_distilled").exists()

    # a resumed loop does not distil again
    stamp = (runs / "coarse" / "checkpoint.pt").stat().st_mtime_ns
    initial_bundle(cfg, tmp_path, None)
    assert (runs / "coarse" / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_a_negative_fine_distill_is_refused_in_one_line(tmp_path, capsys):
    from recstack.cli import main

    with pytest.raises(ValueError, match=r"^LiveConfig: fine_distill must be >= 0 \(0: off\), got -1") as e:
        LiveConfig(fine_distill=-1.0)
    assert "\n" not in str(e.value)
    assert main(["live", "--out", str(tmp_path / "live"), "--fine-distill", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fine_distill must be >= 0" in err[0]
    assert not (tmp_path / "live").exists()  # refused before anything was written
