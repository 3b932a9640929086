"""The fine rankers' behaviour sequence (`ctr_sequence` / `cvr_sequence` = "din"): target
attention's masking and one-request broadcast, the variants that wrap a Ranker, and the
exported graph with its sequence inputs (parity as trained and as served)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recstack import features as FE
from recstack.config import ConfigError
from recstack.data import load
from recstack.training import checkpoint
from recstack.training.onnx import onnx_session

from fine_rank import export as fexport
from fine_rank import train as ftrain
from fine_rank.config import Config, checkpoint_config
from fine_rank.model import MTLRanker, Ranker, SelfAuxiliary, SignalTeacher, build_teacher
from fine_rank.sequence import TargetAttention

VOCAB = FE.Vocab(n_users=40, n_items=120, n_categories=9, n_shops=15, n_brands=11, n_price_buckets=5,
                 n_age_buckets=4, n_genders=2, n_activity_levels=3, log_price_mean=3.0, log_price_std=1.0)
L = FE.SEQ_LEN


def seq_inputs(b: int, s: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """b candidates' inputs with s sequences (s = b, or 1: one request); sequence lengths vary, one is empty."""
    g = torch.Generator().manual_seed(seed)
    sizes = VOCAB.item_sizes()
    seq = torch.stack([torch.randint(1, n, (s, L), generator=g) for n in sizes], dim=-1)  # (s, L, 5)
    lengths = torch.randint(0, L + 1, (s,), generator=g)
    lengths[0] = 0
    empty = torch.arange(L)[None, :] >= lengths[:, None]  # (s, L)
    seq[empty] = 0
    extras = torch.rand(s, L, 3, generator=g)
    extras[empty] = 0.0
    return {
        "user_feats": torch.stack([torch.randint(1, n, (b,), generator=g) for n in VOCAB.user_sizes()], dim=-1),
        "item_feats": torch.stack([torch.randint(1, n, (b,), generator=g) for n in sizes], dim=-1),
        "item_dense": torch.randn(b, 1, generator=g),
        "interacted": torch.rand(b, len(FE.INTERACTED_FIELDS), generator=g),
        "seq_items": seq,
        "seq_extras": extras,
    }


