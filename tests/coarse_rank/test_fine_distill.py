"""The fine ranker's order over retrieved candidates distilled into the coarse student: the targets
file holds what the serving code retrieves and ranks, training reads it whole or refuses it, and
the distilled student's cut agrees more with the fine ranker's top on the requests it learned."""
from __future__ import annotations

import json

import numpy as np
import pytest

from recstack.browse import browsed_categories
from recstack.config import ConfigError
from recstack.data import load
from recstack.evaluation.cascade import requests
from recstack.pipeline import fine_targets
from recstack.serving.cascade import Cascade, Query

from coarse_rank.fine_distill import FineTargets
from coarse_rank.train import Config, fit, load_student, train

SMALL = dict(embed_dim=8, d_model=32, n_heads=4, ff_dim=64, hidden=(64,), out_dim=32, batch_size=256,
             teacher_hidden=(32, 16), cvr_hidden=(16,), lr=0.003, optimizer="adam", warmup_steps=2,
             eval_max_rows=500, split="valid", fine_distill_requests=16, fine_distill_pairs=8, fine_distill_top=10)
R = 40  # candidates retrieved per request


@pytest.fixture(scope="module")
def targets_file(tiny_data, tiny_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("fine_targets") / "targets.npz"
    meta = fine_targets.build(tiny_data, tiny_bundle, path, split="valid", retrieval_size=R, max_requests=60,
                              progress=False)
    return path, meta


def test_targets_hold_the_served_candidates_in_the_fine_rankers_order(targets_file, tiny_data, tiny_bundle):
    path, meta = targets_file
    data = load(tiny_data)
    fit_days, _ = data.split_days("valid")
    with np.load(path) as z:
        a = {k: z[k] for k in fine_targets.ARRAYS}
        assert json.loads(str(z["meta"])) == meta
    n = meta["requests"]
    assert n > 10 and a["cands"].shape == (n, R) and a["log_score"].shape == (n, R)
    assert set(np.unique(a["day"]).tolist()) <= set(fit_days)
    assert all(len(np.unique(row)) == R for row in a["cands"]) and a["cands"].max() < data.items.n
    # the serving code with no coarse cut (coarse size = retrieval size) ranks the same request's
    # candidates by the fine score: its list is the file's top by log_score, with the same scores
    cascade = Cascade.load(tiny_bundle)
    day = int(a["day"][0])
    req = requests(data, day, data.users.n, 0)
    for n in range(3):
        k = int(np.flatnonzero((req["user_id"] == a["user_id"][n]) & (req["ts"] == a["ts"][n]))[0])
        user, ts = int(req["user_id"][k]), float(req["ts"][k])
        item, when, kind = req["log"][k]
        browsed = browsed_categories(item, when, kind, ts, cascade.categories.item_category, cascade.browse_window_s)
        ranked = cascade.rank_features(
            Query(user_id=user, num_results=10, retrieval_size=R, coarse_size=R),
            req["user_feats"][k : k + 1], req["seq_items"][k : k + 1], req["seq_extras"][k : k + 1],
            interacted=lambda c: req["events"].features(np.full(len(c), user), np.full(len(c), ts), c), browsed=browsed)
        assert np.array_equal(a["seq_items"][n], req["seq_items"][k])
        order = np.lexsort((a["cands"][n], -a["log_score"][n]))[:10]
        assert np.array_equal(a["cands"][n][order], ranked.item_ids)
        assert np.allclose(np.exp(a["log_score"][n][order]), ranked.scores, rtol=1e-5)


def _cut_agreement(student, targets: FineTargets, cfg: Config) -> float:
    """Mean share of the fine ranker's top C that the student's served score also puts in its top C."""
    import torch

    student.eval()
    rows = np.arange(targets.n)
    with torch.no_grad():
        s = targets.served_scores(student, rows, targets.a["cands"][rows].astype(np.int64)).numpy()
    mine = np.argsort(-s, axis=1)[:, : targets.top]
    return float(np.mean([targets.in_top[i, mine[i]].mean() for i in rows]))


def test_distilled_student_agrees_more_with_the_fine_cut(targets_file, tiny_data, tmp_path):
    path, _ = targets_file
    data = load(tiny_data)
    fit_days, eval_day = data.split_days("valid")
    base = dict(SMALL, objective="gmv", teacher="baseline", max_steps=40, seed=3, item_stats=False)
    plain = fit(Config(**base), data, fit_days, eval_day)
    cfg = Config(**base, fine_distill=5.0, fine_targets=str(path))
    distilled = fit(cfg, data, fit_days, eval_day)
    targets = FineTargets.load(path, data, cfg.fine_distill_top, fit_days, item_stats=False)
    a_plain, a_dist = _cut_agreement(plain.student, targets, cfg), _cut_agreement(distilled.student, targets, cfg)
    assert a_dist > a_plain + 0.05, (a_plain, a_dist)
    assert np.isfinite(distilled.result["auc"])

    # the checkpoint keeps the setting; training a second time reads the same pairs (seeded by step)
    metrics = train(cfg, tiny_data, tmp_path / "run", progress=False)
    _, saved, _ = load_student(tmp_path / "run" / "checkpoint.pt")
    assert saved.fine_distill == 5.0 and saved.fine_targets == str(path)
    assert metrics["auc"] == pytest.approx(distilled.result["auc"], abs=1e-6)



def test_a_warm_day_learns_the_fine_order_of_the_bundle_that_served_it(targets_file, tiny_data, tiny_bundle, tmp_path):
    """recstack live: a warm day of a distilled coarse stage ranks its own requests with the served
    bundle's fine ranker and trains on those pairs (its cut then agrees more with that order than
    a warm day without them); with no served bundle it trains on impressions alone and says so."""
    from recstack.pipeline.warm import _warm_coarse
    from recstack.training import checkpoint

    path, _ = targets_file
    data = load(tiny_data)
    fit_days, eval_day = data.split_days("valid")
    cfg = Config(**dict(SMALL, objective="gmv", teacher="baseline", max_steps=20, seed=3, item_stats=False),
                 fine_distill=5.0, fine_targets=str(path))
    train(cfg, tiny_data, tmp_path / "run", progress=False)
    ck = checkpoint.load(tmp_path / "run" / "checkpoint.pt", stage="coarse")

    stats = _warm_coarse(ck, None, data, [eval_day], tmp_path / "alone", tiny_data)
    assert "off on this warm day" in stats["fine_distill"] and stats["steps"] > 0
    alone, alone_cfg, _ = load_student(tmp_path / "alone" / "checkpoint.pt")
    assert alone_cfg.fine_distill == 0.0 and alone_cfg.fine_targets is None

    stats = _warm_coarse(ck, None, data, [eval_day], tmp_path / "served", tiny_data, served=tiny_bundle)
    day_file = tmp_path / "served" / "fine_targets.npz"
    assert stats["fine_distill"].startswith("pairs of ") and stats["steps"] > 0
    with np.load(day_file) as z:
        meta = json.loads(str(z["meta"]))
        assert set(np.unique(z["day"]).tolist()) == {eval_day}
    assert meta["bundle"] == Cascade.load(tiny_bundle).version and meta["split"] is None
    served, served_cfg, _ = load_student(tmp_path / "served" / "checkpoint.pt")
    assert served_cfg.fine_distill == 5.0 and served_cfg.fine_targets == str(day_file)
    day_targets = FineTargets.load(day_file, data, cfg.fine_distill_top, [eval_day], item_stats=False)
    a_alone, a_served = _cut_agreement(alone, day_targets, cfg), _cut_agreement(served, day_targets, cfg)
    assert a_served > a_alone + 0.1, (a_alone, a_served)


def test_a_targets_file_that_does_not_fit_is_refused_with_one_line(targets_file, tiny_data, tmp_path):
    path, _ = targets_file
    data = load(tiny_data)
    with pytest.raises(ConfigError, match="no file at"):
        FineTargets.load(tmp_path / "missing.npz", data, 10)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    bad_days = dict(arrays, day=np.full_like(arrays["day"], 99))
    np.savez(tmp_path / "days.npz", **bad_days)
    with pytest.raises(ConfigError, match="training days are"):
        FineTargets.load(tmp_path / "days.npz", data, 10, [1])
    other = dict(arrays, meta=np.asarray(json.dumps({**json.loads(str(arrays["meta"])), "n_items": data.items.n + 1})))
    np.savez(tmp_path / "corpus.npz", **other)
    with pytest.raises(ConfigError, match="corpus of"):
        FineTargets.load(tmp_path / "corpus.npz", data, 10)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a targets file"):
        FineTargets.load(tmp_path / "junk.npz", data, 10)


@pytest.mark.parametrize("overrides, match", [
    (dict(fine_distill=1.0), "set objective=gmv and fine_targets"),
    (dict(fine_distill=1.0, fine_targets="t.npz", objective="ctr"), "set objective=gmv"),
    (dict(fine_distill=-1.0), "fine_distill must be >= 0"),
    (dict(fine_distill_pairs=0), "fine_distill_pairs must be positive"),
])
def test_fine_distill_settings_are_checked(overrides, match):
    with pytest.raises(ConfigError, match=match):
        Config(**overrides).validate()


def test_fits_cached_before_the_option_keep_their_keys(tiny_data):
    from coarse_rank.experiments.runner import _job_key

    key = _job_key(tiny_data, Config(), [1], 2)
    assert _job_key(tiny_data, Config(fine_distill_top=77, fine_distill_pairs=3), [1], 2) == key  # off: not keyed
    assert _job_key(tiny_data, Config(fine_distill=1.0, fine_targets="t.npz"), [1], 2) != key
    assert _job_key(tiny_data, Config(lr_schedule="constant"), [1], 2) == key  # the LR schedule of the fits before it
    assert _job_key(tiny_data, Config(lr_schedule="linear"), [1], 2) != key
