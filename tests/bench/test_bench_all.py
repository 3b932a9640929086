"""`recstack bench all` (recstack.bench.suite.run_all) in quick mode on the tiny world: every section
runs in one call (models, retrieval point, serving path, end to end with both peers, GMV), the
files are written, and the serving-path changes give the answers of the code they replaced."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from recstack.bench import suite as B
from recstack.bench import e2e as E2E


@pytest.fixture(scope="module")
def quick_all(tiny_data, tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_all")
    scratch = tmp_path_factory.mktemp("bench_all_scratch")
    res = B.run_all(out, data_dir=tiny_data, artifacts=tiny_bundle, scratch=scratch, teacher_steps=3, quick=True,
                    n_candidates=2_000, fine_candidates=64, repeats=2, command="test")
    return out, scratch, res


def test_every_section_in_one_run(quick_all):
    out, scratch, res = quick_all
    for name in ("report.md", "results.json", "bench.png", "cascade_w1_fixed.png", "teacher_coarse_w1_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == B.ALL_SCHEMA and "partial" not in on_disk
    assert set(on_disk) >= {"machine", "models", "coarse", "fine", "retrieval", "serving", "coarse_stage_served", "e2e",
                            "targets", "settings"}
    assert len(on_disk["machine"]["loadavg_start"]) == 3 and len(on_disk["machine"]["loadavg_end"]) == 3
    # the teacher was trained in this run, exported, and its ONNX matches torch
    t = res["models"]["teacher"]
    assert t["trained_in_this_run"] and Path(t["path"]).exists()
    assert 0 <= t["onnx"]["parity_max_abs_diff"] <= 1e-5
    report = (out / "report.md").read_text()
    for needle in ("## Targets", "what each change bought", "Profile", "## Retrieval", "End to end through gRPC",
                   "teacher_coarse_w1", "single_stage_w1", "GMV@50", "Quick mode", res["machine"]["cpu_model"]):
        assert needle in report, needle
    assert "{" not in report.replace("{'", "").replace("{}", ""), "an unformatted placeholder in report.md"


def test_end_to_end_configs_and_ratios(quick_all):
    _, _, res = quick_all
    e2e = res["e2e"]
    by = {c["name"]: c for c in e2e["configs"]}
    assert set(by) == {"cascade_w1", "single_stage_w1", "teacher_coarse_w1"}
    for name, c in by.items():
        assert "error" not in c, (name, c.get("error"))
        assert c["fixed"]["status"].get("OK", 0) > 0, name
        assert c["server_exit"] is not None  # stopped
    assert by["teacher_coarse_w1"]["sizes"] == by["cascade_w1"]["sizes"] == E2E.CASCADE
    assert set(e2e["throughput_ratios"]) == {"cascade_w1/single_stage_w1", "cascade_w1/teacher_coarse_w1"}
    g = e2e["gmv"]
    for key in ("cascade_gmv_share", "single_stage_gmv_share", "teacher_coarse_gmv_share"):
        assert 0.0 <= g[key] <= 1.0 + 1e-9, key
    names = [r["target"] for r in e2e["targets"]]
    assert any("single-stage" in n for n in names) and any("teacher-as-coarse" in n for n in names)


def test_serving_changes_measured_and_retrieval_point(quick_all):
    _, _, res = quick_all
    ch = res["serving"]["changes"]
    assert set(ch) == {"coarse_scores", "dedupe_ann", "membership", "protobuf_response"}
    for v in ch.values():
        assert v["before_ms_per_request"] > 0 and v["after_ms_per_request"] > 0
    assert res["serving"]["profile_top"] and res["serving"]["stage_ms"]["total_ms"]["p50"] > 0
    pts = res["retrieval"]["points"]
    assert [p["k"] for p in pts] == sorted(p["k"] for p in pts)
    assert all(0.0 <= p["recall"] <= 1.0 for p in pts)
    cs = res["coarse_stage_served"]
    assert cs["inner_product"]["p50"] > 0 and cs["teacher_dnn"]["p50"] > 0


def test_teacher_file_refused_when_bad(tiny_data, tmp_path):
    bad = tmp_path / "t.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        B.load_or_train_teacher(tiny_data, bad)
    import torch

    torch.save({"config": {}, "vocab": {}}, bad)
    with pytest.raises(ValueError, match="missing"):
        B.load_or_train_teacher(tiny_data, bad)


def test_unknown_e2e_config_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        E2E.run_e2e("x", "y", scratch=tmp_path, configs="cascade_w9")
    with pytest.raises(ValueError, match="teacher_onnx"):
        E2E.run_e2e("x", "y", scratch=tmp_path, configs="teacher_coarse_w1")
