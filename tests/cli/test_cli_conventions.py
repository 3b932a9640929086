"""The CLI conventions a user expects: --version, help with defaults and a description for every
option, --list-settings, one sub-parser per benchmark, outputs where the user said (and said
where), rank with behaviours and --json, the admin commands, loadtest progress, metrics.json."""
from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent import futures
from pathlib import Path
from typing import Optional

import grpc
import pytest

from recstack import cli
from recstack.config import apply_overrides, field_docs, format_settings
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

TOKEN = "s3cret-token"


def _parsers(p: argparse.ArgumentParser, prog: str = "recstack"):
    """(prog, parser) for the parser and every sub-parser below it."""
    yield prog, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    from recstack import __version__

    assert capsys.readouterr().out.strip() == f"recstack {__version__}"


def test_every_option_has_a_description_and_help_shows_defaults():
    parsers = dict(_parsers(cli.build_parser()))
    assert {"recstack train", "recstack bench cascade", "recstack reload", "recstack model-info"} <= set(parsers)
    for prog, p in parsers.items():
        for action in p._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{prog} {action.option_strings or action.dest}: no description"
    rank_help = parsers["recstack rank"].format_help()
    assert "(default: 127.0.0.1:50051)" in rank_help and "(default: 10)" in rank_help


def test_bench_help_shows_only_that_benchmarks_options():
    parsers = dict(_parsers(cli.build_parser()))
    cascade, retrieval = parsers["recstack bench cascade"].format_help(), parsers["recstack bench retrieval"].format_help()
    assert "--users" in cascade and "--checkpoint" not in cascade and "--teacher" not in cascade
    assert "--checkpoint" in retrieval and "--users" not in retrieval and "--gmv-users" not in retrieval


@dataclasses.dataclass
class _Documented:
    # --- a section rule, not a comment of the field below ---
    lr: float = 0.1  # the step size
    # why the default is 3:
    # two lines above the field
    steps: int = 3
    widths: tuple[int, ...] = (4, 2)  # a "#" inside a string does not end the comment
    cap: Optional[int] = None
    name: str = "x#y"


def test_field_docs_reads_the_comments_beside_each_field():
    docs = {d.name: d for d in field_docs(_Documented())}
    assert list(docs) == ["lr", "steps", "widths", "cap", "name"]
    assert docs["lr"].comment == "the step size" and docs["lr"].type == "float" and docs["lr"].value == 0.1
    assert docs["steps"].comment == "why the default is 3: two lines above the field"
    assert docs["widths"].comment == 'a "#" inside a string does not end the comment'
    assert docs["cap"].comment == "" and docs["cap"].type == "Optional[int]"
    assert docs["name"].value == "x#y"


@pytest.mark.parametrize("stage,module", sorted(cli.STAGES.items()))
def test_train_list_settings_prints_every_key_with_type_default_and_comment(stage, module, capsys):
    import importlib

    assert cli.main(["train", stage, "--list-settings"]) == 0  # no --data / --out needed
    out = capsys.readouterr().out
    cfg = importlib.import_module(f"{module}.train").Config()
    docs = field_docs(cfg)
    assert sum(1 for d in docs if d.comment) >= len(docs) - 1  # the stage configs document their fields
    for d in docs:
        assert f"\n  {d.name} ({d.type}) = " in out, d.name
        if d.comment:
            assert d.comment.split()[0] in out
    # each value is printed as --set takes it: setting every key to its printed value changes nothing
    printed = [line.strip().split(" = ", 1) for line in out.splitlines() if line.startswith("  ") and " = " in line
               and not line.startswith("      ")]
    overrides = [f"{key.split(' (')[0]}={value}" for key, value in printed]
    assert len(overrides) == len(docs) and apply_overrides(cfg, overrides) == cfg


def test_simulate_list_settings_shows_the_presets_values(capsys):
    assert cli.main(["simulate", "--preset", "tiny", "--list-settings"]) == 0
    out = capsys.readouterr().out
    assert "  n_users (int) = 400\n" in out and "  n_days (int) = 3\n" in out  # tiny's, not the dataclass defaults
    assert "next-day split" in out  # the comment beside n_days


def test_format_settings_lists_tuples_and_none_as_set_takes_them():
    text = format_settings(_Documented(), "title")
    assert "  widths (tuple[int, ...]) = 4,2\n" in text and "  cap (Optional[int]) = none\n" in text


