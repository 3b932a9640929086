"""`recstack bench all` (recstack.bench.suite.run_all) in quick mode on the tiny world: every section
runs in one call (models, retrieval point, serving path, end to end with both peers, GMV) and the
files are written; the teacher is an input, trained here by the training code (`recstack train
coarse` with a training state), and a bad one is refused in one line."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from recstack import cli
from recstack.bench import e2e as E2E
from recstack.bench import suite as B
from recstack.bench import teacher as T

BENCH = Path(B.__file__).parent


@pytest.fixture(scope="module")
def teacher_run(tiny_data, tmp_path_factory) -> Path:
    """A PFD+MD teacher as `bench all --help` says to make one: a coarse run with a training state."""
    runs = tmp_path_factory.mktemp("teacher_runs")
    assert cli.main(["train", "coarse", "--data", str(tiny_data), "--out", str(runs), "--set", "teacher=pfd_md",
                     "--set", "max_steps=3", "--checkpoint-every", "3"]) == 0
    return runs / "coarse"


@pytest.fixture(scope="module")
def quick_all(tiny_data, tiny_bundle, teacher_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_all")
    scratch = tmp_path_factory.mktemp("bench_all_scratch")
    res = B.run_all(out, data_dir=tiny_data, artifacts=tiny_bundle, teacher=teacher_run, scratch=scratch, quick=True,
                    sizes=B.Sizes(n_candidates=2_000, fine_candidates=64, repeats=2), command="test")
    return out, scratch, res


def test_every_section_in_one_run(quick_all, teacher_run):
    out, scratch, res = quick_all
    for name in ("report.md", "results.json", "bench.png", "cascade_w1_fixed.png", "teacher_coarse_w1_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == B.ALL_SCHEMA and "partial" not in on_disk
    assert set(on_disk) >= {"machine", "models", "coarse", "fine", "retrieval", "serving", "coarse_stage_served", "e2e",
                            "targets", "settings"}
    assert len(on_disk["machine"]["loadavg_start"]) == 3 and len(on_disk["machine"]["loadavg_end"]) == 3
    # the given teacher was read (not trained), exported, and its ONNX matches torch
    t = res["models"]["teacher"]
    assert t["path"] == str(teacher_run) and t["max_steps"] == 3 and "teacher_auc" in t["metrics"]
    assert 0 <= t["onnx"]["parity_max_abs_diff"] <= 1e-5
    report = (out / "report.md").read_text()
    for needle in ("## Targets", "## Serving path in process", "Profile", "## Retrieval", "End to end through gRPC",
                   "teacher_coarse_w1", "single_stage_w1", "GMV@50", "Quick mode", res["machine"]["cpu_model"]):
        assert needle in report, needle
    assert "{" not in report.replace("{'", "").replace("{}", ""), "an unformatted placeholder in report.md"
    # the served cascade's CPU per request, held to its target
    cpu = next(r for r in res["targets"] if r["name"] == "server_cpu_ms_per_request")
    assert cpu["goal"] == 6.0 and cpu["measured"] == res["serving"]["cpu_ms_per_request"] > 0
    assert "ms CPU per request (process time, all threads; target <= 6 ms)" in report
    assert res["serving"]["precision"]["coarse"] in ("fp32", "int8")


def test_end_to_end_configs_and_ratios(quick_all):
    _, _, res = quick_all
    e2e = res["e2e"]
    by = {c["name"]: c for c in e2e["configs"]}
    assert set(by) == {"cascade_w1", "single_stage_w1", "teacher_coarse_w1"}
    for name, c in by.items():
        assert "error" not in c, (name, c.get("error"))
        assert c["fixed"]["status"].get("OK", 0) > 0, name
        assert c["server_exit"] is not None  # stopped
        assert c["fixed"]["server_cpu_ms_per_ok"] >= 0.0, name  # the server tree's CPU over the fixed run
    assert by["teacher_coarse_w1"]["sizes"] == by["cascade_w1"]["sizes"] == E2E.CASCADE
    assert set(e2e["throughput_ratios"]) == {"cascade_w1/single_stage_w1", "cascade_w1/teacher_coarse_w1"}
    g = e2e["gmv"]
    for key in ("cascade_gmv_share", "single_stage_gmv_share", "teacher_coarse_gmv_share"):
        assert 0.0 <= g[key] <= 1.0 + 1e-9, key
    names = [r["target"] for r in e2e["targets"]]
    assert any("single-stage" in n for n in names) and any("teacher-as-coarse" in n for n in names)


def test_serving_path_and_retrieval_point(quick_all):
    _, _, res = quick_all
    assert res["serving"]["profile_top"] and res["serving"]["stage_ms"]["total_ms"]["p50"] > 0
    assert "changes" not in res["serving"]  # the serving path is measured as it is, against no earlier code
    pts = res["retrieval"]["points"]
    assert [p["k"] for p in pts] == sorted(p["k"] for p in pts)
    assert all(0.0 <= p["recall"] <= 1.0 for p in pts)
    cs = res["coarse_stage_served"]
    assert cs["inner_product"]["p50"] > 0 and cs["teacher_dnn"]["p50"] > 0


def test_render_all_rewrites_the_report_with_new_notes(quick_all):
    out, _, _ = quick_all
    path = B.render_all(out, notes=["a note written after the run"])
    assert "- a note written after the run" in path.read_text()
    assert json.loads((out / "results.json").read_text())["notes"] == ["a note written after the run"]


def test_the_teacher_is_the_same_from_a_run_or_a_teacher_file(tiny_data, teacher_run, tmp_path):
    from recstack.training import checkpoint

    teacher, vocab, info = T.load_teacher(teacher_run, tiny_data)
    assert not teacher.training and info["hidden"] and info["manner"] == "share_sync"
    for given in (teacher_run.parent, teacher_run / checkpoint.STATE_FILE):  # the runs folder, the state file
        same, _, _ = T.load_teacher(given, tiny_data)
        assert all(torch.equal(v, same.state_dict()[k]) for k, v in teacher.state_dict().items())
    ckpt = checkpoint.load(teacher_run / "checkpoint.pt")
    file = tmp_path / "teacher.pt"
    torch.save({"config": ckpt["config"], "vocab": ckpt["vocab"], "student": ckpt["model"],
                "teacher": teacher.state_dict(), "metrics": ckpt["metrics"]}, file)
    from_file, _, _ = T.load_teacher(file, tiny_data)
    assert all(torch.equal(v, from_file.state_dict()[k]) for k, v in teacher.state_dict().items())


def test_teacher_refused_when_bad(tiny_data, teacher_run, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        T.load_teacher(tmp_path / "missing.pt", tiny_data)
    bad = tmp_path / "t.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        T.load_teacher(bad, tiny_data)
    torch.save({"config": {}, "vocab": {}}, bad)
    with pytest.raises(ValueError, match="missing"):
        T.load_teacher(bad, tiny_data)
    student_only = tmp_path / "student_only"  # a coarse run without its training state
    student_only.mkdir()
    shutil.copy(teacher_run / "checkpoint.pt", student_only / "checkpoint.pt")
    with pytest.raises(ValueError, match="--checkpoint-every"):
        T.load_teacher(student_only, tiny_data)


def test_bench_all_without_a_teacher_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "all", "--artifacts", "a", "--data", "d"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recstack bench all: error: ") and "--teacher" in err[0]
    assert cli.main(["bench", "all", "--artifacts", "a", "--data", "d", "--teacher", "missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "recstack train coarse" in err[0]
    assert not list(tmp_path.iterdir())


def test_no_benchmark_but_the_training_cost_calls_the_training_code():
    """A benchmark takes trained models as input; only `bench train` (the training cost) trains."""
    for path in sorted(BENCH.glob("*.py")):
        names = {a.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)
                 and (node.module or "").endswith(".train") for a in node.names}
        assert path.name == "train_cost.py" or not names & {"fit", "train"}, (path.name, names)


def test_unknown_e2e_config_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        E2E.run_e2e("x", "y", scratch=tmp_path, configs="cascade_w9")
    for bad in ("cascade_c0_w1", "cascade_c200_w0", "cascade_c200"):
        with pytest.raises(ValueError, match="unknown"):
            E2E.run_e2e("x", "y", scratch=tmp_path, configs=bad)
    with pytest.raises(ValueError, match="teacher_onnx"):
        E2E.run_e2e("x", "y", scratch=tmp_path, configs="teacher_coarse_w1")


def test_a_cascade_config_at_another_coarse_size():
    assert E2E.config_spec("cascade_c200_w2") == ("cascade", 2, {**E2E.CASCADE, "coarse_size": 200})
    assert E2E.config_spec("cascade_w1") == E2E.KNOWN["cascade_w1"]


def test_targets_of_server_cpu_and_of_each_cascade_size():
    """The CPU ratio row for each one-worker cascade against the single stage, and a GMV row for
    the cascade at each extra coarse size, with verdicts from the numbers given."""
    from recstack.bench import e2e_report as R

    configs = {"cascade_w1": {"workers": 1, "fixed": {"server_cpu_ms_per_ok": 10.0, "latency_ms": {"p99": 20.0},
                                                      "offered_qps": 50.0}},
               "cascade_c200_w1": {"workers": 1, "fixed": {"server_cpu_ms_per_ok": 6.0}},
               "cascade_w2": {"workers": 2, "fixed": {"server_cpu_ms_per_ok": 9.0}},
               "single_stage_w1": {"workers": 1, "fixed": {"server_cpu_ms_per_ok": 70.0}}}
    gmv = {"retained": 0.94, "cascade_at": {"200": {"retained": 0.96}}}
    rows = {r["target"].split(" ")[0] + (" cpu" if "CPU" in r["target"] else " gmv"): r
            for r in R.check_targets(configs, gmv) if "CPU" in r["target"] or "GMV" in r["target"]}
    assert rows["cascade_w1 cpu"]["measured"] == "70.0 / 10.0 = 7.0x" and rows["cascade_w1 cpu"]["met"] is False
    assert rows["cascade_c200_w1 cpu"]["met"] is True and "cascade_w2 cpu" not in rows
    gm = [r for r in R.check_targets(configs, gmv) if "GMV" in r["target"]]
    assert [(r["measured"], r["met"]) for r in gm] == [("0.940", False), ("0.960", True)]
