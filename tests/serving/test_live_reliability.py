"""The live path as processes: `recstack serve --workers 2` on each feature store. An event
acknowledged by one worker is seen by the next Rank on the other; acknowledged events survive
kill -9 of the whole server (parent and workers) and a restart."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from recstack.serving import client
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
TOKEN = "live-token"
USER = 25  # make_fake_bundle: a profile, no snapshot behaviours

_SERVER = r"""
import sys
from recstack.serving import process
sys.exit(process.serve(sys.argv[1], port=0, workers=2, grace_s=2.0, admin_token=sys.argv[3], feature_store=sys.argv[2]))
"""


def _start(artifacts: Path, spec: str):
    """-> (process, target); its own process group, so kill -9 reaches the workers too."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(artifacts), spec, TOKEN], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put(None)], daemon=True).start()
    seen, deadline = [], time.monotonic() + 120
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "".join(seen)[-3000:]
        seen.append(line)
        m = re.search(r"started \d+ serving processes on (\S+:\d+)", line)
        if m:
            threading.Thread(target=lambda: [seen.append(x) for x in iter(lines.get, None)], daemon=True).start()
            proc.log = seen
            return proc, m.group(1)


def _worker_channels(target: str, timeout: float = 120) -> dict[int, grpc.Channel]:
    """One open channel per worker process, keyed by its pid (a channel keeps its connection,
    so its calls all reach the same worker). Workers bind the port only once ready."""
    chans: dict[int, grpc.Channel] = {}
    deadline = time.monotonic() + timeout
    while len(chans) < 2:
        assert time.monotonic() < deadline, f"reached only workers {sorted(chans)}"
        ch = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            pid = pb_grpc.ModelServiceStub(ch).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),),
                wait_for_ready=True).pid
        except grpc.RpcError:
            ch.close()
            time.sleep(0.1)
            continue
        if pid in chans:
            ch.close()
        else:
            chans[pid] = ch
    return chans


def _rank(ch: grpc.Channel, user_id: int) -> pb.RankResponse:
    return pb_grpc.RankingServiceStub(ch).Rank(client.make_request(user_id, 10), timeout=30)


def _log(ch: grpc.Channel, events) -> pb.LogEventsResponse:
    return pb_grpc.EventServiceStub(ch).LogEvents(pb.LogEventsRequest(events=events), timeout=30)


def _kill9(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture(params=["sqlite", "redis", "redis-cluster"])
def store_spec(request, tmp_path):
    if request.param == "sqlite":
        return ""  # the default: feature_store.sqlite3 under the artifacts root
    return request.getfixturevalue({"redis": "redis_server", "redis-cluster": "redis_cluster"}[request.param]).url


def test_read_your_writes_across_workers_and_acked_events_survive_kill9(tmp_path, make_fake_bundle, store_spec):
    artifacts = tmp_path / "artifacts"
    make_fake_bundle(artifacts)
    proc, target = _start(artifacts, store_spec)
    chans: dict[int, grpc.Channel] = {}
    try:
        chans = _worker_channels(target)
        (pid_a, a), (pid_b, b) = sorted(chans.items())
        assert _rank(b, USER).stage_counts.sequence_length == 0
        now = time.time()
        assert _log(a, [client.event(USER, 3, now - 30, "click", 5.0), client.event(USER, 4, now - 20, "purchase")]).accepted == 2
        assert _rank(b, USER).stage_counts.sequence_length == 2  # written through worker a, read by worker b
        assert _log(b, [client.event(USER, 5, now - 10, "click", 2.0)]).accepted == 1
        assert _rank(a, USER).stage_counts.sequence_length == 3
        for ch in chans.values():
            ch.close()
        _kill9(proc)  # no drain, no shutdown hook: only what was durable is left
        proc, target = _start(artifacts, store_spec)
        chans = _worker_channels(target)
        for ch in chans.values():
            resp = _rank(ch, USER)
            assert resp.stage_counts.sequence_length == 3 and not resp.degraded_features
    finally:
        for ch in chans.values():
            ch.close()
        if proc.poll() is None:
            _kill9(proc)
    if store_spec == "":
        assert (artifacts / "feature_store.sqlite3").exists()  # beside the bundles, not inside one
