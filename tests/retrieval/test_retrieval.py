"""Retrieval stage: two-tower shapes and masking, the logQ loss, training on tiny, export + FAISS."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recstack.training import checkpoint
from recstack.config import ConfigError, apply_overrides, from_dict
from recstack.features import SEQ_LEN, Vocab
from recstack.training.onnx import onnx_session
from retrieval import export as export_mod
from retrieval.export import ExportError, ann_recall, build_index, export, search_params
from retrieval.model import TwoTower
from retrieval.train import Config, build_model, sampled_softmax_loss, sampling_log_q, train

VOCAB = Vocab(n_users=50, n_items=200, n_categories=10, n_shops=20, n_brands=15, n_price_buckets=5,
              n_age_buckets=7, n_genders=2, n_activity_levels=4, log_price_mean=3.0, log_price_std=1.0)
# Tiny-world training budget for tests: ~1k clicked impressions, so smaller batches and more
# passes (the behaviour-log positives, the default, are tested in test_retrieval_options.py).
TINY = dict(positives="impressions", batch_size=128, epochs=8)


# shared 2-core machine: one intra-op thread is also the fastest for these small ops
pytestmark = pytest.mark.usefixtures("one_thread")


def random_requests(b: int, rng: np.random.Generator, empty_from: int | None = None) -> dict[str, np.ndarray]:
    """Random model inputs shaped as ARCHITECTURE.md; slots >= empty_from are empty (id 0)."""
    user_feats = np.stack([rng.integers(1, VOCAB.n_users + 1, b), rng.integers(1, 8, b), rng.integers(1, 3, b),
                           rng.integers(1, 5, b)], axis=1)
    sizes = VOCAB.item_sizes()
    seq_items = np.stack([rng.integers(1, n, (b, SEQ_LEN)) for n in sizes], axis=-1)
    seq_extras = rng.random((b, SEQ_LEN, 3)).astype(np.float32)
    if empty_from is not None:
        seq_items[:, empty_from:] = 0
        seq_extras[:, empty_from:] = 0
    return {"user_feats": user_feats.astype(np.int64), "seq_items": seq_items.astype(np.int64), "seq_extras": seq_extras}


def tensors(d: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(d[k]) for k in ("user_feats", "seq_items", "seq_extras")]


# --- model -----------------------------------------------------------------------------


def test_towers_return_unit_vectors_of_the_configured_size():
    torch.manual_seed(0)
    model = TwoTower(VOCAB, dim=24).eval()
    req = random_requests(7, np.random.default_rng(0), empty_from=30)
    items = torch.from_numpy(np.stack([np.arange(1, 12)] + [np.ones(11, dtype=np.int64)] * 4, axis=1))
    u, v = model(*tensors(req), items, torch.zeros(11, 1))
    assert u.shape == (7, 24) and v.shape == (11, 24)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(7))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(11))


def test_empty_sequence_and_unknown_user_give_finite_vectors():
    model = TwoTower(VOCAB).eval()
    zeros = {"user_feats": np.zeros((3, 4), np.int64), "seq_items": np.zeros((3, SEQ_LEN, 5), np.int64),
             "seq_extras": np.zeros((3, SEQ_LEN, 3), np.float32)}
    u = model.user_tower(*tensors(zeros))
    assert torch.isfinite(u).all()
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(3))
    # gradients through an all-empty sequence are finite too (no 0/0 in the pooling)
    model.train()
    model.user_tower(*tensors(zeros)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_empty_slots_are_masked_out():
    """Whatever sits in a slot whose item id is 0 must not change the user vector."""
    torch.manual_seed(0)
    model = TwoTower(VOCAB).eval()
    rng = np.random.default_rng(1)
    req = random_requests(5, rng, empty_from=10)
    junk = {k: v.copy() for k, v in req.items()}
    junk["seq_items"][:, 10:, 1:] = rng.integers(1, 5, (5, SEQ_LEN - 10, 4))  # attributes without an item
    junk["seq_extras"][:, 10:] = rng.random((5, SEQ_LEN - 10, 3)) * 10
    with torch.no_grad():
        torch.testing.assert_close(model.user_tower(*tensors(req)), model.user_tower(*tensors(junk)), rtol=0, atol=1e-6)
        # ...while a real behaviour in those slots does change it
        real = random_requests(5, rng)
        real["seq_items"][:, :10], real["seq_extras"][:, :10] = req["seq_items"][:, :10], req["seq_extras"][:, :10]
        real["user_feats"] = req["user_feats"]
        assert not torch.allclose(model.user_tower(*tensors(req)), model.user_tower(*tensors(real)), atol=1e-4)


# --- loss ------------------------------------------------------------------------------


def test_logq_loss_with_equal_log_probs_is_plain_in_batch_softmax():
    torch.manual_seed(0)
    u = F.normalize(torch.randn(16, 8), dim=-1)
    v = F.normalize(torch.randn(16, 8), dim=-1)
    ids = torch.arange(16)
    plain = F.cross_entropy(u @ v.T / 0.1, torch.arange(16))
    for const in (0.0, -3.7):
        got = sampled_softmax_loss(u, v, ids, ids, torch.full((16,), const), 0.1)
        torch.testing.assert_close(got, plain)
    # unequal log-probs: every logit is corrected by its own column's log q
    log_q = torch.randn(16)
    expected = F.cross_entropy(u @ v.T / 0.1 - log_q[None, :], torch.arange(16))
    torch.testing.assert_close(sampled_softmax_loss(u, v, ids, ids, log_q, 0.1), expected)


def test_loss_masks_accidental_hits_and_uses_extra_negatives():
    torch.manual_seed(0)
    u, v = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    pos = torch.tensor([5, 5, 7, 9])  # rows 0 and 1 share a positive
    cand = torch.tensor([5, 5, 7, 9, 3, 7])  # an extra negative (col 5) is row 2's positive
    logits = u @ v.T / 0.5
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = mask[2, 5] = True
    expected = F.cross_entropy(logits.masked_fill(mask, float("-inf")), torch.arange(4))
    torch.testing.assert_close(sampled_softmax_loss(u, v, pos, cand, torch.zeros(6), 0.5), expected)


def test_sampling_log_q_is_log_expected_occurrences():
    counts = np.array([0, 1, 3, 6])
    lq = sampling_log_q(counts, batch_size=10, num_uniform=0, smoothing=1.0)
    p = (counts + 1) / (10 + 4)
    np.testing.assert_allclose(lq, np.log(10 * p), rtol=1e-6)
    lq_mixed = sampling_log_q(counts, batch_size=10, num_uniform=8, smoothing=1.0)
    np.testing.assert_allclose(lq_mixed, np.log(10 * p + 8 / 4), rtol=1e-6)


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="valid keys"):
        apply_overrides(Config(), ["no_such_knob=1"])
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["temperature=0"])
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["item_dims=8,16"])
    cfg = apply_overrides(Config(), ["eval_k=10,20", "max_steps=3", "index_factory=IVF64,Flat"])
    assert cfg.eval_k == (10, 20) and cfg.max_steps == 3 and cfg.index_factory == "IVF64,Flat"


# --- training on tiny ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval_run")
    return out / "checkpoint.pt", train(Config(**TINY), tiny_data, out, progress=False)


def test_training_on_tiny_beats_chance_and_nears_popularity(trained):
    path, m = trained
    # measured: recall@50 0.49 (chance 0.025), @100 0.55 (0.05), @500 0.74 (0.25)
    assert m["recall@50"] > 10 * m["random_recall@50"], m
    assert m["recall@100"] > 5 * m["random_recall@100"], m
    assert m["recall@500"] > 2 * m["random_recall@500"], m
    # tiny's clicks are dominated by the logging policy's popular items (popularity@50 =
    # 0.50): a model that did not learn popularity through the logQ-corrected softmax
    # would sit far below it
    assert m["recall@50"] > 0.8 * m["pop_recall@50"], m
    ckpt = checkpoint.load(path, stage="retrieval")
    assert set(ckpt) >= {"stage", "config", "model", "metrics", "data_dir", "vocab"}
    json.dumps(ckpt["config"]), json.dumps(ckpt["metrics"])


def test_logq_correction_is_what_lets_popular_items_be_retrieved(tiny_data, tmp_path):
    """Plain in-batch softmax over-samples popular items as negatives and learns to bury them.

    Measured on tiny with in-batch negatives only: recall@50 0.41 with logQ, 0.01 without.
    """
    on, off = (train(Config(**TINY, num_uniform_negatives=0, logq_correction=lq), tiny_data, tmp_path / str(lq), progress=False)
               for lq in (True, False))
    assert off["recall@50"] < 0.5 * on["recall@50"], (on["recall@50"], off["recall@50"])
    assert on["recall@50"] > 5 * on["random_recall@50"], on


def test_training_is_deterministic_for_a_seed(tiny_data, tmp_path):
    a = train(Config(**TINY, max_steps=4), tiny_data, tmp_path / "a", progress=False)
    b = train(Config(**TINY, max_steps=4), tiny_data, tmp_path / "b", progress=False)
    sa, sb = (checkpoint.load(tmp_path / d / "checkpoint.pt")["model"] for d in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["recall@50"] == b["recall@50"]


# --- export and index ------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval_bundle")
    return out, export(trained[0], out)


def test_export_writes_the_bundle_files_with_parity(exported, trained):
    out, result = exported
    assert sorted(result["files"]) == ["index.faiss", "item_emb.npy", "user_tower.onnx"]
    assert all((out / f).is_file() for f in result["files"])
    meta = result["meta"]
    json.dumps(meta)
    assert meta["parity_max_abs_diff"] <= 1e-5
    assert meta["metric"] == "inner_product" and meta["index_factory"] == "Flat"
    emb = np.load(out / "item_emb.npy", allow_pickle=False)
    assert emb.dtype == np.float32 and emb.shape == (meta["n_items"], meta["dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert meta["ann_recall@50"] == pytest.approx(1.0)  # Flat is exact

    sess = onnx_session(out / "user_tower.onnx")
    assert [i.name for i in sess.get_inputs()] == ["user_feats", "seq_items", "seq_extras"]
    assert [o.name for o in sess.get_outputs()] == ["user_emb"]
    # the ONNX tower reproduces the checkpoint's tower on fresh inputs, cold start included
    ckpt = checkpoint.load(trained[0])
    vocab = Vocab.from_dict(ckpt["vocab"])
    model = build_model(from_dict(Config, ckpt["config"]), vocab)
    model.load_state_dict(ckpt["model"])
    model.eval()
    rng = np.random.default_rng(3)
    req = random_requests(6, rng, empty_from=20)
    req["user_feats"][:, 0] = rng.integers(1, vocab.n_users + 1, 6)
    req["seq_items"][:, :20, 0] = rng.integers(1, vocab.n_items + 1, (6, 20))
    req["seq_items"][:, :20, 1:] = 1
    req["seq_items"][0], req["seq_extras"][0], req["user_feats"][0] = 0, 0, 0
    onnx_out = sess.run(["user_emb"], req)[0]
    with torch.no_grad():
        ref = model.user_tower(*tensors(req)).numpy()
    assert np.isfinite(onnx_out).all() and np.abs(onnx_out - ref).max() <= 1e-5
    one = sess.run(["user_emb"], {k: v[1:2] for k, v in req.items()})[0]  # serving runs batch 1
    assert one.shape == (1, meta["dim"]) and np.abs(one - ref[1:2]).max() <= 1e-5


def test_flat_index_returns_brute_force_top_k(exported):
    out, _ = exported
    emb = np.load(out / "item_emb.npy", allow_pickle=False)
    index = faiss.read_index(str(out / "index.faiss"))
    assert index.ntotal == len(emb) and index.metric_type == faiss.METRIC_INNER_PRODUCT
    queries = emb[np.random.default_rng(0).choice(len(emb), 50, replace=False)] + 0.01  # (50, D)
    k = 10
    scores, ids = index.search(queries.astype(np.float32), k)
    brute = queries.astype(np.float64) @ emb.T.astype(np.float64)  # (50, n_items)
    order = np.argsort(-brute, axis=1, kind="stable")
    best = np.take_along_axis(brute, order[:, : k + 1], axis=1)
    # FAISS id == row == item_id: the ids it returns carry exactly the top-k brute-force scores
    np.testing.assert_allclose(np.take_along_axis(brute, ids, axis=1), best[:, :k], atol=1e-5)
    np.testing.assert_allclose(scores, best[:, :k], atol=1e-5)
    # and the same ids, in order, wherever float rounding cannot swap near-tied neighbours
    # (items that share every attribute embed almost identically)
    clear = (np.diff(-best, axis=1) > 1e-5).all(axis=1)
    assert clear.sum() >= 10, clear.sum()
    np.testing.assert_array_equal(ids[clear], order[clear, :k])


def test_export_refuses_on_parity_failure(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "parity", lambda *a, **k: 1e-3)
    with pytest.raises(ExportError, match="max abs diff"):
        export(trained[0], tmp_path)
    assert not (tmp_path / "user_tower.onnx").exists() and not (tmp_path / "index.faiss").exists()


def test_build_index_ann_factories_and_measured_recall():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = emb[:100] + 0.1 * rng.standard_normal((100, 16)).astype(np.float32)
    # IVF probing every list is exact
    ivf = build_index(emb, "IVF16,Flat", nprobe=16)
    assert search_params(ivf) == {"nprobe": 16, "ef_search": None}
    assert ann_recall(ivf, emb, queries, [10, 50])["ann_recall@50"] == pytest.approx(1.0)
    # one probed list of 16 misses neighbours, and the measurement shows it
    assert ann_recall(build_index(emb, "IVF16,Flat", nprobe=1), emb, queries, [50])["ann_recall@50"] < 0.9
    hnsw = build_index(emb, "HNSW16", nprobe=8, ef_search=64)
    assert search_params(hnsw) == {"nprobe": None, "ef_search": 64}
    assert ann_recall(hnsw, emb, queries, [10])["ann_recall@10"] > 0.9
    with pytest.raises(ValueError, match="factory"):
        build_index(emb, "NotAnIndex")
    with pytest.raises(ValueError):
        build_index(np.full((4, 3), np.nan, np.float32))
