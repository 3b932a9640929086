"""The serving process: `serve` runs the gRPC server of `recstack.serving.server` until
SIGTERM / SIGINT, then drains in-flight calls and exits.

    serve("artifacts", port=50051, workers=2)   # blocking; SIGTERM/SIGINT drain and exit 0

It owns what belongs to the process rather than to a server: its options (`ServeOptions`),
signals (`StopSignals`), the worker processes sharing one port and their supervision, the
logging configuration (operational lines on stderr, the access log as JSON lines on stdout),
the math libraries' thread limits, and probing the port before gRPC binds it.
"""
from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from recstack import bundle as B
from recstack.serving.events import LivePath
from recstack.serving.prometheus import ServingMetrics
from recstack.serving.server import ServeError, TLSConfig, access_log, create_server
from recstack.serving.store import StoreUnavailable, open_store

__all__ = ["ServeError", "ServeOptions", "StopSignals", "serve"]

log = logging.getLogger("recstack.serving")


@dataclass(frozen=True)
class ServeOptions:
    """Per-process settings of `serve` (picklable: handed to each spawned worker)."""

    threads: int = 4  # Rank calls running at once per process (health and admin calls have threads of their own)
    max_queue: int | None = None  # hard cap on Rank calls waiting beyond `threads`; None = 16 x threads
    max_queue_wait_s: float | None = 1.0  # refuse a Rank whose estimated queue wait is longer; None = the deadline only
    ingest_threads: int = 2  # LogEvents calls writing to the feature store at once (threads apart from Rank's)
    ingest_queue: int | None = None  # LogEvents calls waiting beyond `ingest_threads`; None = 3 x ingest_threads
    onnx_threads: int = 1  # intra-op threads per ONNX session (bounded: workers x threads x this <= cores is sane)
    grace_s: float = 10.0  # SIGTERM: how long in-flight calls may take to finish
    # SIGTERM: how long the server keeps taking calls after it turns NOT_SERVING, before the
    # listener closes and the grace period starts: clients that watch health (the balanced
    # channel) move new calls to other replicas meanwhile, so none reaches a closing server
    drain_notice_s: float = 1.0
    admin_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reflection: bool = True
    metrics_port: int | None = None  # worker i serves /metrics on metrics_port + i
    metrics_host: str | None = None  # the address /metrics listens on; None = the gRPC host
    bundle_key: str | None = None  # when set, only bundles whose manifest is HMAC-signed with it load
    max_message_bytes: int = 64 << 10
    feature_store: str = ""  # "" = SQLite beside the bundles; a path; redis://HOST:PORT; redis-cluster://H:P,...; "none"
    impression_log: str = ""  # impression + event log folder; "" = live_log/ under the artifacts root; "none" = off
    log_roll_s: float = 60.0  # the longest an impression / event log file stays open before it is finished
    retrieval_backend: str = "faiss"  # or milvus://HOST:PORT/COLLECTION (recstack.serving.candidates)
    retrieval_timeout_s: float = 0.05  # the longest a remote retrieval call may take (the deadline may cut it shorter)
    clock_file: str = ""  # "" = the wall clock; else the server's time is the number in this file (recstack.serving.clock)


class _JSONLines(logging.Formatter):
    """The access log's lines as they are: each record's message is one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def _configure_logging() -> None:
    """Operational lines go to stderr with a time and level prefix; the access log goes to
    stdout, one JSON object per line and nothing else (a log shipper parses every line)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_JSONLines())
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False


