"""The cascade measurement tools: paired GMV of bundles (and of one bundle under several serving
options), and the coarse cut against the fine ranker over every retrieved candidate."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_gmv_compares_options_of_one_bundle(tiny_data, tiny_bundle, tmp_path):
    tool = _tool("paired_gmv")
    out = tmp_path / "paired.json"
    assert tool.main(["--data", tiny_data, "--out", str(out), "--users", "6", "--sizes", "60,20",
                      "--bundle", f"a={tiny_bundle}", "--bundle", f"b={tiny_bundle}",
                      "--option", "b:browse_coarse_share=0", "--option", "b:browse_replaces_i2i=false"]) == 0
    res = json.loads(out.read_text())
    assert res["bundles"]["b"]["options"] == {"browse_coarse_share": 0.0, "browse_replaces_i2i": False}
    assert res["bundles"]["a"]["options"] == {} and set(res["paired"]) == {"b"}
    for arm in res["bundles"].values():
        assert 0.0 <= arm["gmv_share"] <= 1.0 and arm["recall_coarse"] <= arm["recall_retrieval"]
    with pytest.raises(SystemExit):  # an option for an arm that is not there
        tool.main(["--data", tiny_data, "--out", str(out), "--bundle", f"a={tiny_bundle}", "--option", "c:i2i_share=0"])


def test_paired_gmv_gives_an_arm_its_own_sizes_and_the_ratio_to_the_first(tiny_data, tiny_bundle, tmp_path):
    """The single stage (coarse size = retrieval size) beside the cascade on the same users: its
    coarse cut keeps everything retrieved; the ratio is of the two arms' mean shares."""
    tool = _tool("paired_gmv")
    out = tmp_path / "paired.json"
    assert tool.main(["--data", tiny_data, "--out", str(out), "--users", "6", "--sizes", "60,20",
                      "--bundle", f"single={tiny_bundle}", "--bundle", f"cascade={tiny_bundle}",
                      "--arm-sizes", "single=60,60"]) == 0
    res = json.loads(out.read_text())
    single, cascade = res["bundles"]["single"], res["bundles"]["cascade"]
    assert single["sizes"] == [60, 60] and cascade["sizes"] == [60, 20]
    assert single["recall_coarse"] == pytest.approx(single["recall_retrieval"])
    assert cascade["recall_retrieval"] == pytest.approx(single["recall_retrieval"])  # same requests, same retrieval
    p = res["paired"]["cascade"]
    assert p["ratio"] == pytest.approx(cascade["gmv_share"] / single["gmv_share"])
    assert 0.0 <= p["ratio_ci95"][0] <= p["ratio_ci95"][1]
    assert single["cpu_ms_mean"] > 0.0 and cascade["cpu_ms_mean"] > 0.0
    png = tmp_path / "pareto.png"  # the arms as GMV share against CPU per request
    assert _tool("paired_gmv_plot").main(["--pareto", str(png), str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # sizes that are not two integers
        tool.main(["--data", tiny_data, "--out", str(out), "--bundle", f"a={tiny_bundle}", "--arm-sizes", "a=60"])


def test_coarse_bound_counts_the_fine_rankers_cut_of_every_candidate(tiny_data, tiny_bundle, tmp_path):
    tool = _tool("coarse_bound")
    res = tool.measure(tiny_data, str(tiny_bundle), 6, 60, 20)
    assert res["n_users"] == 6 and res["retrieval_size"] == 60 and res["coarse_size"] == 20
    # both cuts take 20 of the same 60 retrieved candidates: neither keeps more than retrieval found
    assert 0.0 <= res["coarse"] <= res["retrieval"] and 0.0 <= res["fine_of_all"] <= res["retrieval"]
    # with no cut at all (coarse size = retrieval size), the fine ranker keeps everything retrieved
    full = tool.measure(tiny_data, str(tiny_bundle), 6, 60, 60)
    assert full["fine_of_all"] == pytest.approx(full["retrieval"]) and full["coarse"] == pytest.approx(full["retrieval"])


def test_cascade_calibration_sums_the_heads_against_the_truth_by_fine_rank(tiny_data, tiny_bundle, tmp_path):
    """By block of fine ranks: the predicted and true sums of what the serving code returns, the
    same numbers recomputed here for one user."""
    import numpy as np

    from recstack.data import load
    from recstack.serving.cascade import Cascade, Query
    from recstack.world.truth import Truth

    tool = _tool("cascade_calibration")
    out = tmp_path / "cal.json"
    day = load(tiny_data).test_day
    assert tool.main(["--bundle", str(tiny_bundle), "--data", tiny_data, "--day", str(day), "--users", "1",
                      "--out", str(out)]) == 0
    res = json.loads(out.read_text())["by_fine_rank"]
    assert list(res)[:2] == ["1-10", "11-50"] and res["1-10"]["items"] == 10
    cascade = Cascade.load(tiny_bundle)
    user = int(np.unique(load(tiny_data).impressions(day)["user_id"])[0])
    r = cascade.rank(Query(user_id=user, num_results=200, retrieval_size=min(1000, cascade.n_items), coarse_size=200,
                           now=cascade.snapshot.time), None)
    p = Truth.load(tiny_data).pctr([user], r.item_ids[None], day)[0]
    assert res["1-10"]["ctr"] == pytest.approx(r.pctr[:10].sum() / p[:10].sum(), rel=1e-6)
