"""The fine-ranker experiments (fine_rank.experiments) at quick size on tiny: every method of
each table runs, the results follow the documented schema, the protocol's statistics are
what they claim, and the report files are written. The numbers mean nothing at this size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fine_rank import experiments as FX
from fine_rank.experiments import cvr, signal_loss
from fine_rank.experiments.plan import CVR_METHODS, QUICK_LRS, SIGNAL_METHODS, sead_methods
from fine_rank.experiments.runs import truth_auc
from recstack.config import ConfigError
from recstack.evaluation import protocol as X

SCHEMA_KEYS = {"student_auc", "teacher_auc", "delta_vs_baseline", "calibration", "wall_s"}


def _check_common(res: dict, out, names: set[str], methods_key: str = "methods") -> None:
    assert set(res[methods_key]) == names
    for name, e in res[methods_key].items():
        assert SCHEMA_KEYS <= set(e), name
        assert {"mean", "std"} <= set(e["student_auc"]) and 0.0 < e["student_auc"]["mean"] < 1.0
        assert {"mean", "ci95"} <= set(e["delta_vs_baseline"])
        assert e["calibration"] > 0 and e["wall_s"] >= 0
        # the paired difference is recomputable from the per-seed AUCs
        d = X.paired_diff(e["student_auc_per_seed"], res[methods_key]["baseline"]["student_auc_per_seed"])
        assert d["mean"] == pytest.approx(e["delta_vs_baseline"]["mean"])
        assert set(e["buckets"]) == {"head", "torso", "tail"}
    base = res[methods_key]["baseline"]["delta_vs_baseline"]
    assert base["mean"] == 0.0
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk[methods_key]) == names
    assert (out / "report.md").read_text().startswith("# Fine ranker")
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in out.iterdir())


def test_cvr_experiment(tiny_data, tmp_path):
    res = FX.run("cvr", tiny_data, tmp_path, seeds=(1, 2), quick=True, log=lambda s: None)
    _check_common(res, tmp_path, {m.name for m in CVR_METHODS})
    e = res["methods"]
    for name in ("sd", "lupi", "md", "pfd", "pfd_md"):
        assert e[name]["teacher_auc"] is not None
    assert e["baseline"]["teacher_auc"] is None and e["mtl"]["teacher_auc"] is None
    # post-event features nearly reveal the purchase: the PFD teacher beats its student
    assert e["pfd"]["teacher_auc"]["mean"] > e["pfd"]["student_auc"]["mean"]
    assert set(res["lambda"]) == {"lupi", "pfd"} and set(res["lambda"]["pfd"]) == {"0.1", "0.5"}
    # pfd_lam chose λ on the validation day, from its grid, jointly with the LR
    lam = e["pfd_lam"]
    assert len(lam["chosen_settings"]) == 1 and lam["chosen_settings"][0].startswith("distill_lambda=")
    assert set(lam["validation_grid"]) == {f"distill_lambda={x}" for x in (0.1, 0.3, 0.5, 0.7, 0.9)}
    best = max(lam["validation_grid"].values(), key=lambda sweep: max(sweep.values()))
    assert lam["validation_auc"] == pytest.approx(max(best.values()))
    # every method had the same LR sweep; lr chosen from it
    for name, m in e.items():
        assert set(map(float, m["validation_sweep"])) == set(QUICK_LRS) and m["lr"] in QUICK_LRS
    assert (tmp_path / "cvr_reliability.png").exists() and (tmp_path / "cvr_lambda.png").exists()


def test_sead_experiment(tiny_data, tmp_path):
    res = FX.run("sead", tiny_data, tmp_path, seeds=(1, 2), quick=True, log=lambda s: None)
    names = {"baseline", "sead_max", "sead_min", "sead_curriculum", "ogl", "dtl", "positives_only", "sga", "lr2x"}
    _check_common(res, tmp_path, names)
    _check_common(res, tmp_path, names, methods_key="methods_cvr")
    for key in ("methods", "methods_cvr"):
        e = res[key]
        assert e["lr2x"]["lr"] == pytest.approx(2 * e["baseline"]["lr"]) and e["lr2x"]["validation_sweep"] is None
        assert "aux_auc" in e["sead_max"] and "aux_auc" not in e["baseline"]
        # SGA's aux loss never reaches the shared parts: its serving head is the baseline's
        assert e["sga"]["lr"] != e["baseline"]["lr"] or e["sga"]["student_auc_per_seed"] == pytest.approx(
            e["baseline"]["student_auc_per_seed"], abs=1e-6)
    for f in ("sead_ctr_reliability.png", "sead_cvr_reliability.png", "sead_ctr_delta_auc.png"):
        assert (tmp_path / f).exists()


def test_signal_loss_experiment(consent_world, tmp_path):
    res = FX.run("signal-loss", consent_world, tmp_path, seeds=(1, 2), quick=True, log=lambda s: None)
    _check_common(res, tmp_path, {m.name for m in SIGNAL_METHODS})
    e = res["methods"]
    for name, m in e.items():
        assert {"auc_observed", "auc_full", "auc_aggregated", "calibration_aggregated"} <= set(m)
    # the biased labels undercount conversions by about the consent rate; the aggregates fix the mean
    assert e["baseline"]["calibration_aggregated"] < 0.75
    for name in ("baseline_aggcal", "sead_signal"):
        assert 0.8 < e[name]["calibration_aggregated"] < 1.2
    assert e["sead_signal"]["teacher_auc"] is not None
    assert "consent rate 0.5" in (tmp_path / "report.md").read_text()


def test_truth_auc_is_the_label_auc_in_expectation():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.6, 4000)
    score = p + rng.normal(0, 0.1, p.size)
    y = (rng.random((50, p.size)) < p).astype(float)
    from recstack.evaluation.metrics import auc
    mean_label_auc = np.mean([auc(row, score) for row in y])
    assert truth_auc(p, score) == pytest.approx(mean_label_auc, abs=0.005)
    assert truth_auc(p, p) > truth_auc(p, score)


def test_unknown_experiment_and_single_seed_are_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        FX.run("coarse", tiny_data, tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        FX.run("cvr", tiny_data, tmp_path, seeds=(1,), quick=True)


def test_workers_give_the_serial_numbers(consent_world, tmp_path):
    # the fits are independent and seed themselves: a process pool must not change a number
    lrs = ("lrs=0.001,0.003",)  # the sweep is settable; every method gets it
    serial = FX.run("signal-loss", consent_world, tmp_path / "serial", seeds=(1, 2), quick=True, log=lambda s: None,
                    overrides=lrs)
    pooled = FX.run("signal-loss", consent_world, tmp_path / "pooled", seeds=(1, 2), quick=True, log=lambda s: None,
                    workers=2, overrides=lrs)
    assert serial["lrs"] == [0.001, 0.003]
    for name, e in serial["methods"].items():
        if not e.get("validation_sweep"):
            continue
        assert set(map(float, e["validation_sweep"])) == {0.001, 0.003}, name
    for name, e in serial["methods"].items():
        p = pooled["methods"][name]
        assert p["lr"] == e["lr"] and p["validation_sweep"] == e["validation_sweep"], name
        assert p["student_auc_per_seed"] == e["student_auc_per_seed"], name
        assert p["calibration_aggregated"] == e["calibration_aggregated"], name


@pytest.mark.parametrize("value", ["abc", "", "0,-1"])
def test_bad_lr_sweep_is_refused(tiny_data, tmp_path, value):
    with pytest.raises(ValueError, match="lrs"):
        FX.run("cvr", tiny_data, tmp_path, seeds=(1, 2), quick=True, overrides=(f"lrs={value}",), log=lambda s: None)


def test_sead_method_subset_and_fractions(tiny_data, tmp_path):
    # a CPU cut for big worlds: CTR runs only the target rows, CVR all of them; the report
    # names what was cut and the data curve uses the given fractions (1.0 always added)
    res = FX.run("sead", tiny_data, tmp_path, seeds=(1, 2), quick=True, log=lambda s: None,
                 overrides=("ctr_methods=sead_max,sead_min,sga", "fractions=0.5"))
    assert set(res["methods"]) == {"baseline", "sead_max", "sead_min", "sga"}
    assert set(res["methods_cvr"]) == {m.name for m in sead_methods("cvr")}
    assert res["fractions"] == [0.5, 1.0] and res["tasks"]["ctr"]["multiplier_curve"]["fractions"] == [0.5, 1.0]
    report = (tmp_path / "report.md").read_text()
    assert "not run in this table" in report and "lr2x" in report and "SEAD (max) > SEAD (min)" in report


@pytest.mark.parametrize("item,match", [("ctr_methods=sead_mox", "ctr_methods: unknown"),
                                        ("methods=", "methods: unknown"),
                                        ("fractions=0,0.5", "fractions"), ("fractions=x", "fractions")])
def test_bad_method_subset_or_fractions_is_refused(tiny_data, tmp_path, item, match):
    with pytest.raises(ValueError, match=match):
        FX.run("sead", tiny_data, tmp_path, seeds=(1, 2), quick=True, overrides=(item,), log=lambda s: None)
    if item.startswith("ctr_methods"):  # a key the experiment does not have names the ones it has
        with pytest.raises(ConfigError, match="unknown setting 'ctr_methods' for the cvr experiment; valid keys: [^(]*cvr_methods"):
            FX.run("cvr", tiny_data, tmp_path, seeds=(1, 2), quick=True, overrides=(item,), log=lambda s: None)
        with pytest.raises(ConfigError, match="unknown setting 'methods' for the signal-loss experiment; valid keys: [^(]*fractions"):
            FX.run("signal-loss", tiny_data, tmp_path, seeds=(1, 2), quick=True, overrides=("methods=oracle",),
                   log=lambda s: None)


def test_cvr_method_subset(tiny_data, tmp_path):
    res = FX.run("cvr", tiny_data, tmp_path, seeds=(1, 2), quick=True, log=lambda s: None,
                 overrides=("methods=pfd,pfd_lam", "fractions=0.5"))
    assert set(res["methods"]) == {"baseline", "pfd", "pfd_lam"} and set(res["lambda"]) == {"pfd"}
    report = (tmp_path / "report.md").read_text()
    assert "not run in this table" in report and "mtl" in report and "λ chosen on the validation day" in report
    with pytest.raises(ValueError, match="methods: unknown"):
        FX.run("cvr", tiny_data, tmp_path, seeds=(1, 2), quick=True, overrides=("methods=pfd,sead_max",),
               log=lambda s: None)


def test_cvr_table_fits_are_cached_and_a_rerun_fits_nothing(tiny_data, tmp_path, monkeypatch):
    from fine_rank.experiments import runs

    sets = ("methods=pfd", "fractions=0.5", f"cache={tmp_path / 'cache'}")
    first = FX.run("cvr", tiny_data, tmp_path / "a", seeds=(1, 2), quick=True, log=lambda s: None, overrides=sets)
    kept = sorted((tmp_path / "cache").glob("*.npz"))
    # validation sweep (2 rows x 2 LRs x 1 seed), test (2 rows x 2 seeds), data curve (2), λ table (pfd at λ 0.1)
    assert len(kept) == 4 + 4 + 2 + 2

    def refit(*a, **k):
        raise AssertionError("a cached fit was run again")

    monkeypatch.setattr(runs, "train_eval", refit)
    again = FX.run("cvr", tiny_data, tmp_path / "b", seeds=(1, 2), quick=True, log=lambda s: None, overrides=sets)
    for name, e in first["methods"].items():
        assert again["methods"][name]["student_auc_per_seed"] == e["student_auc_per_seed"], name
        assert again["methods"][name]["validation_sweep"] == e["validation_sweep"], name
    assert again["lambda"] == first["lambda"]
    kept[1].write_bytes(kept[0].read_bytes())  # a file that holds another fit is refused, not read
    with pytest.raises(ValueError, match="holds fit"):
        FX.run("cvr", tiny_data, tmp_path / "c", seeds=(1, 2), quick=True, log=lambda s: None, overrides=sets)
    with pytest.raises(ConfigError, match="cache"):
        FX.run("sead", tiny_data, tmp_path / "d", seeds=(1, 2), quick=True, log=lambda s: None,
               overrides=("streaming=true", f"cache={tmp_path / 'cache'}"))


def test_signal_loss_notes_follow_how_the_world_draws_consent():
    flat = signal_loss.notes({"config": {"consent_rate": 0.5}})
    sloped = signal_loss.notes({"config": {"consent_rate": 0.5, "consent_age_slope": 1.5}})
    assert "independently of everything else" in flat[0]
    assert "consent_age_slope` = 1.5" in sloped[0] and "independently" not in sloped[0]
    assert flat[1:] == sloped[1:] and flat == signal_loss.NOTES and "consent" not in " ".join(cvr.NOTES)


def test_a_window_gives_every_fit_as_many_days(tiny4_world):
    from fine_rank.experiments import runs
    from fine_rank.experiments.plan import CVR_METHODS
    from fine_rank import train as T
    from recstack.data import load

    every, win = runs.load_tables(tiny4_world), runs.load_tables(tiny4_world, window_days=1)
    assert (every.valid.days, every.test.days) == ((1, 2), (1, 2, 3))
    assert (win.valid.days, win.test.days) == ((2,), (3,))  # the day before each scored day
    d = load(tiny4_world)
    assert len(win.test.fit["ctr"]["click"]) == len(d.impressions(3)["click"])
    assert len(win.valid.fit["ctr"]["click"]) == len(d.impressions(2)["click"])
    base = CVR_METHODS[0]
    key = lambda t, phase: runs.fit_key(t, base, T.Config(), phase, 0.002, 1, 1.0, ())  # noqa: E731
    assert key(win, "test") != key(every, "test") and key(win, "valid") != key(every, "valid")
    two = runs.load_tables(tiny4_world, window_days=2)  # the sweep's fits keep every day, the test fit drops one
    assert (two.valid.days, two.test.days) == ((1, 2), (2, 3))
    assert key(two, "valid") == key(every, "valid") and key(two, "test") not in (key(every, "test"), key(win, "test"))
    with pytest.raises(ValueError, match="window_days: must be in"):
        runs.load_tables(tiny4_world, window_days=3)
