"""The gRPC ranking server: recstack.v1.RankingService (+ ModelService, health, reflection, metrics).

    server, port, servicer = build_server("artifacts")   # started, model loaded and warm, health SERVING

The process around it (`serve`: workers, signals, drain, logging) is `recstack.serving.process`.

Status codes: INVALID_ARGUMENT (bad or unparsable request; the message names the field),
UNAVAILABLE (no model loaded yet; LogEvents: the feature store fails), RESOURCE_EXHAUSTED (a Rank
call whose estimated queue wait does not fit its deadline or the max queue wait, or over the hard
cap of `max_workers + max_queue` in flight, or LogEvents over its own bound: refused at once rather
than queued to miss its deadline; or a message over `max_message_bytes`), DEADLINE_EXCEEDED
(the deadline passed before a stage or a model: later ones are skipped), CANCELLED (the caller left),
FAILED_PRECONDITION (Reload of a bundle that fails to load; the old model keeps serving),
UNAUTHENTICATED / PERMISSION_DENIED (ModelService without / with a wrong admin token), INTERNAL
(anything else, logged with the request id; never UNKNOWN, never a stack trace in the details).

Rank (with Score) and LogEvents are bounded apart, each with threads of its own: a LogEvents
call waiting on the feature store never holds a thread or an admission place Rank needs, and
over its own bound it is refused (RESOURCE_EXHAUSTED, nothing written) before Rank is. Health
checks and ModelService calls are served by threads of their own (`PROBE_THREADS`) and never
shed, so a probe tells a busy server from a dead one. Every call that reaches the server is
counted in the metrics by its final code (a call finished after its caller left counts as
CANCELLED or DEADLINE_EXCEEDED, not OK).

Access: the server listens on loopback unless told otherwise; ModelService (model info, reload)
exists only when an admin token is configured and then requires `authorization: Bearer <token>`
metadata (compared in constant time); TLS (server certificate) is optional; reflection can be
switched off.
"""
from __future__ import annotations

import datetime as _dt
import functools
import gc
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recstack import bundle as B
from recstack.serving.admission import HealthServicer, IngestAdmission, RankAdmission
from recstack.serving.cascade import Cascade, DeadlineExceeded
from recstack.serving.events import LivePath
from recstack.serving.messages import Abort, Malformed, parser, response_from_ranking
from recstack.serving.memory import HeapFreezer, trim_heap
from recstack.serving.prometheus import ServingMetrics
from recstack.serving.scoring import log_user_key, response_from_scores, score_candidates
from recstack.serving.store import StoreUnavailable
from recstack.serving.validate import ServingLimits, ValidationError, validate_rank_request, validate_score_request
from recstack.v1 import ranking_pb2 as pb

log = logging.getLogger("recstack.serving")
access_log = logging.getLogger("recstack.access")  # one JSON line per call, with its request id

RANKING_SERVICE = pb.DESCRIPTOR.services_by_name["RankingService"].full_name  # recstack.v1.RankingService
MODEL_SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"].full_name
EVENT_SERVICE = pb.DESCRIPTOR.services_by_name["EventService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# threads beyond the Rank bound, for health checks, ModelService calls and turning away Rank
# calls over the bound (each of which takes microseconds)
PROBE_THREADS = 4


class ServeError(OSError):
    """The server cannot start (e.g. its port is in use); the message says why, in one line."""


def _now_iso(timespec: str = "seconds") -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec=timespec)


@dataclass(frozen=True)
class TLSConfig:
    """Server certificate chain and private key (PEM files)."""

    cert_file: str
    key_file: str

    def credentials(self) -> grpc.ServerCredentials:
        key, cert = Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)])