def _limit_threads(n: int) -> None:
    """Bound the math libraries' thread pools (one process per core): through the environment
    for pools not started yet (spawned workers), and at run time for the BLAS numpy has already
    loaded (`recstack serve` imports numpy before it gets here): an idle BLAS pool of one thread
    per core spins after each call and takes the cores from the requests running beside it."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the environment still bounds freshly started pools
        return
    try:
        limit = int(os.environ["OPENBLAS_NUM_THREADS"])
    except ValueError:
        limit = n
    threadpool_limits(limits=max(1, limit), user_api="blas")


class StopSignals:
    """SIGTERM / SIGINT as something the main thread can wait for without ever missing one.

    The process's signal may be taken by any of its threads (gRPC's, ONNX's, BLAS's); the
    Python handler then runs only once the main thread executes bytecode again, which a main
    thread asleep in a lock wait without a timeout never does. So the C-level handler's wakeup
    fd (written from whichever thread took the signal, with the signal's number) is what
    `wait` selects on, and the Python handler only records the signal: it takes no lock, since
    it may run while the main thread holds one. Use from the main thread; `restore` undoes it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def wait(self, timeout: float | None = None) -> bool:
        """True once SIGTERM or SIGINT has arrived; waits up to `timeout` seconds (None: until then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.received is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            readable, _, _ = select.select([self._r], [], [], 1.0 if left is None else min(left, 1.0))
            if readable:
                try:
                    data = self._r.recv(64)
                except (BlockingIOError, InterruptedError):
                    continue
                got = [n for n in data if n in self.SIGNALS]
                if got and self.received is None:
                    self.received = got[0]
        return True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        self._r.close()
        self._w.close()


def _split_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _probe_bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind (without listening) host:port the way gRPC will, so a port in use is refused here,
    in one line, before gRPC logs its own errors. The caller closes the socket, or keeps it to
    reserve the port (with `reuse_port`, worker processes can still bind it)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(_split_host(host) or None, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a port in TIME_WAIT is free
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ServeError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def _serve_one(artifacts: str, host: str, port: int, opts: ServeOptions, reuse_port: bool, worker: int = 0,
               on_ready=None) -> int:
    """Serve in this process until SIGTERM / SIGINT, then drain. A worker sharing the port
    (`reuse_port`) loads and warms its bundle before it binds; a single process binds first
    (a taken port fails at once) and reports NOT_SERVING while it loads. `on_ready(port)` is
    called once the server is serving."""
    signals = StopSignals()
    try:
        return _serve_until_signal(artifacts, host, port, opts, reuse_port, worker, signals, on_ready)
    finally:
        signals.restore()


def _clock(opts: ServeOptions) -> dict:
    """Cascade options for the server's clock: none for the wall clock; a FileClock (checked now:
    a missing or unreadable file stops the server with one line) for --clock-file."""
    if not opts.clock_file:
        return {}
    from recstack.serving.clock import ClockError, FileClock

    try:
        return {"clock": FileClock(opts.clock_file)}
    except ClockError as e:
        raise ServeError(f"--clock-file: {e}") from None


def open_live(artifacts: str, opts: ServeOptions) -> LivePath:
    """The feature store and the impression / event logs of one serving process: each process
    opens its own connection to the one store the workers share, and writes its own log files."""
    root = Path(artifacts) if (Path(artifacts) / B.CURRENT).is_file() else Path(artifacts).resolve().parent
    try:
        store = open_store(opts.feature_store, root)
    except (ValueError, StoreUnavailable) as e:
        raise ServeError(f"--feature-store: {e}") from None
    log_dir = None if opts.impression_log == "none" else Path(opts.impression_log or root / "live_log")
    try:
        return LivePath(store, log_dir, roll_s=opts.log_roll_s)
    except OSError as e:
        if store is not None:
            store.close()
        raise ServeError(f"--impression-log: cannot write {log_dir}: {e.strerror or e}") from None


def _serve_until_signal(artifacts, host, port, opts, reuse_port, worker, signals, on_ready) -> int:
    tls = TLSConfig(opts.tls_cert, opts.tls_key) if opts.tls_cert else None
    if port and not reuse_port:
        _probe_bind(host, port).close()
    metrics = ServingMetrics()
    metrics_server = live = None
    if opts.metrics_port is not None:
        mhost = opts.metrics_host or host
        try:
            metrics_server, mport = metrics.start_http(mhost, opts.metrics_port + worker if opts.metrics_port else 0)
        except OSError as e:
            raise ServeError(f"cannot serve /metrics on {mhost}:{opts.metrics_port + worker}: {e.strerror or e}") from None
        log.info("pid %d metrics on http://%s:%d/metrics", os.getpid(), mhost, mport)
    try:
        if signals.received is not None:
            return 0
        live = open_live(artifacts, opts)
        server, bound, servicer = create_server(
            artifacts, host, port, opts.threads, max_queue=opts.max_queue, onnx_threads=opts.onnx_threads,
            max_queue_wait_s=opts.max_queue_wait_s, ingest_threads=opts.ingest_threads, max_ingest_queue=opts.ingest_queue,
            reuse_port=reuse_port, admin_token=opts.admin_token, tls=tls, reflection_enabled=opts.reflection,
            max_message_bytes=opts.max_message_bytes, metrics=metrics, worker=worker, load_first=reuse_port,
            bundle_key=opts.bundle_key.encode() if opts.bundle_key else None, live=live,
            cascade_options={"retrieval_backend": opts.retrieval_backend, "retrieval_timeout_s": opts.retrieval_timeout_s,
                             **_clock(opts)})
        try:
            if servicer.cascade is None and signals.received is None:
                servicer.load(artifacts)
        except BaseException:
            server.stop(None)
            raise
        log.info("pid %d worker %d listening on %s:%d (model %s)", os.getpid(), worker, host, bound,
                 servicer.cascade.version if servicer.cascade else "-")
        if on_ready is not None:
            on_ready(bound)
        signals.wait()
        servicer.begin_drain()  # NOT_SERVING at once; calls still served for the notice period
        log.info("pid %d draining (notice %.1f s, then up to %.1f s)", os.getpid(), opts.drain_notice_s, opts.grace_s)
        time.sleep(max(0.0, opts.drain_notice_s))
        server.stop(opts.grace_s).wait()  # no new calls; those in flight get up to grace_s
        log.info("pid %d stopped", os.getpid())
        return 0
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if live is not None:
            live.close()  # the logs' last rows are written (SIGTERM's drain ends here), then the store closes


def _child_main(artifacts: str, host: str, port: int, opts: ServeOptions, worker: int) -> None:
    _configure_logging()
    try:
        code = _serve_one(artifacts, host, port, opts, True, worker)
    except B.BundleError as e:
        log.error("pid %d: refusing the bundle: %s", os.getpid(), e)
        code = 2
    except ServeError as e:
        log.error("pid %d: %s", os.getpid(), e)
        code = 1
    raise SystemExit(code)


def serve(artifacts: str | Path, host: str = "127.0.0.1", port: int = 50051, workers: int = 1,
          options: ServeOptions | None = None, **kwargs) -> int:
    """Serve until SIGTERM/SIGINT, then drain in-flight calls for up to `grace_s` and return 0.

    `workers` > 1 runs that many processes sharing the port (SO_REUSEPORT; the kernel spreads
    connections), since one Python process is bound to about one core. The parent checks and
    reserves the port (0 = any free one), then spawns them (fresh interpreters) before it
    creates any gRPC object; each loads and warms its bundle before it binds the port, so
    the port only ever hands connections to a ready worker, and each bounds its math-library
    threads to `onnx_threads`. `kwargs` are ServeOptions fields.
    Returns the exit code (0 after a clean drain; 1 if a worker died or refused the bundle).
    With one process, a bundle that fails its checks raises BundleError; a port that cannot
    be bound raises ServeError.
    """
    opts = options or ServeOptions(**kwargs)
    _configure_logging()
    _limit_threads(opts.onnx_threads)
    artifacts = str(artifacts)
    B.resolve_bundle(artifacts)  # fail fast, in the parent, on a path that is not a bundle
    if workers <= 1:
        return _serve_one(artifacts, host, port, opts, False)
    # the port must be free of anyone else: checked without SO_REUSEPORT, then held with it
    # (not listening: the kernel hands connections only to the workers' listening sockets)
    probe = _probe_bind(host, port)
    port = probe.getsockname()[1]
    probe.close()
    reservation = _probe_bind(host, port, reuse_port=True)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no gRPC state crosses a fork
    procs = [ctx.Process(target=_child_main, args=(artifacts, host, port, opts, i), daemon=False)
             for i in range(workers)]
    signals = StopSignals()
    try:
        for p in procs:
            p.start()
        log.info("started %d serving processes on %s:%d", workers, host, port)
        return _supervise(procs, signals, opts.grace_s + max(0.0, opts.drain_notice_s))
    finally:
        signals.restore()
        reservation.close()


def _supervise(procs, signals: StopSignals, grace_s: float) -> int:
    """Wait for SIGTERM / SIGINT or a dead worker, then stop every worker (SIGTERM, then SIGKILL
    after grace_s + 5 s). -> 0 when all of them drained cleanly, else 1."""
    failed = False
    while not signals.wait(0.2):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            log.error("serving process %d exited with %s; stopping the others", dead[0].pid, dead[0].exitcode)
            failed = True
            break
    for p in procs:
        if p.is_alive():
            os.kill(p.pid, signal.SIGTERM)
    for p in procs:
        p.join(grace_s + 5)
        if p.is_alive():
            p.kill()
            p.join()
    if failed or any(p.exitcode != 0 for p in procs):
        return 1
    return 0
