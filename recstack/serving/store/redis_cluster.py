"""The feature store on Redis Cluster: the same sorted set per user as redis_store.py, spread
over the cluster's nodes by the `{u:<id>}` hash tag (every key of a user is in one slot).

    store = open_store("redis-cluster://10.0.0.1:7000,10.0.0.2:7000")   # any reachable nodes seed it

Atomicity of a batch: per user, not per batch. A batch of several users spans several slots
and nodes, which no Redis transaction can cover, so each user's part (add, expire, trim, TTL)
is one Lua script on that user's key, atomic on its node; the scripts go out as one pipeline
(one round trip per node). `append` returns, and LogEvents acknowledges, only after every
user's script succeeded. When any fails (a node down, the cluster not ok), StoreUnavailable:
the batch is unacknowledged, some users' parts may be written, and the client retries the
whole batch. A retry writes nothing twice: a member is the event's content (see
redis_store.event_members), so re-adding it only sets the same score again.

The client connects lazily: a cluster down when the server starts degrades Rank until it
comes up, as a single Redis does.
"""
from __future__ import annotations

import threading

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from recstack.serving.store.base import Events, StoreConfig, StoreUnavailable
from recstack.serving.store.redis_store import RedisStore, event_members, user_key

SCHEME = "redis-cluster://"
# RedisClusterException (not a RedisError): no seed node reachable, so no slot map
_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)
# KEYS[1] a user's key; ARGV: exclusive expiry horizon, max events kept, TTL (s), then score, member pairs
_APPEND = """
local key = KEYS[1]
for i = 4, #ARGV, 2 do redis.call('ZADD', key, ARGV[i], ARGV[i + 1]) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', '(' .. ARGV[1])
redis.call('ZREMRANGEBYRANK', key, 0, -tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', key, ARGV[3])
return redis.call('ZCARD', key)
"""


def parse_nodes(spec: str) -> list[tuple[str, int]]:
    """"redis-cluster://HOST:PORT[,HOST:PORT...]" -> [(host, port)]; ValueError naming what is wrong."""
    if not spec.startswith(SCHEME) or not spec[len(SCHEME):]:
        raise ValueError(f"feature store: {spec!r} is not redis-cluster://HOST:PORT[,HOST:PORT...]")
    nodes = []
    for part in spec[len(SCHEME):].split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"feature store: node {part!r} in {spec!r} is not HOST:PORT with a port in 1..65535")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


class RedisClusterStore(RedisStore):
    """Redis Cluster seeded by the nodes of `spec` (redis-cluster://HOST:PORT[,HOST:PORT...])."""

    errors = _ERRORS  # cluster errors (CLUSTERDOWN, a slot's node unreachable) are RedisErrors

    def __init__(self, spec: str, config: StoreConfig | None = None):
        nodes = parse_nodes(spec)
        super().__init__(spec, config, connect=False)
        self._nodes = [ClusterNode(h, p) for h, p in nodes]
        self._client: RedisCluster | None = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> RedisCluster:
        """The cluster client, created on first use (it reads the slot map from a seed node)."""
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._client is None:
                t = self.config.timeout_s
                try:  # no retry here (a slot MOVED is still followed): a hung node fails a call after timeout_s
                    self._client = RedisCluster(startup_nodes=self._nodes, socket_timeout=t, socket_connect_timeout=t,
                                                retry=Retry(NoBackoff(), 0), health_check_interval=0)
                except _ERRORS as e:
                    raise StoreUnavailable(f"feature store {self.url}: no seed node answers: {e}") from e
            return self._client

    def _append(self, events: Events) -> None:
        horizon = repr(float(events.ts.max()) - self.config.ttl_s)
        head = [horizon, self.config.max_events, int(self.config.ttl_s) + 1]
        try:
            pipe = self.client.pipeline(transaction=False)
            for u, members in sorted(event_members(events).items()):
                pairs = (x for member, ts in members.items() for x in (repr(ts), member))
                pipe.execute_command("EVAL", _APPEND, 1, user_key(u), *head, *pairs)  # routed by the key's slot
            pipe.execute()  # raises when any user's script failed or its node was unreachable
        except _ERRORS as e:
            raise StoreUnavailable(f"feature store {self.url}: append not acknowledged (some users' events may be "
                                   f"written; a retry of the whole batch writes none twice): {e}") from e

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except _ERRORS:
                pass
