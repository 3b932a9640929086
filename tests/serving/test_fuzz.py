"""Hostile requests: a property-based fuzz of >= 5,000 malformed Rank calls against an in-process
server. Allowed outcomes: INVALID_ARGUMENT (naming a field), RESOURCE_EXHAUSTED (oversized), or a
valid ranking (cold start exactly when the user is unknown). Never UNKNOWN or INTERNAL, never a
stack trace in the details, and the server's memory stays flat (the server runs in a child
process, so its RSS is not mixed with hypothesis's own bookkeeping).

RECSTACK_FUZZ_REQUESTS (default 5000) sets the number of requests (one hypothesis example each).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recstack.v1 import ranking_pb2 as pb

N_REQUESTS = int(os.environ.get("RECSTACK_FUZZ_REQUESTS", "5000"))
N_ITEMS, N_USERS = 300, 30  # the fake bundle's corpus and users (checked against it in `raw_rank`)
MAX_MESSAGE = 16 << 10
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e-300, 5e-324]))
RANK = "/recstack.v1.RankingService/Rank"
STACK = re.compile(r"Traceback|File \"|line \d+, in ")

behaviours = st.builds(
    dict,
    item_id=st.one_of(st.integers(0, N_ITEMS - 1), st.integers(N_ITEMS, N_ITEMS + 5), INT64),
    seconds_ago=st.one_of(st.floats(0, 1e6), FLOATS),
    kind=st.one_of(st.sampled_from([0, 1]), INT32),
    dwell_seconds=st.one_of(st.floats(0, 600), FLOATS),
)


@st.composite
def rank_requests(draw) -> bytes:
    """Serialized RankRequests: valid, malformed fields, huge lists, or raw garbage bytes."""
    kind = draw(st.sampled_from(["fields"] * 12 + ["many_behaviours"] * 4 + ["garbage"] * 4 + ["huge"] * 3 + ["giant"]))
    if kind == "garbage":
        return draw(st.binary(min_size=0, max_size=200))
    if kind == "huge":  # over the server's message limit: refused before parsing
        return b"\x08\x01" + b"\x12\x00" * (MAX_MESSAGE // 2 + draw(st.integers(1, 1000)))
    if kind == "giant":  # over grpc's own receive limit (16x): refused by grpc, which drops the connection
        return b"\x12\x00" * (8 * MAX_MESSAGE + draw(st.integers(1, 1000)))
    req = pb.RankRequest(
        user_id=draw(st.one_of(st.integers(0, N_USERS + 5), INT64)),
        retrieval_size=draw(st.one_of(st.integers(0, 400), INT32)),
        coarse_size=draw(st.one_of(st.integers(0, 300), INT32)),
        debug=draw(st.booleans()),
    )
    if draw(st.booleans()):
        req.num_results = draw(st.one_of(st.integers(0, 50), INT32))
    if kind == "fields":
        for b in draw(st.lists(behaviours, max_size=5)):
            req.recent_behaviours.add(**b)
    else:  # around and far over the 50-behaviour limit (one drawn behaviour, repeated: cheap to generate)
        b = draw(behaviours)
        for _ in range(draw(st.integers(45, 400))):
            req.recent_behaviours.add(**b)
    return req.SerializeToString()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


_SERVER = """
import sys
from recstack.serving.server import build_server
server, port, _ = build_server(sys.argv[1], max_workers=2, max_message_bytes=int(sys.argv[2]))
print(port, flush=True)
sys.stdin.read()  # until the test closes our stdin
server.stop(None)
"""


@pytest.fixture(scope="module")
def raw_rank(tmp_path_factory, make_fake_bundle, fake_vocab):
    assert (fake_vocab.n_items, fake_vocab.n_users) == (N_ITEMS, N_USERS)
    root = tmp_path_factory.mktemp("fuzz")
    make_fake_bundle(root)
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(root), str(MAX_MESSAGE)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        port = int(proc.stdout.readline())
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        # raw bytes in, parsed response out: the fuzz controls the exact wire message
        call = channel.unary_unary(RANK, request_serializer=None, response_deserializer=pb.RankResponse.FromString)
        call.target = f"127.0.0.1:{port}"
        yield call, proc.pid
        channel.close()
    finally:
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _oversized(target: str, data: bytes):
    """Messages over grpc's own limit on a channel of their own: grpc answers RESOURCE_EXHAUSTED and
    drops the connection, which would cost the shared channel a reconnect."""
    with grpc.insecure_channel(target) as ch:
        return ch.unary_unary(RANK, request_serializer=None, response_deserializer=pb.RankResponse.FromString)(data, timeout=10)


def _check(call, data: bytes, counts: dict) -> None:
    try:
        resp = _oversized(call.target, data) if len(data) > 16 * MAX_MESSAGE else call(data, timeout=10)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        counts[code.name] = counts.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, details, data[:80])
        assert not STACK.search(details), details
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert len(data) > MAX_MESSAGE, details
        else:
            assert re.match(r"^(request|user_id|num_results|retrieval_size|coarse_size|recent_behaviours(\[\d+\]\.\w+)?):",
                            details), details
        return
    counts["OK"] = counts.get("OK", 0) + 1
    req = pb.RankRequest.FromString(data)
    assert resp.cold_start == (req.user_id >= N_USERS)
    counts["OK_cold_start"] = counts.get("OK_cold_start", 0) + int(resp.cold_start)
    ids = [it.item_id for it in resp.items]
    assert len(ids) == len(set(ids)) and all(0 <= i < N_ITEMS for i in ids)
    for it in resp.items:
        assert math.isfinite(it.score) and 0 <= it.pctr <= 1 and 0 <= it.pcvr <= 1


def test_fuzz_malformed_requests(raw_rank):
    raw_rank, pid = raw_rank
    counts: dict[str, int] = {}
    sent, in_calls = [0], [0.0]

    @settings(max_examples=N_REQUESTS, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rank_requests())
    def prop(data):
        sent[0] += 1
        t = time.perf_counter()
        _check(raw_rank, data, counts)
        in_calls[0] += time.perf_counter() - t

    for _ in range(200):  # warm the allocator and the server before the memory baseline
        _check(raw_rank, pb.RankRequest(user_id=1, num_results=10).SerializeToString(), counts)
    counts.clear()
    before = _rss_mb(pid)
    t0 = time.perf_counter()
    prop()
    elapsed = time.perf_counter() - t0
    after = _rss_mb(pid)
    print(f"\nfuzz: {sent[0]} requests in {elapsed:.1f}s ({in_calls[0]:.1f}s in calls), server RSS {before:.0f} -> {after:.0f} MB, "
          f"outcomes {sorted(counts.items())}")
    assert sent[0] >= N_REQUESTS * 0.95  # hypothesis may stop a little short on duplicates
    for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "OK_cold_start"):
        assert counts.get(code, 0) > 0, (code, counts)  # every outcome was exercised
    assert after - before < 20, (before, after)  # MB, over 5,000 calls
