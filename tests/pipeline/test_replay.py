"""`recstack replay` against a real server over the tiny world: every session ranked, clicks and
purchases drawn from the truth go back through LogEvents and reach the feature store."""
from __future__ import annotations

import numpy as np

from recstack.pipeline.replay import ReplayConfig, calibration_vs_truth, mean_ci, replay
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
    assert all(0 < v < np.inf for v in report["calibration_vs_truth"].values())
    stored = store._conn().execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM events WHERE request_id IS NOT NULL"
                                   " AND request_id != ''").fetchone()
    assert stored[0] == sent and stored[1] >= 1
    # the users' own browsing of the day went in too, each event once, with no request id
    from recstack.data import load
    from recstack.features import EVENT_KINDS

    data = load(tiny_data)
    ev = data.events
    mine = np.isin(ev["kind"], [EVENT_KINDS.index(k) for k in ("view", "favourite", "cart")]) & (
        data.day_of(ev["ts"]) == data.test_day)
    assert report["browse_events_sent"] == mine.sum() > 0
    browsed = store._conn().execute("SELECT user_id, item_id, kind FROM events WHERE request_id IS NULL OR request_id = ''"
                                    " ORDER BY user_id, item_id, kind").fetchall()
    expect = sorted(zip(ev["user_id"][mine].tolist(), ev["item_id"][mine].tolist(), ev["kind"][mine].tolist()))
    assert [tuple(r) for r in browsed] == expect
    store.close()


def test_replay_without_browsing_sends_only_the_drawn_events(tiny_data, tiny_bundle, tmp_path):
    store = open_store(str(tmp_path / "fs.sqlite3"))
    server, port, _ = build_server(tiny_bundle, max_workers=2, live=LivePath(store))
    try:
        cfg = ReplayConfig(sessions=10, speedup=1e12, max_wait_s=0.0, k=20, seed=1, browsing=False)
        report = replay(f"127.0.0.1:{port}", tiny_data, cfg)
    finally:
        server.stop(None)
    assert report["browse_events_sent"] == 0
    assert store._conn().execute("SELECT COUNT(*) FROM events").fetchone()[0] == report["events_sent"]
    store.close()


def test_mean_ci_is_a_t_interval():
    r = mean_ci(np.array([1.0, 2.0, 3.0, 4.0]))
    assert r["mean"] == 2.5 and r["n"] == 4
    assert np.isclose(r["ci_high"] - r["mean"], 3.182446305284263 * np.std([1, 2, 3, 4], ddof=1) / 2)


def test_calibration_vs_truth_weights_the_cvr_head_by_the_true_clicks():
    p = np.array([0.1, 0.3, 0.0])  # true pCTR of three served items; the third is never clicked
    q = np.array([0.2, 0.5, 0.9])  # true pCVR
    exact = calibration_vs_truth(p.sum(), p.sum(), (p * q).sum(), (p * q).sum())
    assert exact == {"ctr": 1.0, "cvr": 1.0}
    wrong_where_never_clicked = q + np.array([0.0, 0.0, 0.5])
    c = calibration_vs_truth(2 * p.sum(), p.sum(), (p * wrong_where_never_clicked).sum(), (p * q).sum())
    assert c == {"ctr": 2.0, "cvr": 1.0}
    assert all(np.isnan(v) for v in calibration_vs_truth(0.0, 0.0, 0.0, 0.0).values())
