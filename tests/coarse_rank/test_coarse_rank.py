"""Coarse ranker: the inner-product student, its training on `tiny`, and its export."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from recstack.training import checkpoint
from recstack.config import ConfigError, apply_overrides
from recstack.data import load
from recstack.features import INTERACTED_FIELDS, SEQ_LEN, Vocab
from recstack.training.onnx import export_onnx, onnx_session, parity

import coarse_rank.export as coarse_export
from coarse_rank.model import FeatureEmbeddings, InnerProductStudent
from coarse_rank.train import Config, load_student, model_inputs, request_inputs, train

VOCAB = Vocab(n_users=30, n_items=60, n_categories=7, n_shops=9, n_brands=8, n_price_buckets=5,
              n_age_buckets=6, n_genders=2, n_activity_levels=3, log_price_mean=3.0, log_price_std=1.0)

# small enough to train on `tiny` in seconds, big enough to learn something
FAST = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, batch_size=256,
            epochs=4, lr=0.003, optimizer="adam", warmup_steps=10, teacher="baseline", objective="ctr",
            item_stats=False)  # the batches here are plain Examples' (test_coarse_item_stats covers the statistics)


def random_inputs(b: int, seed: int = 0, lengths=None) -> dict[str, np.ndarray]:
    """Inputs shaped and ranged per ARCHITECTURE.md; row r uses its first lengths[r] slots."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, SEQ_LEN + 1, b) if lengths is None else np.asarray(lengths)
    user_sizes, item_sizes = VOCAB.user_sizes(), VOCAB.item_sizes()
    user_feats = np.stack([rng.integers(1, n, b) for n in user_sizes], axis=1)
    seq_items = np.stack([rng.integers(1, n, (b, SEQ_LEN)) for n in item_sizes], axis=2)
    seq_extras = rng.random((b, SEQ_LEN, 3)).astype(np.float32) * 3
    seq_extras[..., 2] = rng.random((b, SEQ_LEN)) < 0.2
    empty = np.arange(SEQ_LEN)[None, :] >= lengths[:, None]
    seq_items[empty] = 0
    seq_extras[empty] = 0.0
    item_feats = np.stack([rng.integers(1, n, b) for n in item_sizes], axis=1)
    return {
        "user_feats": user_feats.astype(np.int64), "seq_items": seq_items.astype(np.int64), "seq_extras": seq_extras,
        "item_feats": item_feats.astype(np.int64), "item_dense": rng.normal(size=(b, 1)).astype(np.float32),
    }


def t(inputs: dict[str, np.ndarray], *names: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in (names or inputs)}


USER = ("user_feats", "seq_items", "seq_extras")


def trained_bn_model(**kw) -> InnerProductStudent:
    """A student whose BatchNorm running statistics are not the identity (as after training)."""
    torch.manual_seed(0)
    model = InnerProductStudent(VOCAB, **kw)
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(**t(random_inputs(32, seed=100 + s)))
    return model.eval()


