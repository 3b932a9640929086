import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recstack import data as D
from recstack.evaluation import metrics as M
from recstack.config import ConfigError, apply_overrides
from recstack.world import preset, simulate
from recstack.world.schema import SCHEMA


def _same_logs(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    return all(pq.read_table(a / f).equals(pq.read_table(b / f)) for f in files)


def test_files_match_documented_schema(tiny_data):
    root = Path(tiny_data)
    for name, cols in SCHEMA.items():
        paths = sorted(root.glob(name.replace("NN", "*"))) if "NN" in name else [root / name]
        assert paths and all(p.exists() for p in paths), name
        for p in paths:
            assert set(pq.read_schema(p).names) == set(cols), (p, pq.read_schema(p).names)
    meta = json.loads((root / "world.json").read_text())
    assert meta["n_days"] == 3 and len(list((root / "impressions").glob("*.parquet"))) == 3


def test_deterministic_for_a_seed(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["n_users=120", "n_items=500", "history_days=1"])
    simulate(cfg, 7, tmp_path / "a", progress=False)
    simulate(cfg, 7, tmp_path / "b", progress=False)
    simulate(cfg, 8, tmp_path / "c", progress=False)
    assert _same_logs(tmp_path / "a", tmp_path / "b")
    assert not _same_logs(tmp_path / "a", tmp_path / "c")


def test_unknown_override_names_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*n_users"):
        apply_overrides(preset("tiny"), ["n_user=3"])
    with pytest.raises(ConfigError, match="n_users: expected int"):
        apply_overrides(preset("tiny"), ["n_users=many"])
    with pytest.raises(ValueError, match="consent_rate"):
        apply_overrides(preset("tiny"), ["consent_rate=1.5"])


def test_unknown_preset():
    with pytest.raises(ValueError, match="tiny, small, medium, large"):
        preset("huge")


def test_labels_truth_and_split(tiny_data):
    d = D.load(tiny_data)
    assert d.train_days == [1, 2] and d.valid_day == 2 and d.test_day == 3
    im = d.impressions(d.test_day)
    assert ((im["true_pctr"] > 0) & (im["true_pctr"] < 1)).all()
    assert ((im["true_pcvr"] > 0) & (im["true_pcvr"] < 1)).all()
    # purchases only after clicks; post-event features only on clicks
    assert not (im["purchase"] & ~im["click"]).any()
    assert (im["dwell"][~im["click"]] == 0).all() and (im["dwell"][im["click"]] > 0).all()
    # the truth explains the labels: its AUC is well above chance, and calibrated on average
    assert M.auc(im["click"], im["true_pctr"]) > 0.7
    assert abs(im["true_pctr"].mean() / im["click"].mean() - 1) < 0.15
    # the test day is the last day and comes after every training impression
    train = d.impressions(d.train_days)
    assert train["ts"].max() < im["ts"].min()


def test_consent_hides_conversions_but_aggregates_count_them(tmp_path):
    cfg = apply_overrides(preset("tiny"), ["consent_rate=0.5", "history_days=1"])
    simulate(cfg, 3, tmp_path, progress=False)
    d = D.load(tmp_path)
    im = d.impressions([1, 2, 3])
    consent = d.consent[im["user_id"]]
    assert not im["purchase_observed"][~consent].any()
    assert (im["purchase_observed"][consent] == im["purchase"][consent]).all()
    agg = pq.read_table(tmp_path / "aggregates.parquet").to_pydict()
    assert sum(agg["conversions"]) == im["purchase"].sum()
    assert sum(agg["conversions_observed"]) == im["purchase_observed"].sum() < im["purchase"].sum()


def test_consent_age_slope_moves_only_who_consents(tmp_path):
    # ATT-like signal loss: consent follows an observed attribute (the age bucket); the true
    # world (clicks, purchases) is the same world, only the per-example labels change
    base = apply_overrides(preset("tiny"), ["consent_rate=0.5", "history_days=1"])
    sloped = apply_overrides(base, ["consent_age_slope=1.5"])
    simulate(base, 3, tmp_path / "flat", progress=False)
    simulate(sloped, 3, tmp_path / "sloped", progress=False)
    a, b = D.load(tmp_path / "flat"), D.load(tmp_path / "sloped")
    ia, ib = a.impressions([1, 2, 3]), b.impressions([1, 2, 3])
    for k in ("item_id", "click", "purchase", "true_pcvr"):
        assert (ia[k] == ib[k]).all(), k
    age = b.users.feats(np.arange(len(b.consent)))[:, 1]
    young, old = b.consent[age == age.min()].mean(), b.consent[age == age.max()].mean()
    assert old > young + 0.5, (young, old)
    assert abs(b.consent.mean() - 0.5) < 0.1 and abs(a.consent[age == age.min()].mean() - 0.5) < 0.15
    assert not ib["purchase_observed"][~b.consent[ib["user_id"]]].any()
    with pytest.raises(ValueError, match="consent_age_slope"):
        apply_overrides(preset("tiny"), ["consent_age_slope=1.0"])  # consent_rate 1: nothing to vary


def test_privileged_strength_zero_removes_the_signal(tmp_path):
    """With privileged_strength=0 the interacted features say nothing beyond long-term taste:
    the truth no longer depends on the daily intent or favourite shops."""
    on = apply_overrides(preset("tiny"), ["history_days=2"])
    off = apply_overrides(on, ["privileged_strength=0"])
    simulate(on, 1, tmp_path / "on", progress=False)
    simulate(off, 1, tmp_path / "off", progress=False)
    aucs = {}
    for k in ("on", "off"):
        d = D.load(tmp_path / k)
        ex = d.examples(d.test_day)
        b = ex.batch(np.arange(len(ex)))
        aucs[k] = M.auc(b["click"], b["interacted"][:, 0] + b["interacted"][:, 3])
    assert aucs["on"] > aucs["off"] + 0.02, aucs
