"""Serving a fine graph that reads the behaviour sequence: fed one (1, L, ...) row per
request beside the candidates; a bundle of the older layout (no sequence inputs) still
served; a sequence graph this server cannot feed, or one its manifest does not describe,
refused at load with a one-line error naming the file."""
from __future__ import annotations

import numpy as np
import pytest

from recstack import bundle as B
from recstack.bundle import BundleError
from recstack.serving.cascade import Cascade, Query



def _relist_fine(bdir, meta: dict) -> None:
    """List fine/ranker.onnx instead of the two-graph layout, with this fine stage meta."""
    m = B.read_manifest(bdir)
    files = [f for f in m["files"] if f not in ("fine/ctr.onnx", "fine/cvr.onnx")] + ["fine/ranker.onnx"]
    stages = {**m["stages"], "fine": {"meta": meta}}
    B.write_manifest(bdir, version=m["version"], files=files, configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=stages, extra={"snapshot": m["snapshot"]})


INPUTS = ["user_feats", "item_feats", "item_dense", "interacted", "seq_items", "seq_extras"]


def test_a_sequence_graph_is_fed_the_requests_sequence(tmp_path, make_fake_bundle, fake_vocab, write_din_fine):
    bdir = make_fake_bundle(tmp_path / "artifacts")
    old = Cascade.load(bdir)  # the older two-graph layout: four inputs, served as before
    assert not old.fine.merged and "seq_items" not in old.fine.models[0].inputs
    assert len(old.rank(Query(user_id=0, num_results=5, retrieval_size=50, coarse_size=20)).item_ids) == 5
    write_din_fine(bdir, fake_vocab)
    _relist_fine(bdir, {"inputs": INPUTS})
    cascade = Cascade.load(bdir)
    assert cascade.fine.models[0].inputs == INPUTS
    q = Query(user_id=0, num_results=5, retrieval_size=50, coarse_size=20)
    seq_items, seq_extras, _ = cascade.sequence(q)
    assert (seq_items[0, :, 0] > 0).sum() > 0
    user_feats = cascade.users.feats(np.array([0]))
    cands = np.arange(20, dtype=np.int64)
    pctr, _, _, _ = cascade.fine_scores(user_feats, seq_items, seq_extras, cands, lambda stage: None)
    # another history changes the candidates' predictions: the graph reads the sequence it is fed
    other, _, _, _ = cascade.fine_scores(user_feats, np.zeros_like(seq_items), np.zeros_like(seq_extras), cands,
                                         lambda stage: None)
    assert pctr.shape == (20,) and not np.allclose(pctr, other)
    assert len(cascade.rank(q).item_ids) == 5


def test_a_sequence_graph_the_server_cannot_feed_is_refused(tmp_path, make_fake_bundle, fake_vocab, write_din_fine):
    bdir = make_fake_bundle(tmp_path / "artifacts")
    write_din_fine(bdir, fake_vocab, seq_len=10)
    _relist_fine(bdir, {"inputs": INPUTS})
    with pytest.raises(BundleError, match=r"'fine/ranker.onnx': input seq_items has shape \['sequences', 10, 5\]") as e:
        Cascade.load(bdir)
    assert "\n" not in str(e.value)


def test_a_graph_its_manifest_does_not_describe_is_refused(tmp_path, make_fake_bundle, fake_vocab, write_din_fine):
    bdir = make_fake_bundle(tmp_path / "artifacts")
    write_din_fine(bdir, fake_vocab)
    _relist_fine(bdir, {"inputs": INPUTS[:4]})  # the manifest of a sequence-free export
    with pytest.raises(BundleError, match="the manifest's fine stage lists") as e:
        Cascade.load(bdir)
    assert "\n" not in str(e.value)
