"""The online feature store (embedded SQLite by default, or Redis) behind one interface; see base.py.

    store = open_store("", artifacts_root)        # the embedded default: <root>/feature_store.sqlite3
    store = open_store("redis://127.0.0.1:6379")  # Redis
    store = open_store("redis-cluster://10.0.0.1:7000,10.0.0.2:7000")  # Redis Cluster (seed nodes)
"""
from __future__ import annotations

from pathlib import Path

from recstack.serving.store.base import Events, FeatureStore, Snapshot, StoreConfig, StoreUnavailable, newest

__all__ = ["DEFAULT_FILE", "Events", "FeatureStore", "Snapshot", "StoreConfig", "StoreUnavailable", "newest", "open_store"]

DEFAULT_FILE = "feature_store.sqlite3"  # beside the bundles under the artifacts root, never inside one


def open_store(spec: str | None, artifacts_root: str | Path | None = None, config: StoreConfig | None = None) -> FeatureStore | None:
    """"" -> SQLite at <artifacts_root>/feature_store.sqlite3; "sqlite:PATH" or a path -> SQLite there;
    "redis://..." / "rediss://..." / "unix://..." -> Redis; "redis-cluster://HOST:PORT[,...]" -> Redis Cluster; "none" -> None (snapshot and request only).
    ValueError for a spec that is none of these."""
    spec = (spec or "").strip()
    if spec == "none":
        return None
    if spec.startswith("redis-cluster://"):
        from recstack.serving.store.redis_cluster import RedisClusterStore

        return RedisClusterStore(spec, config)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from recstack.serving.store.redis_store import RedisStore  # the redis client only when asked for

        return RedisStore(spec, config)
    from recstack.serving.store.sqlite import SQLiteStore

    if not spec:
        if artifacts_root is None:
            raise ValueError("feature store: no path given and no artifacts root to put it beside")
        return SQLiteStore(Path(artifacts_root) / DEFAULT_FILE, config)
    if "://" in spec:
        raise ValueError(f"feature store: unknown scheme in {spec!r} (use a path, sqlite:PATH, redis://HOST:PORT, redis-cluster://HOST:PORT,... or none)")
    return SQLiteStore(spec[len("sqlite:"):] if spec.startswith("sqlite:") else spec, config)
