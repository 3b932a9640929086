"""From a served day to training data: Rank responses and LogEvents (with request ids) through
a real server, its logs turned into a world folder that the training loader reads."""
from __future__ import annotations

import time

import numpy as np
import pytest

from recstack.data import load
from recstack.data.live_log import LiveLogError, live_log_to_world
from recstack.serving import client
from recstack.serving.events import LivePath
from recstack.serving.server import build_server
from recstack.serving.store import open_store


def test_served_impressions_and_events_become_training_examples(tmp_path, make_fake_bundle):
    bundle = make_fake_bundle(tmp_path / "artifacts")
    live = LivePath(open_store("", artifacts_root=tmp_path / "artifacts"), tmp_path / "log")
    server, port, servicer = build_server(tmp_path / "artifacts", max_workers=2, live=live)
    target = f"127.0.0.1:{port}"
    try:
        with client.channel(target) as ch:
            from recstack.v1 import ranking_pb2_grpc as pb_grpc

            stub = pb_grpc.RankingServiceStub(ch)
            first = stub.Rank(client.make_request(3, 5), metadata=(("x-request-id", "req-a"),), timeout=30)
            second = stub.Rank(client.make_request(4, 5), metadata=(("x-request-id", "req-b"),), timeout=30)
        now = time.time()
        clicked, bought = first.items[1].item_id, first.items[1].item_id
        client.log_events(target, [client.event(3, clicked, now, "click", 30.0, request_id="req-a"),
                                   client.event(3, bought, now + 1, "purchase", request_id="req-a"),
                                   client.event(4, second.items[0].item_id, now, "cart", request_id="req-b"),
                                   client.event(4, 0, now, "click", 5.0)])  # no request id: in the events only
    finally:
        server.stop(None)
        live.close()  # what the process's drain does: the open files are finished
    assert servicer.metrics.value("recstack_impressions_logged_total") == 10

    world = live_log_to_world(tmp_path / "log", bundle, tmp_path / "world")
    assert world["n_days"] == 1 and world["n_events"] == 4
    data = load(tmp_path / "world")
    imps = data.impressions(1)
    assert len(imps["item_id"]) == 10
    a = imps["session_id"] == imps["session_id"][np.flatnonzero(imps["user_id"] == 3)[0]]
    assert imps["item_id"][a].tolist() == [it.item_id for it in first.items]  # served order kept
    assert imps["click"][a].tolist() == [False, True, False, False, False]
    assert imps["purchase"][a].tolist() == [False, True, False, False, False] and imps["dwell"][a][1] == 30.0
    b = imps["user_id"] == 4
    assert imps["cart"][b].tolist() == [1, 0, 0, 0, 0] and not imps["click"][b].any()
    assert np.isnan(imps["true_pctr"]).all()  # a live log has no truth
    batch = data.examples(1).batch(np.arange(10))  # what a stage trains on
    assert batch["seq_items"].shape == (10, 50, 5) and batch["click"].sum() == 1
    # the user-4 click came after the session: not in its own impressions' sequence
    assert (batch["seq_items"][imps["user_id"] == 4][:, :, 0] == 0).all()


def test_a_folder_without_impressions_is_refused(tmp_path, make_fake_bundle):
    bundle = make_fake_bundle(tmp_path / "artifacts")
    (tmp_path / "log").mkdir()
    with pytest.raises(LiveLogError, match="no finished impressions"):
        live_log_to_world(tmp_path / "log", bundle, tmp_path / "world")
