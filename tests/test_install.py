"""Light installs: serving and calling the model need no torch, scipy, scikit-learn or matplotlib.

The fresh-venv test installs `recstack[serve]` from PyPI into a new virtual environment (no
system site packages: a missing dependency cannot hide behind the development install), then
serves a bundle and calls Rank and Score in it, from outside the checkout."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("torch", "scipy", "sklearn", "matplotlib")
INSTALL_TIMEOUT_S = 900


def test_serve_rank_and_the_client_import_no_training_library():
    code = textwrap.dedent(f"""
        import sys
        from recstack import cli
        cli.build_parser()
        import recstack.serving.server, recstack.serving.process, recstack.serving.client, recstack.cli_rpc
        print(",".join(m for m in {TRAINING_ONLY!r} if m in sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert r.stdout.strip() == "", f"imported: {r.stdout}"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


SERVE_SCRIPT = """
import json, sys
from recstack.serving.client import make_request
from recstack.serving.server import build_server
from recstack.v1 import ranking_pb2 as pb, ranking_pb2_grpc as pb_grpc
import grpc
server, port, _ = build_server(sys.argv[1], max_workers=2)
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    stub = pb_grpc.RankingServiceStub(channel)
    ranked = stub.Rank(make_request(3, 5), timeout=60)
    scored = stub.Score(pb.ScoreRequest(user_id=3, item_ids=[it.item_id for it in ranked.items]), timeout=60)
server.stop(None)
print(json.dumps({"ranked": [it.score for it in ranked.items], "scored": [it.score for it in scored.items],
                  "loaded": sorted(m for m in ("torch", "scipy", "sklearn", "matplotlib") if m in sys.modules)}))
"""


def test_a_fresh_serve_install_serves_a_bundle(make_fake_bundle, tmp_path):
    if not _pypi_reachable():
        pytest.skip("pypi.org is not reachable from this machine: the [serve] install cannot be built")
    bundle = make_fake_bundle(tmp_path / "artifacts")
    # the project's files only (no build output in the checkout, no .venv copied)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for pkg in ("recstack", "retrieval", "coarse_rank", "fine_rank"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                        f"{src}[serve]"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=INSTALL_TIMEOUT_S)
    assert r.returncode == 0, f"pip install .[serve] failed: {r.stderr[-2000:]}"
    installed = subprocess.run([str(py), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                               capture_output=True, text=True, env=env, check=True).stdout
    names = {p["name"].lower() for p in json.loads(installed)}
    assert not names & {"torch", "scipy", "scikit-learn", "matplotlib", "grpcio-tools"}, sorted(names)
    install_s = time.monotonic() - t0

    out = subprocess.run([str(py), "-c", SERVE_SCRIPT, str(bundle)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["ranked"]) == 5 and result["scored"] == result["ranked"] and result["loaded"] == []
    cli = subprocess.run([str(venv / "bin" / "recstack"), "serve", "--help"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert cli.returncode == 0 and "--artifacts" in cli.stdout, cli.stderr[-2000:]
    print(f"fresh [serve] venv: created and installed in {install_s:.0f} s")