def test_shapes_unit_norm_and_score_range():
    model = trained_bn_model()
    x = random_inputs(7)
    with torch.no_grad():
        u = model.user_tower(**t(x, *USER))
        v = model.item_tower(**t(x, "item_feats", "item_dense"))
        logits = model(**t(x))
    assert u.shape == (7, 128) and v.shape == (7, 128) and logits.shape == (7,)
    assert torch.allclose(u.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(v.norm(dim=1), torch.ones(7), atol=1e-5)
    assert torch.allclose(logits, 5.0 * (u * v).sum(1), atol=1e-6)
    assert logits.abs().max() <= 5.0 + 1e-5


def test_score_requests_equals_forward_on_gathered_rows():
    model = trained_bn_model()
    x = random_inputs(5, seed=3)
    index = np.array([0, 0, 1, 4, 2, 2, 3, 4, 4], dtype=np.int64)
    rows = {k: x[k][index] for k in USER}
    rows.update({k: random_inputs(9, seed=4)[k] for k in ("item_feats", "item_dense")})
    with torch.no_grad():
        per_row = model(**t(rows))
        for buckets in (1, 3):
            shared = model.score_requests(**t(x, *USER), request_index=torch.from_numpy(index),
                                          item_feats=torch.from_numpy(rows["item_feats"]),
                                          item_dense=torch.from_numpy(rows["item_dense"]), length_buckets=buckets)
            assert torch.allclose(per_row, shared, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_sequence_and_unknown_user_are_finite(mode):
    model = trained_bn_model()
    model.train(mode == "train")
    x = random_inputs(6, lengths=[0, 0, 3, 50, 0, 1])
    x["user_feats"][0] = 0  # unknown user (cold start) with no behaviours
    inputs = t(x)
    logits = model(**inputs)
    assert torch.isfinite(logits).all()
    if mode == "train":
        logits.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # all rows empty at once: the attention has no valid behaviour key anywhere in the batch
    x0 = random_inputs(4, lengths=[0, 0, 0, 0])
    with torch.no_grad():
        assert torch.isfinite(model(**t(x0))).all()


def test_padding_slots_do_not_change_the_output():
    model = trained_bn_model()
    x = random_inputs(4, seed=7, lengths=[5, 12, 0, 50])
    with torch.no_grad():
        ref = model.user_tower(**t(x, *USER))
        # junk in the extras of empty slots is ignored (the mask comes from the item id)
        junk = dict(x, seq_extras=x["seq_extras"].copy())
        junk["seq_extras"][x["seq_items"][..., 0] == 0] = 7.5
        assert torch.allclose(model.user_tower(**t(junk, *USER)), ref, atol=1e-6)
        # so does the number of trailing empty slots, and the bucketing that relies on it
        cut = {k: x[k][:2] for k in USER}
        cut["seq_items"], cut["seq_extras"] = cut["seq_items"][:, :12], cut["seq_extras"][:, :12]
        assert torch.allclose(model.user_tower(**t(cut, *USER)), ref[:2], atol=1e-5)
        assert torch.allclose(model.user_tower(**t(x, *USER), length_buckets=3), ref, atol=1e-5)
        # ...while a valid slot does matter
        moved = dict(x, seq_extras=x["seq_extras"].copy())
        moved["seq_extras"][0, 0, 0] += 2.0
        assert not torch.allclose(model.user_tower(**t(moved, *USER))[0], ref[0], atol=1e-4)


def test_feature_embeddings_sharing_except_user_id():
    emb = FeatureEmbeddings(VOCAB, 8)
    shared = emb.sharing(except_user_fields=(0,), vocab=VOCAB)
    assert all(a is b for a, b in zip(shared.item_tables, emb.item_tables))
    assert shared.user_tables[0] is not emb.user_tables[0]
    assert all(shared.user_tables[j] is emb.user_tables[j] for j in (1, 2, 3))
    assert emb.sharing().user_tables[0] is emb.user_tables[0]
    with pytest.raises(ValueError):
        emb.sharing(except_user_fields=(0,))


def test_user_tower_onnx_parity_batch_1_and_7(tmp_path):
    model = trained_bn_model()
    x = {k: v for k, v in random_inputs(7, seed=11, lengths=[0, 1, 2, 10, 25, 49, 50]).items() if k in USER}
    path = export_onnx(model.user_tower, x, tmp_path / "u.onnx", ["user_vec"])
    assert parity(model.user_tower, path, x) <= 1e-5
    for r in (0, 6):  # the empty-sequence row and the full one, alone (batch 1)
        one = {k: v[r : r + 1] for k, v in x.items()}
        assert parity(model.user_tower, path, one) <= 1e-5
    out = onnx_session(path).run(["user_vec"], x)[0]
    assert out.shape == (7, 128) and np.isfinite(out).all()
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_config_overrides_are_checked():
    cfg = apply_overrides(Config(), ["lr=0.2", "hidden=64,32", "optimizer=adam"])
    assert cfg.lr == 0.2 and cfg.hidden == (64, 32) and cfg.optimizer == "adam"
    with pytest.raises(ConfigError, match="valid keys"):
        apply_overrides(Config(), ["learning_rate=0.1"])
    with pytest.raises(ConfigError, match="optimizer"):
        apply_overrides(Config(), ["optimizer=sgd"])
    with pytest.raises(ConfigError, match="divisible"):
        apply_overrides(Config(), ["d_model=30"])


def test_lr_schedule_warms_up_then_holds_or_falls_to_zero():
    from coarse_rank.tasks import lr_factor

    const, lin = Config(warmup_steps=4), Config(warmup_steps=4, lr_schedule="linear")
    total = 20
    assert [lr_factor(const, s, total) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    f = [lr_factor(lin, s, total) for s in range(total)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]  # the same warm-up
    assert all(a > b for a, b in zip(f[3:], f[4:])) and 0 < f[-1] <= 1 / (total - 4)  # falls every step
    assert lr_factor(lin, total, total) == 0.0  # 0 after the last step
    with pytest.raises(ConfigError, match="lr_schedule"):
        apply_overrides(Config(), ["lr_schedule=cosine"])


def test_linear_lr_schedule_trains_and_ends_at_zero(tiny_data, tmp_path):
    from coarse_rank.tasks import make_optimizer
    from coarse_rank.objective import build_student

    cfg = Config(**dict(FAST, lr_schedule="linear"))
    opt, sched = make_optimizer(cfg, build_student(cfg, load(tiny_data).vocab).parameters(), 12)
    for _ in range(12):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    m = train(Config(**dict(FAST, lr_schedule="linear", max_steps=6, eval_max_rows=200)), tiny_data, tmp_path,
              progress=False)
    assert np.isfinite(m["final_train_loss"])
    assert checkpoint.load(tmp_path / "checkpoint.pt")["config"]["lr_schedule"] == "linear"


def test_request_inputs_share_one_user_row_per_request():
    x = random_inputs(6, seed=5, lengths=[3, 3, 3, 8, 8, 2])
    x["user_id"] = np.array([4, 4, 4, 9, 9, 4])
    ts = np.array([10.0, 10.0, 10.0, 10.0, 10.0, 11.0])
    inputs = request_inputs(x, ts)
    assert inputs["user_feats"].shape[0] == 3  # (4, 10), (9, 10), (4, 11)
    assert inputs["seq_items"].shape[1] == 8  # cut after the last slot any request uses
    idx = inputs["request_index"].numpy()
    assert idx[0] == idx[1] == idx[2] and idx[3] == idx[4] and len({idx[0], idx[3], idx[5]}) == 3


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("coarse_run")
    metrics = train(Config(**FAST), tiny_data, out, progress=False)
    return out / "checkpoint.pt", metrics


def test_training_on_tiny_beats_chance(trained):
    path, metrics = trained
    assert metrics["auc"] > 0.56, metrics
    assert metrics["auc"] < metrics["ceiling_auc"] <= 1.0
    assert 0.3 < metrics["calibration"] < 3.0
    ckpt = checkpoint.load(path, stage="coarse")
    assert set(ckpt) >= {"stage", "config", "model", "metrics", "data_dir", "vocab"}
    assert ckpt["config"]["d_model"] == FAST["d_model"]


def test_training_is_deterministic(tiny_data, tmp_path):
    cfg = Config(**dict(FAST, max_steps=4, eval_max_rows=200))
    a = train(cfg, tiny_data, tmp_path / "a", progress=False)
    b = train(cfg, tiny_data, tmp_path / "b", progress=False)
    assert a["auc"] == b["auc"] and a["final_train_loss"] == b["final_train_loss"]
    sa = checkpoint.load(tmp_path / "a" / "checkpoint.pt")["model"]
    sb = checkpoint.load(tmp_path / "b" / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_export_parity_and_item_vectors_match_student(trained, tiny_data, tmp_path):
    path, _ = trained
    result = coarse_export.export(path, tmp_path)
    int8 = result["meta"]["item_vectors_int8"]
    assert result["files"] == ["user_tower.onnx", "item_vectors.npy"] + (["item_codes.npy", "item_scales.npy"]
                                                                          if int8["served"] else [])
    # the parity check ran on real requests, and its verdict follows its own bound
    assert int8["requests"] > 0 and int8["top_k"] == 500 and 0.0 <= int8["worst_overlap"] <= int8["mean_overlap"] <= 1.0
    assert int8["served"] == (int8["mean_overlap"] >= 0.99)
    # measured as served: the int8 shortlist re-scored in float32 keeps at least the int8 scores' own top-k
    assert int8["method"] == "int8_shortlist_fp32_rescore" and int8["shortlist_factor"] == 1.5
    assert int8["mean_overlap"] >= int8["int8_only_mean_overlap"] - 1e-12
    meta = result["meta"]
    assert meta["parity_max_abs_diff"] <= 1e-5 and meta["logit_max_abs_diff"] <= 1e-4
    assert meta["dim"] == FAST["out_dim"] and meta["scale"] == 5.0

    data = load(tiny_data)
    vecs = np.load(tmp_path / "item_vectors.npy", allow_pickle=False)
    assert vecs.dtype == np.float32 and vecs.shape == (data.vocab.n_items, FAST["out_dim"])
    assert np.allclose(np.linalg.norm(vecs, axis=1), 5.0, atol=1e-4)  # unit vectors x the scale

    # what serving does (ONNX user tower, one matmul against all items) equals the student
    model, _, _ = load_student(path)
    ex = data.examples(data.test_day)
    batch = ex.batch(np.arange(0, len(ex), max(1, len(ex) // 50)))
    user_vec = onnx_session(tmp_path / "user_tower.onnx").run(["user_vec"], {k: batch[k] for k in USER})[0]
    all_scores = user_vec @ vecs.T  # (B, n_items)
    served = all_scores[np.arange(len(user_vec)), batch["item_id"]]
    with torch.no_grad():
        expected = model(**model_inputs(batch)).numpy()
    assert np.max(np.abs(served - expected)) <= 1e-4


def test_export_refuses_when_parity_fails(trained, tmp_path, monkeypatch):
    path, _ = trained
    monkeypatch.setattr(coarse_export, "PARITY_TOL", -1.0)
    with pytest.raises(coarse_export.ExportError, match="ONNX vs PyTorch"):
        coarse_export.export(path, tmp_path)


def test_config_defaults_are_documented():
    import inspect

    import coarse_rank.train as tr

    src = inspect.getsource(tr.Config)
    for f in dataclasses.fields(Config):
        line = next(l for l in src.splitlines() if l.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"Config.{f.name} has no comment"


# --- distillation teachers and the synchronous objective (PFD Eq. 5, Algorithm 1) ----------

from coarse_rank.model import DNNTeacher, InnerProductTeacher, LUPITeacher  # noqa: E402
from coarse_rank.train import MANNERS, TEACHERS, build_student, build_teacher, fit  # noqa: E402
from recstack.training.distill import student_loss  # noqa: E402

SMALL_MODEL = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, teacher_hidden=(64, 32),
                   objective="ctr", item_stats=False)  # hand-built batches of item_dense (B, 1)


def request_batch(b: int = 12, r: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    x = random_inputs(r, seed=seed)
    items = random_inputs(b, seed=seed + 1)
    rng = np.random.default_rng(seed)
    out = t(x, *USER)
    out.update(t(items, "item_feats", "item_dense"))
    out["request_index"] = torch.from_numpy(np.sort(rng.integers(0, r, b)).astype(np.int64))
    out["interacted"] = torch.from_numpy(np.log1p(rng.integers(0, 5, (b, len(INTERACTED_FIELDS)))).astype(np.float32))
    return out


@pytest.mark.parametrize("teacher", [t_ for t_ in TEACHERS if t_ not in ("baseline", "oracle")])
@pytest.mark.parametrize("manner", MANNERS)
def test_teachers_score_the_students_batch(teacher, manner):
    cfg = Config(**SMALL_MODEL, teacher=teacher, manner=manner)
    student = build_student(cfg, VOCAB)
    model = build_teacher(cfg, VOCAB, student)
    expected = {"sd": InnerProductTeacher, "pfd": InnerProductTeacher, "md": DNNTeacher, "pfd_md": DNNTeacher,
                "lupi": LUPITeacher}[teacher]
    assert isinstance(model, expected)
    logits = model(**request_batch())
    assert logits.shape == (12,) and torch.isfinite(logits).all()
    # sharing per manner: Share shares every table, Share* all but the user id table, Ind none
    if teacher == "lupi":
        return
    s_emb, t_emb = student.embeddings, (model.embeddings if hasattr(model, "embeddings") else model.user_tower.embeddings)
    same = [a is b for a, b in zip([*s_emb.user_tables, *s_emb.item_tables], [*t_emb.user_tables, *t_emb.item_tables])]
    if manner == "share_sync":
        assert all(same)
    elif manner == "share_star_sync":
        assert not same[0] and all(same[1:])
    else:
        assert not any(same)


def test_split_first_layer_is_the_mlp_on_the_gathered_rows():
    # the teachers' speed-up: the request columns of the first layer run once per request;
    # outputs, BatchNorm batch statistics and gradients equal the MLP on the (B, in) matrix
    from coarse_rank.model import MLP, split_first_layer

    torch.manual_seed(0)
    x_req, x_imp = torch.randn(5, 6, requires_grad=True), torch.randn(17, 3, requires_grad=True)
    idx = torch.tensor(np.random.default_rng(0).integers(0, 5, 17), dtype=torch.int64)
    for train in (True, False):
        mlp = MLP(9, (16, 8), 4)
        mlp.train(train)
        ref_mlp = copy.deepcopy(mlp)
        got = split_first_layer(mlp, x_req, idx, x_imp)
        ref = ref_mlp(torch.cat([x_req.index_select(0, idx), x_imp], dim=-1))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(got.square().sum(), [x_req, x_imp, *mlp.parameters()])
        r = torch.autograd.grad(ref.square().sum(), [x_req, x_imp, *ref_mlp.parameters()])
        for a, b in zip(g, r):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if train:  # the running statistics moved the same way
            torch.testing.assert_close(mlp[1].running_mean, ref_mlp[1].running_mean)


def test_privileged_teachers_use_the_interacted_features_and_lupi_only_them():
    torch.manual_seed(0)
    batch = request_batch()
    moved = dict(batch, interacted=batch["interacted"] + 1.0)
    other_user = dict(batch, user_feats=batch["user_feats"].flip(0))
    for teacher in ("pfd", "pfd_md", "lupi", "sd", "md"):
        cfg = Config(**SMALL_MODEL, teacher=teacher)
        model = build_teacher(cfg, VOCAB, build_student(cfg, VOCAB)).eval()
        with torch.no_grad():
            ref, x_moved, u_moved = model(**batch), model(**moved), model(**other_user)
        uses_x = not torch.allclose(ref, x_moved)
        assert uses_x == (teacher in ("pfd", "pfd_md", "lupi")), teacher
        assert torch.allclose(ref, u_moved) == (teacher == "lupi"), teacher


def test_distillation_loss_gives_the_teacher_no_gradient():
    cfg = Config(**SMALL_MODEL, teacher="pfd_md", manner="share_sync")
    student = build_student(cfg, VOCAB)
    teacher = build_teacher(cfg, VOCAB, student)
    batch = request_batch()
    s_logit = student.score_requests(**{k: v for k, v in batch.items() if k != "interacted"})
    loss, _ = student_loss(s_logit, torch.zeros(12), teacher(**batch), lam=1.0)  # L_d only
    loss.backward()
    own = [p for n, p in teacher.named_parameters() if n.startswith("mlp.")]
    assert own and all(p.grad is None or not p.grad.any() for p in own)
    assert student.user_tower.mlp[0].weight.grad.abs().sum() > 0


def test_before_the_swap_step_the_student_is_the_baseline(tiny_data):
    """λ = 0 before k: with independent inputs (Ind&Sync) and k past the last step, the
    student must be bit-for-bit the baseline (the teacher trains beside it without touching it)."""
    data = load(tiny_data)
    kw = dict(SMALL_MODEL, batch_size=256, max_steps=4, eval_max_rows=100, warmup_steps=2)
    base = fit(Config(**kw, teacher="baseline"), data, data.fit_days, data.valid_day)
    late = fit(Config(**kw, teacher="pfd_md", manner="ind_sync", swap_step=10**6), data, data.fit_days, data.valid_day)
    early = fit(Config(**kw, teacher="pfd_md", manner="ind_sync", swap_step=0), data, data.fit_days, data.valid_day)
    a, b, c = (f.student.state_dict() for f in (base, late, early))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert "teacher_auc" in late.result and "teacher_auc" not in base.result


def test_the_oracle_teacher_is_the_true_pctr_through_eq5(tiny_data):
    """teacher=oracle: no teacher network; the soft label is each impression's true pCTR. At
    λ = 0 the student is bit-for-bit the baseline; the step's loss is Eq. 5 with the truth."""
    from coarse_rank.tasks import DistillationStep, oracle_logit
    from coarse_rank.train import request_batches
    from recstack.training.distill import LambdaSchedule

    data = load(tiny_data)
    kw = dict(SMALL_MODEL, batch_size=256, max_steps=4, eval_max_rows=100, warmup_steps=2)
    assert build_teacher(Config(**kw, teacher="oracle"), VOCAB, build_student(Config(**kw), VOCAB)) is None
    base = fit(Config(**kw, teacher="baseline"), data, data.fit_days, data.valid_day)
    zero = fit(Config(**kw, teacher="oracle", lam=0.0), data, data.fit_days, data.valid_day)
    half = fit(Config(**kw, teacher="oracle", lam=0.5), data, data.fit_days, data.valid_day)
    a, b, c = (f.student.state_dict() for f in (base, zero, half))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    cfg = Config(**kw, teacher="oracle", lam=0.7, swap_step=10**6)  # no warm-up for the truth
    student = build_student(cfg, data.vocab)
    batch, inputs = next(request_batches(data.examples(data.valid_day), 64))
    loss = DistillationStep(cfg, student, None, LambdaSchedule(cfg.lam, cfg.swap_step))((batch, inputs), 0, 1)
    tower = student.user_tower
    pooled = tower.encode_sequence(inputs["seq_items"], inputs["seq_extras"], cfg.length_buckets)
    u = tower.head(inputs["user_feats"], pooled).index_select(0, inputs["request_index"])
    s_logit = student.scale * (u * student.item_tower(inputs["item_feats"], inputs["item_dense"])).sum(-1)
    want = student_loss(s_logit, torch.from_numpy(batch["click"]), oracle_logit(batch["true_pctr"]), 0.7)[0]
    assert torch.allclose(loss, want)


def test_distilled_student_checkpoint_exports_like_the_baseline(tiny_data, tmp_path):
    """Only the student is saved: same state keys as the baseline, same export and serving path."""
    cfg = Config(**dict(FAST, epochs=1, max_steps=8, eval_max_rows=300, teacher="pfd_md"), teacher_hidden=(32, 16))
    metrics = train(cfg, tiny_data, tmp_path / "run", progress=False)
    assert np.isfinite(metrics["teacher_auc"])
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoint.pt", stage="coarse")
    assert set(ckpt["model"]) == set(build_student(cfg, load(tiny_data).vocab).state_dict())
    result = coarse_export.export(tmp_path / "run" / "checkpoint.pt", tmp_path / "export")
    assert result["files"][:2] == ["user_tower.onnx", "item_vectors.npy"]
    assert result["meta"]["logit_max_abs_diff"] <= 1e-4 and result["meta"]["config"]["teacher"] == "pfd_md"


def test_default_teacher_is_pfd_md():
    assert Config().teacher == "pfd_md"  # chosen on the validation day (docs/results/coarse/report.md)


def test_cli_train_coarse_with_a_teacher(tiny_data, tmp_path):
    from recstack.cli import main

    rc = main(["train", "coarse", "--data", tiny_data, "--out", str(tmp_path), "--set", "teacher=pfd_md",
               "--set", "embed_dim=8", "--set", "d_model=32", "--set", "ff_dim=64", "--set", "hidden=64",
               "--set", "out_dim=32", "--set", "teacher_hidden=32,16", "--set", "max_steps=4", "--set", "eval_max_rows=300"])
    assert rc == 0 and (tmp_path / "coarse" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="teacher"):
        apply_overrides(Config(), ["teacher=wizard"])
    with pytest.raises(ConfigError, match="manner"):
        apply_overrides(Config(), ["manner=async"])
