"""The retrieval options chosen on the validation day: positives from the behaviour log, the
logQ strength, the split; and the recall evaluation against clicks and the oracle."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from recstack.config import ConfigError, from_dict
from recstack.data import load
from recstack.training import checkpoint
from recstack.browse import CategoryItems
from recstack.world.truth import Truth
from retrieval import positives as P
from retrieval.config import Config
from retrieval.evaluation import load_model, run as evaluate_run, served_lists
from retrieval.export import export
from retrieval.inputs import embed_items, embed_users, top_k_inner_product
from retrieval.tasks import logq_vector, sampling_log_q
from retrieval.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(batch_size=128, epochs=2)


def test_logq_vector_scales_the_classic_correction():
    counts = np.array([50, 10, 0, 3])
    full = sampling_log_q(counts, 8, 4, 1.0)
    np.testing.assert_allclose(logq_vector(counts, 8, 4, 1.0), full)
    np.testing.assert_allclose(logq_vector(counts, 8, 4, 1.0, alpha=0.25), 0.25 * full, rtol=1e-6)
    assert not logq_vector(counts, 8, 4, 1.0, alpha=0.0).any()
    assert not logq_vector(counts, 8, 4, 1.0, enabled=False).any()


@pytest.mark.parametrize("key,value,match", [
    ("logq_alpha", 1.5, "logq_alpha"), ("logq_alpha", -0.1, "logq_alpha"), ("positives", "views", "positives"),
    ("positive_kinds", ("click", "share"), "positive_kinds"), ("positive_kinds", (), "positive_kinds"),
    ("split", "train", "split"),
])
def test_config_rejects_bad_option_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        Config(**{key: value}).validate()
    with pytest.raises(ConfigError, match="positives=log"):
        Config(positives="log", stream_chunk_rows=100).validate()


def test_log_events_stop_before_the_evaluation_day_and_keep_the_kinds(tiny_data):
    data = load(tiny_data)
    ev = data.events
    cut = P.day_start(data, data.valid_day)
    got = P.log_events(data, ("click", "cart"), data.valid_day)
    keep = np.isin(ev["kind"], [0, 4]) & (ev["ts"] < cut)
    assert len(got["item_id"]) == int(keep.sum()) > 0
    assert got["ts"].max() < cut
    np.testing.assert_array_equal(got["item_id"], ev["item_id"][keep])
    # the impression clicks of the fit days are among them, at the click's time (after the impression's)
    imps = data.impressions(data.fit_days)
    assert int(imps["click"].sum()) <= int((ev["kind"][keep] == 0).sum())
    with pytest.raises(ValueError, match="unknown kinds"):
        P.log_events(data, ("like",), data.valid_day)


def test_tower_inputs_see_only_behaviours_before_the_positive(tiny_data):
    data = load(tiny_data)
    ev = P.log_events(data, ("click",), data.test_day)
    rows = P.tower_inputs(data, ev["user_id"][:200], ev["ts"][:200], ev["item_id"][:200])
    assert rows["seq_items"].shape[0] == rows["item_feats"].shape[0] == 200
    # an event's own item is never its newest behaviour at its own time (strictly before ts)
    b = data.behaviours
    idx = b.last_indices(ev["user_id"][:200], ev["ts"][:200], 1)[:, 0]
    assert (b.ts[idx[idx >= 0]] < ev["ts"][:200][idx >= 0]).all()
    np.testing.assert_array_equal(rows["item_id"], ev["item_id"][:200])


@pytest.fixture(scope="module")
def log_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval_log")
    cfg = Config(**TINY, positives="log", positive_kinds=("click", "purchase", "cart"), logq_alpha=0.8, split="valid",
                 eval_every_epoch=True)
    return out / "checkpoint.pt", train(cfg, tiny_data, out, progress=False)


def test_log_positives_train_save_their_config_and_beat_chance(log_run, tiny_data):
    path, m = log_run
    data = load(tiny_data)
    assert m["eval_day"] == data.valid_day
    kinds = ("click", "purchase", "cart")
    assert m["train_clicks"] == len(P.log_events(data, kinds, data.valid_day)["item_id"])
    assert m["recall@50"] > 5 * m["random_recall@50"], m
    cfg = from_dict(Config, checkpoint.load(path, stage="retrieval")["config"])
    assert (cfg.positives, cfg.positive_kinds, cfg.logq_alpha, cfg.split) == ("log", kinds, 0.8, "valid")
    # the popularity baseline stays the fit days' impression clicks, whatever the positives
    imps = data.impressions(data.fit_days)
    top = np.argsort(-np.bincount(imps["item_id"][imps["click"].astype(bool)], minlength=data.items.n), kind="stable")[:50]
    clicks = data.impressions(data.valid_day)
    assert m["pop_recall@50"] == pytest.approx(np.isin(clicks["item_id"][clicks["click"].astype(bool)], top).mean())


def test_epoch_curve_ends_at_the_final_metrics(log_run):
    _, m = log_run
    curve = m["epoch_curve"]
    assert [p["epoch"] for p in curve] == [1, 2]
    assert curve[-1]["recall@50"] == m["recall@50"] and curve[0]["pop_recall@50"] == m["pop_recall@50"]
    assert all(0.0 <= p["recall@50"] <= 1.0 for p in curve)


def test_session_starts_group_a_users_events_by_gap():
    user = np.array([1, 0, 1, 0, 1, 0])
    ts = np.array([100.0, 10.0, 150.0, 5000.0, 4000.0, 20.0])
    np.testing.assert_array_equal(P.session_starts(user, ts, 60.0), [100.0, 10.0, 100.0, 5000.0, 4000.0, 10.0])
    np.testing.assert_array_equal(P.session_starts(user, ts, 0.0), ts)
    assert (P.session_starts(user, ts, 1e9) == np.where(user == 0, 10.0, 100.0)).all()


def test_exported_index_returns_what_the_trained_model_scores(log_run, tmp_path):
    path, _ = log_run
    out = export(path, tmp_path)
    assert out["meta"]["ann_recall@50"] == pytest.approx(1.0)
    model, _, ckpt = load_model(path)
    data = load(ckpt["data_dir"])
    item_emb = embed_items(model, data.items)
    np.testing.assert_allclose(np.load(tmp_path / "item_emb.npy"), item_emb, atol=1e-6)
    ex = data.examples(data.valid_day, clicked_only=True)
    from recstack.data import materialise
    inputs = materialise(ex.subset(np.arange(20)), ("user_feats", "seq_items", "seq_extras"))
    users = embed_users(model, inputs)
    index = faiss.read_index(str(tmp_path / "index.faiss"))
    scores, ids = index.search(users, 10)
    exact = users.astype(np.float64) @ item_emb.T.astype(np.float64)
    # the index's ids carry the model's top-10 scores (ties may swap ids, never scores)
    np.testing.assert_allclose(np.take_along_axis(exact, ids, axis=1), -np.sort(-exact, axis=1)[:, :10], atol=1e-5)


def test_served_lists_merge_the_two_sources_as_serving_does():
    rng = np.random.default_rng(0)
    item_emb = rng.normal(size=(300, 8)).astype(np.float32)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    seq = np.zeros((3, 50, 5), np.int64)
    seq[0, :4, 0] = np.array([7, 7, 20, 31]) + 1  # newest first, a repeat
    seq[1, :1, 0] = 100 + 1
    got = served_lists(users, item_emb, seq, 20, share=0.3, n_seeds=5)
    ann = top_k_inner_product(users, item_emb, 20)
    assert got.shape == (3, 20)
    assert all(len(np.unique(r)) == 20 for r in got)
    np.testing.assert_array_equal(got[:, :14], ann[:, :14])  # the ANN head: k - round(0.3 k)
    np.testing.assert_array_equal(got[2], ann[2])  # no behaviours: the ANN list
    seeds = np.array([7, 20, 31])
    i2i = got[0, 14:][~np.isin(got[0, 14:], ann[0])]
    assert len(i2i) > 0 and not np.isin(i2i, seeds).any()
    nb = top_k_inner_product(item_emb[seeds], item_emb, 10)
    assert np.isin(i2i, nb).all()


def test_served_lists_with_the_browse_source_follow_the_serving_order():
    rng = np.random.default_rng(1)
    item_emb = rng.normal(size=(300, 8)).astype(np.float32)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    categories = CategoryItems(np.arange(300) % 10)
    seq = np.zeros((3, 50, 5), np.int64)
    seq[0, :2, 0] = np.array([7, 20]) + 1
    browsed = [np.array([3, 4]), np.array([5]), np.zeros(0, np.int64)]
    got = served_lists(users, item_emb, seq, 20, share=0.3, browsed=browsed, categories=categories, browse_share=0.2)
    ann = top_k_inner_product(users, item_emb, 20)
    assert got.shape == (3, 20) and all(len(np.unique(r)) == 20 for r in got)
    # no browsing: exactly the two-source merge
    np.testing.assert_array_equal(got[2], served_lists(users[2:], item_emb, seq[2:], 20, share=0.3)[0])
    # row 1 (no seeds): ANN's first 16, then the 4 best items of category 5 that ANN's head lacks
    head = ann[1, :16]
    np.testing.assert_array_equal(got[1, :16], head)
    pool = np.flatnonzero(np.arange(300) % 10 == 5)
    pool = pool[~np.isin(pool, head)]
    np.testing.assert_array_equal(got[1, 16:], pool[np.argsort(-(item_emb[pool] @ users[1]))][:4])
    # row 0 browses, so its seeds are not searched: ANN's first 16, then four browse items of 3 / 4
    np.testing.assert_array_equal(got[0, :16], ann[0, :16])
    assert np.isin(got[0, 16:] % 10, [3, 4]).all()
    # both sources when browsing does not replace i2i: ANN's first 20 - 6 - 4, six i2i, four browse
    both = served_lists(users, item_emb, seq, 20, share=0.3, browsed=browsed, categories=categories, browse_share=0.2,
                        browse_replaces_i2i=False)
    np.testing.assert_array_equal(both[0, :10], ann[0, :10])
    assert np.isin(both[0, 16:] % 10, [3, 4]).all() and not np.isin(both[0, 10:16], ann[0, :10]).any()
    np.testing.assert_array_equal(both[1:], got[1:])  # rows without seeds or browsing: unchanged


def test_evaluation_reports_recall_against_clicks_and_the_oracle(log_run, tiny_data):
    res = evaluate_run(log_run[0], tiny_data, n_users=20, max_clicks=100, ks=(10, 50), ceiling_clicks=10)
    assert res["split"] == "valid" and res["day"] == load(tiny_data).valid_day
    for part in ("clicks", "oracle"):
        for name in ("model", "served", "served_browse", "popularity", "popularity_log"):
            for k in (10, 50):
                assert 0.0 <= res[part][f"{name}@{k}"] <= 1.0
            assert res[part][f"{name}@10"] <= res[part][f"{name}@50"] + 1e-12
    for name in ("true_pctr", "exposure_x_pctr", "exposure_x_pctr_prior"):
        assert 0.0 <= res["ceiling"][f"{name}@10"] <= res["ceiling"][f"{name}@50"] <= 1.0


def test_prior_intent_ceiling_draws_the_sessions_intents_from_the_world(tiny_data, monkeypatch):
    """prior_intents: the sessions' intents come from World.intents, one draw per session, and
    the day's true intents are never read; the day's ceiling reads them and draws none."""
    from recstack.world.simulate import World
    from retrieval.evaluation import exposure_ceiling

    data = load(tiny_data)
    truth = Truth.load(data.root)
    drawn, read = [], []
    real_intents, real_intent = World.intents, Truth.intent
    monkeypatch.setattr(World, "intents", lambda self, users, rng: drawn.append(len(users)) or real_intents(self, users, rng))
    monkeypatch.setattr(Truth, "intent", lambda self, users, day: read.append(day) or real_intent(self, users, day))
    prior = exposure_ceiling(data, truth, data.valid_day, (10, 50), max_clicks=5, sessions=30, prior_intents=True)
    assert drawn == [30] * prior["clicks"] and not read
    assert set(prior) == {"clicks", "sessions_per_user", "exposure_x_pctr_prior@10", "exposure_x_pctr_prior@50"}
    drawn.clear()
    day = exposure_ceiling(data, truth, data.valid_day, (10, 50), max_clicks=5, sessions=30)
    assert not drawn and read and day["clicks"] == prior["clicks"] == 5
    again = exposure_ceiling(data, truth, data.valid_day, (10, 50), max_clicks=5, sessions=30, prior_intents=True)
    assert again == prior  # seeded


def test_sweep_records_each_run_and_seed_once(tiny_data, tmp_path):
    from retrieval import sweep

    runs = ["batch_size=128;max_steps=2", "batch_size=128;max_steps=2;logq_alpha=0.5"]
    path = sweep.run(tiny_data, tmp_path, runs, [0], "valid")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["run"], r["seed"], r["split"], r["steps"]) for r in rows] == [(runs[0], 0, "valid", 2), (runs[1], 0, "valid", 2)]
    sweep.run(tiny_data, tmp_path, runs, [0], "valid")  # resumed: nothing left to train
    assert len(path.read_text().splitlines()) == 2
    with pytest.raises(ConfigError):
        sweep.run(tiny_data, tmp_path, ["no_such_key=1"], [0], "valid")
