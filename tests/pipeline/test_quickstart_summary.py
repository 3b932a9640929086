"""The quickstart's summary: the served cascade's GMV@50 share beside the stage AUCs."""
from __future__ import annotations

from recstack.pipeline.quickstart import _quality_lines, cascade_share


def test_summary_prints_the_gmv_share_beside_the_aucs(tiny_data, tiny_bundle, tmp_path):
    share = cascade_share(tiny_bundle, tiny_data, tmp_path, n_users=20)
    assert share["n_users"] == 20 and 0.0 <= share["gmv_share"] <= 1.0 + 1e-9
    assert share["recall_served"] <= share["recall_coarse"] <= share["recall_retrieval"] <= 1.0
    assert (tmp_path / "results.json").exists()
    metrics = {"coarse": {"auc": 0.61, "ceiling_auc": 0.7, "objective": "gmv"},
               "fine": {"ctr": {"auc": 0.7, "auc_truth": 0.8, "calibration": 1.01}},
               "cascade": share}
    lines = _quality_lines(metrics)
    gmv = next(line for line in lines if "GMV@" in line)
    assert f"{share['gmv_share']:.4f}" in gmv and "20 users" in gmv
    assert any(line.startswith("coarse AUC") and "ranks by gmv" in line for line in lines)
    assert lines.index(gmv) > max(i for i, line in enumerate(lines) if "AUC" in line)  # printed after the AUCs


def test_distil_coarse_retrains_the_cut_on_the_bundles_fine_order_and_exports_again(tiny_data, tiny_train_settings, tmp_path):
    """The quickstart's --fine-distill step on a trained `tiny` runs folder: the targets file is
    built from the first bundle, the coarse stage is trained again with the pairs (its config
    keeps the setting), the first checkpoint is kept beside it, and `current` is a new bundle
    whose coarse stage is the distilled one."""
    import json

    import numpy as np
    import torch

    from recstack.bundle import resolve_bundle
    from recstack.cli import main
    from recstack.pipeline.quickstart import distil_coarse

    runs, art = tmp_path / "runs", tmp_path / "artifacts"
    for stage, settings in tiny_train_settings.items():
        assert main(["train", stage, "--data", tiny_data, "--out", str(runs), *[a for s in settings for a in ("--set", s)]]) == 0
    assert main(["export", "--runs", str(runs), "--out", str(art)]) == 0
    first = resolve_bundle(art)
    plain_ckpt = (runs / "coarse" / "checkpoint.pt").read_bytes()

    bundle, info = distil_coarse(tiny_data, runs, art, tmp_path, 2.0, coarse_settings={"fine_distill_requests": 8},
                                 max_requests=20, progress=False)

    assert bundle != first and resolve_bundle(art) == bundle
    assert (runs / "coarse_plain" / "checkpoint.pt").read_bytes() == plain_ckpt
    with np.load(tmp_path / "fine_targets.npz") as z:
        meta = json.loads(str(z["meta"]))
    assert meta["bundle"] == first.name and info["requests"] == meta["requests"] > 0
    cfg = torch.load(runs / "coarse" / "checkpoint.pt", weights_only=False)["config"]
    assert cfg["fine_distill"] == 2.0 and cfg["fine_targets"] == str(tmp_path / "fine_targets.npz")
    assert cfg["fine_distill_requests"] == 8 and cfg["hidden"] == [32]  # the first training's config, plus the pairs
    assert info["coarse"]["steps"] == 8 and not (runs / "coarse_distilled").exists()
    # the new bundle's coarse item vectors come from the distilled checkpoint, not the first one's
    assert (bundle / "coarse").exists() and any(
        (bundle / "coarse" / f.name).read_bytes() != f.read_bytes() for f in (first / "coarse").iterdir() if f.is_file())

    # a second run starts again from the checkpoint without the pairs and keeps it
    again, _ = distil_coarse(tiny_data, runs, art, tmp_path, 1.0, coarse_settings={"fine_distill_requests": 8},
                             max_requests=20, progress=False)
    assert resolve_bundle(art) == again != bundle
    assert (runs / "coarse_plain" / "checkpoint.pt").read_bytes() == plain_ckpt
    assert torch.load(runs / "coarse" / "checkpoint.pt", weights_only=False)["config"]["fine_distill"] == 1.0


def test_quickstart_refuses_a_negative_fine_distill(tmp_path, capsys):
    from recstack.cli import main

    assert main(["quickstart", "--workdir", str(tmp_path), "--fine-distill", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fine-distill must be >= 0" in err[0]
