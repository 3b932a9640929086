"""Coarse distillation experiments: the protocol's day windows and a quick run of each table."""
from __future__ import annotations

import json

import pytest

from recstack.config import ConfigError
from recstack.data import load

from coarse_rank.experiments import run
from coarse_rank.experiments.plan import windows


class _Days:
    def __init__(self, n):
        self.n_days = n


def test_windows_never_train_on_the_evaluation_day():
    w = windows(_Days(7), 3)
    assert w == {"fit": [3, 4, 5], "valid": 6, "train": [4, 5, 6], "test": 7, "double": [1, 2, 3, 4, 5, 6]}
    w = windows(_Days(4), 3)
    assert w["fit"] == [1, 2] and w["train"] == [1, 2, 3] and w["double"] is None
    for n in (3, 4, 5, 7, 9):
        w = windows(_Days(n), 3)
        assert w["valid"] not in w["fit"] and w["test"] not in w["train"] + w["fit"] + (w["double"] or [])


@pytest.mark.parametrize("name", ["coarse", "lambda", "manner"])
def test_quick_experiment_writes_the_report_files(name, tiny_data, tmp_path, monkeypatch):
    from coarse_rank.experiments.runner import Runner

    batches, many = [], Runner.many
    monkeypatch.setattr(Runner, "many", lambda self, specs: batches.append(specs) or many(self, specs))
    res = run(name, tiny_data, tmp_path, seeds=(1, 2), quick=True)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "report.md").read_text().startswith("# Coarse ranker")
    assert list(tmp_path.glob("*.png"))
    assert set(on_disk["methods"]) == set(res["methods"]) and "baseline" in on_disk["methods"]
    for m in on_disk["methods"].values():
        assert set(m["student_auc"]) >= {"mean", "std"} and set(m["teacher_auc"]) >= {"mean", "std"}
        assert set(m["delta_vs_baseline"]) >= {"mean", "ci95"} and len(m["delta_vs_baseline"]["ci95"]) == 2
        assert m["wall_s"] > 0 and len(m["per_seed"]) == 2
    if name == "coarse":
        assert set(on_disk["methods"]) == {"baseline", "sd", "lupi", "md", "pfd", "pfd_md", "oracle", "sd_lam0",
                                           "oracle_lam1", "baseline_wd"}
        assert on_disk["methods"]["oracle"]["teacher_auc"]["mean"] is None  # no teacher network: the truth
        assert on_disk["methods"]["baseline_wd"]["chosen"]["weight_decay"] == 1e-4
        assert set(on_disk["contrasts"]) == {"pfd - sd", "pfd_md - md", "pfd - baseline", "pfd_md - baseline"}
        assert not on_disk["contrasts"]["pfd - sd"]["enough_seeds"] and "PARTIAL" in (tmp_path / "report.md").read_text()
        d = on_disk["contrasts"]["pfd - sd"]
        pfd, sd = on_disk["methods"]["pfd"]["per_seed"], on_disk["methods"]["sd"]["per_seed"]
        assert d["per_seed"] == pytest.approx([a - b for a, b in zip(pfd, sd)])
        assert (tmp_path / "paired_seeds.png").stat().st_size > 0
        axis = on_disk["data_axis"]["days"]
        assert set(axis["1"]["methods"]) == {"baseline", "pfd", "pfd_md"}
        assert set(axis["1"]["contrasts"]) == {"pfd - baseline", "pfd_md - baseline"}
        one = axis["1"]["methods"]
        want = [a - b for a, b in zip(one["pfd"]["per_seed"], one["baseline"]["per_seed"])]
        assert axis["1"]["contrasts"]["pfd - baseline"]["per_seed"] == pytest.approx(want)
        main = [p for p in axis.values() if p.get("main_window")]  # the main table's window is a point too
        assert len(main) == 1 and main[0]["methods"]["pfd"]["per_seed"] == pfd
        assert (tmp_path / "data_axis.png").stat().st_size > 0 and "pfd - baseline [95% CI]" in (tmp_path / "report.md").read_text()
        assert on_disk["methods"]["pfd_md"]["teacher_auc"]["mean"] is not None
        assert on_disk["buckets"]["user_id"]["pfd"]["tail"]["delta"]["ci95"]
        assert on_disk["methods"]["baseline"]["delta_vs_baseline"]["mean"] == 0.0
    if name == "manner":
        assert {"pfd_md_ind_async", "pfd_md_share_star_sync"} <= set(on_disk["methods"])
    if name == "lambda":
        # PFD Table 5's four rows, each at the plan's λs and at 0.5 (the λ its LR is chosen at)
        teachers, lams = ("lupi", "md", "pfd", "pfd_md"), (0.3, 0.5, 0.7)
        m = on_disk["methods"]
        assert set(m) == {"baseline"} | {f"{t}_lam{lam:g}" for t in teachers for lam in lams}
        assert on_disk["lams"] == list(lams) and on_disk["teachers"] == list(teachers)
        assert all(m[f"{t}_lam{lam:g}"]["lr"] == on_disk["lrs"][t] for t in teachers for lam in lams)
        d = on_disk["vs_select_lam"]["pfd"]["0.3"]
        want = [a - b for a, b in zip(m["pfd_lam0.3"]["per_seed"], m["pfd_lam0.5"]["per_seed"])]
        assert d["n"] == 2 and d["mean"] == pytest.approx(sum(want) / 2)
        assert set(on_disk["vs_select_lam"]["lupi"]) == {"0.3", "0.7"}
        text = (tmp_path / "report.md").read_text()
        assert "Table 5's layout" in text and "(paper +0.0015)" in text  # LUPI at 0.3: 0.6640 - 0.6625
        # the test fits run seed by seed across the table: every cell's seed 1 before any seed 2
        test_seeds = [kw["seed"] for phase, _, kw in batches[-1] if phase == "test"]
        assert test_seeds == sorted(test_seeds) and len(test_seeds) == 2 * len(m)