def test_simulate_force_replaces_a_previous_world(tmp_path, capsys):
    out = tmp_path / "w"
    assert cli.main(["simulate", "--preset", "tiny", "--out", str(out), "--shard-rows", "2000"]) == 0
    assert (out / "impressions" / "day=01").is_dir()
    assert cli.main(["simulate", "--preset", "tiny", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["simulate", "--preset", "tiny", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in (out / "impressions").iterdir()) == ["day=01.parquet", "day=02.parquet", "day=03.parquet"]
    stdout = capsys.readouterr().out
    assert f"wrote {out}/" in stdout and "world.json" in stdout


def test_train_prints_metrics_once_and_writes_metrics_json(tiny_data, tmp_path, capsys):
    assert cli.main(["train", "coarse", "--data", tiny_data, "--out", str(tmp_path), "--set", "max_steps=3",
                     "--set", "eval_max_rows=2000", "--set", "teacher=baseline"]) == 0
    out = capsys.readouterr().out
    assert out.count("AUC") == 1 and "auc:" not in out  # the stage's summary line, not a second dump
    path = tmp_path / "coarse" / "metrics.json"
    assert f"wrote {tmp_path / 'coarse' / 'checkpoint.pt'} and {path}" in out
    metrics = json.loads(path.read_text())
    assert metrics["steps"] == 3 and isinstance(metrics["steps"], int) and 0 < metrics["auc"] < 1
    assert not list((tmp_path / "coarse").glob("*.tmp"))


def test_retrieval_metrics_counts_are_ints(tiny_data, tmp_path, capsys):
    assert cli.main(["train", "retrieval", "--data", tiny_data, "--out", str(tmp_path), "--set", "max_steps=2",
                     "--set", "eval_k=50"]) == 0
    metrics = json.loads((tmp_path / "retrieval" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and all(isinstance(metrics[k], int) for k in ("steps", "train_clicks", "test_clicks"))
    assert "steps: 2.0000" not in capsys.readouterr().out


# --- bench: a fresh folder under ./runs by default, report.md for cascade, paths printed ---------------------


def _cascade_results() -> dict:
    row = dict(recall_retrieval=0.5, recall_coarse=0.4, recall_served=0.3, gmv_share=0.25, gmv_share_se=0.01,
               i2i_in_retrieved=0.0, i2i_in_served=0.0, oracle_via_i2i=0.0, ms=1.5)
    return {"k": 20, "day": 3, "n_users": 12, "n_items": 2000, "data_dir": "/w", "bundle_version": "v1", "i2i_seeds": 5,
            "oracle": "the truth's top k", "requests": "first sessions", "wall_seconds": 1.0,
            "configs": [dict(row, retrieval_size=1000, coarse_size=200, i2i_share=0.0),
                        dict(row, retrieval_size=1000, coarse_size=200, i2i_share=0.3, gmv_share_diff_vs_no_i2i=0.01,
                             gmv_share_diff_se=0.005)],
            "references": {"random_k": {"gmv_share": 0.05, "recall": 0.01}}}


def test_bench_cascade_writes_report_md_into_a_fresh_runs_folder(tmp_path, monkeypatch, capsys):
    from recstack.evaluation import cascade as cascade_eval

    def fake_run(artifacts, data, out, n_users):
        Path(out).mkdir(parents=True)
        (Path(out) / "results.json").write_text("{}")
        return _cascade_results()

    monkeypatch.setattr(cascade_eval, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "cascade", "--artifacts", "a", "--data", "d"]) == 0
    (out,) = (tmp_path / "runs").iterdir()
    assert out.name.startswith("bench-cascade-")
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| **")]  # rows at the default sizes are bold
    assert [row.split(" | ")[0] for row in rows] == ["| **0.00**", "| **0.30**"]
    assert "+0.0100" in report and "20 random items" in report
    printed = capsys.readouterr().out
    assert f"wrote {Path('runs') / out.name}/: report.md, results.json" in printed
    # --out before the benchmark's name, as it used to be given, still works
    assert cli.main(["bench", "--out", "mine", "cascade", "--artifacts", "a", "--data", "d"]) == 0
    assert (tmp_path / "mine" / "report.md").exists() and not (tmp_path / "docs").exists()


# --- rank, model-info, reload, loadtest against a stand-in server --------------------------------------------


class _StandIn(pb_grpc.RankingServiceServicer, pb_grpc.ModelServiceServicer):
    """Answers like the ranking server and records what it was sent."""

    def __init__(self):
        self.requests: list[pb.RankRequest] = []
        self.reloads: list[str] = []

    def Rank(self, request, context):
        self.requests.append(request)
        items = [pb.RankedItem(item_id=100 + i, score=1.0 / (i + 1), pctr=0.1, pcvr=0.2, price=9.5, source="ann")
                 for i in range(request.num_results)]
        resp = pb.RankResponse(items=items, model_version="v1")
        if request.debug:
            resp.timings.CopyFrom(pb.StageTimings(features_ms=0.1, retrieval_ms=0.2, coarse_ms=0.3, fine_ms=0.4, total_ms=1.0))
        return resp

    def _check(self, context):
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")

    def GetModelInfo(self, request, context):
        self._check(context)
        return pb.ModelInfo(model_version="v1", bundle_path="/art/v1", n_items=2000, n_users=400, pid=7)

    def Reload(self, request, context):
        self._check(context)
        self.reloads.append(request.version)
        return pb.ModelInfo(model_version=request.version or "v1", bundle_path=f"/art/{request.version or 'v1'}")


def _serve(admin: bool):
    servicer = _StandIn()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RankingServiceServicer_to_server(servicer, server)
    if admin:
        pb_grpc.add_ModelServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")  # the OS picks a free port and we hold it
    server.start()
    return server, f"127.0.0.1:{port}", servicer


@pytest.fixture(scope="module")
def stand_in():
    server, target, servicer = _serve(admin=True)
    yield target, servicer
    server.stop(None)


def test_rank_sends_behaviours_and_prints_json(stand_in, capsys):
    target, servicer = stand_in
    assert cli.main(["rank", "--target", target, "--user-id", "42", "-k", "3", "--behaviour", "123:click:30",
                     "--behaviour", "77:purchase:600:12.5", "--behaviour", "5", "--json"]) == 0
    req = servicer.requests[-1]
    assert req.user_id == 42 and req.num_results == 3
    assert [(b.item_id, b.kind, b.seconds_ago, b.dwell_seconds) for b in req.recent_behaviours] == [
        (123, pb.BEHAVIOUR_KIND_CLICK, 30.0, 0.0), (77, pb.BEHAVIOUR_KIND_PURCHASE, 600.0, 12.5),
        (5, pb.BEHAVIOUR_KIND_CLICK, 0.0, 0.0)]
    resp = json.loads(capsys.readouterr().out)
    assert [it["item_id"] for it in resp["items"]] == [100, 101, 102] and resp["model_version"] == "v1"
    assert resp["timings"]["total_ms"] == 1.0
    assert cli.main(["rank", "--target", target, "--user-id", "42", "-k", "2"]) == 0
    assert "model v1" in capsys.readouterr().out  # the table


def test_model_info_and_reload_with_the_token_from_a_file_or_the_environment(stand_in, tmp_path, monkeypatch, capsys):
    target, servicer = stand_in
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert cli.main(["model-info", "--target", target, "--admin-token-file", str(token_file)]) == 0
    assert "model v1  (bundle /art/v1)" in capsys.readouterr().out
    monkeypatch.setenv("RECSTACK_ADMIN_TOKEN", TOKEN)
    assert cli.main(["reload", "--target", target, "--version", "v2", "--json"]) == 0
    assert servicer.reloads[-1] == "v2" and json.loads(capsys.readouterr().out)["model_version"] == "v2"
    monkeypatch.setenv("RECSTACK_ADMIN_TOKEN", "wrong")
    assert cli.main(["model-info", "--target", target]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PERMISSION_DENIED: wrong admin token" in err


def test_admin_commands_on_a_server_without_model_service(monkeypatch, capsys):
    server, target, _ = _serve(admin=False)
    try:
        monkeypatch.setenv("RECSTACK_ADMIN_TOKEN", TOKEN)
        assert cli.main(["model-info", "--target", target]) == 2
    finally:
        server.stop(None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no ModelService" in err and "--admin-token-file" in err


def test_loadtest_sweep_shows_progress_and_says_where_files_went(stand_in, tmp_path, capsys):
    target, _ = stand_in
    js, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert cli.main(["loadtest", "--target", target, "--qps", "20", "--duration", "0.2", "--max-requests", "4",
                     "--concurrency", "4", "--connections", "1", "--sweep", "--p99-bound-ms", "60000",
                     "--json", str(js), "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    runs = json.loads(js.read_text())["runs"]
    steps = [line for line in captured.err.splitlines() if line.startswith("sweep ")]
    assert len(steps) == len(runs) >= 1 and steps[0].startswith(f"sweep 1/{len(steps)}: offered 20 QPS")
    assert f"wrote results: {js}" in captured.out and f"wrote plot: {png}" in captured.out
    assert png.read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.png"]


def test_readme_cli_section_matches_the_parsers():
    """Each command line of the README's CLI section names exactly the options its parser has."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("\n## CLI\n", 1)[1].split("```")[1]
    documented: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        m = re.match(r"recstack (\S+)(?: +(all|retrieval|cascade|models|train|soak|backends|mixed)\b)?", line)
        if m:
            command = "recstack" if m.group(1).startswith("-") else " ".join(
                ["recstack", m.group(1)] + ([m.group(2)] if m.group(1) == "bench" else []))
        elif not line.startswith(" "):
            command = None  # e.g. the torchrun line: not a parser of its own
        if command:
            documented.setdefault(command, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-k)(?![\w-])",
                                                                    line.split("#")[0]))
    parsers = dict(_parsers(cli.build_parser()))
    del parsers["recstack bench"]  # only its benchmarks are commands
    for prog, p in parsers.items():
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions) and prog != "recstack":
            continue
        options = {s for a in p._actions for s in a.option_strings if s not in ("-h", "--help")}
        assert documented.get(prog) == options, prog


@pytest.mark.parametrize("flags", [["--ingest-threads", "0"], ["--ingest-queue", "-1"]])
def test_serve_refuses_a_bound_on_ingestion_that_admits_nothing(tmp_path, capsys, flags):
    assert cli.main(["serve", "--artifacts", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ingest-threads must be >= 1 and --ingest-queue >= 0" in err[0]
