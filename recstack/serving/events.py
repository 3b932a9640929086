"""The live path of a serving process (`LivePath`): EventService.LogEvents validates a batch of
behaviour events and writes it to the feature store; Rank reads the user's history from the
store (degrading to the snapshot when it fails) and logs what it served.

A batch is all-or-nothing: every event is checked before anything is written, the first bad
one refuses the batch (INVALID_ARGUMENT, `events[i].field: reason`), and a good batch is
acknowledged only once the store has made it durable (UNAVAILABLE when it cannot).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from recstack import features as F
from recstack.serving.impressions import EVENT_SCHEMA, IMPRESSION_SCHEMA, ParquetLog
from recstack.serving.store import Events, StoreUnavailable
from recstack.serving.validate import ValidationError

log = logging.getLogger("recstack.serving")
_REQUEST_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


@dataclass(frozen=True)
class EventLimits:
    """What LogEvents accepts."""

    max_events: int = 1000  # per call
    max_future_s: float = 300.0  # a timestamp further ahead of the server's clock is a client bug (clock skew allowed)
    dwell_seconds_max: float = 86400.0  # as for Rank's behaviours
    max_user_id: int = 2**62  # ids are the bundle's raw ids; an unknown user's events wait for a bundle that knows it


def _fail(i: int, field: str, message: str):
    raise ValidationError(f"events[{i}].{field}", message)


def validate_events(request, n_items: int, now: float, limits: EventLimits = EventLimits()) -> Events:
    """recstack.v1.LogEventsRequest -> Events; ValidationError naming the first bad event's field."""
    evs = request.events
    if not evs:
        raise ValidationError("events", "at least one event is needed")
    if len(evs) > limits.max_events:
        raise ValidationError("events", f"at most {limits.max_events} events per call, got {len(evs)}")
    cols = {"user_id": [], "item_id": [], "kind": [], "ts": [], "dwell": []}
    rids = []
    for i, e in enumerate(evs):
        if not 0 <= e.user_id <= limits.max_user_id:
            _fail(i, "user_id", f"must be in [0, {limits.max_user_id}], got {e.user_id}")
        if not 0 <= e.item_id < n_items:
            _fail(i, "item_id", f"unknown item {e.item_id} (the corpus has items 0..{n_items - 1})")
        if e.kind not in range(len(F.EVENT_KINDS)):
            _fail(i, "kind", f"unknown BehaviourKind {e.kind} (0..4 = {', '.join(F.EVENT_KINDS)})")
        if not math.isfinite(e.timestamp) or e.timestamp <= 0:
            _fail(i, "timestamp", f"must be a finite time in seconds since the epoch, got {e.timestamp}")
        if e.timestamp > now + limits.max_future_s:
            _fail(i, "timestamp", f"{e.timestamp - now:.0f} s in the future of the server's clock (at most "
                                  f"{limits.max_future_s:g} s allowed)")
        if not math.isfinite(e.dwell_seconds) or e.dwell_seconds < 0:
            _fail(i, "dwell_seconds", f"must be finite and >= 0, got {e.dwell_seconds}")
        if e.dwell_seconds > limits.dwell_seconds_max:
            _fail(i, "dwell_seconds", f"must be <= {limits.dwell_seconds_max:g}, got {e.dwell_seconds}")
        rid = e.request_id if e.HasField("request_id") else ""
        if rid and (len(rid) > 64 or not set(rid) <= _REQUEST_ID_CHARS):
            _fail(i, "request_id", "at most 64 characters of [A-Za-z0-9._:-]")
        for k, v in (("user_id", e.user_id), ("item_id", e.item_id), ("kind", e.kind), ("ts", e.timestamp),
                     ("dwell", e.dwell_seconds)):
            cols[k].append(v)
        rids.append(rid)
    return Events(np.array(cols["user_id"]), np.array(cols["item_id"]), np.array(cols["kind"]), np.array(cols["ts"]),
                  np.array(cols["dwell"]), request_id=tuple(rids))


def read_history(store, user_id: int, now: float, metrics) -> tuple[Events | None, bool]:
    """The user's history for Rank -> (events, degraded). Without a store: (None, False) (the
    cascade reads its snapshot). With a store that fails: the snapshot's part alone, degraded
    (counted in `metrics.degraded_features`); the next call tries the store again, so recovery
    needs nothing."""
    if store is None:
        return None, False
    try:
        return store.history(user_id, now), False
    except StoreUnavailable as e:
        if metrics is not None:
            metrics.degraded_features.inc()
        log.debug("feature store unavailable: %s", e)
        return store.seed_history(user_id, now), True