def test_one_data_size_reports_no_curve_and_no_data_axis(tiny_data, tmp_path):
    run("coarse", tiny_data, tmp_path, seeds=(1, 2), quick=True,
        overrides=["methods=baseline,sd", "fractions=", "double=false", "data_days="])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert on_disk["sample_efficiency"]["fractions"] == [1.0]
    assert all(m["data_multiplier"] is None for m in on_disk["methods"].values())
    assert "infx" not in report and "## Sample efficiency" not in report and "## Data axis" not in report
    assert "then constant (the paper's schedule)" in report  # the LR schedule every fit shared
    assert not (tmp_path / "sample_efficiency.png").exists() and (tmp_path / "delta_vs_baseline.png").exists()


def test_report_names_a_linear_lr_schedule(tiny_data, tmp_path):
    run("coarse", tiny_data, tmp_path, seeds=(1, 2), quick=True,
        overrides=["methods=baseline", "fractions=", "double=false", "data_days=", "lr_schedule=linear"])
    assert json.loads((tmp_path / "results.json").read_text())["config"]["lr_schedule"] == "linear"
    assert "then falling linearly to 0 at the last step" in (tmp_path / "report.md").read_text()


def test_select_only_sweeps_the_lr_and_hands_its_choices_to_the_test_run(tiny_data, tmp_path):
    sweep, test = tmp_path / "sweep", tmp_path / "test"
    res = run("coarse", tiny_data, sweep, seeds=(1, 2), quick=True,
              overrides=["methods=baseline,sd", "lrs=0.05,0.1", "select_seeds=2", "select_only=true"])
    on_disk = json.loads((sweep / "results.json").read_text())
    report = (sweep / "report.md").read_text()
    assert on_disk["select_only"] and on_disk["plan"]["select_only"]
    assert all(line.startswith("  valid") for line in res["log"])  # no test-day fit
    for m in on_disk["methods"].values():
        curve = m["validation_curve"]
        assert set(curve) == {"lr=0.05", "lr=0.1"} and all(len(v["per_seed"]) == 2 for v in curve.values())
        assert m["chosen"]["lr"] == max((0.05, 0.1), key=lambda lr: curve[f"lr={lr:g}"]["mean"])
    handoff = on_disk["selected_lrs"]
    assert handoff == ",".join(f"{m}:{on_disk['methods'][m]['lr']:g}" for m in ("baseline", "sd"))
    assert "LR selection only" in report and "not touched" in report and f"--set selected_lrs={handoff}" in report
    assert "Ground-truth ceiling" not in report  # nothing was scored on the test day
    done = run("coarse", tiny_data, test, seeds=(1, 2), quick=True,
               overrides=["methods=baseline,sd", "lrs=0.05,0.1", "select_seeds=2", f"selected_lrs={handoff}",
                          "fractions=", "double=false", "data_days="])
    assert all(line.startswith("  test") for line in done["log"])  # the sweep is not re-run
    for m in ("baseline", "sd"):
        assert done["methods"][m]["lr"] == on_disk["methods"][m]["lr"]
    with pytest.raises(ConfigError, match="select_only"):
        run("lambda", tiny_data, tmp_path / "l", quick=True, overrides=["select_only=true"])


