"""A two-tower whose item tower reads the item statistics (`item_stats=True`): every positive and
uniform negative carries those of its own day, the exported vectors fold in the serving day's
table, and checkpoints from before the option rebuild the model they hold."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recstack import item_stats as S
from recstack.config import ConfigError
from recstack.data import load
from retrieval import positives as P
from retrieval.config import Config, checkpoint_config
from retrieval.evaluation import load_model
from retrieval.export import export
from retrieval.inputs import add_row_stats, embed_items, row_stats, serving_stats
from retrieval.model import build_model, stats_columns
from retrieval.tasks import InBatchSoftmaxStep, SampledSoftmaxLoss
from retrieval.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

EVENTS = ("click", "purchase", "view", "favourite", "cart")


def test_the_sources_choose_both_windows_of_each():
    cols = stats_columns(Config(item_stats=True, item_stats_sources=("click",)))
    assert [S.FIELDS[c] for c in cols] == ["clicks_per_day_1d", "clicks_per_day_7d"]
    assert stats_columns(Config(item_stats=True)) == list(range(len(S.FIELDS)))
    with pytest.raises(ConfigError, match="item_stats_sources"):
        Config(item_stats_sources=("likes",)).validate()
    with pytest.raises(ConfigError, match="item_stats_sources"):
        Config(item_stats_sources=()).validate()


def test_log_positives_carry_the_statistics_of_their_own_day(tiny_data):
    data = load(tiny_data)
    cfg = Config(item_stats=True, item_stats_sources=EVENTS)
    ev = P.log_events(data, ("click",), data.test_day, 1800.0)
    pick = np.linspace(0, len(ev["item_id"]) - 1, 300).astype(np.int64)
    rows = add_row_stats(cfg, data, P.tower_inputs(data, ev["user_id"][pick], ev["ts"][pick], ev["item_id"][pick]))
    cols = stats_columns(cfg)
    assert rows["item_dense"].shape == (300, 1 + len(cols))
    np.testing.assert_array_equal(rows["day"], data.day_of(ev["ts"][pick]))
    assert rows["day"].min() <= 0 < rows["day"].max()  # the history's days and the impression days alike
    want = data.item_stats.features(rows["day"], rows["item_id"])[:, cols]
    np.testing.assert_array_equal(rows["item_dense"][:, 1:], want)
    np.testing.assert_array_equal(rows["item_dense"][:, :1], data.items.dense(ev["item_id"][pick]))


def test_uniform_negatives_take_the_days_of_the_batchs_positives(tiny_data):
    data = load(tiny_data)
    cfg = Config(item_stats=True, dim=8, item_hidden=(8,), user_hidden=(8,))
    model = build_model(cfg, data.vocab)
    seen = []

    def stats(days, items):
        seen.append((days.copy(), items.copy()))
        return row_stats(cfg, data)(days, items)

    step = InBatchSoftmaxStep(model, SampledSoftmaxLoss(0.05, False), {"item_feats": data.items.feats(np.arange(data.items.n)),
                              "item_dense": data.items.dense(np.arange(data.items.n))},
                              torch.zeros(data.items.n), np.random.default_rng(0), 5, False, stats)
    ev = P.log_events(data, ("click",), data.test_day)
    step.rows = add_row_stats(cfg, data, P.tower_inputs(data, ev["user_id"][:3], ev["ts"][:3], ev["item_id"][:3]))
    loss = step(np.arange(3), 0, 1)
    assert torch.isfinite(loss)
    days, _ = seen[-1]
    np.testing.assert_array_equal(days, step.rows["day"][[0, 1, 2, 0, 1]])


@pytest.fixture(scope="module")
def stats_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval_stats")
    cfg = Config(batch_size=128, epochs=1, item_stats=True, item_stats_sources=("impression", "click"))
    return out, train(cfg, tiny_data, out / "run", progress=False)


def test_a_tower_with_statistics_trains_and_exports_the_serving_days_vectors(stats_run, tiny_data):
    out, metrics = stats_run
    assert metrics["recall@50"] > 5 * metrics["random_recall@50"], metrics
    result = export(out / "run" / "checkpoint.pt", out / "bundle")
    data = load(tiny_data)
    assert result["meta"]["item_stats_day"] == data.test_day
    model, cfg, _ = load_model(out / "run" / "checkpoint.pt")
    assert cfg.item_stats and model.item_tower.n_dense == 1 + 4
    table = serving_stats(cfg, data, data.test_day)
    np.testing.assert_array_equal(table, data.item_stats.table(data.test_day)[:, stats_columns(cfg)])
    np.testing.assert_allclose(np.load(out / "bundle" / "item_emb.npy"), embed_items(model, data.items, table), atol=1e-6)
    # another day's table gives other vectors: the statistics are read, not ignored
    assert not np.allclose(embed_items(model, data.items, serving_stats(cfg, data, data.valid_day)),
                           embed_items(model, data.items, table))
    with pytest.raises(ValueError, match="item statistics missing"):
        embed_items(model, data.items)


def test_a_checkpoint_from_before_the_option_rebuilds_as_trained(tiny_data):
    data = load(tiny_data)
    old = Config().__dict__.copy()
    del old["item_stats"], old["item_stats_sources"]
    cfg = checkpoint_config(old)
    assert not cfg.item_stats
    model = build_model(cfg, data.vocab)
    assert model.item_tower.n_dense == 1
    assert embed_items(model, data.items).shape == (data.items.n, cfg.dim)
    assert checkpoint_config({**old, "item_stats": True}).item_stats
