"""recstack/world/truth.py (the oracle) and recstack/evaluation/cascade.py (cascade recall against it), on `tiny`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recstack.data import load
from recstack.world.truth import Truth, expected_sigmoid
from recstack.evaluation import cascade as cascade_eval


@pytest.fixture(scope="module")
def truth(tiny_data) -> Truth:
    return Truth.load(tiny_data)


def test_truth_reproduces_the_simulators_probabilities(tiny_data, truth):
    data = load(tiny_data)
    day = data.test_day
    im = data.impressions(day)
    users, items = im["user_id"], im["item_id"][:, None]
    # P(buy | click) has no noise term: the rebuilt world gives the logged truth exactly
    np.testing.assert_allclose(truth.pcvr(users, items, day)[:, 0], im["true_pcvr"], rtol=1e-5, atol=1e-7)
    # the logged pCTR carries the per-impression noise N(0, click_noise^2): the residual of its
    # logit against the noise-free truth is that noise, centred, with the configured spread
    p = im["true_pctr"].astype(np.float64)
    resid = np.log(p / (1 - p)) - truth.click_logit(users, items, day)[:, 0]
    noise = truth.world.cfg.click_noise
    assert len(resid) > 2000
    assert abs(resid.mean()) < 0.05 and abs(resid.std() / noise - 1) < 0.05, (resid.mean(), resid.std())
    # and another day's intent would not fit: the intent is part of the truth
    other = truth.pcvr(users, items, day - 1)[:, 0]
    assert np.abs(other - im["true_pcvr"]).max() > 1e-2


def test_expected_sigmoid_is_the_noise_average():
    logits = np.linspace(-8, 4, 25)
    z = np.random.default_rng(0).standard_normal(400_000)
    mc = np.array([np.mean(1 / (1 + np.exp(-(x + 0.5 * z)))) for x in logits])
    np.testing.assert_allclose(expected_sigmoid(logits, 0.5), mc, atol=1.5e-3, rtol=5e-3)
    np.testing.assert_allclose(expected_sigmoid(logits, 0.0), 1 / (1 + np.exp(-logits)))


def test_oracle_top_k_is_the_brute_force_top_k(truth):
    users, day = np.array([0, 5, 17]), 2
    ids, vals = truth.oracle_top_k(users, day, k=30, chunk_items=700)  # chunks smaller than the corpus
    everything = np.arange(truth.n_items)
    for n, u in enumerate(users):
        gmv = truth.expected_gmv(np.array([u]), everything[None], day)[0]
        best = np.argsort(-gmv, kind="stable")[:30]
        np.testing.assert_array_equal(ids[n], best)
        np.testing.assert_allclose(vals[n], gmv[best])
        assert np.all(np.diff(vals[n]) <= 0)


def test_requests_use_only_behaviours_before_the_request(tiny_data):
    data = load(tiny_data)
    req = cascade_eval.requests(data, data.test_day, n_users=40, seed=0)
    valid = req["seq_items"][..., 0] > 0  # (N, L)
    assert valid.any()
    assert (req["seq_extras"][..., 0][valid] > 0).all()  # log1p(hours since) > 0: strictly earlier
    assert len(np.unique(req["user_id"])) == len(req["user_id"]) == 40


def test_cascade_eval_invariants(tiny_data, tiny_bundle, tmp_path):
    n_items = load(tiny_data).items.n
    res = cascade_eval.run(tiny_bundle, tiny_data, tmp_path, n_users=12, k=20, retrieval_sizes=(50, 400, n_items),
                           coarse_sizes=(50, n_items), default_retrieval=n_items, default_coarse=50, i2i_shares=(0.0, 0.3))
    assert (tmp_path / "cascade_recall.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["n_users"] == 12
    rows = res["configs"]
    for r in rows:
        for m in ("recall_retrieval", "recall_coarse", "recall_served", "gmv_share"):
            assert 0.0 <= r[m] <= 1.0 + 1e-9, (m, r)  # the oracle list is the best any k items can do
        assert r["recall_served"] <= r["recall_coarse"] <= r["recall_retrieval"]
    ann = sorted((r for r in rows if r["i2i_share"] == 0.0 and r["coarse_size"] == min(50, r["retrieval_size"])),
                 key=lambda r: r["retrieval_size"])
    # exact ANN: a larger retrieval size keeps a superset
    assert [r["recall_retrieval"] for r in ann] == sorted(r["recall_retrieval"] for r in ann)
    full = next(r for r in rows if r["i2i_share"] == 0.0 and r["retrieval_size"] == r["coarse_size"] == n_items)
    assert full["recall_retrieval"] == full["recall_coarse"] == 1.0
    # nothing cut before fine: the cascade is the fine ranker over the whole corpus
    assert full["gmv_share"] == pytest.approx(res["references"]["fine_over_whole_corpus"]["gmv_share"])
    assert full["i2i_in_retrieved"] == 0.0 and any(r["i2i_in_retrieved"] > 0 for r in rows if r["i2i_share"] > 0)
    assert 0 <= res["references"]["random_k"]["gmv_share"] < 1


def test_settings_fields_as_keywords_and_unknown_ones_refused(tiny_data, tiny_bundle, tmp_path):
    s = cascade_eval.Settings(retrieval_sizes=(10, 20), coarse_sizes=(5, 30), default_retrieval=20, default_coarse=5)
    assert s.grid(n_items=15) == [(10, 5), (15, 5), (15, 15)]  # clamped to the corpus, coarse <= retrieval, no repeats
    with pytest.raises(TypeError, match="n_userz"):
        cascade_eval.run(tiny_bundle, tiny_data, tmp_path / "out", n_userz=3)
    assert not (tmp_path / "out").exists()


def test_bench_cascade_exports_a_runs_folder_before_evaluating(tmp_path, monkeypatch):
    """The evaluation takes a bundle; the CLI turns a runs folder into one first."""
    from recstack import cli
    from recstack.pipeline import export

    runs = tmp_path / "runs"
    (runs / "retrieval").mkdir(parents=True)
    (runs / "retrieval" / "checkpoint.pt").write_bytes(b"")
    seen = {}

    def fake_export(runs_dir, out):
        seen["exported"] = Path(runs_dir)
        return Path(out) / "v1"

    def fake_run(bundle, data, out, n_users):
        seen["bundle"] = Path(bundle)
        Path(out).mkdir(parents=True, exist_ok=True)
        return {"k": 5, "day": 1, "n_users": n_users, "n_items": 10, "data_dir": str(data), "bundle_version": "v1",
                "oracle": "o", "configs": [], "references": {}, "wall_seconds": 0.0}

    monkeypatch.setattr(export, "export_bundle", fake_export)
    monkeypatch.setattr(cascade_eval, "run", fake_run)
    assert cli.main(["bench", "cascade", "--artifacts", str(runs), "--data", "d", "--users", "3",
                     "--out", str(tmp_path / "out")]) == 0
    assert seen["exported"] == runs and seen["bundle"].name == "v1" and seen["bundle"].parent.name == "artifacts"
    assert (tmp_path / "out" / "report.md").exists()


def test_pareto_front_and_budget_pick():
    from recstack.evaluation.cascade_pareto import best_within, pareto

    rows = [{"cpu_ms": 1.0, "gmv_share": 0.1}, {"cpu_ms": 2.0, "gmv_share": 0.3}, {"cpu_ms": 3.0, "gmv_share": 0.2},
            {"cpu_ms": 4.0, "gmv_share": 0.35}, {"cpu_ms": 2.0, "gmv_share": 0.25}]
    assert [(r["cpu_ms"], r["gmv_share"]) for r in pareto(rows)] == [(1.0, 0.1), (2.0, 0.3), (4.0, 0.35)]
    assert best_within(rows, 3.5)["gmv_share"] == 0.3 and best_within(rows, 0.5) is None


def test_compare_runs_every_bundle_on_one_grid_with_cpu_cost(tiny_data, tiny_bundle, tmp_path):
    from recstack.evaluation.cascade_pareto import compare

    res = compare({"a": tiny_bundle, "b": tiny_bundle}, tiny_data, tmp_path, n_users=6, k=10,
                  retrieval_sizes=(50, 200), coarse_sizes=(20, 50), default_retrieval=200, default_coarse=20,
                  i2i_shares=(0.0,), plot=False, fine_precision="fp32")
    assert res["runs"]["a"]["fine_precision"] == res["runs"]["b"]["fine_precision"] == "fp32"
    grid = {(r["retrieval_size"], r["coarse_size"]) for r in res["runs"]["a"]["configs"]}
    assert grid == {(50, 20), (50, 50), (200, 20), (200, 50)}  # the full grid
    assert all(r["cpu_ms"] > 0 for r in res["runs"]["b"]["configs"])
    assert res["runs"]["a"]["pareto"] and (tmp_path / "pareto.png").stat().st_size > 0
    assert (tmp_path / "a" / "results.json").exists() and (tmp_path / "results.json").exists()
