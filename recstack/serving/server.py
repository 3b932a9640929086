"""The gRPC ranking server: recstack.v1.RankingService + ModelService, health, reflection.

    server, port, servicer = build_server("artifacts")   # started, model loaded, health SERVING
    serve("artifacts", port=50051, workers=2)             # blocking; SIGTERM/SIGINT drain and stop

Status codes: INVALID_ARGUMENT (bad request; the message names the field), UNAVAILABLE (no
model loaded yet), RESOURCE_EXHAUSTED (more than `max_concurrent_rpcs` in flight: grpc
refuses rather than queueing without bound), DEADLINE_EXCEEDED (checked between stages),
FAILED_PRECONDITION (Reload of a bundle that fails its checks), INTERNAL (anything else,
logged with a reference; never UNKNOWN).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import multiprocessing
import os
import signal
import threading
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from recstack import bundle as B
from recstack.serving.cascade import Cascade, DeadlineExceeded, Ranking
from recstack.serving.validate import ServingLimits, ValidationError, validate_rank_request
from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

log = logging.getLogger("recstack.serving")

RANKING_SERVICE = pb.DESCRIPTOR.services_by_name["RankingService"].full_name  # recstack.v1.RankingService
MODEL_SERVICE = pb.DESCRIPTOR.services_by_name["ModelService"].full_name


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def response_from_ranking(r: Ranking, version: str, debug: bool) -> pb.RankResponse:
    resp = pb.RankResponse(model_version=version, cold_start=r.cold_start)
    for i in range(len(r.item_ids)):
        resp.items.add(
            item_id=int(r.item_ids[i]), score=float(r.scores[i]), pctr=float(r.pctr[i]), pcvr=float(r.pcvr[i]),
            price=float(r.price[i]), coarse_score=float(r.coarse_scores[i]), source=r.sources[i],
        )
    if debug:
        resp.timings.CopyFrom(pb.StageTimings(**r.timings_ms))
        resp.stage_counts.CopyFrom(pb.StageCounts(**r.counts))
    return resp


class RankingServicer(pb_grpc.RankingServiceServicer, pb_grpc.ModelServiceServicer):
    """Holds the serving model and implements both services; the health servicer follows it.

    The model is one attribute read once per request, so Reload swaps it atomically: calls in
    flight finish on the model they started with.
    """

    def __init__(self, artifacts_root: Path, limits: ServingLimits, health_servicer: health.HealthServicer,
                 onnx_threads: int = 1):
        self.artifacts_root = artifacts_root
        self.limits = limits
        self.health = health_servicer
        self.onnx_threads = onnx_threads
        self.cascade: Cascade | None = None
        self.loaded_at = ""
        self._reload_lock = threading.Lock()  # one load at a time; serving never waits on it

    # -- model lifecycle --------------------------------------------------------------------

    def load(self, path: str | Path) -> Cascade:
        """Verify, load and warm the bundle at `path`, then swap it in; raises BundleError
        (and keeps the current model) if it fails any check."""
        with self._reload_lock:
            cascade = Cascade.load(path, onnx_threads=self.onnx_threads)
            previous = self.cascade.version if self.cascade else None
            self.cascade, self.loaded_at = cascade, _now_iso()
        for service in ("", RANKING_SERVICE, MODEL_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving model %s from %s%s", cascade.version, cascade.bundle.root,
                 f" (was {previous})" if previous else "")
        return cascade

    def reload(self, version: str = "") -> Cascade:
        """Load `version` (a directory under the artifacts root), or what `current` names when empty."""
        if version:
            try:
                B.check_version_name(version)
            except B.BundleError as e:
                raise ValidationError("version", str(e)) from None
            path = B.safe_path(self.artifacts_root, version)
        else:
            path = B.resolve_bundle(self.artifacts_root)
        return self.load(path)

    def model_info(self) -> pb.ModelInfo:
        c = self.cascade
        info = pb.ModelInfo(limits=pb.StageLimits(**self.limits.to_dict()))
        if c is not None:
            info.model_version = c.version
            info.bundle_path = str(c.bundle.root)
            info.created = str(c.bundle.manifest.get("created", ""))
            info.loaded_at = self.loaded_at
            info.n_items, info.n_users = c.n_items, c.n_users
            info.manifest_json = json.dumps(c.bundle.manifest, sort_keys=True)
        return info

    # -- RPCs -----------------------------------------------------------------------------

    def _guard(self, context, method: str, fn):
        """Run `fn`, mapping every exception to a status code: never UNKNOWN."""
        try:
            return fn()
        except ValidationError as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except DeadlineExceeded as e:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
        except B.BundleError as e:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, f"bundle refused, still serving the previous model: {e}"
        except _Unavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, str(e)
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("%s failed (ref %s)", method, ref)
            code, message = grpc.StatusCode.INTERNAL, f"internal error in {method} (ref {ref}; see the server log)"
        context.abort(code, message)  # raises: outside the try so it is not caught above

    def Rank(self, request, context):
        def run():
            cascade = self.cascade  # one read: a concurrent Reload cannot change the model mid-request
            if cascade is None:
                raise _Unavailable("no model loaded yet")
            query = validate_rank_request(request, self.limits, cascade.n_items)
            ranking = cascade.rank(query, time_remaining=context.time_remaining)
            return response_from_ranking(ranking, cascade.version, request.debug)

        return self._guard(context, "Rank", run)

    def GetModelInfo(self, request, context):
        return self._guard(context, "GetModelInfo", self.model_info)

    def Reload(self, request, context):
        def run():
            self.reload(request.version)
            return self.model_info()

        return self._guard(context, "Reload", run)


class _Unavailable(RuntimeError):
    pass


def build_server(
    bundle_path: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 4,
    *,
    limits: ServingLimits | None = None,
    onnx_threads: int = 1,
    max_concurrent_rpcs: int | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.Server, int, RankingServicer]:
    """Start a server on host:port (0 = any free port), then load + warm the bundle.

    `bundle_path` is a bundle directory or an artifacts root with a `current` pointer. Health
    reports NOT_SERVING until the model is loaded and warm, then SERVING. A bundle that fails
    its checks raises BundleError (and the server is stopped). Returns (started server, bound
    port, servicer).
    """
    bundle_path = Path(bundle_path)
    root = bundle_path if (bundle_path / B.CURRENT).is_file() else bundle_path.resolve().parent
    limits = limits or ServingLimits()
    options = [("grpc.so_reuseport", 1 if reuse_port else 0)]  # off: a taken port is an error, not a silent share
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="recstack-rpc"),
        options=options,
        maximum_concurrent_rpcs=max_concurrent_rpcs or 4 * max_workers,
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    servicer = RankingServicer(root, limits, health_servicer, onnx_threads=onnx_threads)
    for service in ("", RANKING_SERVICE, MODEL_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    pb_grpc.add_RankingServiceServicer_to_server(servicer, server)
    pb_grpc.add_ModelServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (RANKING_SERVICE, MODEL_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {address}: {e}") from e
    if not bound:
        raise OSError(f"cannot listen on {address}")
    server.start()
    try:
        servicer.load(bundle_path)
    except BaseException:
        server.stop(None)
        raise
    return server, bound, servicer


def _serve_one(artifacts: str, host: str, port: int, threads: int, reuse_port: bool, grace_s: float) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server, bound, servicer = build_server(artifacts, host, port, max_workers=threads, reuse_port=reuse_port)
    log.info("pid %d listening on %s:%d (model %s)", os.getpid(), host, bound, servicer.cascade.version)
    stop.wait()
    log.info("pid %d draining (up to %.0f s)", os.getpid(), grace_s)
    servicer.health.enter_graceful_shutdown()  # load balancers stop routing here first
    server.stop(grace_s).wait()
    log.info("pid %d stopped", os.getpid())


def _child_main(artifacts: str, host: str, port: int, threads: int, grace_s: float) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    _serve_one(artifacts, host, port, threads, True, grace_s)


def serve(artifacts: str | Path, host: str = "127.0.0.1", port: int = 50051, workers: int = 1, *,
          threads: int = 4, grace_s: float = 10.0) -> None:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls for up to `grace_s` and stop.

    `workers` > 1 runs that many processes sharing the port (SO_REUSEPORT; the kernel spreads
    connections), since one Python process is bound to about one core. Each process has
    `threads` RPC threads.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    artifacts = str(artifacts)
    B.resolve_bundle(artifacts)  # fail fast, in the parent, on a path that is not a bundle
    if workers <= 1:
        _serve_one(artifacts, host, port, threads, False, grace_s)
        return
    if port == 0:
        raise ValueError("--workers > 1 needs a fixed port (processes share it)")
    ctx = multiprocessing.get_context("spawn")  # grpc must not be forked after it started threads
    procs = [ctx.Process(target=_child_main, args=(artifacts, host, port, threads, grace_s), daemon=False)
             for _ in range(workers)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    for p in procs:
        p.start()
    log.info("started %d serving processes on %s:%d", workers, host, port)
    while not stop.wait(0.5):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            log.error("serving process %d exited with %s; stopping the others", dead[0].pid, dead[0].exitcode)
            break
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(grace_s + 5)
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode not in (0, -signal.SIGTERM) for p in procs):
        raise SystemExit(1)
