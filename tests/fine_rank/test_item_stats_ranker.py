"""Fine rankers that read the item statistics (`item_stats=True`): trained rows and served feeds
hold the same numbers, the bundle ships the serving day's table, and a bundle whose table and
graph do not go together is refused at load."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from recstack import bundle as B
from recstack import features as FE
from recstack import item_stats as S
from recstack.bundle import BundleError
from recstack.data import load
from recstack.training import checkpoint

from fine_rank import export as fexport
from fine_rank import train as ftrain
from fine_rank.config import Config

TINY = dict(ctr_hidden=(16,), cvr_hidden=(16,), ctr_emb_dim=4, cvr_emb_dim=4, ctr_max_steps=6, cvr_max_steps=6,
            ctr_batch_size=256, cvr_batch_size=128, item_stats=True)


@pytest.fixture(scope="module")
def stats_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fine_item_stats")
    ftrain.train(Config(**TINY), tiny_data, out, progress=False)
    return {"data": tiny_data, "ckpt": out / "checkpoint.pt"}


def with_fine(tiny_bundle, tmp_path, ckpt, install_fine, *, files=None, meta_edit=None):
    """A copy of the tiny bundle whose fine stage is `ckpt` exported (listing `files` of it)."""
    bdir = tmp_path / tiny_bundle.name  # a bundle's directory is named by its version
    shutil.copytree(tiny_bundle, bdir)
    result = fexport.export(ckpt, bdir / "fine", int8=False)
    meta = dict(result["meta"])
    if meta_edit is not None:
        meta_edit(meta)
    install_fine(bdir, result, files=files, meta=meta)
    return bdir, result


def test_trained_rows_and_served_feeds_hold_the_same_item_statistics(stats_run, tiny_bundle, install_fine, tmp_path):
    from recstack.serving.cascade import Cascade

    bdir, result = with_fine(tiny_bundle, tmp_path, stats_run["ckpt"], install_fine)
    data = load(stats_run["data"])
    assert result["meta"]["item_stats"] == {"file": "item_stats.npy", "day": data.test_day, "fields": list(S.FIELDS)}
    cascade = Cascade.load(bdir)  # the warm-up ranks probe requests through the graph
    np.testing.assert_array_equal(cascade.item_stats, data.item_stats.table(data.test_day))
    ex = data.examples(data.test_day)
    table = ftrain.materialise(ex, item_stats=True)
    assert table["item_dense"].shape[1] == 1 + len(S.FIELDS)
    _, models = fexport.load_models(checkpoint.load(stats_run["ckpt"]))
    rows = np.random.default_rng(0).choice(len(ex), 20, replace=False)
    seq_items, seq_extras = np.zeros((1, FE.SEQ_LEN, 5), np.int64), np.zeros((1, FE.SEQ_LEN, 3), np.float32)
    for row in rows:
        item = table["item_id"][row : row + 1]
        feeds = FE.fine_inputs(table["user_feats"][row : row + 1], seq_items, seq_extras, cascade.items, item,
                               table["interacted"][row : row + 1], cascade.item_stats)
        np.testing.assert_array_equal(feeds["item_dense"], table["item_dense"][row : row + 1])
        pctr, pcvr = cascade.fine(feeds)
        for task, served in (("ctr", pctr), ("cvr", pcvr)):
            trained = ftrain.predict(models[task], {k: v[row : row + 1] for k, v in table.items()})
            assert abs(float(served[0]) - float(trained[0])) <= 1e-5, task


def test_a_bundle_whose_statistics_and_graph_do_not_go_together_is_refused(stats_run, tiny_bundle, install_fine, tmp_path):
    from recstack.serving.cascade import Cascade

    # the graph reads 13 item_dense columns, the bundle ships no table (neither file nor meta)
    bdir, _ = with_fine(tiny_bundle, tmp_path / "a", stats_run["ckpt"], install_fine, files=["ranker.onnx"],
                        meta_edit=lambda m: m.pop("item_stats"))
    with pytest.raises(BundleError, match=r"item_dense has 13 columns.*give 1"):
        Cascade.load(bdir)
    # the meta names the table, the manifest does not list the file
    bdir, _ = with_fine(tiny_bundle, tmp_path / "b", stats_run["ckpt"], install_fine, files=["ranker.onnx"])
    with pytest.raises(BundleError, match="come together; found only the meta"):
        Cascade.load(bdir)
    # other fields than this server serves
    bdir, _ = with_fine(tiny_bundle, tmp_path / "c", stats_run["ckpt"], install_fine,
                        meta_edit=lambda m: m["item_stats"].update(fields=["clicks"]))
    with pytest.raises(BundleError, match="item_stats.fields"):
        Cascade.load(bdir)


def test_a_table_with_negative_counts_is_refused(stats_run, tiny_bundle, install_fine, tmp_path):
    from recstack.serving.cascade import Cascade

    bdir, _ = with_fine(tiny_bundle, tmp_path, stats_run["ckpt"], install_fine)
    table = np.load(bdir / "fine/item_stats.npy")
    table[3, 0] = -1.0
    np.save(bdir / "fine/item_stats.npy", table)
    m = B.read_manifest(bdir)  # re-checksummed: the table itself is what is wrong
    B.write_manifest(bdir, version=m["version"], files=list(m["files"]), configs=m["configs"],
                     feature_schema=m["feature_schema"], vocab=m["vocab"], stages=m["stages"],
                     extra={"snapshot": m["snapshot"]})
    with pytest.raises(BundleError, match="item_stats.npy.*negative"):
        Cascade.load(bdir)
