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
