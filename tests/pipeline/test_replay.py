"""`recstack replay` against a real server over the tiny world: every session ranked, clicks and
purchases drawn from the truth go back through LogEvents and reach the feature store."""
from __future__ import annotations

import numpy as np

from recstack.pipeline.replay import ReplayConfig, mean_ci, replay
from recstack.serving.events import LivePath
from recstack.serving.server import build_server
from recstack.serving.store import open_store


def test_replay_ranks_every_session_and_sends_the_drawn_events(tiny_data, tiny_bundle, tmp_path):
    store = open_store(str(tmp_path / "fs.sqlite3"))
    server, port, _ = build_server(tiny_bundle, max_workers=2, live=LivePath(store))
    try:
        cfg = ReplayConfig(sessions=25, speedup=1e12, max_wait_s=0.0, k=20, seed=1)
        report = replay(f"127.0.0.1:{port}", tiny_data, cfg)
    finally:
        server.stop(None)
    assert report["requests"] == 25 and not report["failed"] and report["degraded"] == 0
    pr = report["per_request"]
    sent = round((pr["clicks"]["mean"] + pr["conversions"]["mean"]) * 25)
    assert report["events_sent"] == sent > 0  # the drawn clicks and purchases, all acknowledged
    for v in pr.values():
        assert v["n"] == 25 and v["ci_low"] <= v["mean"] <= v["ci_high"]
    assert 0 < pr["ctr"]["mean"] < 1 and pr["expected_gmv"]["mean"] > 0
    stored = store._conn().execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM events").fetchone()
    assert stored[0] == sent and stored[1] >= 1
    store.close()


def test_mean_ci_is_a_t_interval():
    r = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert r["mean"] == 2.5 and r["n"] == 4
    assert np.isclose(r["ci_high"] - r["mean"], 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2)
