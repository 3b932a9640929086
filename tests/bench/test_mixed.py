"""The mixed-load benchmark through a real gRPC server with a feature store, at tiny sizes:
no failed call, every acknowledged event readable from the store afterwards, refused batches
counted as failed and never as acknowledged; the report states what was measured."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from recstack.bench import mixed as M
from recstack.bench.mixed_report import report
from recstack.serving.events import LivePath
from recstack.serving.server import build_server
from recstack.serving.store import open_store

N_ITEMS = 300  # make_fake_bundle's corpus
USERS = np.arange(40, dtype=np.int64)  # known (0..29) and unknown ids: the store keeps both

# Outstanding calls (2 Rank + 1 LogEvents) stay under the server's 4 RPC threads, and the
# deadline is far beyond any call's time, so no call can be shed or time out however slow
# the machine is: a failure here is a real one.
TINY = M.MixedConfig(qps=20.0, events_per_s=40.0, batch=4, duration_s=1.0, warmup_s=0.0, concurrency=2,
                     event_concurrency=1, timeout_s=60.0)


@pytest.fixture
def served(tmp_path, make_fake_bundle):
    make_fake_bundle(tmp_path / "artifacts")
    store = open_store(str(tmp_path / "fs.sqlite3"))
    server, port, _ = build_server(tmp_path / "artifacts", max_workers=4, live=LivePath(store))
    yield {"target": f"127.0.0.1:{port}", "spec": str(tmp_path / "fs.sqlite3")}
    server.stop(None)
    store.close()


def test_mixed_load_fails_no_call_and_every_acknowledged_event_is_readable(served):
    reader = open_store(served["spec"])
    res = M.measure(served["target"], USERS, N_ITEMS, TINY, reader, server_pid=os.getpid())  # served in process
    reader.close()
    ev, back = res["events"], res["readback"]
    assert set(res["cpu_cores_used"]["mixed"]) == {"server", "client"} and res["cpu_cores_used"]["mixed"]["server"] >= 0
    assert res["rank_only"]["status"] == {"OK": res["rank_only"]["sent"]} and res["rank_only"]["sent"] == 20
    assert res["mixed"]["status"] == {"OK": res["mixed"]["sent"]} and res["mixed"]["sent"] == 20
    assert ev["failed_calls"] == 0 and ev["calls_sent"] == 10 and ev["status"] == {"OK": 10}
    assert ev["events_acknowledged"] == ev["events_sent"] == 40
    assert back == {"acknowledged": 40, "per_user_bound": reader.config.max_events, "expected_readable": 40,
                    "readable": 40, "missing": 0}
    assert M.store_size(served["spec"])["rows"] == 40  # the store held nothing before
    res.update(artifacts="fake", data="fake", store=served["spec"], store_size=M.store_size(served["spec"]))
    res["targets"] = t = M.targets(res)
    assert t["zero_failed_calls"] and t["acknowledged_all_readable"]
    md = report(res)
    assert "| Rank + LogEvents | 20 |" in md and "missing: 0" in md and "0 failed calls: met" in md


def test_refused_batches_are_failed_calls_and_not_acknowledged(served):
    """Items drawn beyond the corpus make some batches invalid: the server refuses them whole,
    the sender counts them failed, and only the accepted batches are looked up (all found)."""
    cfg = M.MixedConfig(**{**TINY.__dict__, "batch": 2})
    reader = open_store(served["spec"])
    res = M.measure(served["target"], USERS, 2 * N_ITEMS, cfg, reader)
    reader.close()
    ev, back = res["events"], res["readback"]
    assert ev["status"].get("INVALID_ARGUMENT", 0) == ev["failed_calls"] > 0
    assert ev["events_acknowledged"] == ev["events_sent"] - 2 * ev["failed_calls"] == back["acknowledged"] > 0
    assert back["missing"] == 0 and back["readable"] == back["acknowledged"]
    assert M.store_size(served["spec"])["rows"] == back["acknowledged"]
    res.update(artifacts="fake", data="fake", store=served["spec"], store_size=None)
    assert not M.targets(res)["zero_failed_calls"]


def test_events_are_drawn_in_funnel_proportions_with_valid_fields():
    d = M.draw_events(np.random.default_rng(0), USERS, N_ITEMS, 20_000)
    assert d["item_id"].min() >= 0 and d["item_id"].max() < N_ITEMS
    assert set(d["user_id"].tolist()) <= set(USERS.tolist())
    from recstack import features as F

    share = {k: float(np.mean(d["kind"] == F.EVENT_KINDS.index(k))) for k in M.KIND_MIX}
    assert all(abs(share[k] - M.KIND_MIX[k][0]) < 0.02 for k in M.KIND_MIX)
    no_dwell = np.isin(d["kind"], [F.EVENT_KINDS.index(k) for k, (_, m) in M.KIND_MIX.items() if m == 0])
    assert (d["dwell"][no_dwell] == 0).all() and (d["dwell"][~no_dwell] > 0).mean() > 0.99


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="batch"):
        M.MixedConfig(batch=0)
    with pytest.raises(ValueError, match="warmup_s"):
        M.MixedConfig(warmup_s=-1)


def test_cli_refuses_a_bad_config_or_data_folder_in_one_line(tmp_path, capsys):
    from recstack.cli import main

    args = ["bench", "mixed", "--artifacts", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    assert main(args + ["--data", str(tmp_path), "--batch", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "batch" in err and "must be >= 1" in err
    assert main(args + ["--data", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no world.json" in err
    assert not (tmp_path / "out").exists()  # nothing left behind


class _Answer:
    """A finished LogEvents call: its code and, when OK, how many events it accepted."""

    def __init__(self, code, accepted: int):
        self._code, self._accepted = code, accepted

    def code(self):
        return self._code

    def result(self):
        from recstack.v1 import ranking_pb2 as pb

        return pb.LogEventsResponse(accepted=self._accepted)

    def add_done_callback(self, fn):
        fn(self)


class _ScriptedStub:
    """EventService whose LogEvents answers with `codes`, in order, one per attempt."""

    def __init__(self, codes, accepted: int):
        self.codes, self.accepted, self.attempts = list(codes), accepted, 0
        self.LogEvents = self

    def future(self, request, timeout):
        self.attempts += 1
        return _Answer(self.codes.pop(0), self.accepted)


@pytest.mark.parametrize("codes, status, retried", [
    (["RESOURCE_EXHAUSTED", "UNAVAILABLE", "OK"], {"OK": 1}, {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 1}),
    (["INVALID_ARGUMENT"], {"INVALID_ARGUMENT": 1}, {}),  # a refused batch is not sent again
])
def test_the_sender_sends_a_refused_unacknowledged_batch_again(codes, status, retried):
    import grpc

    sender = M.EventSender("127.0.0.1:1", USERS, N_ITEMS, TINY)
    stub = _ScriptedStub([getattr(grpc.StatusCode, c) for c in codes], TINY.batch)
    assert sender.slots.acquire(blocking=False)
    sender.outstanding = 1
    sender._attempt(stub, 0, 123.0, time.perf_counter(), sender._batch(0, 123.0), 1e-3)
    deadline = time.monotonic() + 60.0  # a bound on reaching the state, not a timing
    while sender.outstanding and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sender.outstanding == 0 and stub.attempts == len(codes)
    assert sender.status == status and sender.retried == retried
    assert sender.acked == ([(0, 123.0)] if status == {"OK": 1} else [])
