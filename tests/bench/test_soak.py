"""The soak benchmark's bookkeeping (the soak itself runs outside the suite: `recstack bench soak`):
the two versions it serves, RSS drift per server life, and the report's failed-call count."""
from __future__ import annotations

import json


from recstack import bundle as B
from recstack.bench import soak


def test_two_versions_of_one_bundle_leave_the_source_untouched(tmp_path, make_fake_bundle):
    make_fake_bundle(tmp_path / "src", version="vsrc")
    before = (tmp_path / "src/vsrc" / B.MANIFEST).read_text()
    root, names = soak.prepare_versions(tmp_path / "src", tmp_path / "scratch")
    assert names == ["soak-a", "soak-b"] and B.read_current(root) == "soak-a"
    for name in names:
        assert B.Bundle.open(root / name).version == name  # the version names its directory
    assert (tmp_path / "src/vsrc" / B.MANIFEST).read_text() == before
    assert json.loads(before)["version"] == "vsrc"


def test_rss_drift_compares_the_first_and_last_minute_after_warm_up():
    life = soak.Life("A", started=0.0, pid=1, ready_s=5.0)
    # 35 s .. 95 s at 100 MiB, then growing to 103 MiB in the last minute of a 300 s life
    life.rss = [(t, (100 if t < 240 else 103) * 2**20) for t in range(0, 301, 2)]
    d = life.drift()
    assert d["first_mb"] == 100 and abs(d["last_mb"] - 103) < 1e-9 and abs(d["drift"] - 0.03) < 1e-9
    short = soak.Life("B", started=0.0, pid=2, ready_s=5.0)
    short.rss = [(t, 2**20) for t in range(0, 120, 2)]
    assert short.drift() is None  # too short for two disjoint minutes after the warm-up


def test_report_counts_failed_calls(tmp_path):
    tally = soak.Tally(started=0.0)
    tally.add("rank", True, False, ms=5.0)
    tally.add("rank", True, True, ms=7.0)
    tally.add("health", False, False, "UNAVAILABLE: gone")
    res = soak.summarise(tally, [], 60.0, dict(minutes=1, qps=1, client_threads=1, reload_every_s=60,
                                               restart_every_min=0, server_threads=1, grace_s=1, seed=0,
                                               artifacts="a", n_users=1, n_items=1, command="", scratch=""))
    assert res["failed_calls"] == 1 and res["total_calls"] == 3 and not res["targets"]["failed_calls_0"]
    assert res["calls"]["rank"] == {"ok": 2, "failed": 0, "retried": 1}
    text = soak.report(res, soak.MIX, soak.CALL_BUDGET_S)
    assert "**Failed calls: 1 of 3**" in text and "UNAVAILABLE: gone" in text
