"""Prometheus metrics of one serving process, and its text endpoint.

    m = ServingMetrics()                       # a registry of its own (several servers per test process)
    m.observe_stages({"retrieval_ms": 1.2, ...}); m.count("Rank", "OK")
    httpd, port = m.start_http("127.0.0.1", 0)  # GET /metrics -> Prometheus text format

Series (all prefixed `recstack_`):
    stage_latency_seconds{stage}      histogram: features, retrieval, coarse, fine, total (server side)
    rpc_latency_seconds{method}       histogram: handler time, validation and serialisation included
    requests_total{method,code}       counter by gRPC status code name (OK, INVALID_ARGUMENT, ...)
    in_flight{method}                 gauge: calls running in a handler
    queue_depth                       gauge: calls accepted and waiting for a handler thread
    model_info{version}               gauge, 1 for the loaded version (the only series with value 1)
    reloads_total{result}             counter: ok / failed
"""
from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

STAGES = ("features", "retrieval", "coarse", "fine", "total")
# 0.1 ms .. 2.5 s: the cascade's stages span sub-millisecond (coarse) to tens of ms (fine, large corpus)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25,
           0.5, 1.0, 2.5)


class ServingMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_latency = Histogram("recstack_stage_latency_seconds", "Cascade stage latency (server side)",
                                       ["stage"], buckets=BUCKETS, registry=r)
        self.rpc_latency = Histogram("recstack_rpc_latency_seconds", "RPC handler latency", ["method"],
                                     buckets=BUCKETS, registry=r)
        self.requests = Counter("recstack_requests", "RPCs by method and gRPC status code", ["method", "code"], registry=r)
        self.in_flight = Gauge("recstack_in_flight", "Calls running in a handler", ["method"], registry=r)
        self.queue_depth = Gauge("recstack_queue_depth", "Calls accepted and waiting for a handler thread", registry=r)
        self.model_info = Gauge("recstack_model_info", "The loaded model version (value 1)", ["version"], registry=r)
        self.reloads = Counter("recstack_reloads", "Model loads by result", ["result"], registry=r)
        self._version: str | None = None
        self._lock = threading.Lock()

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage in STAGES:
            v = timings_ms.get(f"{stage}_ms")
            if v is not None:
                self.stage_latency.labels(stage).observe(v / 1e3)

    def count(self, method: str, code: str, seconds: float | None = None) -> None:
        self.requests.labels(method, code).inc()
        if seconds is not None:
            self.rpc_latency.labels(method).observe(seconds)

    def set_version(self, version: str) -> None:
        with self._lock:
            if self._version is not None and self._version != version:
                self.model_info.remove(self._version)
            self.model_info.labels(version).set(1)
            self._version = version

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(lambda: float(depth()))

    def value(self, name: str, **labels) -> float | None:
        """One sample's current value, e.g. value("recstack_requests_total", method="Rank", code="OK")."""
        return self.registry.get_sample_value(name, labels)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def start_http(self, host: str = "127.0.0.1", port: int = 0):
        """Serve GET /metrics on host:port in a daemon thread; returns (http server, bound port)."""
        httpd, _thread = start_http_server(port, addr=host, registry=self.registry)
        return httpd, httpd.server_address[1]
