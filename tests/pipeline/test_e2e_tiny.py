"""End to end at `tiny` size: simulate -> train the three stages -> export -> serve -> Rank over gRPC."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

import coarse_rank.train
import fine_rank.train
import retrieval.train
from recstack import bundle as B
from recstack.data import load
from recstack.pipeline.export import ExportError, export_bundle
from recstack.serving import client
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc


def test_tiny_end_to_end(tiny_data, tmp_path):
    runs, artifacts = tmp_path / "runs", tmp_path / "artifacts"
    # small models and few steps: this checks the plumbing, not model quality
    retrieval.train.train(retrieval.train.Config(epochs=1, max_steps=30, batch_size=256, user_hidden=(32,), item_hidden=(32,),
                                                 dim=16, ann_eval_queries=100),
                          tiny_data, runs / "retrieval", progress=False)
    coarse_rank.train.train(coarse_rank.train.Config(max_steps=30, batch_size=256, hidden=(64,), eval_max_rows=2000),
                            tiny_data, runs / "coarse", progress=False)
    fine_rank.train.train(fine_rank.train.Config(ctr_hidden=(32, 16), cvr_hidden=(32, 16), ctr_max_steps=30, cvr_max_steps=30,
                                                 ctr_batch_size=256, cvr_batch_size=128),
                          tiny_data, runs / "fine", progress=False)

    bundle_dir = export_bundle(runs, artifacts)
    assert B.resolve_bundle(artifacts) == bundle_dir and (artifacts / B.CURRENT).read_text().strip() == bundle_dir.name
    manifest = B.verify_bundle(bundle_dir)
    for rel in ("retrieval/user_tower.onnx", "retrieval/index.faiss", "coarse/user_tower.onnx", "coarse/item_vectors.npy",
                "fine/ranker.onnx", B.SNAPSHOT_USERS, B.SNAPSHOT_ITEMS, B.SNAPSHOT_BEHAVIOURS):
        assert rel in manifest["files"], rel
    assert set(manifest["stages"]) == {"retrieval", "coarse", "fine"}
    assert not [p for p in artifacts.iterdir() if p.name.startswith(".staging")]
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(runs, artifacts, version=bundle_dir.name)

    data = load(tiny_data)
    n_items, n_users = data.items.n, data.users.n
    busiest = int(np.argmax(np.diff(data.behaviours.start)))  # the user with the longest history
    server, port, servicer = build_server(artifacts, max_workers=2, admin_token="e2e-token")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RankingServiceStub(channel)
            for user_id, k in ((0, 10), (busiest, 20), (n_users + 5, 10)):
                resp = stub.Rank(client.make_request(user_id, k), timeout=30)
                ids = [it.item_id for it in resp.items]
                assert len(ids) == k == len(set(ids)) and all(0 <= i < n_items for i in ids)
                scores = [it.score for it in resp.items]
                assert scores == sorted(scores, reverse=True)
                for it in resp.items:
                    assert 0 < it.pctr < 1 and 0 < it.pcvr < 1 and it.price > 0
                    assert it.score == pytest.approx(it.pctr * it.pcvr * it.price, rel=1e-6)
                assert resp.model_version == bundle_dir.name
                assert resp.cold_start == (user_id >= n_users)
                assert resp.stage_counts.retrieved == min(1000, n_items) and resp.stage_counts.coarse == 200
                if user_id == busiest:
                    assert resp.stage_counts.sequence_length == min(50, int(np.diff(data.behaviours.start).max()))
            with pytest.raises(grpc.RpcError) as e:
                stub.Rank(client.make_request(0, 5, behaviours=[{"item_id": n_items}]), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "recent_behaviours[0].item_id" in e.value.details()
            info = pb_grpc.ModelServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                                                      metadata=client.admin_metadata("e2e-token"))
            assert info.model_version == bundle_dir.name and info.n_items == n_items
    finally:
        server.stop(None)
