"""The cascade's two retrieval sources (ANN + item-to-item): quotas, dedup, provenance, FAISS padding.

Against a small FAKE bundle (random ONNX towers, clustered item embeddings) so that every
property is checked independently of training: which items i2i may return is recomputed
here by brute force from item_emb.npy.
"""
from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from torch import nn

from recstack import bundle as B
from recstack import features as F
from recstack.export import write_feature_snapshot
from recstack.onnx_export import export_onnx
from recstack.serving.cascade import SOURCE_ANN, SOURCE_I2I, Cascade, DeadlineExceeded, Query
from retrieval import index as index_lib

torch.set_num_threads(1)

VOCAB = F.Vocab(n_users=20, n_items=400, n_categories=8, n_shops=20, n_brands=12, n_price_buckets=5,
                n_age_buckets=4, n_genders=2, n_activity_levels=3, log_price_mean=3.0, log_price_std=1.0)
DIM = 16


class Tower(nn.Module):
    """user_feats (B, 4), seq_items (B, L, 5), seq_extras (B, L, 3) -> (B, D): a mean of behaviour embeddings."""

    def __init__(self, vocab: F.Vocab, dim: int, normalise: bool):
        super().__init__()
        self.user = nn.ModuleList(nn.Embedding(n, 8) for n in vocab.user_sizes())
        self.item = nn.ModuleList(nn.Embedding(n, 8) for n in vocab.item_sizes())
        self.out = nn.Linear(16 + 3, dim)
        self.normalise = normalise

    def forward(self, user_feats, seq_items, seq_extras):
        u = sum(e(user_feats[:, i]) for i, e in enumerate(self.user))  # (B, 8)
        mask = (seq_items[..., :1] > 0).float()  # (B, L, 1)
        s = sum(e(seq_items[..., i]) for i, e in enumerate(self.item))  # (B, L, 8)
        s = (s * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        x = (seq_extras * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out = self.out(torch.cat([u, s, x], dim=1))
        return nn.functional.normalize(out, dim=1) if self.normalise else out


class Fine(nn.Module):
    """user_feats (B, 4), item_feats (B, 5), item_dense (B, 1), interacted (B, 7) -> prob (B,)."""

    def __init__(self, vocab: F.Vocab):
        super().__init__()
        self.item = nn.ModuleList(nn.Embedding(n, 4) for n in vocab.item_sizes())
        self.head = nn.Linear(4 + 1 + 7, 1)

    def forward(self, user_feats, item_feats, item_dense, interacted):
        it = sum(e(item_feats[:, i]) for i, e in enumerate(self.item))
        return torch.sigmoid(self.head(torch.cat([it, item_dense, interacted], dim=1)) + 0 * user_feats[:, :1]).squeeze(1)


def clustered_embeddings(n: int, dim: int, rng, clusters: int = 20) -> np.ndarray:
    """Unit vectors in tight clusters: an item's nearest neighbours are its cluster mates."""
    centres = rng.standard_normal((clusters, dim))
    emb = centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def make_bundle(root: Path, *, vocab: F.Vocab = VOCAB, factory: str = "Flat", nprobe: int | None = None,
                snapshot: dict | None = None, items: dict | None = None, seed: int = 0, version: str = "v1") -> Path:
    """A complete bundle with random models; `snapshot`/`items` default to random behaviours / items."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    bdir = root / version
    b = 2
    tower_in = {"user_feats": np.ones((b, 4), np.int64), "seq_items": np.ones((b, F.SEQ_LEN, 5), np.int64),
                "seq_extras": np.zeros((b, F.SEQ_LEN, 3), np.float32)}
    fine_in = {"user_feats": np.ones((b, 4), np.int64), "item_feats": np.ones((b, 5), np.int64),
               "item_dense": np.zeros((b, 1), np.float32), "interacted": np.zeros((b, 7), np.float32)}
    export_onnx(Tower(vocab, DIM, True), tower_in, bdir / "retrieval/user_tower.onnx", ["user_emb"])
    export_onnx(Tower(vocab, 32, True), tower_in, bdir / "coarse/user_tower.onnx", ["user_vec"])
    export_onnx(Fine(vocab), fine_in, bdir / "fine/ctr.onnx", ["prob"])
    export_onnx(Fine(vocab), fine_in, bdir / "fine/cvr.onnx", ["prob"])
    item_emb = clustered_embeddings(vocab.n_items, DIM, rng)
    np.save(bdir / "retrieval/item_emb.npy", item_emb)
    index = index_lib.build(item_emb, factory, nprobe=nprobe)
    faiss.write_index(index, str(bdir / "retrieval/index.faiss"))
    np.save(bdir / "coarse/item_vectors.npy", 5.0 * clustered_embeddings(vocab.n_items, 32, rng))
    if snapshot is None:
        n_beh = rng.integers(0, 30, vocab.n_users)
        n_beh[0] = 20
        n_beh[1] = 0  # a known user without behaviours
        user = np.repeat(np.arange(vocab.n_users), n_beh)
        snapshot = {"user_id": user, "seconds_ago": rng.uniform(0, 8 * 86400, len(user)),
                    "item_id": rng.integers(0, vocab.n_items, len(user)), "kind": np.zeros(len(user), np.int8),
                    "dwell": rng.exponential(30.0, len(user))}
    if items is None:
        items = {"category": rng.integers(0, vocab.n_categories, vocab.n_items), "shop": rng.integers(0, vocab.n_shops, vocab.n_items),
                 "brand": rng.integers(0, vocab.n_brands, vocab.n_items),
                 "price_bucket": rng.integers(0, vocab.n_price_buckets, vocab.n_items),
                 "price": np.exp(rng.normal(3.0, 1.0, vocab.n_items))}
    snap_files = write_feature_snapshot(
        bdir,
        users={"age_bucket": rng.integers(0, vocab.n_age_buckets, vocab.n_users), "gender": rng.integers(0, vocab.n_genders, vocab.n_users),
               "activity": rng.integers(0, vocab.n_activity_levels, vocab.n_users)},
        items=items, behaviours=snapshot,
    )
    files = ["retrieval/user_tower.onnx", "retrieval/index.faiss", "retrieval/item_emb.npy", "coarse/user_tower.onnx",
             "coarse/item_vectors.npy", "fine/ctr.onnx", "fine/cvr.onnx", *snap_files]
    B.write_manifest(
        bdir, version=version, files=files, configs={"retrieval": {}, "coarse": {}, "fine": {}},
        feature_schema=F.feature_schema(), vocab=vocab.to_dict(),
        stages={"retrieval": {"meta": {"dim": DIM, **index_lib.search_params(index)}}, "coarse": {"meta": {"dim": 32}},
                "fine": {"meta": {}}},
        extra={"snapshot": {"time": 8 * 86400.0}},
    )
    B.write_current(root, version)
    return bdir

def tiny_world_bundle(tiny_data: str, out: Path) -> Path:
    """A fake bundle (random models) over a simulated world's corpus and vocabulary."""
    import pyarrow.parquet as pq

    from recstack.data import load

    data = load(tiny_data)
    items = pq.read_table(Path(tiny_data) / "items.parquet").to_pydict()
    item_cols = {k: np.asarray(items[k]) for k in ("category", "shop", "brand", "price_bucket", "price")}
    snap = {"user_id": np.zeros(0, np.int64), "seconds_ago": np.zeros(0), "item_id": np.zeros(0, np.int64),
            "kind": np.zeros(0, np.int8), "dwell": np.zeros(0, np.float32)}
    vocab = F.Vocab.from_dict(data.world["vocab"])
    return make_bundle(out, vocab=vocab, snapshot=snap, items=item_cols)



@pytest.fixture(scope="module")
def flat_bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="module")
def cascade(flat_bundle) -> Cascade:
    return Cascade.load(flat_bundle, i2i_share=0.25, i2i_seeds=3)


def _q(user_id=0, r=100, c=50, n=20, items=(), secs=None) -> Query:
    items = np.asarray(items, np.int64)
    secs = np.arange(1, len(items) + 1, dtype=np.float64) if secs is None else np.asarray(secs, np.float64)
    return Query(user_id=user_id, num_results=n, retrieval_size=r, coarse_size=c, item_ids=items, seconds_ago=secs,
                 kinds=np.zeros(len(items), np.int8), dwell=np.full(len(items), 10.0, np.float32))


def _trace(cascade: Cascade, q: Query):
    seq_items, seq_extras, cold = cascade.sequence(q)
    trace: dict = {}
    res = cascade.rank_features(q, cascade.users.feats(np.array([q.user_id])), seq_items, seq_extras, cold_start=cold, trace=trace)
    return res, trace, cascade.recent_items(seq_items)


def _brute_neighbours(emb: np.ndarray, seeds: np.ndarray, per_seed: int) -> set[int]:
    sims = emb[seeds] @ emb.T  # (S, I)
    return {int(i) for row in np.argsort(-sims, axis=1)[:, :per_seed] for i in row}


def test_request_behaviours_seed_i2i_newest_first(cascade):
    # the request's items are newer than any snapshot behaviour: they lead the seeds
    q = _q(user_id=0, items=[7, 300, 7, 42], secs=[1.0, 2.0, 3.0, 4.0])
    _, _, seeds = _trace(cascade, q)
    assert list(seeds) == [7, 300, 42]  # distinct, newest first, capped at i2i_seeds = 3


def test_sources_quota_dedup_and_provenance(cascade, flat_bundle):
    emb = np.load(flat_bundle / "retrieval/item_emb.npy")
    q = _q(user_id=0, r=100, c=100, n=100, items=[5, 17, 250])
    res, trace, seeds = _trace(cascade, q)
    ids, src = trace["retrieved"], trace["retrieved_sources"]
    assert len(ids) == 100 and len(set(ids.tolist())) == 100 and ids.min() >= 0 and ids.max() < VOCAB.n_items
    n_i2i = int((src == 1).sum())
    assert n_i2i == 25  # round(0.25 * 100): enough neighbours exist to fill the quota
    # i2i items are true nearest neighbours of the seeds (never the seeds themselves) ...
    i2i = set(ids[src == 1].tolist())
    assert i2i <= _brute_neighbours(emb, seeds, 1 + -(-2 * 25 // len(seeds))) - set(seeds.tolist())
    # ... that ANN's own share did not already hold
    ann_head = ids[src == 0][:75]
    assert not i2i & set(ann_head.tolist())
    # and the response reports each returned item's source
    served_src = dict(zip(ids.tolist(), src.tolist()))
    assert res.sources == [SOURCE_I2I if served_src[i] == 1 else SOURCE_ANN for i in res.item_ids]
    assert set(res.sources) == {SOURCE_ANN, SOURCE_I2I}


def test_no_behaviours_means_ann_only(cascade):
    for q in (_q(user_id=1), _q(user_id=10_000)):  # known user without history; unknown user (cold start)
        res, trace, seeds = _trace(cascade, q)
        assert len(seeds) == 0 and (trace["retrieved_sources"] == 0).all() and set(res.sources) == {SOURCE_ANN}
    # a cold-start user with behaviours in the request gets i2i candidates from them
    res, trace, seeds = _trace(cascade, _q(user_id=10_000, items=[3, 9]))
    assert res.cold_start and list(seeds) == [3, 9] and (trace["retrieved_sources"] == 1).any()


def test_share_zero_is_plain_ann_and_share_one_backfills(flat_bundle):
    c0 = Cascade.load(flat_bundle, i2i_share=0.0, warm=False)
    index = faiss.read_index(str(flat_bundle / "retrieval/index.faiss"))
    q = _q(user_id=0, r=60, c=60, n=60, items=[5])
    _, trace, _ = _trace(c0, q)
    seq_items, seq_extras, _ = c0.sequence(q)
    user_emb = c0.retrieval_tower({"user_feats": c0.users.feats(np.array([0])), "seq_items": seq_items, "seq_extras": seq_extras})
    np.testing.assert_array_equal(trace["retrieved"], index.search(np.ascontiguousarray(user_emb, np.float32), 60)[1][0])
    # share 1: i2i takes every slot it can fill, ANN fills the rest; nothing repeats
    c1 = Cascade.load(flat_bundle, i2i_share=1.0, i2i_seeds=1, warm=False)
    _, trace, _ = _trace(c1, _q(user_id=10_000, r=VOCAB.n_items, c=10, n=10, items=[5]))
    ids = trace["retrieved"]
    assert len(ids) == VOCAB.n_items and len(np.unique(ids)) == VOCAB.n_items
    assert (trace["retrieved_sources"] == 1).sum() == VOCAB.n_items - 1  # every item but the seed itself


def test_ivf_padding_and_too_few_candidates_never_leak(tmp_path):
    """nprobe=1 over 64 lists returns far fewer than k hits: the -1 padding must not reach any stage."""
    bdir = make_bundle(tmp_path, factory="IVF64,Flat", nprobe=1)
    cas = Cascade.load(bdir, i2i_share=0.5, i2i_seeds=4)
    assert cas.search_params == {"nprobe": 1}
    q = _q(user_id=0, r=VOCAB.n_items, c=VOCAB.n_items, n=VOCAB.n_items, items=[1, 2])
    res, trace, _ = _trace(cas, q)
    ids = trace["retrieved"]
    assert 0 < len(ids) < VOCAB.n_items  # fewer than asked: IVF padded with -1
    assert ids.min() >= 0 and len(np.unique(ids)) == len(ids)
    assert res.counts["retrieved"] == len(ids) == res.counts["coarse"] == len(res.item_ids)
    assert res.item_ids.min() >= 0 and np.all(np.isfinite(res.scores))
    # through the public entry point too
    assert cas.rank(q).item_ids.min() >= 0


def test_rank_and_rank_features_agree_and_deadlines_hold(cascade):
    q = _q(user_id=0, items=[11, 12])
    a = cascade.rank(q)
    b, _, _ = _trace(cascade, q)
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    assert a.sources == b.sources
    assert set(a.timings_ms) == {"features_ms", "retrieval_ms", "coarse_ms", "fine_ms", "total_ms"}
    with pytest.raises(DeadlineExceeded, match="retrieval"):
        cascade.rank(q, time_remaining=lambda: 0.0)
    calls = iter([1.0, 1.0, 0.0])  # before retrieval, before its search, then before coarse
    with pytest.raises(DeadlineExceeded, match="coarse"):
        cascade.rank(q, time_remaining=lambda: next(calls))


def test_bad_i2i_options_are_refused(flat_bundle):
    with pytest.raises(ValueError, match="i2i_share"):
        Cascade.load(flat_bundle, i2i_share=1.5, warm=False)
    with pytest.raises(ValueError, match="i2i_seeds"):
        Cascade.load(flat_bundle, i2i_seeds=-1, warm=False)
