"""Prometheus metrics of one serving process, and its text endpoint.

    m = ServingMetrics()                       # a registry of its own (several servers per test process)
    m.observe_stages({"retrieval_ms": 1.2, ...}); m.count("Rank", "OK")
    httpd, port = m.start_http("127.0.0.1", 0)  # GET /metrics -> Prometheus text format; httpd.shutdown()

Series (all prefixed `recstack_`):
    stage_latency_seconds{stage}      histogram: features, retrieval, coarse, fine, total (server side)
    rpc_latency_seconds{method}       histogram: handler time, validation and serialisation included
    requests_total{method,code}       counter by gRPC status code name (OK, INVALID_ARGUMENT, ...)
    in_flight{method}                 gauge: calls running in a handler
    queue_depth                       gauge: Rank calls admitted and waiting for a cascade slot
    model_info{version}               gauge, 1 for the loaded version (the only series with value 1)
    reloads_total{result}             counter: ok / failed
    degraded_features_total           counter: Rank calls served without the live feature store (it failed)
    impressions_logged_total          counter: impression rows written to the impression log
    live_log_dropped_total            counter: batches (a Rank response, a LogEvents call) dropped: the log's queue was full
    degraded_retrieval_total          counter: Rank answers served from popularity (retrieval backend down)
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self.queue_depth = Gauge("recstack_queue_depth", "Rank calls admitted and waiting for a cascade slot", registry=r)
        self.model_info = Gauge("recstack_model_info", "The loaded model version (value 1)", ["version"], registry=r)
        self.reloads = Counter("recstack_reloads", "Model loads by result", ["result"], registry=r)
        self.degraded_features = Counter("recstack_degraded_features",
                                         "Rank calls served from the request and the snapshot: the feature store failed",
                                         registry=r)
        self.impressions_logged = Counter("recstack_impressions_logged", "Impression rows written to the impression log",
                                          registry=r)
        self.log_dropped = Counter("recstack_live_log_dropped",
                                   "Impression / event log batches dropped because the writer's queue was full", registry=r)
        self.degraded_retrieval = Counter("recstack_degraded_retrieval",
                                          "Rank answers whose candidates came from popularity (retrieval backend "
                                          "unavailable)", registry=r)
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

    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> tuple["MetricsHTTPServer", int]:
        """Serve GET /metrics on host:port (see MetricsHTTPServer); returns (server, bound port)."""
        httpd = MetricsHTTPServer(self, host, port)
        return httpd, httpd.port


class MetricsHTTPServer:
    """GET /metrics (Prometheus text format) on one event-loop thread.

    Only `/metrics` answers (200; any other path 404, any method but GET and HEAD 405). Each
    connection carries one request and is then closed, and a connection that sends no complete
    request head within `idle_timeout_s` is dropped: an idle or slow client costs a coroutine,
    never a thread. The bind happens in the constructor, so an address in use raises OSError there.
    """

    MAX_HEAD_BYTES = 16 << 10

    def __init__(self, metrics: ServingMetrics, host: str = "127.0.0.1", port: int = 0, idle_timeout_s: float = 10.0):
        self.metrics, self.idle_timeout_s = metrics, idle_timeout_s
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._handle, host, port, limit=self.MAX_HEAD_BYTES))
        except BaseException:
            self._loop.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, name="recstack-metrics", daemon=True)
        self._thread.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout_s)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            body, ctype = b"", "text/plain; charset=utf-8"
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, body = "400 Bad Request", b"bad request\n"
            elif parts[0] not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b"only GET /metrics\n"
            elif parts[1].split("?", 1)[0] != "/metrics":
                status, body = "404 Not Found", b"only /metrics\n"
            else:
                status, body, ctype = "200 OK", generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST
            head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode("latin-1")
            writer.write(head_out + (b"" if parts[:1] == ["HEAD"] else body))
            await asyncio.wait_for(writer.drain(), self.idle_timeout_s)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def shutdown(self) -> None:
        """Stop listening, drop open connections and end the thread (idempotent)."""
        if self._loop.is_closed():
            return

        async def stop():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def server_close(self) -> None:  # the http.server name for the same thing
        self.shutdown()
