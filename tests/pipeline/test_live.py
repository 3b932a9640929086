"""`recstack live` on `tiny` for 2 days through real gRPC servers (in process, port 0): each day
a new served version, the day's logged rows are what every stage trains on, no failed call across
the Reload, and a loop stopped after day 1 resumes at day 2."""
import json

import numpy as np

import pytest

from recstack import bundle as B
from recstack.pipeline.live import live


@pytest.fixture(scope="module")
def run(live_config, tmp_path_factory, one_thread):
    # the coarse export's int8 parity check on 50 requests, not 1,000: these tests check the
    # loop; the check itself is tested with the exporter
    patch = pytest.MonkeyPatch()
    patch.setattr("coarse_rank.export.INT8_REQUESTS", 50)
    out = tmp_path_factory.mktemp("live")
    first = live(live_config, out, stop_after=1)  # an interruption after day 1
    day1 = (out / "days" / "d01" / "day.json").read_text()
    second = live(live_config, out)
    patch.undo()
    return out, first, second, day1


def test_each_day_serves_a_new_version(run):
    out, first, second, _ = run
    assert [d["version"] for d in second["days"]] == ["day01", "day02"]
    for d in second["days"]:
        assert d["reload"]["version"] == d["version"]
        assert d["reload"]["probe_calls"] > 0
    assert B.resolve_bundle(out / "arms" / "B").name == "day02"
    assert B.resolve_bundle(out / "arms" / "A").name == "day00"  # the control arm never reloads


def test_the_days_logged_rows_are_what_trains(run):
    out, _, second, _ = run
    for d in second["days"]:
        rec = json.loads((out / "days" / f"d{d['live_day']:02d}" / "day.json").read_text())
        served = rec["arms"]["B"]["impressions"]
        assert served > 0 and rec["logged_rows"] == served
        assert rec["trained"]["coarse"]["rows"] == served  # every impression, once
        assert rec["trained"]["fine"]["rows"] == served
        assert rec["trained"]["fine"]["ctr"]["rows"] == served
        assert sum(v["impressions"] for v in rec["world_rows"].values()) == served
        assert rec["trained"]["retrieval"]["rows"] == rec["trained"]["fine"]["cvr"]["rows"]  # the clicked rows


def test_no_call_fails_across_the_reloads(run):
    _, _, second, _ = run
    assert second["failed_calls_total"] == 0
    for d in second["days"]:
        assert d["reload"]["probe_failed"] == {}
        assert sum(d["requests"].values()) > 0


def test_resume_skips_finished_days(run):
    out, first, second, day1 = run
    assert first["days_run_now"] == 1 and len(first["days"]) == 1
    assert second["days_run_now"] == 1 and len(second["days"]) == 2
    assert (out / "days" / "d01" / "day.json").read_text() == day1  # day 1 was not run again


def test_a_day_interrupted_after_its_export_resumes_there(live_config, run, tmp_path):
    """day.json is written last: without it the day is unfinished; its replay, training and export
    are found and not redone, B is reloaded and the day recorded again."""
    import shutil

    out, _, second, _ = run
    copy = tmp_path / "live"
    shutil.copytree(out, copy)
    (copy / "days" / "d02" / "day.json").unlink()
    replayed = (copy / "days" / "d02" / "replay.json").read_text()
    ckpt = (copy / "days" / "d02" / "runs" / "fine" / "checkpoint.pt").stat().st_mtime_ns
    again = live(live_config, copy)
    assert again["days_run_now"] == 1 and again["failed_calls_total"] == 0
    assert (copy / "days" / "d02" / "replay.json").read_text() == replayed  # not replayed
    assert (copy / "days" / "d02" / "runs" / "fine" / "checkpoint.pt").stat().st_mtime_ns == ckpt  # not retrained
    day2 = again["days"][1]
    assert day2["version"] == "day02" and day2["reload"]["version"] == "day02"
    assert day2["trained_rows"] == second["days"][1]["trained_rows"]


def test_the_coarse_teacher_keeps_teaching_on_warm_days(run):
    """The day-0 coarse checkpoint carries its teacher and optimiser; each warm day trains student
    and teacher together from them (PFD's synchronous manner) and hands both to the next day."""
    import torch

    from recstack.training import checkpoint as C

    out, _, second, _ = run
    paths = [out / "runs" / "day00" / "coarse" / "checkpoint.pt"] + [
        out / "days" / f"d{d['live_day']:02d}" / "runs" / "coarse" / "checkpoint.pt" for d in second["days"]]
    teachers = [C.load(p, stage="coarse")["teacher"] for p in paths]
    for i, d in enumerate(second["days"]):
        rec = json.loads((out / "days" / f"d{d['live_day']:02d}" / "day.json").read_text())
        assert "trained with the student" in rec["trained"]["coarse"]["teacher"]
        # Adagrad's accumulators continue: from the initial training on the first day, then day to day
        assert rec["trained"]["coarse"]["optimizer"] == ("initial training" if i == 0 else "previous day")
    for before, after in zip(teachers, teachers[1:]):
        assert before.keys() == after.keys()
        assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


