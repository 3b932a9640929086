"""`recstack replay --split`: two real servers on the tiny world, both designs, and B − A."""
from __future__ import annotations

import numpy as np
import pytest

from recstack.pipeline.replay import ReplayConfig
from recstack.pipeline.replay_split import METRICS, difference, parse_split, replay_split
from recstack.serving.events import LivePath
from recstack.serving.server import build_server
from recstack.serving.store import open_store

CFG = ReplayConfig(sessions=24, speedup=1e12, max_wait_s=0.0, k=10, seed=3)


@pytest.fixture
def two_arms(tiny_bundle, tmp_path):
    arms, stores = [], {}
    for name in ("A", "B"):
        stores[name] = open_store(str(tmp_path / f"{name}.sqlite3"))
        server, port, _ = build_server(tiny_bundle, max_workers=2, live=LivePath(stores[name]))
        arms.append((name, server, f"127.0.0.1:{port}"))
    yield {name: target for name, _, target in arms}, stores
    for _, server, _ in arms:
        server.stop(None)
    for s in stores.values():
        s.close()


def _users(store) -> set[int]:
    return {u for (u,) in store._conn().execute("SELECT DISTINCT user_id FROM events")}


def test_paired_sends_every_session_to_both_arms(tiny_data, two_arms):
    targets, stores = two_arms
    r = replay_split(targets, tiny_data, CFG, design="paired")
    a, b = r["arms"]["A"], r["arms"]["B"]
    assert a["requests"] == b["requests"] == 24 and not a["failed"] and not b["failed"]
    for m in METRICS:  # every session answered by both: the mean difference is the difference of the means
        d = r["difference"][m]
        assert d["n"] == 24
        assert np.isclose(d["mean"], b["per_request"][m]["mean"] - a["per_request"][m]["mean"])
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert "rows" not in a  # the per-session rows stay out of the report
    assert _users(stores["A"]) and _users(stores["B"])  # each arm's drawn events went to its own store


def test_users_design_splits_the_users_between_the_arms(tiny_data, two_arms):
    targets, stores = two_arms
    r = replay_split(targets, tiny_data, CFG, design="users")
    assert r["arms"]["A"]["requests"] > 0 and r["arms"]["B"]["requests"] > 0
    assert _users(stores["A"]).isdisjoint(_users(stores["B"]))
    d = r["difference"]["expected_gmv"]
    assert d["n_a"] == r["arms"]["A"]["requests"] and d["n_b"] == r["arms"]["B"]["requests"]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"]


def test_paired_differences_align_sessions_and_cancel_on_identical_arms():
    rows = {"session": [5, 7, 9], **{m: [1.0, 2.0, 4.0] for m in METRICS}}
    same = difference({"rows": rows}, {"rows": dict(rows)}, "paired")
    assert all(same[m]["mean"] == 0 and same[m]["n"] == 3 for m in METRICS)
    # B missed session 7: only the sessions both answered are compared, matched by id, not position
    b = {"session": [9, 5], **{m: [6.0, 1.5] for m in METRICS}}
    d = difference({"rows": rows}, {"rows": b}, "paired")["gmv"]
    assert d["n"] == 2 and np.isclose(d["mean"], ((6.0 - 4.0) + (1.5 - 1.0)) / 2)


@pytest.mark.parametrize("text, message", [
    ("A=h:1", "expected two arms"), ("A=h:1,A=h:2", "named twice"), ("A=h:1,Bh:2", "expected NAME=HOST:PORT"),
    ("A=h:1,B=h:2,C=h:3", "expected two arms")])
def test_bad_split_is_a_one_line_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_split(text)
