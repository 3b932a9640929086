"""tools/pfd_fill_cache.py: its fits are the coarse experiment's own (same Config, days and
cache keys), in seed-major order of priority."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from recstack.data import load

from coarse_rank.experiments import base_config
from coarse_rank.experiments.plan import ROWS, CoarsePlan, windows
from coarse_rank.experiments.runner import Runner, _job_key
from coarse_rank.train import Config

TOOL = Path(__file__).resolve().parents[2] / "tools" / "pfd_fill_cache.py"


def _tool():
    spec = importlib.util.spec_from_file_location("pfd_fill_cache", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fill_cache_jobs_have_the_experiments_keys(tiny_data, tmp_path):
    seeds = [1, 2, 3]
    jobs = _tool().jobs(tiny_data, tiny_data, str(tmp_path), seeds, 0.05)
    # what `recstack experiment coarse --set lrs=0.05` fits on the test day for each row and seed
    plan = CoarsePlan.from_cli("coarse", seeds, config=Config, overrides=("lrs=0.05",))
    data = load(tiny_data)
    r = Runner(tiny_data, data, base_config(plan), windows(data, plan.base_days), print)
    order = [("baseline", "sd", "pfd"), ("md", "pfd_md"), ("oracle",), ("sd", "pfd")]
    want = [_job_key(tiny_data, r.cfg(**ROWS[m], lr=0.05, seed=s), r.win["train"], r.win["test"])
            for rows in order for s in seeds for m in rows]
    assert [_job_key(*j[:4]) for j in jobs] == want
    assert all(j[4] == str(tmp_path) for j in jobs)
    assert [(j[1].teacher, j[1].seed) for j in jobs[:4]] == [("baseline", 1), ("sd", 1), ("pfd", 1), ("baseline", 2)]
    assert all(j[1].manner == "share_star_sync" and j[1].objective == "ctr" and j[1].eval_max_rows == 0 for j in jobs)


def test_fill_cache_sets_reach_every_fit_and_its_key(tiny_data, tmp_path):
    plain = _tool().jobs(tiny_data, tiny_data, str(tmp_path), [1, 2, 3], 0.05)
    linear = _tool().jobs(tiny_data, tiny_data, str(tmp_path), [1, 2, 3], 0.05, ["lr_schedule=linear"])
    assert all(j[1].lr_schedule == "linear" for j in linear) and all(j[1].lr_schedule == "constant" for j in plain)
    # the experiment run with the same --set finds these fits in the cache
    plan = CoarsePlan.from_cli("coarse", [1, 2, 3], config=Config, overrides=("lrs=0.05", "lr_schedule=linear"))
    data = load(tiny_data)
    r = Runner(tiny_data, data, base_config(plan), windows(data, plan.base_days), print)
    assert _job_key(*linear[0][:4]) == _job_key(tiny_data, r.cfg(**ROWS["baseline"], lr=0.05, seed=1), r.win["train"],
                                                r.win["test"])
    assert {_job_key(*j[:4]) for j in linear}.isdisjoint(_job_key(*j[:4]) for j in plain)


def test_fill_cache_groups_choose_the_rows_and_their_order(tiny_data, tmp_path):
    jobs = _tool().jobs(tiny_data, tiny_data, str(tmp_path), [1, 2, 3], 0.05, groups=["control", "bsp"])
    assert [j[1].teacher for j in jobs[:2]] == ["sd", "pfd"] and len(jobs) == 3 * 2 + 3 * 3
    with pytest.raises(SystemExit, match="unknown group"):
        _tool().jobs(tiny_data, tiny_data, str(tmp_path), [1, 2, 3], 0.05, groups=["teachers"])


def test_fill_cache_selected_lrs_give_rows_their_own_rate_on_both_worlds(tiny_data, tmp_path):
    sets = ["lr_schedule=linear", "selected_lrs=baseline:0.025,pfd:0.1"]
    jobs = _tool().jobs(tiny_data, tiny_data, str(tmp_path), [1, 2, 3], 0.05, sets, groups=["bsp", "control"])
    lrs = [(j[1].teacher, j[1].lr) for j in jobs]
    assert lrs[:3] == [("baseline", 0.025), ("sd", 0.05), ("pfd", 0.1)] and lrs[-2:] == [("sd", 0.05), ("pfd", 0.1)]
    # the test-day run handed the same choices finds these fits in the cache
    plan = CoarsePlan.from_cli("coarse", [1, 2, 3], config=Config, overrides=["lrs=0.025,0.05,0.1", *sets])
    data = load(tiny_data)
    r = Runner(tiny_data, data, base_config(plan), windows(data, plan.base_days), print)
    assert _job_key(*jobs[2][:4]) == _job_key(tiny_data, r.cfg(**ROWS["pfd"], lr=plan.selected_lrs["pfd"], seed=1),
                                              r.win["train"], r.win["test"])
    with pytest.raises(SystemExit, match="methods"):
        _tool().jobs(tiny_data, tiny_data, str(tmp_path), [1, 2, 3], 0.05, ["methods=baseline"])
