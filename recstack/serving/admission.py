"""What lets a bounded server still answer its probes: the admission queue of Rank
(`RankAdmission`: a bounded number running, a bounded number waiting, the rest refused at once),
a separate one of the same kind for event ingestion (`IngestAdmission`), and a health servicer whose Watch streams the server can end at shutdown (`HealthServicer`)."""
from __future__ import annotations

import threading

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
    """The bounded queue of Rank: at most `running` calls in the cascade at once and at most
    `limit` admitted in all (running + waiting); a call beyond the limit is refused at once.
    A waiting call gives up when its deadline passes or its caller leaves."""

    def __init__(self, running: int, limit: int):
        if not 1 <= running <= limit:
            raise ValueError(f"need 1 <= running ({running}) <= limit ({limit})")
        self.running, self.limit = running, limit
        self._slots = threading.Semaphore(running)
        self._lock = threading.Lock()
        self._admitted = 0
        self.waiting = 0

    def admit(self) -> bool:
        with self._lock:
            if self._admitted >= self.limit:
                return False
            self._admitted += 1
            return True

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

    def release(self) -> None:
        self._slots.release()

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1


class IngestAdmission(RankAdmission):
    """The bounded queue of EventService.LogEvents, apart from Rank's: a write waiting on the
    feature store (a Redis fsync, SQLite's write lock) holds one of these places and a thread
    of its own, never one of Rank's, so ingestion sheds (RESOURCE_EXHAUSTED, nothing written;
    the client retries) before it can take the server's threads from Rank."""