def trained_looking(model: torch.nn.Module) -> torch.nn.Module:
    """Heads start at zero weights (every output equal): give them a slope, then eval mode."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "head"):
                m.head.linear.weight.normal_(std=0.5)
    return model.eval()


def test_attention_masks_empty_slots_and_one_request_equals_its_rows():
    torch.manual_seed(0)
    att = TargetAttention(emb_dim=4, attention_dim=8)
    e = 3 * 4
    cand, seq, extras = torch.randn(6, e), torch.randn(6, L, e), torch.rand(6, L, 3)
    valid = torch.arange(L)[None, :] < torch.tensor([0, 1, 5, 20, 49, 50])[:, None]
    out = att(cand, seq, extras, valid)
    assert out.shape == (6, att.out_dim) and torch.isfinite(out).all()
    assert torch.all(out[0] == 0)  # an empty sequence pools to zeros, length share 0
    # what empty slots hold does not matter
    noisy = att(cand, torch.where(valid[..., None], seq, torch.randn_like(seq)),
                torch.where(valid[..., None], extras, torch.rand_like(extras)), valid)
    torch.testing.assert_close(noisy, out, rtol=0, atol=0)
    # one request: a single sequence (S = 1) against every candidate == that sequence repeated per row
    one = att(cand, seq[3:4], extras[3:4], valid[3:4])
    rep = att(cand, seq[3:4].expand(6, -1, -1), extras[3:4].expand(6, -1, -1), valid[3:4].expand(6, -1))
    torch.testing.assert_close(one, rep, rtol=0, atol=1e-6)
    # the candidate steers the weights: two candidates over one sequence pool differently
    assert not torch.allclose(one[0, : att.slot_dim], one[1, : att.slot_dim])


def test_din_ranker_reads_the_sequence_and_needs_it():
    model = trained_looking(Ranker.build(VOCAB, emb_dim=4, hidden=(16, 8), sequence="din", attention_dim=8))
    x = seq_inputs(16, 16)
    with torch.no_grad():
        p = model(**x)
        other = dict(x, seq_extras=torch.where(x["seq_items"][..., :1] > 0, 1 - x["seq_extras"], x["seq_extras"]))
        assert not torch.allclose(p, model(**other))  # recency / type move the prediction
        # shared embeddings: the attention looks the slots up in the ranker's own item tables
        assert not any(isinstance(m, torch.nn.Embedding) for m in model.sequence.modules())
    with pytest.raises(ValueError, match="seq_items and seq_extras are required"):
        model(x["user_feats"], x["item_feats"], x["item_dense"], x["interacted"])
    plain = Ranker.build(VOCAB, emb_dim=4, hidden=(16, 8))
    assert plain.sequence is None and plain(**x).shape == (16,)  # takes and ignores the sequence


@pytest.mark.parametrize("kind", ["pfd", "pfd_md", "md", "lupi"])
def test_teachers_share_the_students_attention(kind):
    student = Ranker.build(VOCAB, emb_dim=4, hidden=(16, 8), sequence="din", attention_dim=8)
    t = trained_looking(build_teacher(kind, student, (16, 8), (32, 16)))
    assert (t.sequence is student.sequence) == (kind != "lupi")
    x = seq_inputs(8, 8)
    xs = list(x.values())
    with torch.no_grad():
        out = t.logits(*xs, torch.randn(8, 4))
    assert out.shape == (8,) and torch.isfinite(out).all()


def test_wrappers_take_the_sequence():
    student = Ranker.build(VOCAB, emb_dim=4, hidden=(16, 8, 4), sequence="din", attention_dim=8)
    xs = list(seq_inputs(8, 8).values())
    main, aux = MTLRanker(student, aux_hidden=(6, 3)).eval().both(*xs)
    assert main.shape == (8,) and aux.shape == (8, 4)
    assert all(z.shape == (8,) for z in SelfAuxiliary(student, 8).eval().both(*xs))
    teacher = SignalTeacher(Ranker.build(VOCAB, emb_dim=4, hidden=(16, 8), sequence="din", attention_dim=8), 8).eval()
    assert all(z.shape == (8,) for z in teacher.both(*xs))


def test_sequence_config_is_checked_and_old_checkpoints_keep_theirs():
    with pytest.raises(ConfigError, match="ctr_sequence must be one of"):
        Config(ctr_sequence="transformer")
    with pytest.raises(ConfigError, match="cvr_attention_dim must be >= 1"):
        Config(cvr_attention_dim=0)
    assert Config(cvr_sequence="din").uses_sequence and not Config(ctr_sequence="none", cvr_sequence="none").uses_sequence
    old = {k: v for k, v in vars(Config()).items() if k not in ("ctr_sequence", "cvr_sequence")}
    cfg = checkpoint_config(old)  # a checkpoint from before the option holds sequence-free models
    assert cfg.ctr_sequence == cfg.cvr_sequence == "none"
    assert checkpoint_config({**old, "ctr_sequence": "din"}).ctr_sequence == "din"


TINY = dict(ctr_hidden=(16,), cvr_hidden=(16,), ctr_emb_dim=4, cvr_emb_dim=4, ctr_attention_dim=8, cvr_attention_dim=8,
            ctr_max_steps=6, cvr_max_steps=6, ctr_batch_size=256, cvr_batch_size=128, ctr_sequence="din", cvr_sequence="din")


@pytest.fixture(scope="module")
def din_run(tiny_data, tmp_path_factory):
    """The tiny world's fine rankers with the sequence, a few steps, CVR with the PFD+MD teacher."""
    out = tmp_path_factory.mktemp("fine_din")
    metrics = ftrain.train(Config(**TINY, cvr_teacher="pfd_md", cvr_md_hidden=(32, 16)), tiny_data, out, progress=False)
    return {"data": tiny_data, "ckpt": out / "checkpoint.pt", "metrics": metrics}


def test_din_rankers_train_with_the_variants(din_run, tiny_data):
    m = din_run["metrics"]
    assert m["cvr"]["train"]["method"] == "pfd_md" and 0.0 < m["ctr"]["mean_pred"] < 1.0
    assert np.isfinite(m["cvr"]["teacher"]["auc"])
    data = load(tiny_data)
    table = ftrain.clicked(ftrain.materialise(data.examples(data.fit_days)))
    assert table["seq_items"].dtype == np.int32 and table["seq_items"].shape[1:] == (L, 5)
    for cfg in (Config(**TINY, cvr_teacher="mtl"), Config(**TINY, cvr_sead="max"),
                Config(**TINY, cvr_teacher="signal_loss", cvr_label="purchase_observed", cvr_calibrate="aggregates")):
        r = ftrain.fit_task("cvr", cfg, data.vocab, table, 3, aggregate_rate=0.1)
        assert r.model.sequence is not None
        p = ftrain.predict(r.model, table)
        assert np.all(np.isfinite(p)) and np.all((p > 0) & (p < 1))


