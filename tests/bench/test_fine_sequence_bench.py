"""recstack.bench.fine_sequence: the served fine graphs of two bundles timed on one request,
and a sequence graph also fed its sequence once per candidate."""
from __future__ import annotations

import json

import numpy as np

from recstack import bundle as B
from recstack.bench import fine_sequence as FS
from recstack.serving.cascade import Cascade


def _with_din_fine(bdir, vocab, write_din_fine) -> None:
    write_din_fine(bdir, vocab)
    m = B.read_manifest(bdir)
    files = [f for f in m["files"] if f not in ("fine/ctr.onnx", "fine/cvr.onnx")] + ["fine/ranker.onnx"]
    B.write_manifest(bdir, version=m["version"], files=files, configs=m["configs"], feature_schema=m["feature_schema"],
                     vocab=m["vocab"], stages=m["stages"], extra={"snapshot": m["snapshot"]})


def test_the_paths_feed_one_request_and_the_per_row_sequence_gives_the_same_scores(tmp_path, make_fake_bundle,
                                                                                   fake_vocab, write_din_fine, capsys):
    old = make_fake_bundle(tmp_path / "old")
    din = make_fake_bundle(tmp_path / "din")
    _with_din_fine(din, fake_vocab, write_din_fine)
    feeds = FS.request_feeds(Cascade.load(din, warm=False), user=0, n=40)
    assert feeds["item_feats"].shape == (40, 5) and feeds["seq_items"].shape == (1, 50, 5)
    fns = FS.paths({"none": str(old), "din": str(din)}, n=40, precision="fp32", user=0)
    assert sorted(fns) == ["din", "din/sequence_per_row", "none"]
    once, per_row = fns["din"](), fns["din/sequence_per_row"]()
    for a, b in zip(once, per_row):  # the same request either way
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert FS.main(["--bundle", f"none={old}", "--bundle", f"din={din}", "--candidates", "40", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["ms"]) == {"none", "din", "din/sequence_per_row"} and out["candidates"] == 40
    assert set(out["ms"]["din"]) == {"wall_ms", "cpu_ms"} and out["ms"]["din"]["cpu_ms"]["median"] >= 0
