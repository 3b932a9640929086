"""Which days a warm pass trains on: the days of a world that hold impressions, whether the world
was written by the simulator (a list of days) or from a live log (days keyed by number)."""
from __future__ import annotations

from types import SimpleNamespace

from recstack.data import load
from recstack.pipeline.warm import logged_days


def test_logged_days_of_a_simulated_world(tiny_data):
    data = load(tiny_data)
    assert logged_days(data) == sorted(d["day"] for d in data.world["days"] if d["impressions"] > 0)
    assert logged_days(data) == list(range(1, data.test_day + 1))


def test_logged_days_of_a_log_world_skip_empty_days_and_sort_by_number():
    world = {"days": {"10": {"impressions": 5}, "9": {"impressions": 0}, "2": {"impressions": 7}}}
    assert logged_days(SimpleNamespace(world=world)) == [2, 10]