def test_unknown_experiment_and_keys_are_errors(tiny_data, tmp_path):
    with pytest.raises(ConfigError):
        run("table9", tiny_data, tmp_path, quick=True)
    with pytest.raises(ConfigError):
        run("coarse", tiny_data, tmp_path, quick=True, overrides=["methods=oracle"])
    with pytest.raises(ConfigError, match="valid keys"):
        run("coarse", tiny_data, tmp_path, quick=True, overrides=["learning_rate=1"])


def test_fit_cache_round_trips_without_pickle(tmp_path):
    import numpy as np

    from coarse_rank.experiments.runner import load_fitted, save_fitted
    from coarse_rank.train import Fitted

    f = Fitted(None, None, {"auc": 0.61, "fit_days": [1, 2]}, {"prob": np.arange(4, dtype=np.float32)}, None,
               {"user_id": np.array([3, 1]), "item_id": np.array([7, 9])})
    save_fitted(tmp_path / "x.npz", f)
    g = load_fitted(tmp_path / "x.npz")
    assert g.result == f.result and g.teacher_pred is None
    np.testing.assert_array_equal(g.student_pred["prob"], f.student_pred["prob"])
    np.testing.assert_array_equal(g.train_ids["item_id"], f.train_ids["item_id"])


def test_bench_train_cost_rows_and_refusals(tiny_data, tmp_path):
    # `recstack bench train`: every row timed the same number of steps, ratios to the baseline
    import json

    from recstack.bench import train_cost as CB
    from recstack.cli import main

    assert main(["bench", "train", "--data", tiny_data, "--out", str(tmp_path), "--steps", "10", "--repeats", "2",
                 "--rows", "baseline,pfd,pfd_md"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["rows"]) == {"baseline", "pfd", "pfd_md"} and res["steps"] == 10
    b = res["rows"]["baseline"]
    assert b["cpu_ratio_vs_baseline"]["median"] == pytest.approx(1.0)
    for r in res["rows"].values():
        assert len(r["cpu_s_per_step"]) == 2 and all(x > 0 for x in r["cpu_s_per_step"])
    assert (tmp_path / "train_cost.png").exists() and "pfd_md" in (tmp_path / "report.md").read_text()
    data = load(tiny_data)
    with pytest.raises(ConfigError, match="baseline"):
        CB.measure(data, ("pfd",), steps=10)
    with pytest.raises(ConfigError, match="unknown"):
        CB.measure(data, ("baseline", "pdf"), steps=10)
    with pytest.raises(ConfigError, match="manner"):
        CB.measure(data, ("baseline",), manner="async", steps=10)
    assert main(["bench", "train", "--out", str(tmp_path)]) == 2  # --data missing: a clear error, not a traceback


def test_every_plan_key_parses_and_bad_values_name_the_key():
    from coarse_rank.experiments.plan import CoarsePlan
    from coarse_rank.train import Config

    items = ["lrs=0.025,0.1", "base_days=2", "methods=baseline,pfd", "lams=0.1,0.5", "manners=ind_sync,share_sync",
             "fractions=0.25", "double=false", "control_methods=baseline,pfd", "workers=3", "cache=/c",
             "control_data=/w", "selected_lrs=baseline:0.05,pfd:0.1", "lr=0.2", "select_seeds=3",
             "weight_decays=0,1e-4", "data_days=2,4", "data_methods=baseline,oracle", "select_only=true",
             "lambda_methods=pfd,oracle"]
    p = CoarsePlan.from_cli("coarse", (1, 2, 3), workers=1, overrides=items, config=Config)
    assert p.record() == {"lrs": (0.025, 0.1), "base_days": 2, "methods": ("baseline", "pfd"), "lams": (0.1, 0.5),
                          "manners": ("ind_sync", "share_sync"), "fractions": (0.25,), "control_data": "/w",
                          "double": False, "control_methods": ("baseline", "pfd"), "workers": 3, "cache": "/c",
                          "selected_lrs": {"baseline": 0.05, "pfd": 0.1}, "select_only": True, "select_seeds": 3,
                          "weight_decays": (0.0, 1e-4), "data_days": (2, 4), "data_methods": ("baseline", "oracle"),
                          "lambda_methods": ("pfd", "oracle")}
    assert p.overrides == ("lr=0.2",)
    quick = CoarsePlan.from_cli("lambda", (1,), quick=True, config=Config)
    assert (quick.lrs, quick.lams, quick.fractions, quick.methods) == ((0.05,), (0.3, 0.7), (0.5,), CoarsePlan().methods)
    for item, match in [("manners=sideways", "manners: unknown"), ("methods=pfd", "needs the baseline"),
                        ("control_methods=wizard", "control_methods"), ("base_days=0", "base_days"),
                        ("select_seeds=2", "select_seeds"), ("select_seeds=4", "select_seeds"),
                        ("weight_decays=-1", "weight_decays"), ("data_days=0", "data_days"),
                        ("selected_lrs=pfd", "selected_lrs"), ("double=maybe", "double"), ("lrs=-1", "lrs"),
                        ("lambda_methods=baseline", "lambda_methods")]:
        with pytest.raises(ConfigError, match=match):
            CoarsePlan.from_cli("coarse", (1, 2, 3), overrides=[item], config=Config)


def test_control_world_reports_its_paired_contrasts(tiny_data, tmp_path):
    # the control's PFD - SD is paired over the same seeds, as on the main world
    run("coarse", tiny_data, tmp_path, seeds=(1, 2), quick=True,
        overrides=["methods=baseline,sd,pfd", f"control_data={tiny_data}", "control_methods=sd,pfd",
                   "fractions=", "data_days="])
    c = json.loads((tmp_path / "results.json").read_text())["control"]
    assert set(c["methods"]) == {"sd", "pfd"} and c["methods"]["pfd"]["delta_vs_baseline"] is None
    want = [a - b for a, b in zip(c["methods"]["pfd"]["per_seed"], c["methods"]["sd"]["per_seed"])]
    assert set(c["contrasts"]) == {"pfd - sd"} and c["contrasts"]["pfd - sd"]["n"] == 2
    assert c["contrasts"]["pfd - sd"]["mean"] == pytest.approx(sum(want) / 2)
    assert "Control: paired contrasts" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "paired_seeds.png").stat().st_size > 0  # the main world's contrast and the control's
