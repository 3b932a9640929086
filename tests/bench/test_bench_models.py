"""recstack.bench.models (`recstack bench models`) and recstack.bench.timing: quick run, files, schema,
parity bound, the timing helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recstack import features as FE
from recstack.bench import models as B
from recstack.bench import timing


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    res = B.run(out, quick=True, n_candidates=2_000, fine_candidates=64, repeats=2)
    return out, res, threads


def _timing_ok(t: dict) -> None:
    assert set(t) >= {"median", "min", "max", "p10", "p90", "repeats"}
    assert 0 < t["min"] <= t["p10"] <= t["median"] <= t["p90"] <= t["max"]


def test_quick_run_writes_report_results_and_plot(quick):
    out, res, _ = quick
    for name in ("report.md", "results.json", "bench.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == B.SCHEMA
    assert on_disk["coarse"]["timings_ms"]["teacher_dnn"]["median"] == pytest.approx(
        res["coarse"]["timings_ms"]["teacher_dnn"]["median"])
    report = (out / "report.md").read_text()
    for needle in ("nproc", "load average", "onnxruntime", "Quick mode", "missed by", "random initialisation",
                   res["machine"]["cpu_model"]):
        assert needle in report, needle


def test_schema(quick):
    _, res, _ = quick
    assert set(res) >= {"schema", "machine", "settings", "models", "coarse", "fine", "targets"}
    m = res["machine"]
    assert m["nproc"] >= 1 and len(m["loadavg_start"]) == 3 and len(m["loadavg_end"]) == 3
    assert m["torch"] and m["onnxruntime"] and m["numpy"]
    assert res["settings"]["threads"]["torch_threads"] == 1
    assert res["settings"]["quick"] is True

    c = res["coarse"]
    assert c["n_candidates"] == 2_000 and c["dim"] == 128 and c["gathered_bytes"] == 2_000 * 128 * 4
    assert set(c["timings_ms"]) == {"inner_product_serving", "inner_product_numpy", "inner_product_sorted_gather",
                                    "inner_product_contiguous", "inner_product_int8", "inner_product_int8_shortlist",
                                    "gather_only", "memory_scan_sum", "memory_copy", "teacher_dnn",
                                    "teacher_gemm_floor"}
    for t in c["timings_ms"].values():
        _timing_ok(t)
        assert t["repeats"] == 2
    med = {k: v["median"] for k, v in c["timings_ms"].items()}
    assert c["ratios"]["coarse_speedup_vs_teacher"] == pytest.approx(med["teacher_dnn"] / med["inner_product_serving"])
    assert c["ratios"]["coarse_vs_memory_scan"] == pytest.approx(med["inner_product_serving"] / med["memory_scan_sum"])
    assert c["ratios"]["coarse_int8_shortlist_vs_memory_scan"] == pytest.approx(
        med["inner_product_int8_shortlist"] / med["memory_scan_sum"])
    # the teacher does real work: far more arithmetic than the candidates' vectors have bytes
    assert c["teacher_mlp_gflop"] * 1e9 > 10 * c["gathered_bytes"]

    f = res["fine"]
    assert f["n_candidates"] == 64
    assert set(f["timings_ms"]) >= {"torch_eager", "onnxruntime", "gemm_floor", "onnxruntime_serving_session",
                                    "onnxruntime_intra_op_2"}
    # every ONNX Runtime variant has its parity figure; the fp32 ones within the bound
    for name in ("onnxruntime_serving_session", "onnxruntime_intra_op_2"):
        assert 0 <= f["variant_parity_max_abs_diff"][name] <= 1e-5, name
    # both int8 graphs measured: the served form (the user fed once) and the plain one; int8 moves
    # the probabilities a little, never far
    for name in ("onnxruntime_int8_dynamic", "onnxruntime_int8_plain_graph"):
        assert name in f["timings_ms"] and 0 <= f["variant_parity_max_abs_diff"][name] < 0.05, name
    for t in f["timings_ms"].values():
        _timing_ok(t)
    assert f["ratios"]["fine_ort_speedup_vs_eager"] == pytest.approx(
        f["timings_ms"]["torch_eager"]["median"] / f["timings_ms"]["onnxruntime"]["median"])
    assert f["ratios"]["fine_int8_speedup_vs_eager"] == pytest.approx(
        f["timings_ms"]["torch_eager"]["median"] / f["timings_ms"]["onnxruntime_int8_dynamic"]["median"])

    names = [t["name"] for t in res["targets"]]
    assert names == [n for n in B.TARGETS if n != "server_cpu_ms_per_request"]  # `bench all` measures the server
    for t in res["targets"]:
        assert t["met"] == (t["measured"] >= t["goal"] if t["op"] == ">=" else t["measured"] <= t["goal"])
        assert (t["shortfall_factor"] is None) == t["met"]
        if not t["met"]:
            assert t["shortfall_factor"] > 1


def test_parity_bound(quick):
    _, res, _ = quick
    diff = res["fine"]["parity_max_abs_diff"]
    assert 0 <= diff <= 1e-5
    row = next(t for t in res["targets"] if t["name"] == "fine_parity_max_abs_diff")
    assert row["met"] and row["measured"] == diff


def test_restores_torch_threads(quick):
    _, _, before = quick
    assert torch.get_num_threads() == before


def test_fine_model_outputs_vary():
    """A fresh Ranker's zero head would make every probability equal and parity vacuous."""
    vocab, _ = B.vocab_for(None)
    model, _ = B.fine_model(vocab, None)
    rng = np.random.default_rng(0)
    n = 32
    x = {"user_feats": B.random_ids(rng, vocab.user_sizes(), n), "item_feats": B.random_ids(rng, vocab.item_sizes(), n),
         "item_dense": rng.standard_normal((n, 1)).astype(np.float32),
         "interacted": rng.random((n, len(FE.INTERACTED_FIELDS))).astype(np.float32)}
    with torch.no_grad():
        p = model(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()
    assert not model.training
    assert p.std() > 1e-3


def test_check_targets_shortfall():
    rows = {r["name"]: r for r in B.check_targets({"coarse_speedup_vs_teacher": 250.0, "coarse_vs_memory_scan": 3.0,
                                                    "fine_int8_speedup_vs_eager": 3.0, "ort_vs_gemm_floor": 1.21,
                                                    "fine_parity_max_abs_diff": 0.0})}
    assert rows["coarse_speedup_vs_teacher"]["shortfall_factor"] == pytest.approx(4.0)
    assert rows["coarse_vs_memory_scan"]["shortfall_factor"] == pytest.approx(1.5)
    assert rows["ort_vs_gemm_floor"]["shortfall_factor"] == pytest.approx(1.1)
    assert rows["fine_int8_speedup_vs_eager"]["met"] and rows["fine_parity_max_abs_diff"]["met"]


def test_time_ms_and_bad_arguments(tmp_path):
    t = timing.time_ms(lambda: sum(range(100)), repeats=3, warmup=1)
    assert t["repeats"] == 3 and t["min"] <= t["median"] <= t["max"]
    with pytest.raises(ValueError):
        timing.time_ms(lambda: None, repeats=0)
    with pytest.raises(ValueError):
        B.run(tmp_path, n_candidates=0)
    with pytest.raises(ValueError):
        B.run(tmp_path, repeats=0)


def test_time_interleaved_spreads_repeats_over_rounds():
    order = []
    t = timing.time_interleaved({"a": (lambda: order.append("a"), 6), "b": (lambda: order.append("b"), 2)}, warmup=1)
    assert t["a"]["repeats"] == 6 and t["b"]["repeats"] == 2
    timed = order[2:]  # after one warm-up call each
    assert timed.count("a") == 6 and timed.count("b") == 2
    # b's two calls are spread over the rounds, not bunched at the start
    pos = [i for i, x in enumerate(timed) if x == "b"]
    assert pos[1] - pos[0] >= 3
    with pytest.raises(ValueError):
        timing.time_interleaved({"a": (lambda: None, 0)})
