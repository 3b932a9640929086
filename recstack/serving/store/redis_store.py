"""The Redis feature store: a sorted set per user, scored by event time.

Key layout: `recstack:{u:<user_id>}:events`. The `{u:<id>}` hash tag puts every key of a user
in one Redis Cluster slot, so one user's writes stay single-slot; a batch of several users is
one MULTI/EXEC transaction (all or nothing) on a single server, and per user on a cluster.
Each member is one event, `<item>|<kind>|<dwell>|<request id>|<time>#<k>`: its content, and k
counting identical events within the batch (so they stay apart). A member is the same when a
batch is sent again, so a client retrying an unacknowledged batch writes nothing twice (an
event identical in every field to one of an earlier batch is taken for its retry). Every append trims the users it touched to their newest
`max_events` and drops expired members; an idle user's key expires after `ttl_s`.

Durability is Redis's: the append returns after EXEC, and survives a Redis restart only with
AOF persistence (`appendonly yes`; `appendfsync always` for every acknowledged write, as the
tests run it). `open` reads the server's setting and logs a warning when AOF is off.
"""
from __future__ import annotations

import logging

import numpy as np
import redis

from recstack.serving.store.base import Events, FeatureStore, StoreConfig, StoreUnavailable

log = logging.getLogger("recstack.serving")
KEY = "recstack:{{u:{user}}}:events"
_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError)


def user_key(user_id: int) -> str:
    return KEY.format(user=int(user_id))


def event_members(events: Events) -> dict[int, dict[str, float]]:
    """A batch -> {user: {member: time}}, the members derived from the events alone (idempotent)."""
    per_user: dict[int, dict[str, float]] = {}
    seen: dict[tuple, int] = {}
    for row in zip(events.user_id.tolist(), events.item_id.tolist(), events.kind.tolist(), events.ts.tolist(),
                   events.dwell.tolist(), events.request_id):
        u, item, kind, ts, dwell, rid = row
        k = seen[row] = seen.get(row, -1) + 1
        per_user.setdefault(u, {})[f"{item}|{kind}|{dwell!r}|{rid}|{ts!r}#{k}"] = ts
    return per_user


class RedisStore(FeatureStore):
    """Redis at `url` (redis://HOST:PORT[/DB] or unix:///path/to/socket)."""

    errors = _ERRORS  # what the client raises when the store fails (-> StoreUnavailable)

    def __init__(self, url: str, config: StoreConfig | None = None, connect: bool = True):
        super().__init__(config)
        self.url = url
        if not connect:  # a subclass makes its own client
            return
        t = self.config.timeout_s
        self.client = redis.Redis.from_url(url, socket_timeout=t, socket_connect_timeout=t, health_check_interval=0,
                                           retry_on_timeout=False)
        try:
            aof = self.client.config_get("appendonly").get("appendonly")
        except _ERRORS:  # CONFIG may be disabled (managed Redis), or the server down at start: it may come up later
            aof = None
        if aof == "no":
            log.warning("feature store %s: Redis runs without AOF (appendonly no): acknowledged events are lost "
                        "if Redis restarts", url)

    def _append(self, events: Events) -> None:
        pipe = self.client.pipeline(transaction=True)
        per_user = event_members(events)
        horizon = float(events.ts.max()) - self.config.ttl_s
        ttl = int(self.config.ttl_s) + 1
        for u, members in per_user.items():
            key = user_key(u)
            pipe.zadd(key, members)
            pipe.zremrangebyscore(key, "-inf", f"({horizon!r}")
            pipe.zremrangebyrank(key, 0, -self.config.max_events - 1)  # all but the newest max_events
            pipe.expire(key, ttl)
        try:
            pipe.execute()
        except _ERRORS as e:
            raise StoreUnavailable(f"feature store {self.url}: append failed: {e}") from e

    def _read(self, user_id: int, since: float) -> list:
        try:
            return self.client.zrevrangebyscore(user_key(user_id), "+inf", since, start=0, num=self.config.max_events,
                                                withscores=True)
        except self.errors as e:
            raise StoreUnavailable(f"feature store {self.url}: read failed: {e}") from e

    def _recent(self, user_id: int, since: float) -> Events:
        rows = self._read(user_id, since)
        if not rows:
            return Events.empty()
        rows.reverse()  # oldest first
        fields = [m.decode().split("|", 4) for m, _ in rows]
        return Events(np.full(len(rows), user_id), [int(f[0]) for f in fields], [int(f[1]) for f in fields],
                      [s for _, s in rows], [float(f[2]) for f in fields])

    def close(self) -> None:
        try:
            self.client.close()
        except _ERRORS:
            pass
