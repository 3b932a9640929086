"""SEAD's auxiliary tower as a model (its own weights, two branches, nothing of it exported),
the streaming fit of a fine-ranker task (one pass per day, warm start, next-day scores) and
the streaming SEAD / signal-loss experiments (cached per run, resumable)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from recstack.config import ConfigError, apply_overrides
from recstack.data import load
from recstack.training import sead
from recstack.training.onnx import onnx_session

from fine_rank import export as fexport
from fine_rank import stream as S
from fine_rank import train as ftrain
from fine_rank.experiments import run as run_experiment
from fine_rank.model import Ranker, SelfAuxiliary, SignalTeacher

SMALL = dict(ctr_hidden=(16, 8), cvr_hidden=(16, 8), ctr_emb_dim=4, cvr_emb_dim=4, ctr_batch_size=256,
             cvr_batch_size=64, sead_aux_width=8)


def test_aux_tower_has_its_own_randomly_initialised_weights_and_ogl_is_not_the_main_gradient(fine_vocab, random_inputs):
    torch.manual_seed(0)
    ranker = Ranker.build(fine_vocab, emb_dim=4, hidden=(16, 8))
    sa = SelfAuxiliary(ranker, aux_width=8)
    main_ids = {id(p) for p in ranker.parameters()}
    aux = list(sa.aux.parameters())
    assert aux and not any(id(p) in main_ids for p in aux)
    assert torch.count_nonzero(sa.aux.scratch[1].weight) > 0 and not torch.equal(sa.aux.scratch[1].weight,
                                                                                  sa.aux.distill[1].weight)
    x = random_inputs(64)
    y = (torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    sa.train()

    def bottom_grad(loss_of):
        sa.zero_grad()
        main, zs, zd = sa.both(**x)
        loss_of(main, zs, zd).backward()
        return ranker.bottom.layers[0].weight.grad.flatten().clone()

    g_main = bottom_grad(lambda m, zs, zd: torch.nn.functional.binary_cross_entropy_with_logits(m, y))
    g_ogl = bottom_grad(lambda m, zs, zd: sead.aux_loss("ogl", zs, zd, y, m)[0])
    g_dtl = bottom_grad(lambda m, zs, zd: sead.aux_loss("dtl", zs, zd, y, m)[0])
    # at the first step the aux losses reach the shared bottom, along their own directions
    assert g_ogl.norm() > 0 and g_dtl.norm() > 0
    cos = torch.nn.functional.cosine_similarity(g_main, g_ogl, dim=0)
    assert abs(float(cos)) < 0.99


def test_sead_exports_the_same_graph_as_the_baseline(tiny_fine_cfg, tiny_data, tmp_path):
    """Only the main head is exported: same inputs, outputs and weight shapes with and without SEAD."""
    graphs = {}
    for name, changes in (("baseline", []), ("sead", ["ctr_sead=max", "cvr_sead=curriculum"])):
        cfg = apply_overrides(ftrain.Config(**tiny_fine_cfg), changes)
        metrics = ftrain.train(cfg, tiny_data, tmp_path / name, progress=False)
        fexport.export(tmp_path / name / "checkpoint.pt", tmp_path / name / "bundle")
        graphs[name] = {}
        for task in ("ranker",):  # CTR and CVR in one graph (fine_rank/export.py); int8 copies aside
            model = onnx.load(str(tmp_path / name / "bundle" / f"{task}.onnx"))
            sess = onnx_session(tmp_path / name / "bundle" / f"{task}.onnx")
            graphs[name][task] = (
                [(i.name, i.shape, i.type) for i in sess.get_inputs()], [(o.name, o.shape, o.type) for o in sess.get_outputs()],
                sorted((t.name, tuple(t.dims)) for t in model.graph.initializer), len(model.graph.node))
        if name == "sead":
            assert metrics["ctr"]["train"]["method"] == "sead_max" and "aux" in metrics["cvr"]
    assert graphs["sead"] == graphs["baseline"]


def test_fit_stream_trains_one_pass_per_day_and_scores_the_next(tiny4_world):
    data = load(tiny4_world)
    days = S.day_tables(data, "cvr")
    agg = S.day_aggregates(data)
    cfg = ftrain.Config(**SMALL, cvr_sead="max", cvr_calibrate="none")
    curve = S.fit_stream("cvr", cfg, data.vocab, days, seed=1, aggregates=agg)
    assert [(c["day"], c["eval_day"]) for c in curve] == [(1, 2), (2, 3), (3, 4)]
    for c in curve:
        assert c["train"]["steps"] == int(np.ceil(len(days[c["day"]]["click"]) / 64))  # one pass
        assert 0 < c["auc"] < 1 and "aux_auc" in c and c["calibration_shift"] == 0.0
    # signal loss: the served model of each day is calibrated to that day's aggregated rate
    sig = ftrain.Config(**SMALL, cvr_teacher="signal_loss", cvr_label="purchase_observed", cvr_calibrate="aggregates")
    curve = S.fit_stream("cvr", sig, data.vocab, days, seed=1, aggregates=agg)
    assert all({"teacher_auc", "auc_observed", "auc_aggregated"} <= set(c) for c in curve)
    assert all(c["calibration_shift"] != 0.0 for c in curve)
    with pytest.raises(ConfigError, match="cvr_teacher='pfd' has no streaming mode"):
        S.fit_stream("cvr", ftrain.Config(**SMALL, cvr_teacher="pfd"), data.vocab, days, seed=1)


def test_signal_teacher_shares_nothing_with_the_student(fine_vocab, random_inputs):
    student = Ranker.build(fine_vocab, emb_dim=4, hidden=(16, 8))
    teacher = SignalTeacher(Ranker.build(fine_vocab, emb_dim=4, hidden=(16, 8)), aux_width=8)
    assert not {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    main, aux = teacher.both(**random_inputs(5))
    assert main.shape == aux.shape == (5,)


def test_streaming_experiments_write_reports_and_resume_from_the_cache(tiny4_world, tmp_path):
    over = ("streaming=true", "last_days=2", "ctr_methods=sead_max,sead_min,ogl,lr2x", "cvr_methods=sead_max,dtl")
    res = run_experiment("sead", tiny4_world, tmp_path / "sead", seeds=(1, 2), quick=True, overrides=over, log=lambda s: None)
    ctr = res["tasks"]["ctr"]["methods"]
    assert set(ctr) == {"baseline", "sead_max", "sead_min", "ogl", "lr2x"}
    assert set(res["tasks"]["cvr"]["methods"]) == {"baseline", "sead_max", "dtl"}
    # SEAD (max) - SEAD (min) is paired per seed; the table without sead_min has none
    gap = res["tasks"]["ctr"]["sead_max_minus_min"]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx(np.mean(ctr["sead_max"]["auc_per_seed"]) - np.mean(ctr["sead_min"]["auc_per_seed"]))
    assert "sead_max_minus_min" not in res["tasks"]["cvr"]
    assert res["tasks"]["cvr"]["label_noise"]["days"] == [3, 4]
    assert res["tasks"]["ctr"]["eval_days"] == [2, 3, 4] and len(ctr["baseline"]["curve"]) == 3
    assert ctr["baseline"]["delta_vs_baseline"]["mean"] == 0.0 and ctr["ogl"]["delta_vs_baseline"]["n"] == 2
    assert ctr["ogl"]["per_seed_differs_from_baseline"]
    report = (tmp_path / "sead" / "report.md").read_text()
    assert "streaming" in report and (tmp_path / "sead" / "sead_ctr_stream_daily_delta.png").exists()
    assert "SEAD (max) − SEAD (min), paired over seeds" in report and "relative standard error of the label mean" in report
    cached = sorted((tmp_path / "sead" / "cache").iterdir())
    assert len(cached) == 2 * (5 + 3)
    # a second run reads every run from the cache: the same numbers
    again = run_experiment("sead", tiny4_world, tmp_path / "sead", seeds=(1, 2), quick=True, overrides=over, log=lambda s: None)
    assert json.dumps(again["tasks"], sort_keys=True) == json.dumps(res["tasks"], sort_keys=True)
    # a cached run of another Config is refused, never reused (here: other tower widths)
    with pytest.raises(ValueError, match=r"cache .*\(another world or Config\); remove it or use another --out"):
        run_experiment("sead", tiny4_world, tmp_path / "sead", seeds=(1, 2), quick=True, overrides=over + ("cvr_emb_dim=8",),
                       log=lambda s: None)
    sig = run_experiment("signal-loss", tiny4_world, tmp_path / "sig", seeds=(1, 2), quick=True,
                         overrides=("streaming=true", "last_days=2"), log=lambda s: None)
    e = sig["tasks"]["cvr"]["methods"]
    assert "sead_signal_wu" not in e and {"baseline", "sead_signal", "oracle", "consented_only"} <= set(e)
    assert "delta_auc_observed" in e["sead_signal"] and "calibration_aggregated" in e["sead_signal"]
    with pytest.raises(ConfigError, match="streaming=true runs the sead and signal-loss experiments"):
        run_experiment("cvr", tiny4_world, tmp_path / "cvr", seeds=(1, 2), quick=True, overrides=("streaming=true",),
                       log=lambda s: None)


def test_the_run_key_names_the_world_and_the_config_but_not_the_world_timings():
    from fine_rank.experiments.streaming import run_key

    world = {"preset": "tiny", "seed": 0, "n_days": 4, "timings_s": {"total": 1.0}}
    cfg = ftrain.Config(**SMALL)
    key = run_key(world, cfg, "all")
    assert key == run_key({**world, "timings_s": {"total": 9.0}}, cfg, "all")  # the same world, simulated again
    assert key != run_key({**world, "seed": 1}, cfg, "all")
    assert key != run_key(world, apply_overrides(cfg, ["cvr_lr=0.004"]), "all")
    assert key != run_key(world, cfg, "consented")


def test_label_noise_is_the_label_sum_over_the_true_sum_and_its_standard_error():
    from fine_rank.experiments.streaming import label_noise

    p = np.full(100, 0.2, dtype=np.float32)
    days = {d: {"purchase": np.arange(100) < k, "true_pcvr": p} for d, k in ((1, 50), (2, 18), (3, 22))}
    n = label_noise("cvr", days, [2, 3])
    # 40 purchases where 40 were expected; sqrt(200 * 0.2 * 0.8) / 40 = 0.1414
    assert n["labels"] == 40 and n["expected"] == pytest.approx(40.0) and n["label_over_truth"] == pytest.approx(1.0)
    assert n["rel_se"] == pytest.approx(np.sqrt(200 * 0.16) / 40) and n["days"] == [2, 3]
    assert label_noise("cvr", days, [2])["label_over_truth"] == pytest.approx(0.9)