class LivePath:
    """A serving process's live path: the feature store (None: the snapshot and the request
    only) and, with `log_dir`, the impression and event logs (recstack.serving.impressions).

    `log_options`: ParquetLog's max_queue, roll_rows, roll_s."""

    def __init__(self, store=None, log_dir: str | Path | None = None, limits: EventLimits = EventLimits(),
                 **log_options):
        self.store, self.limits = store, limits
        self.metrics = None
        self.worker = 0
        self._degraded = False  # the last Rank's state, to log changes only
        self.log_dir = Path(log_dir) if log_dir else None
        opts = dict(on_drop=self._dropped, **log_options)
        self.impressions = ParquetLog(self.log_dir, "impressions", IMPRESSION_SCHEMA, on_write=self._logged, **opts) \
            if self.log_dir else None
        self.events = ParquetLog(self.log_dir, "events", EVENT_SCHEMA, **opts) if self.log_dir else None

    def bind(self, metrics, worker: int = 0) -> None:
        """The serving process's metrics (ServingMetrics) and worker index."""
        self.metrics, self.worker = metrics, worker

    def _dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.log_dropped.inc()

    def _logged(self, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.impressions_logged.inc(rows)

    def seed(self, cascade) -> None:
        """Serve a newly loaded cascade's snapshot under the store's live events."""
        if self.store is not None:
            self.store.seed(cascade.snapshot)

    def read(self, cascade, query):
        """`query` with the user's store history at the cascade's clock -> (query, degraded). The
        server calls it before the call takes a running slot: a read waiting on the store (a Redis
        fsync of ingested events) holds no slot that ranking work could use."""
        now = cascade.clock()
        history, degraded = read_history(self.store, query.user_id, now, self.metrics)
        if degraded != self._degraded:  # one line per outage and per recovery, not one per call
            self._degraded = degraded
            (log.warning if degraded else log.info)(
                "feature store %s: Rank %s", "unavailable" if degraded else "back",
                "answers from the request and the snapshot (degraded_features)" if degraded else "reads it again")
        return replace(query, now=now, history=history), degraded

    def rank(self, cascade, query, time_remaining):
        """Rank `query` at the cascade's clock with the user's store history -> (Ranking, degraded, now)."""
        return self.rank_read(cascade, time_remaining, self.read(cascade, query))

    @staticmethod
    def rank_read(cascade, time_remaining, prepared):
        """Rank what `read` returned -> (Ranking, degraded, now)."""
        query, degraded = prepared
        return cascade.rank(query, time_remaining), degraded, query.now

    def served(self, request_id: str, user_id: int, now: float, version: str, r, degraded: bool) -> None:
        """Log one Rank response (one row per item) to the impression log; never blocks."""
        if self.impressions is None:
            return
        n = len(r.item_ids)
        self.impressions.put({
            "request_id": [request_id] * n, "ts": [now] * n, "user_id": [user_id] * n, "model_version": [version] * n,
            "worker": [self.worker] * n, "position": list(range(n)), "item_id": r.item_ids.tolist(),
            "score": r.scores.tolist(), "pctr": r.pctr.tolist(), "pcvr": r.pcvr.tolist(), "price": r.price.tolist(),
            "coarse_score": r.coarse_scores.tolist(), "source": list(r.sources), "cold_start": [r.cold_start] * n,
            "degraded_features": [degraded] * n})

    def log_events(self, cascade, request) -> int:
        """Validate the batch, write it (durable on return), then log it -> events written. Raises
        ValidationError or StoreUnavailable, and then nothing is written."""
        if self.store is None:
            raise StoreUnavailable("this server has no feature store (--feature-store none)")
        events = validate_events(request, cascade.n_items, cascade.clock(), self.limits)
        self.store.append(events)
        if self.events is not None:
            self.events.put({"user_id": events.user_id, "ts": events.ts, "item_id": events.item_id,
                             "kind": events.kind, "dwell": events.dwell, "request_id": list(events.request_id)})
        return len(events)

    def close(self) -> None:
        """Flush and close the logs, then the store (the process's drain calls it)."""
        for part in (self.impressions, self.events, self.store):
            if part is not None:
                part.close()
