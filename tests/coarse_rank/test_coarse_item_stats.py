"""A coarse student whose item tower reads the item statistics (`item_stats=True`): trained on
each row's day, its exported item vectors fold in the serving day's table, and the served
inner product equals the student's logit on real rows of that day."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recstack import item_stats as S
from recstack.data import load

import coarse_rank.export as coarse_export
from coarse_rank.train import Config, load_student, train

QUICK = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, teacher_hidden=(32,),
             batch_size=256, max_steps=8, warmup_steps=2, swap_step=2, item_stats=True)


@pytest.fixture(scope="module", params=["ctr", "gmv"])
def exported(request, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"coarse_stats_{request.param}")
    train(Config(**QUICK, objective=request.param, teacher="pfd_md"), tiny_data, out / "run", progress=False)
    result = coarse_export.export(out / "run" / "checkpoint.pt", out / "bundle")
    return out, result, request.param


def test_the_rows_carry_the_statistics_of_their_day(tiny_data):
    data = load(tiny_data)
    ex = data.examples([data.test_day - 1, data.test_day], item_stats=True)
    rows = np.arange(0, len(ex), max(1, len(ex) // 50))
    dense = ex.batch(rows)["item_dense"]
    assert dense.shape == (len(rows), 1 + len(S.FIELDS))
    np.testing.assert_array_equal(dense[:, :1], data.items.dense(ex.imps["item_id"][rows]))
    np.testing.assert_array_equal(dense[:, 1:], data.item_stats.features(ex.imps["day"][rows], ex.imps["item_id"][rows]))
    # a subset keeps the choice; a plain Examples' batch keeps the price alone
    assert ex.subset(rows).batch(np.arange(3))["item_dense"].shape[1] == 1 + len(S.FIELDS)
    assert data.examples(data.test_day).batch(np.arange(3))["item_dense"].shape[1] == 1


def test_exported_vectors_fold_in_the_serving_days_statistics(exported, tiny_data):
    out, result, objective = exported
    data = load(tiny_data)
    meta = result["meta"]
    assert meta["item_stats_day"] == data.test_day
    # the export's own check passed: served logits equal the student's on that day's rows
    assert meta["logit_max_abs_diff"] <= coarse_export.LOGIT_TOL
    model, cfg, _ = load_student(out / "run" / "checkpoint.pt")
    assert cfg.item_stats and cfg.n_item_dense == 1 + len(S.FIELDS)
    vecs = np.load(out / "bundle" / coarse_export.NAMES["item_vectors"])
    ids = np.arange(data.items.n)
    dense = np.concatenate([data.items.dense(ids), data.item_stats.table(data.test_day)], axis=1)
    with torch.no_grad():
        want = model.item_tower(torch.from_numpy(data.items.feats(ids)), torch.from_numpy(dense)).numpy() * model.scale
    np.testing.assert_allclose(vecs[:, : want.shape[1]], want, atol=1e-5)
    if objective == "gmv":  # the item term (last coordinate) reads the statistics too
        assert vecs.shape[1] == want.shape[1] + 1