def test_each_day_reads_the_fine_heads_calibration(run, tmp_path):
    """Each day records the served and frozen fine heads' calibration (mean prediction / label
    rate) on the day's log; a warm pass shifts the CVR head to its rows' purchase rate, and the
    calibration read on those rows is then 1."""
    import math

    from recstack.pipeline import warm
    from recstack.pipeline.live import world_origin
    from recstack.pipeline.live_report import calibration, markdown

    out, _, second, _ = run
    for d in second["days"]:
        for model in ("served", "frozen"):
            fine = d["auc"][model]["fine"]
            assert fine["ctr_calibration"] > 0  # every tiny day has clicks
            assert math.isnan(fine["cvr_calibration"]) or fine["cvr_calibration"] > 0
    assert calibration(second["days"][0]["auc"], "served") in markdown(second)
    for d in second["days"]:  # the live days that had purchases to calibrate to
        day_dir = out / "days" / f"d{d['live_day']:02d}"
        rec = json.loads((day_dir / "day.json").read_text())
        if "calibration_shift" in rec["trained"]["fine"]["cvr"]:
            s = warm.score_stage("fine", day_dir / "runs" / "fine" / "checkpoint.pt", day_dir / "world")
            assert s["cvr_calibration"] == pytest.approx(1.0, abs=1e-4)
    # the same warm pass on the initial window, whose purchases do not depend on the live draws
    runs = out / "runs" / "day00"
    stats = warm.warm_stage("fine", runs / "fine" / "checkpoint.pt", out / "window", tmp_path / "fine", world_origin(runs))
    assert "calibration_shift" in stats["cvr"]
    s = warm.score_stage("fine", tmp_path / "fine" / "checkpoint.pt", out / "window")
    assert s["cvr_calibration"] == pytest.approx(1.0, abs=1e-4)
    from recstack.data import load

    one = warm.score_stage("fine", tmp_path / "fine" / "checkpoint.pt", out / "window", days=[1])
    assert one["n"] == len(load(out / "window").impressions(1)["click"]) < s["n"]


def test_each_day_reads_both_arms_heads_against_the_truth(run):
    """The replay scores what each arm served against the world's true probabilities; the day's
    row and the report table carry it."""
    from recstack.pipeline.live_report import markdown, truth_calibration

    _, _, second, _ = run
    for d in second["days"]:
        for arm in ("A", "B"):
            assert all(0 < v < float("inf") for v in d["truth_calibration"][arm].values())
        assert truth_calibration(d["truth_calibration"]) in markdown(second)
    assert truth_calibration(None) == "A CTR n/a, CVR n/a; B CTR n/a, CVR n/a"


def test_live_compare_pairs_runs_by_request_and_reads_the_replays_calibration(live_config, run, tmp_path):
    """tools/live_compare.py on a run against itself: every paired difference is 0, and the
    calibration it reads back from the impression logs is the one the replay recorded."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("live_compare", Path(__file__).resolve().parents[2] / "tools" / "live_compare.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, _, second, _ = run
    res = tool.compare({"a": out, "b": out}, "a", out / "world")
    for arm in ("A", "B"):
        v = res["paired_expected_gmv"]["b - a"][arm]
        assert all(r["diff"] == 0.0 and r["n"] == live_config.sessions for r in v["days"].values())
        for d in second["days"]:
            got = res["truth_calibration"]["a"][arm][str(d["world_day"])]
            assert got == pytest.approx(d["truth_calibration"][arm], rel=1e-5)
    days = [d["world_day"] for d in second["days"]]
    assert sorted(int(d) for d in res["frozen_on_the_simulated_log"]) == days
    tool.plot(res, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_the_servers_run_on_the_simulated_clock(live_config, run):
    """Each arm's server is on the virtual clock the replay sets: every logged request and event
    of a live day is at offset + a simulated time of that world day, the browsing at its own
    time in the world's log; every bundle anchors the pre-live history at the window's end."""
    from recstack import bundle as B
    from recstack.data import load
    from recstack.data.live_log import read_log
    from recstack.pipeline.live import start_clocks
    from recstack.pipeline.live_data import day_rows

    out, _, second, _ = run
    _, offset = start_clocks(out, live_config)
    world = load(out / "world")
    for d in second["days"]:
        rep = json.loads((out / "days" / f"d{d['live_day']:02d}" / "replay.json").read_text())
        for arm in ("A", "B"):
            rows = day_rows(out / "arms" / arm / "live_log", rep["prefix"], rep["since"])
            assert (world.day_of(rows["ts"] - offset) == d["world_day"]).all()
            sent = {int(s[1:]) for s in {r.rsplit("-", 1)[-1] for r in rows["request_id"].tolist()}}
            imps = world.impressions(d["world_day"])
            first = {int(s): t for s, t in zip(imps["session_id"][::-1].tolist(), imps["ts"][::-1].tolist())}
            assert all(t == pytest.approx(first[s] + offset, abs=1e-3) for s, t in zip(
                [int(r.rsplit("-", 1)[-1][1:]) for r in rows["request_id"].tolist()], rows["ts"].tolist()) if s in sent)
        version = f"day{d['live_day']:02d}"
        manifest = json.loads((out / "arms" / "B" / version / B.MANIFEST).read_text())
        window = json.loads((out / "window" / "world.json").read_text())
        assert manifest["snapshot"]["epoch"] == pytest.approx(offset + window["now"])
    events = read_log(out / "arms" / "A" / "live_log", "events")
    browsed = events["request_id"] == ""
    assert browsed.any()
    t, ref = events["ts"][browsed] - offset, np.sort(world.events["ts"])
    i = np.clip(np.searchsorted(ref, t), 1, len(ref) - 1)
    gap = np.minimum(np.abs(ref[i] - t), np.abs(ref[i - 1] - t))
    assert gap.max() < 1e-3  # each at its own time in the world's log
