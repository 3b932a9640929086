"""The fine tables' LR choice (fine_rank.experiments.table.choose): the best mean validation
score over the first `select_seeds` seeds, the first seed alone by default."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from fine_rank import experiments as FX
from fine_rank.experiments import table
from fine_rank.experiments.plan import CVR_METHODS, FinePlan
from recstack.config import ConfigError

LRS = (0.001, 0.002, 0.004)
# validation score by (lr, seed): seed 1 alone prefers 0.004; the mean over seeds 1-3 prefers
# 0.002 (0.70 vs 0.6733...); seed 4 would flip the mean back to 0.004 if it were read
SCORES = {(0.001, 1): 0.60, (0.001, 2): 0.61, (0.001, 3): 0.62, (0.001, 4): 0.50,
          (0.002, 1): 0.68, (0.002, 2): 0.71, (0.002, 3): 0.71, (0.002, 4): 0.40,
          (0.004, 1): 0.72, (0.004, 2): 0.65, (0.004, 3): 0.65, (0.004, 4): 0.99}


@pytest.fixture
def fake_fits(monkeypatch):
    """run_many returns each job's (lr, seed) as its "probabilities"; the score looks them up."""
    ran = []

    def run_many(tables, jobs, workers):
        ran.extend(jobs)
        return [{"probs": (float(lr), seed)} for _, _, phase, lr, seed, _, _ in jobs]

    monkeypatch.setattr(table, "run_many", run_many)
    monkeypatch.setattr(table, "validation_score", lambda kind, task, rows, probs: SCORES[probs])
    return ran


def _choose(select_seeds: int):
    methods = [m for m in CVR_METHODS if m.name in ("baseline", "pfd")]
    tables = SimpleNamespace(valid=SimpleNamespace(score={"cvr": {}}))
    return table.choose("cvr", methods, tables, None, (1, 2, 3, 4), LRS, lambda s: None, 1, select_seeds)


def test_one_selection_seed_reads_the_first_seed_alone(fake_fits):
    c = _choose(1)
    assert c.lr == {"baseline": 0.004, "pfd": 0.004}
    assert {job[4] for job in fake_fits} == {1} and all(job[2] == "valid" for job in fake_fits)
    assert c.sweeps["pfd"] == {0.001: 0.60, 0.002: 0.68, 0.004: 0.72}
    assert c.per_seed["pfd"] == {0.001: [0.60], 0.002: [0.68], 0.004: [0.72]}


def test_three_selection_seeds_choose_by_the_mean(fake_fits):
    c = _choose(3)
    assert c.lr == {"baseline": 0.002, "pfd": 0.002}
    # every (method, LR) ran on seeds 1, 2, 3 and never on seed 4
    assert sorted((job[0].name, job[3], job[4]) for job in fake_fits) == sorted(
        (m, lr, s) for m in ("baseline", "pfd") for lr in LRS for s in (1, 2, 3))
    assert c.sweeps["pfd"][0.002] == pytest.approx(np.mean([0.68, 0.71, 0.71]))
    assert c.sweeps["pfd"][0.004] == pytest.approx(np.mean([0.72, 0.65, 0.65]))
    assert c.per_seed["baseline"][0.002] == [0.68, 0.71, 0.71]


def test_more_selection_seeds_than_seeds_is_refused(fake_fits):
    with pytest.raises(ValueError, match=r"select_seeds: must be in \[1, 4\]"):
        _choose(5)
    with pytest.raises(ConfigError, match=r"select_seeds: must be in \[1, 2\]"):
        FinePlan.from_cli("cvr", (1, 2), overrides=("select_seeds=3",))


def test_the_plan_default_keeps_one_seed_for_tables_and_three_for_the_stream_sweep():
    assert FinePlan.from_cli("cvr", (1, 2, 3)).n_select_seeds() == 1
    assert FinePlan.from_cli("cvr", (1, 2, 3)).record()["select_seeds"] == 1
    assert FinePlan.from_cli("cvr", (1, 2, 3), overrides=("select_seeds=3",)).record()["select_seeds"] == 3
    stream = FinePlan.from_cli("sead", (1, 2, 3), overrides=("streaming=true", "stream_lrs=0.001"))
    assert stream.n_select_seeds() == 3 and stream.record()["stream"]["select_seeds"] == 3


def test_cvr_table_records_each_selection_seed(tiny_data, tmp_path):
    res = FX.run("cvr", tiny_data, tmp_path, seeds=(1, 2), quick=True, log=lambda s: None,
                 overrides=("select_seeds=2", "methods=pfd"))
    assert res["select_seeds"] == 2
    for name in ("baseline", "pfd"):
        e = res["methods"][name]
        assert set(e["validation_per_seed"]) == set(e["validation_sweep"])
        for lr, scores in e["validation_per_seed"].items():
            assert len(scores) == 2 and e["validation_sweep"][lr] == pytest.approx(np.mean(scores))
        assert e["validation_sweep"][e["lr"]] == max(e["validation_sweep"].values())
    assert json.loads((tmp_path / "results.json").read_text())["select_seeds"] == 2
    assert "best mean over the first 2 seeds" in (tmp_path / "report.md").read_text()
