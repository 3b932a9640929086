"""The coarse ranker under the gmv objective: two-task training, the extra item coordinate
through export and the served inner product, and the objective kept in the checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recstack.config import ConfigError, apply_overrides
from recstack.data import load
from recstack.training import checkpoint
from recstack.training.distill import LambdaSchedule
from recstack.training.onnx import onnx_session
from recstack.serving.coarse import inner_products_by_idx

import coarse_rank.export as coarse_export
from coarse_rank.objective import GmvStep, GmvStudent, TwoTaskDNNTeacher, item_terms
from coarse_rank.train import Config, build_student, build_teacher, load_student, model_inputs, request_batches, train

SMALL = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, batch_size=256,
             teacher_hidden=(32, 16), cvr_hidden=(16,), lr=0.003, optimizer="adam", warmup_steps=2,
             item_stats=False)  # the batches here are plain Examples' (test_coarse_item_stats covers the statistics)


@pytest.fixture(scope="module")
def gmv_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("coarse_gmv")
    cfg = Config(**SMALL, objective="gmv", teacher="pfd_md", max_steps=12, swap_step=4, eval_max_rows=500)
    metrics = train(cfg, tiny_data, out, progress=False)
    return out / "checkpoint.pt", metrics


def test_objective_is_saved_in_the_checkpoint(gmv_run):
    path, metrics = gmv_run
    ckpt = checkpoint.load(path, stage="coarse")
    assert ckpt["config"]["objective"] == "gmv" and metrics["objective"] == "gmv"
    assert any(k.startswith("cvr_head.") for k in ckpt["model"])  # the CVR head is part of the served student
    model, cfg, _ = load_student(path)
    assert isinstance(model, GmvStudent) and cfg.objective == "gmv"
    assert np.isfinite(metrics["auc"]) and np.isfinite(metrics["teacher_auc"])


def test_item_coordinate_round_trips_through_export_and_serving(gmv_run, tiny_data, tmp_path):
    path, _ = gmv_run
    result = coarse_export.export(path, tmp_path)
    meta = result["meta"]
    assert meta["objective"] == "gmv" and meta["dim"] == SMALL["out_dim"] + 1
    assert meta["logit_max_abs_diff"] <= 1e-4 and meta["user_vec_norm_max_err"] <= 1e-4

    data = load(tiny_data)
    vecs = np.load(tmp_path / "item_vectors.npy", allow_pickle=False)
    assert vecs.shape == (data.items.n, SMALL["out_dim"] + 1)
    model, _, _ = load_student(path)
    ids = np.arange(data.items.n)
    terms = item_terms(model, data.items.feats(ids), np.ascontiguousarray(data.items.dense(ids)), data.items.price)
    assert np.allclose(vecs[:, -1], terms - terms.mean(), atol=1e-5)  # log pCVR + log price, centred

    ex = data.examples(data.test_day)
    batch = ex.batch(np.arange(0, len(ex), max(1, len(ex) // 20)))
    user_vec = onnx_session(tmp_path / "user_tower.onnx").run(
        ["user_vec"], {k: batch[k] for k in ("user_feats", "seq_items", "seq_extras")})[0]
    assert np.all(user_vec[:, -1] == 1.0)
    with torch.no_grad():
        click_logit = model(**model_inputs(batch)).numpy().astype(np.float64)
    expected = click_logit + terms[batch["item_id"]] - terms.mean()
    # the served path: the fused gather-dot of recstack.serving.coarse, one request at a time
    served = np.array([inner_products_by_idx(vecs, batch["item_id"][r : r + 1], user_vec[r])[0]
                       for r in range(len(user_vec))])
    assert np.max(np.abs(served - expected)) <= 1e-4
    # and the ranking it gives one user over the whole corpus is the model's
    full = inner_products_by_idx(vecs, ids, user_vec[0])
    assert np.argmax(full) == np.argmax(user_vec[0] @ vecs.T)


def test_gmv_step_is_eq5_on_both_tasks_and_gives_the_teacher_no_soft_gradient(tiny_data):
    data = load(tiny_data)
    cfg = Config(**SMALL, objective="gmv", teacher="pfd_md")
    torch.manual_seed(0)
    student = build_student(cfg, data.vocab)
    teacher = build_teacher(cfg, data.vocab, student)
    assert isinstance(student, GmvStudent) and isinstance(teacher, TwoTaskDNNTeacher)
    batch, inputs = next(request_batches(data.examples(data.train_days), 256))
    student.eval(), teacher.eval()  # fixed BatchNorm statistics: the same numbers on every call
    click, purchase = torch.from_numpy(batch["click"]), torch.from_numpy(batch["purchase"])
    clicked = click > 0
    assert clicked.any()

    # λ = 0 (before the swap) with a frozen teacher: exactly the student's two hard log-losses
    loss = GmvStep(cfg, student, teacher, LambdaSchedule(0.5, 10))((batch, inputs), 0, 10)
    s_ctr = student.score_requests(**inputs)
    s_cvr = student.cvr_logit(inputs["item_feats"], inputs["item_dense"])
    want = (F.binary_cross_entropy_with_logits(s_ctr, click)
            + F.binary_cross_entropy_with_logits(s_cvr[clicked], purchase[clicked]))
    assert torch.allclose(loss, want, atol=1e-6)

    # after the swap, the soft labels reach the student only: the teacher's gradient is its own L_t
    teacher.train(), student.train()
    for m in (student, teacher):
        m.zero_grad()
    GmvStep(cfg, student, teacher, LambdaSchedule(1.0, 0))((batch, inputs), 5, 10).backward()
    g_full = teacher.mlp[-1].weight.grad.clone()
    for m in (student, teacher):
        m.zero_grad()
    GmvStep(cfg, None, teacher, LambdaSchedule(1.0, 0))((batch, inputs), 5, 10).backward()
    assert torch.allclose(teacher.mlp[-1].weight.grad, g_full, atol=1e-6)


def test_gmv_teachers_and_the_refused_settings(tiny_data):
    data = load(tiny_data)
    assert Config().objective == "gmv"  # chosen on the validation day (docs/results/cascade/report.md)
    for teacher in ("md", "pfd_md"):  # the DNN teachers learn both tasks
        cfg = Config(**SMALL, teacher=teacher)
        assert isinstance(build_teacher(cfg, data.vocab, build_student(cfg, data.vocab)), TwoTaskDNNTeacher)
    cfg = Config(**SMALL, teacher="pfd")  # a click-only teacher distils the click logit; the CVR head keeps its hard loss
    student = build_student(cfg, data.vocab)
    teacher = build_teacher(cfg, data.vocab, student)
    assert not isinstance(teacher, TwoTaskDNNTeacher)
    batch, inputs = next(request_batches(data.examples(data.train_days), 256))
    student.eval(), teacher.eval()
    loss = GmvStep(cfg, student, teacher, LambdaSchedule(1.0, 0))((batch, inputs), 5, 10)
    clicked = batch["click"] > 0
    s_cvr = student.cvr_logit(inputs["item_feats"], inputs["item_dense"])
    cvr = F.binary_cross_entropy_with_logits(s_cvr[torch.from_numpy(clicked)], torch.from_numpy(batch["purchase"][clicked]))
    soft = F.binary_cross_entropy_with_logits(student.score_requests(**inputs), torch.sigmoid(teacher(
        **inputs, interacted=torch.from_numpy(batch["interacted"]))))
    assert torch.allclose(loss, soft + cvr, atol=1e-5)
    with pytest.raises(ConfigError, match="oracle"):
        apply_overrides(Config(), ["teacher=oracle"])
    with pytest.raises(ConfigError, match="objective must be one of"):
        apply_overrides(Config(), ["objective=clicks"])
