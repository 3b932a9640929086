"""External ids: the data's own user and item ids (int64 or string) beside the dense internal
indices the models use.

A world's `users.parquet` / `items.parquet` may carry an `external_id` column (int64 or
string; row i is internal id i). Export copies it into the bundle as `ids/users.parquet` /
`ids/items.parquet` (one `external_id` column, checksummed like every bundle file); the
server reads it back into an `IdMap` and speaks external ids to its callers. Without the
column a side's external ids are its internal ones (`IdMap.identity`).

On the wire an external id is a string key (`user_key`, `item_key`) — for integer ids their
decimal form — and the int64 fields (`user_id`, `item_id`) carry integer external ids; with
string ids the int64 fields carry internal indices.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

EXTERNAL_ID = "external_id"  # the column name in the data's tables and in the bundle's id files
KIND_IDENTITY, KIND_INT, KIND_STRING = "identity", "int", "string"
_INT_KEY = re.compile(r"^-?(0|[1-9][0-9]{0,18})$")  # the canonical decimal form only: "007" is not 7


class IdError(ValueError):
    """A mapping that cannot be served (nulls, repeats, wrong type or length); the message names it."""


def check_external(values, n: int, where: str) -> np.ndarray:
    """The external ids of n rows -> int64 (n,) or object (n,) of str; raises IdError naming `where`."""
    return _checked(values, n, where)[0]


def _checked(values, n: int, where: str) -> tuple[np.ndarray, dict | None]:
    """check_external, and for string ids the key -> row dict it builds to find repeats."""
    values = np.asarray(values)
    if values.shape != (n,):
        raise IdError(f"{where}: {values.shape[0] if values.ndim else 0} external ids for {n} rows")
    if values.dtype.kind in "iu":
        if values.dtype.kind == "u" and n and values.max() > np.iinfo(np.int64).max:
            raise IdError(f"{where}: external ids above the int64 range")
        out = values.astype(np.int64)
        ordered = np.sort(out)
        same = np.flatnonzero(ordered[1:] == ordered[:-1]) if n > 1 else np.zeros(0, np.int64)
        if len(same):
            dup = ordered[same[0]]
            raise IdError(f"{where}: external id {int(dup)} names {int(np.count_nonzero(out == dup))} rows")
        return out, None
    if values.dtype.kind not in "OUT":
        raise IdError(f"{where}: external ids must be int64 or string, got {values.dtype}")
    keys = values.tolist()
    if not all(type(v) is str for v in keys):
        raise IdError(f"{where}: external ids must be all int64 or all strings (found nulls or mixed types)")
    by_key = dict(zip(keys, range(n)))
    if "" in by_key:
        raise IdError(f"{where}: an external id is the empty string (an unset key on the wire)")
    if len(by_key) != n:
        seen: set[str] = set()
        dup = next(k for k in keys if k in seen or seen.add(k))
        raise IdError(f"{where}: external id {dup!r} names {keys.count(dup)} rows")
    return np.array(keys, dtype=object), by_key


class IdMap:
    """One side's (users' or items') external ids <-> internal indices 0..n-1."""

    def __init__(self, external: np.ndarray | None, n: int, where: str = "external ids"):
        self.n = int(n)
        if external is None:
            self.kind, self._ext = KIND_IDENTITY, None
            return
        ext, by_key = _checked(external, n, where)
        if by_key is not None:
            self.kind, self._ext, self._by_key = KIND_STRING, ext, by_key
        else:
            self.kind, self._ext = KIND_INT, ext
            self._order = np.argsort(ext, kind="stable")
            self._sorted = ext[self._order]

    @classmethod
    def identity(cls, n: int) -> "IdMap":
        return cls(None, n)

    def internal_of_ints(self, ids) -> np.ndarray:
        """int64 ids as sent in user_id / item_id fields (N,) -> internal indices (N,), -1 where unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind != KIND_INT:  # identity, or string ids (the int64 fields carry internal indices)
            return np.where((ids >= 0) & (ids < self.n), ids, -1)
        pos = np.minimum(np.searchsorted(self._sorted, ids), max(self.n - 1, 0))
        hit = (self._sorted[pos] == ids) if self.n else np.zeros(len(ids), bool)
        return np.where(hit, self._order[pos], -1).astype(np.int64)

    def internal_of_keys(self, keys) -> np.ndarray:
        """String keys (N,) -> internal indices (N,), -1 where unknown."""
        if self.kind == KIND_STRING:
            return np.array([self._by_key.get(k, -1) for k in keys], dtype=np.int64)
        ints = [int(k) if _INT_KEY.match(k) else None for k in keys]
        out = self.internal_of_ints([v if v is not None else -1 for v in ints])
        return np.where([v is not None for v in ints], out, -1).astype(np.int64)

    def ints(self, internal: np.ndarray) -> np.ndarray:
        """Internal indices (N,) -> the int64 ids to report (the external ids unless they are strings)."""
        internal = np.asarray(internal, dtype=np.int64)
        return self._ext[internal] if self.kind == KIND_INT else internal

    def keys(self, internal: np.ndarray) -> list[str]:
        """Internal indices (N,) -> external ids as strings."""
        internal = np.asarray(internal, dtype=np.int64)
        if self.kind == KIND_STRING:
            return self._ext[internal].tolist()
        return [str(v) for v in self.ints(internal).tolist()]


def read_external(path: str | Path) -> np.ndarray | None:
    """A data table's `external_id` column, or None when it has none."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if EXTERNAL_ID not in schema.names:
        return None
    return pq.read_table(path, columns=[EXTERNAL_ID]).column(EXTERNAL_ID).to_numpy(zero_copy_only=False)


def write_external(path: str | Path, external: np.ndarray) -> None:
    """Write one side's checked external ids as a one-column Parquet file (row i = internal id i)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ext = np.asarray(external)
    column = pa.array(ext.tolist(), type=pa.string()) if ext.dtype == object else pa.array(ext, type=pa.int64())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({EXTERNAL_ID: column}), path)


class BundleIds:
    """A bundle's two id maps: `users` and `items` (identity where the bundle has no id file)."""

    def __init__(self, users: IdMap, items: IdMap):
        self.users, self.items = users, items

    @classmethod
    def identity(cls, n_users: int, n_items: int) -> "BundleIds":
        return cls(IdMap.identity(n_users), IdMap.identity(n_items))
