"""Metrics and logs: the Prometheus text endpoint has per-stage latency histograms, request counts
by status code, queue depth and the loaded model version; every call logs one JSON line with its
request id, which is also returned to the caller."""
from __future__ import annotations

import json
import logging
import socket
import threading
import urllib.error
import urllib.request

import grpc
import pytest

from recstack.serving import client
from recstack.serving.prometheus import ServingMetrics
from recstack.serving.server import REQUEST_ID_KEY, build_server
from recstack.v1 import ranking_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, make_fake_bundle):
    root = tmp_path_factory.mktemp("metrics")
    make_fake_bundle(root, version="vmetrics")
    return root


def test_prometheus_endpoint(artifacts):
    metrics = ServingMetrics()
    httpd, mport = metrics.start_http("127.0.0.1", 0)
    server, port, _ = build_server(artifacts, max_workers=2, metrics=metrics)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            for u in range(5):
                stub.Rank(client.make_request(u, 5, debug=False), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Rank(client.make_request(-1, 5), timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
    finally:
        server.stop(None)
        httpd.shutdown()
        httpd.server_close()
    for stage in ("features", "retrieval", "coarse", "fine", "total"):
        # 5 ranked calls (+ none from the warm-up, which runs before the server takes traffic)
        assert f'recstack_stage_latency_seconds_count{{stage="{stage}"}} 5.0' in text
        assert f'recstack_stage_latency_seconds_bucket{{le="0.001",stage="{stage}"}}' in text
    assert 'recstack_requests_total{code="OK",method="Rank"} 5.0' in text
    assert 'recstack_requests_total{code="INVALID_ARGUMENT",method="Rank"} 1.0' in text
    assert 'recstack_rpc_latency_seconds_count{method="Rank"} 6.0' in text
    assert "recstack_queue_depth 0.0" in text
    assert 'recstack_in_flight{method="Rank"} 0.0' in text
    assert 'recstack_model_info{version="vmetrics"} 1.0' in text
    assert 'recstack_reloads_total{result="ok"} 1.0' in text


def test_structured_access_log_with_request_ids(artifacts, caplog):
    server, port, _ = build_server(artifacts, max_workers=2)
    try:
        with caplog.at_level(logging.INFO, logger="recstack.access"), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RankingServiceStub(ch)
            resp, call = stub.Rank.with_call(client.make_request(3, 4), timeout=10, metadata=((REQUEST_ID_KEY, "req-abc.1"),))
            assert dict(call.trailing_metadata())[REQUEST_ID_KEY] == "req-abc.1"
            with pytest.raises(grpc.RpcError) as e:  # a server-made id when the caller sends none (or a bad one)
                stub.Rank(client.make_request(3, 0), timeout=10, metadata=((REQUEST_ID_KEY, "bad id with spaces"),))
            generated = dict(e.value.trailing_metadata())[REQUEST_ID_KEY]
            assert generated != "bad id with spaces" and len(generated) == 16
    finally:
        server.stop(None)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "recstack.access"]
    ok = next(x for x in lines if x["request_id"] == "req-abc.1")
    assert ok["method"] == "Rank" and ok["code"] == "OK" and ok["user_id"] == 3 and ok["version"] == resp.model_version
    assert ok["returned"] == 4 and ok["ms"] > 0 and ok["cold_start"] is False
    bad = next(x for x in lines if x["request_id"] == generated)
    assert bad["code"] == "INVALID_ARGUMENT"


def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_metrics_answers_only_metrics():
    metrics = ServingMetrics()
    metrics.count("Rank", "OK")
    httpd, port = metrics.start_http("127.0.0.1", 0)
    try:
        status, body = _get(port, "/metrics")
        assert status == 200 and b'recstack_requests_total{code="OK",method="Rank"} 1.0' in body
        assert _get(port, "/metrics?name[]=x")[0] == 200
        for path in ("/", "/metricsx", "/metrics/", "/favicon.ico", "/../metrics"):
            assert _get(port, path)[0] == 404, path
        assert _get(port, "/metrics", method="POST")[0] == 405
        assert _get(port, "/metrics", method="HEAD") == (200, b"")
    finally:
        httpd.shutdown()


def test_idle_metrics_connections_hold_no_thread():
    metrics = ServingMetrics()
    httpd, port = metrics.start_http("127.0.0.1", 0)
    idle = []
    try:
        before = threading.active_count()
        for _ in range(50):  # connections that never send a request (or send half of one)
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /metr")
            idle.append(s)
        assert _get(port, "/metrics")[0] == 200  # still answering
        assert threading.active_count() - before < 10  # not a thread per connection
    finally:
        for s in idle:
            s.close()
        httpd.shutdown()
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
