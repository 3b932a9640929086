"""EventService.LogEvents: validate a batch of behaviour events and write it to the feature store.

A batch is all-or-nothing: every event is checked before anything is written, the first bad
one refuses the batch (INVALID_ARGUMENT, `events[i].field: reason`), and a good batch is
acknowledged only once the store has made it durable (UNAVAILABLE when it cannot).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from recstack import features as F
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
    (counted in `metrics.degraded_features`, logged); the next call tries the store again, so
    recovery needs nothing."""
    if store is None:
        return None, False
    try:
        return store.history(user_id, now), False
    except StoreUnavailable as e:
        metrics.degraded_features.inc()
        log.warning("feature store unavailable, ranking from the request and the snapshot: %s", e)
        return store.seed_history(user_id, now), True


def log_events(store, cascade, request, limits: EventLimits = EventLimits()) -> int:
    """Validate the batch, then write it (durable on return) -> events written. Raises
    ValidationError (nothing written) or StoreUnavailable (nothing written)."""
    if store is None:
        raise StoreUnavailable("this server has no feature store (--feature-store none)")
    events = validate_events(request, cascade.n_items, cascade.clock(), limits)
    store.append(events)
    return len(events)


def rank_with_history(cascade, store, query, time_remaining, metrics):
    """Rank `query` at the cascade's clock with the user's history from `store` -> (Ranking, degraded)."""
    now = cascade.clock()
    history, degraded = read_history(store, query.user_id, now, metrics)
    return cascade.rank(replace(query, now=now), time_remaining=time_remaining, history=history), degraded
