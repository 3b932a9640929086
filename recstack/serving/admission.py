"""What lets a bounded server still answer its probes: the admission queue of Rank
(`RankAdmission`: a bounded number running; a call waits only when its estimated wait fits its
deadline, under a hard cap; the rest refused at once),
a separate one of the same kind for event ingestion (`IngestAdmission`), and a health servicer whose Watch streams the server can end at shutdown (`HealthServicer`)."""
from __future__ import annotations

import threading
import time

from grpc_health.v1 import health


class HealthServicer(health.HealthServicer):
    """grpc's health servicer whose `Watch` streams can be ended by the server: at shutdown,
    after watchers have been told NOT_SERVING, `close_watches` ends them with OK (a client
    reconnects or gives up), so an open Watch does not hold the drain for the whole grace
    period. Each stream is ended once, whichever of close_watches and the call ending comes first."""

    def __init__(self):
        super().__init__(experimental_non_blocking=True)
        self._streams: set = set()
        self._streams_lock = threading.Lock()
        self._closing = False

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is None:  # a server without non-blocking streams: grpc's own
            return super().Watch(request, context)
        stream = _OnceClosed(send_response_callback)
        with self._streams_lock:
            self._streams.add(stream)
        context.add_callback(lambda: self._forget(stream))
        super().Watch(request, context, stream)
        if self._closing:  # opened while the server shuts down: answered, then ended at once
            stream(None)
        return None

    def _forget(self, stream) -> None:
        with self._streams_lock:
            self._streams.discard(stream)

    def close_watches(self) -> None:
        self._closing = True
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream(None)


class _OnceClosed:
    """A Watch stream's send callback that sends nothing once the stream is ended (None)."""

    def __init__(self, send):
        self._send, self._lock, self._closed = send, threading.Lock(), False

    def __call__(self, response) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = response is None
            self._send(response)


class RankAdmission:
    """The admission queue of Rank: at most `running` calls in the cascade at once, and a call
    is admitted only when it can be answered in time. Its estimated queue wait is the EWMA of a
    running slot's service time (`service_s`, measured over the calls that ran) x its place in
    the queue / `running`; it is refused when that wait is over `max_wait_s`, or when the wait
    plus one service time is over the call's remaining deadline, and always beyond `limit`
    calls admitted in all (running + waiting: the hard cap that bounds threads and memory).
    Refusal is immediate: a few comparisons under a lock. A call that finds a slot free is never
    refused on its deadline (it runs, and the cascade's own deadline checks cut it short); the
    estimate is 0 until a call has run, so a fresh server sheds only at the hard cap. A waiting
    call gives up when its deadline passes or its caller leaves. `clock` (seconds, monotonic)
    is injectable so that tests need no timing."""

    def __init__(self, running: int, limit: int, max_wait_s: float | None = None, clock=time.monotonic,
                 alpha: float = 0.1, service_s: float = 0.0):
        if not 1 <= running <= limit:
            raise ValueError(f"need 1 <= running ({running}) <= limit ({limit})")
        if max_wait_s is not None and not max_wait_s > 0:
            raise ValueError(f"max_wait_s: must be > 0 or None, got {max_wait_s}")
        if not 0 < alpha <= 1 or not service_s >= 0:
            raise ValueError(f"need 0 < alpha ({alpha}) <= 1 and service_s ({service_s}) >= 0")
        self.running, self.limit, self.max_wait_s = running, limit, max_wait_s
        self.clock, self.alpha, self.service_s = clock, alpha, float(service_s)
        self._slots = threading.Semaphore(running)
        self._lock = threading.Lock()
        self._admitted = 0
        self.waiting = 0

    def estimated_wait(self) -> float:
        """Seconds a call arriving now is expected to wait for a slot (0 while one is free)."""
        ahead = self._admitted - self.running + 1  # its place in the queue when every slot is busy
        return self.service_s * ahead / self.running if ahead > 0 else 0.0

    def try_admit(self, time_remaining: float | None = None) -> str:
        """Admit a call with `time_remaining` seconds to its deadline (None: no deadline) -> ""
        when admitted, else why not (one line, for the RESOURCE_EXHAUSTED message)."""
        with self._lock:
            if self._admitted >= self.limit:
                return f"{self.limit} calls in flight (the queue's hard cap)"
            wait = self.estimated_wait()
            if wait > 0 and self.max_wait_s is not None and wait > self.max_wait_s:
                return f"estimated queue wait {wait * 1e3:.0f} ms is over the server's max queue wait " \
                       f"{self.max_wait_s * 1e3:.0f} ms"
            if wait > 0 and time_remaining is not None and wait + self.service_s > time_remaining:
                return f"estimated queue wait {wait * 1e3:.0f} ms + service {self.service_s * 1e3:.0f} ms is over " \
                       f"the call's remaining deadline {max(time_remaining, 0.0) * 1e3:.0f} ms"
            self._admitted += 1
            return ""

    def admit(self, time_remaining: float | None = None) -> bool:
        return not self.try_admit(time_remaining)

    def acquire(self, time_remaining) -> bool:
        """Wait for a cascade slot; False when `time_remaining()` reaches 0 first (re-read at
        least every 0.1 s, so a caller who leaves frees its place in the queue)."""
        with self._lock:
            self.waiting += 1
        try:
            while True:
                left = time_remaining()
                if left is not None and left <= 0:
                    return False
                if self._slots.acquire(timeout=0.1 if left is None else min(left, 0.1)):
                    return True
        finally:
            with self._lock:
                self.waiting -= 1

    def release(self, service_s: float | None = None) -> None:
        """Free a slot; `service_s`, the seconds the call held it, updates the estimate."""
        if service_s is not None and service_s >= 0:
            with self._lock:
                self.service_s = service_s if self.service_s == 0 else \
                    (1 - self.alpha) * self.service_s + self.alpha * service_s
        self._slots.release()

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1


class IngestAdmission(RankAdmission):
    """The bounded queue of EventService.LogEvents, apart from Rank's: a write waiting on the
    feature store (a Redis fsync, SQLite's write lock) holds one of these places and a thread
    of its own, never one of Rank's, so ingestion sheds (RESOURCE_EXHAUSTED, nothing written;
    the client retries) before it can take the server's threads from Rank."""
