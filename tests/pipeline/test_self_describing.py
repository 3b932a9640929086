"""A trained, exported bundle from a world with its own (string) ids: the bundle carries the id
map, every ONNX model carries its schema, `export --stage` writes one stage's self-describing
models, and the documented onnxruntime snippet reproduces a served Score."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import coarse_rank.train
import fine_rank.train
import retrieval.train
from recstack import bundle as B
from recstack import bundle_files, cli
from recstack.model_schema import SCHEMA_KEY
from recstack.pipeline.export import export_bundle
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

DOC = Path(__file__).resolve().parents[2] / "docs" / "SCORING.md"


def _add_external_ids(world: Path) -> None:
    for table, prefix in (("users.parquet", "cust-"), ("items.parquet", "sku-")):
        t = pq.read_table(world / table)
        ext = pa.array([f"{prefix}{(i * 7919) % 100_003:05d}" for i in range(t.num_rows)], type=pa.string())
        pq.write_table(t.append_column("external_id", ext), world / table)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """(runs, bundle dir): the three stages trained for a few steps (plumbing, not quality) on a
    copy of the tiny world whose users and items have string external ids."""
    tmp = tmp_path_factory.mktemp("self_describing")
    world = tmp / "world"
    shutil.copytree(tiny_data, world)
    _add_external_ids(world)
    runs = tmp / "runs"
    retrieval.train.train(retrieval.train.Config(epochs=1, max_steps=10, batch_size=256, user_hidden=(16,),
                                                 item_hidden=(16,), dim=8, ann_eval_queries=50),
                          world, runs / "retrieval", progress=False)
    coarse_rank.train.train(coarse_rank.train.Config(max_steps=10, batch_size=256, hidden=(32,), eval_max_rows=1000),
                            world, runs / "coarse", progress=False)
    fine_rank.train.train(fine_rank.train.Config(ctr_hidden=(16,), cvr_hidden=(16,), ctr_max_steps=10, cvr_max_steps=10,
                                                 ctr_batch_size=256, cvr_batch_size=128),
                          world, runs / "fine", progress=False)
    return runs, export_bundle(runs, tmp / "artifacts")


def _schema(path: Path) -> dict:
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    return json.loads(meta.custom_metadata_map[SCHEMA_KEY])


def test_the_bundle_carries_the_id_map_and_every_model_its_schema(trained):
    _, bundle = trained
    manifest = B.verify_bundle(bundle)
    assert {bundle_files.IDS_USERS, bundle_files.IDS_ITEMS} <= set(manifest["files"])
    items = pq.read_table(bundle / bundle_files.IDS_ITEMS).column("external_id").to_pylist()
    assert len(items) == manifest["vocab"]["n_items"] and items[1] == "sku-07919"
    onnx_files = sorted(rel for rel in manifest["files"] if rel.endswith(".onnx"))
    fine = [rel for rel in onnx_files if rel.startswith("fine/")]  # the int8 copy only when it passed its checks
    assert fine in (["fine/ranker.onnx"], ["fine/ranker.onnx", "fine/ranker_int8.onnx"]), fine
    assert [rel for rel in onnx_files if not rel.startswith("fine/")] == ["coarse/user_tower.onnx", "retrieval/user_tower.onnx"]
    for rel in onnx_files:
        schema = _schema(bundle / rel)
        session = ort.InferenceSession(str(bundle / rel), providers=["CPUExecutionProvider"])
        assert schema["bundle_version"] == bundle.name and schema["stage"] == rel.split("/")[0]
        assert [i["name"] for i in schema["inputs"]] == [i.name for i in session.get_inputs()]
        assert all(i["columns"] and i["transform"] for i in schema["inputs"]), rel
        assert schema["id_offset"] == 1 and schema["vocab"] == manifest["vocab"]
        assert schema["item_dense"] == {k: manifest["vocab"][k] for k in ("log_price_mean", "log_price_std")}
    assert _schema(bundle / "fine/ranker.onnx")["model"] == "ranker"


def _snippet() -> str:
    text = DOC.read_text()
    m = re.search(r"<!-- snippet: reproduce-score -->\n```python\n(.*?)```", text, re.S)
    assert m, f"{DOC} has no reproduce-score snippet"
    return m.group(1)


def test_the_documented_snippet_reproduces_a_served_score(trained):
    _, bundle = trained
    code = _snippet()
    assert len(code.strip().splitlines()) <= 10
    keys = pq.read_table(bundle / bundle_files.IDS_ITEMS).column("external_id").to_pylist()
    cands, clicked, hours_ago = np.array([3, 40, 7, 199, 3]), 40, 0.5
    server, port, _ = build_server(bundle, max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            resp = pb_grpc.RankingServiceStub(channel).Score(pb.ScoreRequest(
                user_key="not-a-customer", item_keys=[keys[i] for i in cands],
                recent_behaviours=[pb.Behaviour(item_key=keys[clicked], seconds_ago=hours_ago * 3600)]), timeout=30)
    finally:
        server.stop(None)
    assert resp.cold_start and [it.item_key for it in resp.items] == [keys[i] for i in cands]
    scope = {"bundle": str(bundle), "cands": cands, "clicked": clicked, "hours_ago": hours_ago}
    exec(compile(code, str(DOC), "exec"), scope)
    served = np.array([it.score for it in resp.items])
    np.testing.assert_allclose(scope["score"], served, rtol=1e-6)
    np.testing.assert_allclose(scope["pctr"], [it.pctr for it in resp.items], rtol=1e-6)
    # the clicked candidate's interacted features made a difference the snippet reproduced
    assert scope["feeds"]["interacted"][1].sum() > 0


@pytest.mark.parametrize("stage,names", [
    ("fine", ["ranker.onnx", "item_stats.npy"]),  # the default rankers read the item statistics
    ("coarse", ["user_tower.onnx", "item_vectors.npy"]),
    ("retrieval", ["user_tower.onnx", "item_emb.npy", "index.faiss"]),
])
def test_export_one_stage_writes_its_self_describing_models(trained, tmp_path, capsys, stage, names):
    runs, _ = trained
    out = tmp_path / stage
    assert cli.main(["export", "--runs", str(runs), "--out", str(out), "--stage", stage]) == 0
    optional = {"ranker_int8.onnx", "item_codes.npy", "item_scales.npy"}  # int8 copies, kept only when they pass
    written = sorted(p.name for p in out.iterdir() if p.name not in optional)
    assert written == sorted(names)
    for name in names:
        if name.endswith(".onnx"):
            schema = _schema(out / name)
            assert schema["stage"] == stage and schema["bundle_version"] == ""
    assert f"{stage} exported to {out}" in capsys.readouterr().out


def test_export_refuses_a_world_whose_external_ids_repeat(tmp_path):
    from recstack.pipeline.export import ExportError, write_id_maps

    pq.write_table(pa.table({"user_id": [0, 1, 2], "external_id": ["a", "b", "a"]}), tmp_path / "users.parquet")
    pq.write_table(pa.table({"item_id": [0, 1]}), tmp_path / "items.parquet")  # no column: no item map
    with pytest.raises(ExportError, match=r"users.parquet column 'external_id': external id 'a' names 2 rows"):
        write_id_maps(tmp_path, tmp_path / "bundle", 3, 2)
    pq.write_table(pa.table({"user_id": [0, 1, 2], "external_id": [10, 11, 12]}), tmp_path / "users.parquet")
    assert write_id_maps(tmp_path, tmp_path / "bundle", 3, 2) == [bundle_files.IDS_USERS]