class RankingServicer:
    """Holds the serving model and implements RankingService and ModelService.

    The model is one attribute read once per request, so Reload swaps it atomically: calls in
    flight finish on the model they started with, and every response names that model's version.
    """

    def __init__(self, artifacts_root: Path, limits: ServingLimits, health_servicer: health.HealthServicer,
                 onnx_threads: int = 1, metrics: ServingMetrics | None = None, admin_token: str | None = None,
                 worker: int = 0, admission: RankAdmission | None = None, bundle_key: bytes | None = None,
                 live: LivePath | None = None, cascade_options: dict | None = None,
                 ingest: IngestAdmission | None = None):
        self.live = live or LivePath()  # feature store and impression log (none: the snapshot and the request)
        self.artifacts_root = artifacts_root
        self.limits = limits
        self.health = health_servicer
        self.admission = admission or RankAdmission(4, 12)
        self.ingest = ingest or IngestAdmission(2, 8)  # LogEvents' own bound
        self._bundle_key = bundle_key
        self.onnx_threads = onnx_threads
        self.cascade_options = dict(cascade_options or {})  # Cascade.load options (the retrieval backend, ...)
        self.metrics = metrics or ServingMetrics()
        self.live.bind(self.metrics, worker)
        self._admin_token = admin_token.encode() if admin_token else None
        self.worker = worker
        self.cascade: Cascade | None = None
        self.loaded_at = ""
        self.last_load_error = ""
        self.draining = False
        self._reload_lock = threading.Lock()  # one load at a time; serving never waits on it
        self.heap = HeapFreezer()  # a loaded model stays out of the collector's full collections

    # -- model lifecycle --------------------------------------------------------------------

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", RANKING_SERVICE, MODEL_SERVICE):
            self.health.set(service, status)

    def begin_drain(self) -> None:
        """Health NOT_SERVING for good (watchers are told, then their streams end, so they do
        not hold the server's stop for its grace period); calls in flight carry on."""
        self.draining = True
        self.health.enter_graceful_shutdown()
        close_watches = getattr(self.health, "close_watches", None)  # grpc's own servicer has none
        if close_watches is not None:
            close_watches()

    def load(self, path: str | Path) -> Cascade:
        """Verify, load and warm the bundle at `path`, then swap it in. Any failure raises
        BundleError naming the cause, and the current model keeps serving."""
        with self._reload_lock:
            t0 = time.perf_counter()
            try:
                cascade = Cascade.load(path, onnx_threads=self.onnx_threads, key=self._bundle_key,
                                       **self.cascade_options)  # verified, warmed
            except Exception as e:
                self.metrics.reloads.labels("failed").inc()
                reason = str(e) if isinstance(e, B.BundleError) else f"{type(e).__name__}: {e}"
                self.last_load_error = f"{path}: {reason}"[:2000]
                log.error("refused bundle %s: %s%s", path, reason,
                          f" (still serving {self.cascade.version})" if self.cascade else "")
                if isinstance(e, B.BundleError):
                    raise
                raise B.BundleError(f"cannot load {Path(path).name}: {reason}"[:2000]) from e
            old = self.cascade
            self.cascade, self.loaded_at, self.last_load_error = cascade, _now_iso(), ""
            self.live.seed(cascade)
        previous = old.version if old is not None else None
        if old is not None:
            # the heap is trimmed, and frozen again, when the previous model is freed: at once,
            # or when the last call still running on it ends
            self.heap.thaw()
            weakref.finalize(old, trim_heap)
            weakref.finalize(old, self.heap.mark_due)
            del old
            gc.collect()
        else:
            self.heap.mark_due()
        self.heap.freeze_if_due()
        self.metrics.reloads.labels("ok").inc()
        self.metrics.set_version(cascade.version)
        if not self.draining:
            self.set_serving(True)
        log.info("serving model %s from %s in %.2fs%s", cascade.version, cascade.bundle.root,
                 time.perf_counter() - t0, f" (was {previous})" if previous else "")
        return cascade

    def reload(self, version: str = "") -> Cascade:
        """Load `version` (a directory under the artifacts root), or what `current` names when empty."""
        if version:
            try:
                B.check_version_name(version)
            except B.BundleError as e:
                raise ValidationError("version", str(e)) from None
            path = B.safe_path(self.artifacts_root, version)
            if not path.is_dir():
                raise Abort(grpc.StatusCode.NOT_FOUND, f"version: no bundle {version!r} under the artifacts root")
        else:
            path = B.resolve_bundle(self.artifacts_root)
        return self.load(path)

    def model_info(self) -> pb.ModelInfo:
        c = self.cascade
        info = pb.ModelInfo(limits=pb.StageLimits(**self.limits.to_dict()), pid=os.getpid(), worker=self.worker,
                            last_load_error=self.last_load_error)
        if c is not None:
            info.model_version = c.version
            info.bundle_path = str(c.bundle.root)
            info.created = str(c.bundle.manifest.get("created", ""))
            info.loaded_at = self.loaded_at
            info.n_items, info.n_users = c.n_items, c.n_users
            info.manifest_json = json.dumps(c.bundle.manifest, sort_keys=True)
        return info

    # -- RPC plumbing ------------------------------------------------------------------------

    def _guard(self, context, method: str, fn):
        """Run `fn` with a request id, metrics and an access log line, mapping every exception to
        a status code: never UNKNOWN, never a stack trace in the details."""
        t0 = time.perf_counter()
        rid = dict(context.invocation_metadata()).get(REQUEST_ID_KEY, "")
        rid = rid if isinstance(rid, str) and _REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
        extra: dict = {"request_id": rid}
        gauge = self.metrics.in_flight.labels(method)
        gauge.inc()
        code, message = grpc.StatusCode.OK, ""
        try:
            response = fn(extra)
            # is_active() turns False only once gRPC's poller has seen the deadline, which a busy
            # machine can delay: the clock says it too
            left = context.time_remaining()
            if context.is_active() and (left is None or left > 0):
                if "on_sent" in extra:  # e.g. the impression log: only answers that go back to the caller
                    extra.pop("on_sent")()
                return response
            raise DeadlineExceeded("deadline exceeded before the response was sent")  # nobody reads it
        except ValidationError as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except DeadlineExceeded as e:
            left = context.time_remaining()
            if context.is_active() or (left is not None and left <= 0):
                code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
            else:  # the caller cancelled: nobody reads this answer, but the metrics and log tell it apart
                code, message = grpc.StatusCode.CANCELLED, str(e).replace("deadline exceeded", "call cancelled")
        except B.BundleError as e:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, f"bundle refused, still serving the previous model: {e}"
        except Abort as e:
            code, message = e.code, str(e)
        except StoreUnavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, f"feature store unavailable, batch not acknowledged (retry it): {e}"
        except Exception:
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method} (request id {rid}; see the server log)"
            log.exception("%s failed (request id %s)", method, rid)
        finally:
            extra.pop("on_sent", None)  # not sent: nothing to do after it
            self.heap.freeze_if_due()  # after a reload whose previous model was freed since
            gauge.dec()
            seconds = time.perf_counter() - t0
            self.metrics.count(method, code.name, seconds)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({"ts": _now_iso("milliseconds"), "request_id": rid, "method": method,
                                            "code": code.name, "ms": round(seconds * 1e3, 3), "pid": os.getpid(),
                                            "worker": self.worker, **extra}))
        context.abort(code, message[:1000])  # raises: outside the try so it is not caught above

    def _check_admin(self, context) -> None:
        token = dict(context.invocation_metadata()).get("authorization", "")
        if not token:
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, "ModelService needs `authorization: Bearer <admin token>` metadata")
        if not isinstance(token, str) or not token.startswith("Bearer "):
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: expected `Bearer <admin token>`")
        if not hmac.compare_digest(token[7:].encode(errors="replace"), self._admin_token or b"\0"):
            raise Abort(grpc.StatusCode.PERMISSION_DENIED, "wrong admin token")

    # -- RPCs -----------------------------------------------------------------------------

    def _admitted(self, context, work, admission: RankAdmission | None = None, what: str = "Rank and Score",
                  before=None):
        """`work(time_remaining)` in the bounded `admission` (Rank's unless given); never for a
        caller who left while queued. With `before` (I/O such as the feature-store read), it runs
        once the call is admitted but before it takes a running slot, and `work(time_remaining,
        before())` follows: slots bound the work that needs the CPU, not waits on I/O."""
        admission = admission or self.admission
        refused = admission.try_admit(context.time_remaining())  # "" = admitted
        if refused:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"overloaded: {what}: {refused}; retry with backoff")
        try:
            if before is not None:
                prepared = before()
                work = functools.partial(work, prepared=prepared)
            remaining = lambda: 0.0 if not context.is_active() else context.time_remaining()  # noqa: E731
            if not admission.acquire(remaining):
                raise DeadlineExceeded("deadline exceeded while the call was queued")
            started = admission.clock()
            try:
                return work(remaining)
            finally:
                admission.release(admission.clock() - started)
        finally:
            admission.leave()

    def _model(self, request) -> Cascade:
        if isinstance(request, Malformed):
            request.abort()
        cascade = self.cascade  # one read: a concurrent Reload cannot change the model mid-request
        if cascade is None:
            raise Abort(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
        return cascade

    def Rank(self, request, context):
        def run(extra):
            cascade = self._model(request)
            query = validate_rank_request(request, self.limits, cascade.n_items, cascade.ids)
            extra.update(user_id=query.user_id, version=cascade.version, **log_user_key(request))
            ranking, degraded, now = self._admitted(context, functools.partial(self.live.rank_read, cascade),
                                                    before=lambda: self.live.read(cascade, query))
            self.metrics.observe_stages(ranking.timings_ms)
            if ranking.degraded_retrieval:
                self.metrics.degraded_retrieval.inc()
                extra["degraded_retrieval"] = True
            extra.update(cold_start=ranking.cold_start, returned=len(ranking.item_ids), degraded=degraded)
            extra["on_sent"] = lambda: self.live.served(extra["request_id"], query.user_id, now, cascade.version,
                                                        ranking, degraded)
            return response_from_ranking(ranking, cascade.version, request.debug, cascade.ids, degraded)

        return self._guard(context, "Rank", run)

    def Score(self, request, context):
        def run(extra):
            cascade = self._model(request)
            query, cands = validate_score_request(request, self.limits, cascade.ids)
            extra.update(user_id=query.user_id, version=cascade.version, candidates=len(cands), **log_user_key(request))
            scores = self._admitted(context, lambda remaining: score_candidates(cascade, query, cands, remaining))
            extra.update(cold_start=scores.cold_start)
            return response_from_scores(scores, cascade, request.debug)

        return self._guard(context, "Score", run)

    def LogEvents(self, request, context):
        def run(extra):
            cascade = self._model(request)
            extra["events"] = self._admitted(  # durable once it returns
                context, lambda remaining: self.live.log_events(cascade, request), self.ingest, "LogEvents")
            return pb.LogEventsResponse(accepted=extra["events"])

        return self._guard(context, "LogEvents", run)

    def GetModelInfo(self, request, context):
        def run(extra):
            self._check_admin(context)
            if isinstance(request, Malformed):
                request.abort()
            return self.model_info()

        return self._guard(context, "GetModelInfo", run)

    def Reload(self, request, context):
        def run(extra):
            self._check_admin(context)
            if isinstance(request, Malformed):
                request.abort()
            extra["requested"] = request.version
            self.reload(request.version)
            extra["version"] = self.cascade.version
            return self.model_info()

        return self._guard(context, "Reload", run)


def _handlers(servicer: RankingServicer, admin: bool, max_bytes: int) -> list[grpc.GenericRpcHandler]:
    """Method handlers with our own deserialisers (malformed -> INVALID_ARGUMENT, too large -> RESOURCE_EXHAUSTED)."""
    h = grpc.unary_unary_rpc_method_handler
    out = [grpc.method_handlers_generic_handler(RANKING_SERVICE, {
        "Rank": h(servicer.Rank, request_deserializer=parser(pb.RankRequest, max_bytes),
                  response_serializer=pb.RankResponse.SerializeToString),
        "Score": h(servicer.Score, request_deserializer=parser(pb.ScoreRequest, max_bytes),
                   response_serializer=pb.ScoreResponse.SerializeToString)}), grpc.method_handlers_generic_handler(
        EVENT_SERVICE, {"LogEvents": h(servicer.LogEvents, request_deserializer=parser(pb.LogEventsRequest, max_bytes),
                                       response_serializer=pb.LogEventsResponse.SerializeToString)})]
    if admin:
        out.append(grpc.method_handlers_generic_handler(MODEL_SERVICE, {
            "GetModelInfo": h(servicer.GetModelInfo, request_deserializer=parser(pb.GetModelInfoRequest, max_bytes),
                              response_serializer=pb.ModelInfo.SerializeToString),
            "Reload": h(servicer.Reload, request_deserializer=parser(pb.ReloadRequest, max_bytes),
                        response_serializer=pb.ModelInfo.SerializeToString)}))
    return out


def create_server(
    artifacts: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 4,
    *,
    max_queue: int | None = None,
    max_concurrent_rpcs: int | None = None,
    limits: ServingLimits | None = None,
    onnx_threads: int = 1,
    reuse_port: bool = False,
    admin_token: str | None = None,
    tls: TLSConfig | None = None,
    reflection_enabled: bool = True,
    max_message_bytes: int = 64 << 10,
    metrics: ServingMetrics | None = None,
    worker: int = 0,
    load_first: bool = False,
    bundle_key: bytes | None = None,
    live: LivePath | None = None,
    cascade_options: dict | None = None,
    ingest_threads: int = 2,
    max_ingest_queue: int | None = None,
    max_queue_wait_s: float | None = 1.0,
) -> tuple[grpc.Server, int, RankingServicer]:
    """Build and start a server with NO model: health NOT_SERVING, Rank UNAVAILABLE, until
    `servicer.load(...)` has verified and warmed one. With `load_first`, the bundle is loaded
    and warmed before the port is bound, so the port never takes a call this server cannot
    serve (worker processes sharing a port). See `build_server` for the other arguments."""
    artifacts = Path(artifacts)
    root = artifacts if (artifacts / B.CURRENT).is_file() else artifacts.resolve().parent
    limits = limits or ServingLimits()
    if max_concurrent_rpcs is None:  # Rank's hard cap: beyond it RESOURCE_EXHAUSTED at once, whatever the deadline
        max_concurrent_rpcs = max_workers + (max_queue if max_queue is not None else 16 * max_workers)
    admission = RankAdmission(min(max_workers, max_concurrent_rpcs), max_concurrent_rpcs, max_wait_s=max_queue_wait_s)
    ingest = IngestAdmission(ingest_threads, ingest_threads + (3 * ingest_threads if max_ingest_queue is None
                                                               else max_ingest_queue))
    options = [
        ("grpc.so_reuseport", 1 if reuse_port else 0),  # off: a taken port is an error, not a silent share
        # a request over max_message_bytes is refused by our deserialiser (RESOURCE_EXHAUSTED, at once); grpc's
        # own limit, 16x higher, bounds what is buffered at all (it answers the same code, but drops the connection)
        ("grpc.max_receive_message_length", 16 * max_message_bytes),
    ]
    # a thread for every admitted Rank and every admitted LogEvents (running or waiting) and
    # PROBE_THREADS more: health and admin calls never wait behind either, and grpc itself sheds
    # nothing (no maximum_concurrent_rpcs)
    executor = futures.ThreadPoolExecutor(max_workers=admission.limit + ingest.limit + PROBE_THREADS,
                                          thread_name_prefix="recstack-rpc")
    server = grpc.server(executor, options=options)
    health_servicer = HealthServicer()
    metrics = metrics or ServingMetrics()
    servicer = RankingServicer(root, limits, health_servicer, onnx_threads=onnx_threads, metrics=metrics,
                               admin_token=admin_token, worker=worker, admission=admission, bundle_key=bundle_key,
                               live=live, cascade_options=cascade_options, ingest=ingest)
    metrics.track_queue(lambda: admission.waiting)
    servicer.set_serving(False)
    server.add_generic_rpc_handlers(tuple(_handlers(servicer, admin=bool(admin_token), max_bytes=max_message_bytes)))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        names = [RANKING_SERVICE, EVENT_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME] + ([MODEL_SERVICE] if admin_token else [])
        reflection.enable_server_reflection(names, server)
    if load_first:
        servicer.load(artifacts)
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError as e:
        raise ServeError(f"cannot listen on {address}: {e}") from None
    if not bound:
        raise ServeError(f"cannot listen on {address}")
    server.start()
    return server, bound, servicer


def build_server(
    bundle_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 4,
    **kwargs,
) -> tuple[grpc.Server, int, RankingServicer]:
    """Start a server on host:port (0 = any free port), then load + warm the bundle.

    `bundle_path` is a bundle directory or an artifacts root with a `current` pointer. Health
    reports NOT_SERVING until the model is loaded and warm, then SERVING. A bundle that fails
    its checks raises BundleError (and the server is stopped). Returns (started server, bound
    port, servicer).

    Keyword arguments (all optional): `max_queue` calls waiting beyond the `max_workers`
    running ones at most (a hard cap, default 16 x max_workers; `max_concurrent_rpcs` sets the
    total directly); below it a Rank call is refused when its estimated queue wait is over
    `max_queue_wait_s` (default 1 s; None: no bound but the deadline) or, with its service,
    over its remaining deadline (recstack.serving.admission.RankAdmission),
    `limits` (ServingLimits), `onnx_threads` (intra-op threads per ONNX session), `reuse_port`,
    `admin_token` (enables ModelService), `tls` (TLSConfig), `reflection_enabled`,
    `max_message_bytes` (largest request accepted), `metrics` (ServingMetrics), `worker`,
    `bundle_key` (bytes: every bundle loaded must carry a manifest HMAC made with it), `live`
    (recstack.serving.events.LivePath: the feature store and impression log; None: neither),
    `cascade_options` (Cascade.load options: retrieval_backend, retrieval_timeout_s, i2i_share, ...),
    `ingest_threads` LogEvents calls writing at once and `max_ingest_queue` waiting beyond them
    (default 3 x ingest_threads), a bound of their own apart from Rank's.
    """
    server, bound, servicer = create_server(bundle_path, host, port, max_workers, **kwargs)
    try:
        servicer.load(bundle_path)
    except BaseException:
        server.stop(None)
        raise
    return server, bound, servicer
