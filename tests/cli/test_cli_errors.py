"""Every failure a user can cause, driven through the installed `recstack` console script: one line
on stderr, a non-zero exit status, no traceback, and no output file left behind half-written.
(Failures of `recstack serve` are tested with the server.)"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

RECSTACK = Path(sys.executable).parent / "recstack"


def recstack(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    run_env = {k: v for k, v in os.environ.items() if k not in ("RECSTACK_ADMIN_TOKEN", "RECSTACK_TRACEBACK")}
    run_env.update(env or {})
    return subprocess.run([str(RECSTACK), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=run_env,
                          timeout=300)


def assert_one_line_error(r: subprocess.CompletedProcess, status: int, command: str, *needles: str) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode == status, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"recstack {command}: error: ") if command else lines[0].startswith("recstack: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture()
def dead_port():
    """A port on 127.0.0.1 where nothing accepts connections: bound by this test, never listening,
    held for the test's duration (no other process can take it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_train_without_a_world(tmp_path):
    r = recstack("train", "coarse", "--data", "nodir", "--out", "r", cwd=tmp_path)
    assert_one_line_error(r, 1, "train", "nodir", "world.json")
    assert not (tmp_path / "r").exists()


def test_train_bad_setting_value(tmp_path, tiny_data):
    r = recstack("train", "retrieval", "--data", tiny_data, "--out", "r", "--set", "lr=abc", cwd=tmp_path)
    assert_one_line_error(r, 2, "train", "lr", "abc")
    assert not (tmp_path / "r").exists()


def test_loadtest_dead_port_fails_at_once_naming_the_target(tmp_path, dead_port):
    target = f"127.0.0.1:{dead_port}"
    r = recstack("loadtest", "--target", target, "--duration", "30", "--json", "out.json", cwd=tmp_path)
    assert_one_line_error(r, 2, "loadtest", target, "cannot connect")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--plot", "--json"])
def test_loadtest_unwritable_output_is_refused_before_the_run(tmp_path, dead_port, flag):
    (tmp_path / "afile").write_text("a file, not a folder")
    out = tmp_path / "afile" / "x.out"
    r = recstack("loadtest", "--target", f"127.0.0.1:{dead_port}", flag, out, cwd=tmp_path)
    assert_one_line_error(r, 2, "loadtest", flag, "does not exist")  # before the target is even tried
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_loadtest_non_loopback_target_says_why_and_what_to_do(tmp_path):
    line = assert_one_line_error(recstack("loadtest", "--target", "10.0.0.1:1", cwd=tmp_path), 2, "loadtest",
                                 "10.0.0.1", "loopback")
    assert "--target 127.0.0.1:1" in line  # how to load a server where that is allowed: from its own machine


def test_simulate_into_a_non_empty_folder_asks_for_force(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    r = recstack("simulate", "--preset", "tiny", "--out", "w", cwd=tmp_path)
    assert_one_line_error(r, 2, "simulate", "not empty", "--force")
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["notes.txt"]
    assert (tmp_path / "w" / "notes.txt").read_text() == "mine"


def test_rank_against_a_dead_port(tmp_path, dead_port):
    r = recstack("rank", "--target", f"127.0.0.1:{dead_port}", "--user-id", "1", "--timeout", "5", cwd=tmp_path)
    assert_one_line_error(r, 1, "rank", "UNAVAILABLE")


def test_bench_with_a_missing_checkpoint_leaves_no_folder(tmp_path):
    r = recstack("bench", "retrieval", "--checkpoint", "missing.pt", cwd=tmp_path)
    assert_one_line_error(r, 1, "bench retrieval", "missing.pt")
    assert not list(tmp_path.iterdir())  # the default ./runs/bench-retrieval-<time>/ was removed again


# The same rule for the other failures found by trying every command with missing or bad paths,
# bad --set keys and values and bad numbers: (arguments, exit status, what the line names).
CASES = [
    (["frobnicate"], 2, "", "invalid choice"),
    (["simulate", "--preset", "tiny"], 2, "simulate", "--out"),
    (["simulate", "--preset", "huge", "--out", "w"], 2, "simulate", "huge"),
    (["simulate", "--preset", "tiny", "--out", "w", "--set", "n_userz=3"], 2, "simulate", "n_users"),
    (["simulate", "--preset", "tiny", "--out", "w", "--set", "n_users=-5"], 2, "simulate", "n_users"),
    (["simulate", "--preset", "tiny", "--out", "w", "--shard-rows", "0"], 2, "simulate", "shard_rows"),
    (["simulate", "--preset", "tiny", "--out", "w", "--seed", "x"], 2, "simulate", "--seed"),
    (["experiment", "cvr", "--data", "nodir", "--out", "w"], 2, "experiment", "nodir"),
    (["experiment", "cvr", "--data", "nodir", "--out", "w", "--seeds", "a,b"], 2, "experiment", "--seeds"),
    (["export", "--runs", "nodir", "--out", "w"], 1, "export", "nodir"),
    (["bench", "cascade", "--data", "nodir"], 2, "bench cascade", "--artifacts"),
    (["bench", "train", "--data", "nodir", "--steps", "0"], 2, "bench train", "--steps"),
    (["loadtest", "--qps", "0"], 2, "loadtest", "qps"),
    (["loadtest", "--connections", "0"], 2, "loadtest", "connections"),
    (["loadtest", "--data", "nodir"], 2, "loadtest", "nodir"),
    (["rank"], 2, "rank", "--user-id"),
    (["rank", "--user-id", "1", "--behaviour", "12:view"], 2, "rank", "click, purchase"),
    (["rank", "--user-id", "1", "--behaviour", "x"], 2, "rank", "'x'"),
    (["reload"], 2, "reload", "RECSTACK_ADMIN_TOKEN"),
    (["model-info", "--admin-token-file", "missing-token"], 1, "model-info", "missing-token"),
]


@pytest.mark.parametrize("args,status,command,needle", CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_each_failure_is_one_line(tmp_path, args, status, command, needle):
    r = recstack(*args, cwd=tmp_path)
    assert_one_line_error(r, status, command, needle)
    assert not list(tmp_path.iterdir())  # nothing written, not even an empty folder
