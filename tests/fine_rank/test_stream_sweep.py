"""The streaming protocol's validation-window sweep: each row's LR (and aux-loss weight) is
chosen on the validation window's scored days alone, the test window is reported with it."""
from __future__ import annotations

import pytest

from recstack.config import ConfigError

from fine_rank.experiments import run as run_experiment
from fine_rank.experiments import stream_sweep as W
from fine_rank.experiments.plan import FinePlan, sead_methods
from fine_rank import train as ftrain


def _run(method: str, seed: int, auc_by_day: dict[int, float]) -> dict:
    return {"method": method, "seed": seed, "curve": [{"eval_day": d, "auc": a} for d, a in sorted(auc_by_day.items())]}


def test_windows_are_the_last_days_and_the_days_just_before_them():
    valid, test = W.windows(range(2, 13), valid_days=3, last_days=4)
    assert valid == (6, 7, 8) and test == (9, 10, 11, 12)
    with pytest.raises(ConfigError, match="valid_days \\+ last_days = 12 exceeds the 11 scored days"):
        W.windows(range(2, 13), valid_days=8, last_days=4)


def test_the_grid_sweeps_the_aux_weight_only_where_there_is_an_aux_tower():
    rows = {m.name: m for m in sead_methods("cvr")}
    assert W.grid(rows["baseline"], (1e-3, 2e-3), (0.1, 1.0)) == (W.Setting(1e-3), W.Setting(2e-3))
    g = W.grid(rows["sead_max"], (1e-3, 2e-3), (0.1, 1.0))
    assert [s.key() for s in g] == ["lr0.001_aux0.1", "lr0.001_aux1", "lr0.002_aux0.1", "lr0.002_aux1"]
    assert g[1].overrides("cvr") == ["cvr_lr=0.001", "sead_weight=1.0"]
    with pytest.raises(ValueError, match="lr2x is not swept"):
        W.grid(rows["lr2x"], (1e-3,), (1.0,))


def test_the_choice_reads_the_validation_window_only():
    """A setting that wins on the test days but not on the validation days is not chosen, and
    no change of the test days' scores moves the choice or its scores."""
    a, b = W.Setting(1e-3, 0.1), W.Setting(2e-3, 0.1)
    valid, test = W.windows(range(2, 9), valid_days=3, last_days=3)

    def runs(test_auc_a: float, test_auc_b: float) -> dict:
        out = {}
        for s, v_auc, t_auc in ((a, 0.70, test_auc_a), (b, 0.69, test_auc_b)):
            out[s] = [_run("sead_max", seed, {2: 0.5, **{d: v_auc + 0.001 * seed for d in valid},
                                              **{d: t_auc for d in test}}) for seed in (1, 2, 3)]
        return out

    chosen, scores = W.choose((a, b), runs(0.60, 0.90), valid)
    assert chosen == a and scores[a.key()] == pytest.approx(0.702) and scores[b.key()] == pytest.approx(0.692)
    for t_a, t_b in ((0.99, 0.10), (0.10, 0.99), (0.5, 0.5)):
        assert W.choose((a, b), runs(t_a, t_b), valid) == (chosen, scores)
    # a tie goes to the earlier setting of the grid
    tie = {a: [_run("x", 1, {d: 0.7 for d in valid})], b: [_run("x", 1, {d: 0.7 for d in valid})]}
    assert W.choose((b, a), tie, valid)[0] == b and W.choose((a, b), tie, valid)[0] == a


def test_the_plan_refuses_a_sweep_it_cannot_run():
    with pytest.raises(ConfigError, match="stream_lrs: the validation-window sweep needs streaming=true"):
        FinePlan.from_cli("sead", (1, 2), overrides=("stream_lrs=0.001",), config=ftrain.Config)
    with pytest.raises(ConfigError, match="select_seeds: must be in \\[1, 2\\]"):
        FinePlan.from_cli("sead", (1, 2), overrides=("streaming=true", "stream_lrs=0.001", "select_seeds=3"),
                          config=ftrain.Config)
    with pytest.raises(ConfigError, match="tasks: needs streaming=true and a subset of \\['ctr', 'cvr'\\]"):
        FinePlan.from_cli("sead", (1, 2), overrides=("streaming=true", "tasks=ranker"), config=ftrain.Config)
    with pytest.raises(ConfigError, match="stream_swept: must include sead_max"):
        FinePlan.from_cli("sead", (1, 2), overrides=("streaming=true", "stream_swept=sead_min"), config=ftrain.Config)


def test_a_streaming_sweep_runs_the_chosen_setting_on_every_seed(tiny4_world, tmp_path):
    over = ("streaming=true", "last_days=1", "valid_days=2", "select_seeds=1", "stream_lrs=0.001,0.004",
            "stream_aux_weights=0.1,1.0", "tasks=cvr", "cvr_methods=sead_max,dtl,lr2x", "stream_swept=sead_max")
    res = run_experiment("sead", tiny4_world, tmp_path / "sw", seeds=(1, 2), quick=True, overrides=over, log=lambda s: None)
    sweep = res["sweep"]
    assert sweep["validation_days"] == [2, 3] and sweep["test_days"] == [4] and sweep["select_seeds"] == [1]
    rows = sweep["rows"]
    assert len(rows["cvr/sead_max"]["validation_scores"]) == 4 and len(rows["cvr/baseline"]["validation_scores"]) == 2
    cvr = res["tasks"]["cvr"]["methods"]
    best = max(rows["cvr/sead_max"]["validation_scores"].items(), key=lambda kv: kv[1])[0]
    assert W.Setting(**cvr["sead_max"]["chosen"]).key() == best
    assert set(res["tasks"]) == {"cvr"} and "cvr/dtl" in rows and rows["cvr/dtl"]["inherited"]
    assert cvr["lr2x"]["chosen"]["lr"] == pytest.approx(2 * cvr["baseline"]["chosen"]["lr"])
    assert cvr["dtl"]["chosen"] == cvr["sead_max"]["chosen"]  # an unswept ablation runs at SEAD's setting
    assert cvr["sead_max"]["delta_vs_baseline"]["n"] == 2 and len(cvr["sead_max"]["auc_per_seed"]) == 2
    # the sweep's runs of the selection seed are the cache the reported runs come from
    cached = {p.name for p in (tmp_path / "sw" / "cache").iterdir()}
    assert f"sead_cvr_sead_max_{best}_s1.json" in cached and f"sead_cvr_sead_max_{best}_s2.json" in cached
    report = (tmp_path / "sw" / "report.md").read_text()
    assert "chosen LR / aux weight" in report and "The sweep: validation days [2, 3], seeds [1]" in report
    assert "not swept: sead_max's setting" in report
