"""Export refuses a diverged model: checkpoints whose weights hold NaN make no bundle, and the
error names the file that would have carried them; `current` keeps naming the last good bundle."""
from __future__ import annotations

import shutil

import pytest
import torch

import coarse_rank.train
import fine_rank.train
import retrieval.train
from recstack import bundle as B
from recstack.pipeline.export import ExportError, export_bundle


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The three stages trained for a few steps on the tiny world (plumbing, not quality)."""
    out = tmp_path_factory.mktemp("nan_runs")
    retrieval.train.train(retrieval.train.Config(epochs=1, max_steps=10, batch_size=256, user_hidden=(16,),
                                                 item_hidden=(16,), dim=8, ann_eval_queries=50),
                          tiny_data, out / "retrieval", progress=False)
    coarse_rank.train.train(coarse_rank.train.Config(max_steps=10, batch_size=256, hidden=(32,), eval_max_rows=1000),
                            tiny_data, out / "coarse", progress=False)
    fine_rank.train.train(fine_rank.train.Config(ctr_hidden=(16,), cvr_hidden=(16,), ctr_max_steps=10, cvr_max_steps=10,
                                                 ctr_batch_size=256, cvr_batch_size=128),
                          tiny_data, out / "fine", progress=False)
    return out


def _poison(runs, tmp_path, stage: str, select) -> "Path":
    """A copy of `runs` whose `stage` checkpoint has NaN in the first weight `select(name)` picks."""
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    path = copy / stage / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    state = ckpt["model"]["ctr"] if stage == "fine" else ckpt["model"]
    name = next(k for k in state if select(k) and state[k].is_floating_point())
    state[name].view(-1)[-1] = float("nan")  # one value: what a single diverged row looks like
    torch.save(ckpt, path)
    return copy


@pytest.mark.parametrize("stage,select,rel", [
    ("retrieval", lambda k: "item" in k and k.endswith("weight"), "item_emb.npy"),
    ("coarse", lambda k: k.startswith("item_tower.mlp."), "item_vectors.npy"),  # the embeddings are shared
    ("fine", lambda k: "emb" in k and k.endswith("weight"), "ranker.onnx"),
])
def test_export_refuses_nan_weights_naming_the_file(runs, tmp_path, stage, select, rel):
    artifacts = tmp_path / "artifacts"
    good = export_bundle(runs, artifacts)
    poisoned = _poison(runs, tmp_path, stage, select)
    with pytest.raises(ExportError) as e:
        export_bundle(poisoned, artifacts)
    assert str(e.value).startswith(f"{stage}: ") or f"'{stage}/" in str(e.value), e.value
    assert rel in str(e.value) and ("NaN" in str(e.value) or "nan" in str(e.value)), e.value
    assert B.read_current(artifacts) == good.name  # nothing half-written, nothing switched
    assert sorted(p.name for p in artifacts.iterdir()) == sorted(["current", good.name])


def test_export_signs_the_manifest_when_given_a_key(runs, tmp_path):
    bundle = export_bundle(runs, tmp_path / "artifacts", signing_key=b"k1")
    assert B.verify_bundle(bundle, b"k1")["signature"]["alg"] == "hmac-sha256"
    with pytest.raises(B.BundleError, match="does not match"):
        B.verify_bundle(bundle, b"k2")


def test_export_publishes_the_embeddings_before_current_moves(runs, tmp_path, milvus_lite):
    from recstack.pipeline.publish import PublishError
    from recstack.serving.cascade import Cascade

    artifacts = tmp_path / "artifacts"
    db = tmp_path / "vectors.db"
    uri = f"milvus://{db}/items"
    first = export_bundle(runs, artifacts, publish=uri)
    assert B.read_current(artifacts) == first.name
    cascade = Cascade.load(artifacts, retrieval_backend=uri, retrieval_timeout_s=120.0)
    assert cascade.version == first.name and cascade.index is None
    # a store that cannot be reached: the bundle is written, `current` stays on the last published one
    with pytest.raises(PublishError, match="127.0.0.1:1"):
        export_bundle(runs, artifacts, publish="milvus://127.0.0.1:1/items")
    assert B.read_current(artifacts) == first.name
    milvus_lite.stop(uri)