def test_din_graph_declares_the_sequence_and_matches_torch_as_served(din_run, tmp_path):
    """The merged graph reads seq_items / seq_extras on their own leading axis; it equals the
    torch models per row (training's layout) and for one request's sequence against 500
    candidates (serving's), and the export's own parity check covered both."""
    result = fexport.export(din_run["ckpt"], tmp_path, int8=False)
    meta = result["meta"]
    assert meta["inputs"] == list(ftrain.MODEL_INPUTS) + ["seq_items", "seq_extras"]
    assert meta["sequence"] == {"ctr": "din", "cvr": "din"}
    assert set(meta["ctr"]["parity_max_abs_diff"]) == {"1", "500", "request500"}
    sess = onnx_session(tmp_path / "ranker.onnx")
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert shapes["seq_items"] == ["sequences", L, 5] and shapes["item_feats"][0] == "batch"
    _, models = fexport.load_models(checkpoint.load(din_run["ckpt"]))
    data = load(din_run["data"])
    day = ftrain.materialise(data.examples(data.test_day))
    has_seq = np.flatnonzero((day["seq_items"][:, :, 0] > 0).sum(1) > 10)
    request = fexport.feeds(day, tuple(meta["inputs"]), np.arange(500))
    request["user_feats"] = np.repeat(request["user_feats"][:1], 500, axis=0)
    one = fexport.feeds(day, ("seq_items", "seq_extras"), has_seq[:1])
    request.update(one)
    for task, got in zip(("ctr", "cvr"), sess.run(["pctr", "pcvr"], request)):
        with torch.no_grad():
            ref = models[task](**{k: torch.from_numpy(v) for k, v in request.items()}).numpy()
        assert got.shape == (500,) and np.max(np.abs(got - ref)) <= 1e-5
    assert len(set(np.round(got, 6))) > 1


def test_one_history_gives_the_same_sequence_and_prediction_in_training_and_serving(din_run, tiny_bundle, install_fine,
                                                                                    tmp_path):
    """Impressions of the test day: the trainer's table row and the server's fine feeds, built
    from the same event history (the user's events before the impression, at its time), hold
    identical sequence and interacted tensors, and the served graph's pCTR / pCVR equal the
    torch models' on the training row."""
    import shutil

    import pyarrow.parquet as pq

    from recstack.serving.cascade import Cascade, Query
    from recstack.serving.store import Events

    bdir = tmp_path / tiny_bundle.name  # a bundle's directory is named by its version
    shutil.copytree(tiny_bundle, bdir)
    # fine/ranker.onnx (and the item statistics it reads) in place of the fake two-graph layout
    install_fine(bdir, fexport.export(din_run["ckpt"], bdir / "fine", int8=False))
    cascade = Cascade.load(bdir)  # the warm-up runs the sequence graph on its probe requests
    assert cascade.fine.merged and "seq_items" in cascade.fine.models[0].inputs
    _, models = fexport.load_models(checkpoint.load(din_run["ckpt"]))
    data = load(din_run["data"])
    ex = data.examples(data.test_day)
    table = ftrain.materialise(ex)
    lengths = (table["seq_items"][:, :, 0] > 0).sum(1)
    rows = [int(np.argmax(lengths)), int(np.flatnonzero((lengths > 0) & (lengths < 10))[0]), int(np.argmin(lengths))]
    ev = {k: np.asarray(v) for k, v in pq.read_table(f"{din_run['data']}/events.parquet").to_pydict().items()}
    for row in rows:
        user, ts, item = int(table["user_id"][row]), float(ex.imps["ts"][row]), int(table["item_id"][row])
        mine = (ev["user_id"] == user) & (ev["ts"] < ts)
        history = Events(ev["user_id"][mine], ev["item_id"][mine], ev["kind"][mine], ev["ts"][mine], ev["dwell"][mine])
        q = Query(user_id=user, num_results=1, retrieval_size=1, coarse_size=1, now=ts, history=history)
        seq_items, seq_extras, _ = cascade.sequence(q)
        feeds = FE.fine_inputs(table["user_feats"][row : row + 1], seq_items, seq_extras, cascade.items,
                               np.array([item]), cascade.interacted_for(q)(np.array([item])), cascade.item_stats)
        for k in ("seq_items", "seq_extras", "item_feats", "item_dense", "interacted"):
            np.testing.assert_array_equal(feeds[k], table[k][row : row + 1].astype(feeds[k].dtype), err_msg=k)
        pctr, pcvr = cascade.fine(feeds)
        for task, served in (("ctr", pctr), ("cvr", pcvr)):
            trained = ftrain.predict(models[task], {k: v[row : row + 1] for k, v in table.items()})
            assert abs(float(served[0]) - float(trained[0])) <= 1e-5, task
    assert lengths[rows[0]] == L
