"""The Milvus retrieval backend: item vectors in a Milvus collection, searched over gRPC with
pymilvus (the same client for a Milvus cluster and for milvus-lite's local `.db` file).

    publish(item_emb, "http://milvus:19530", "items", version)   # at export; one collection per version
    backend = MilvusBackend.connect("http://milvus:19530", "items", version=..., n_items=I)
    ids = backend.search(queries, k, timeout_s=0.02)               # (Q, D) -> (Q, k) int64, -1 padded

Versioning: a bundle's embeddings are published to `<collection>_v<first 16 hex of their
sha256>`, and the collection's properties record the full sha256, the item count and the
dimension — written last, once every vector is in, so a collection whose publishing stopped
half-way carries no version and is refused. A bundle loads only against the collection of its own embedding version (a
bundle exported after the collection was republished, or one whose collection was never
published, is refused at load); two bundle versions can therefore serve side by side during
a reload, each from its own collection. Old versions are dropped by the operator
(`drop_collection`) once no replica serves them.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from pymilvus import DataType, MilvusClient

from recstack.bundle import BundleError
from recstack.serving.candidates import MILVUS_SCHEME, RetrievalUnavailable, row_ks

ID_FIELD = "item_id"
VECTOR_FIELD = "emb"
MAX_LIMIT = 16_384  # Milvus's largest top-k
CONNECT_TIMEOUT_S = 10.0
# index types publish accepts and their search parameters (FLAT: exact, the FAISS bundle's default)
INDEX_SEARCH_PARAMS = {"FLAT": {}, "IVF_FLAT": {"nprobe": 48}, "HNSW": {"ef": 1024}}


def collection_name(collection: str, version: str) -> str:
    """The physical collection holding one embedding version of the logical `collection`."""
    return f"{collection}_v{version[:16]}"


VERSION_PROPERTY = "recstack.embedding"  # JSON {"sha256", "n_items", "dim"}


def _version_property(version: str, n_items: int, dim: int) -> dict[str, str]:
    return {VERSION_PROPERTY: json.dumps({"sha256": version, "n_items": n_items, "dim": dim}, sort_keys=True)}


def publish(item_emb: np.ndarray, uri: str, collection: str, version: str, index_type: str = "FLAT",
            batch: int = 20_000, nlist: int | None = None) -> str:
    """Write the (I, D) float32 item vectors (row = item id) to the collection of `version`,
    index them by inner product and load them; an existing collection of that version is
    replaced. `nlist`: IVF_FLAT's lists (default I / 256, at most 4096). -> the physical
    collection name."""
    if index_type not in INDEX_SEARCH_PARAMS:
        raise ValueError(f"index_type {index_type!r}: expected one of {sorted(INDEX_SEARCH_PARAMS)}")
    n, dim = item_emb.shape
    name = collection_name(collection, version)
    client = MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S)
    try:
        if client.has_collection(name):
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
        params = client.prepare_index_params()
        build = {"nlist": nlist or max(1, min(4096, n // 256))} if index_type == "IVF_FLAT" else (
            {"M": 32, "efConstruction": 200} if index_type == "HNSW" else {})
        # the build parameters travel as one JSON "params" entry: the form both a Milvus server
        # and milvus-lite read (milvus-lite 3.2 ignores pymilvus 3's flattened nlist / M entries
        # and would build its defaults, e.g. 128 IVF lists whatever was asked)
        params.add_index(VECTOR_FIELD, index_type=index_type, metric_type="IP", params={"params": build})
        client.create_collection(name, schema=schema, index_params=params)
        # upsert, not insert: a batch the client sends again after a timeout (pymilvus retries)
        # replaces its rows instead of adding a second copy of each id
        for s in range(0, n, batch):
            rows = np.asarray(item_emb[s:s + batch], np.float32)
            client.upsert(name, [{ID_FIELD: s + i, VECTOR_FIELD: v} for i, v in enumerate(rows)])
        client.flush(name)
        written = int(client.get_collection_stats(name).get("row_count", -1))
        if written != n:  # the version property below is what marks the collection as complete
            raise RuntimeError(f"collection {name!r} holds {written} rows after publishing {n} item vectors")
        client.alter_collection_properties(name, properties=_version_property(version, n, dim))
        client.load_collection(name)
    finally:
        client.close()
    return name


class MilvusBackend:
    """Searches one embedding version's collection; see the module docstring."""

    name = MILVUS_SCHEME

    def __init__(self, client: MilvusClient, name: str, dim: int, n_items: int, timeout_s: float, index_type: str):
        self.client, self.collection, self.dim, self.n_items = client, name, dim, n_items
        self.timeout_s = timeout_s
        self.search_params = {"metric_type": "IP", "params": dict(INDEX_SEARCH_PARAMS.get(index_type, {}))}

    @classmethod
    def connect(cls, uri: str, collection: str, *, version: str, n_items: int, timeout_s: float = 0.05) -> "MilvusBackend":
        """Connect and check the collection holds exactly this embedding version (sha256, item
        count, dimension); any mismatch or an unreachable server is a BundleError naming it."""
        where = f"retrieval backend {MILVUS_SCHEME} {uri} collection {collection!r}"
        try:
            client = MilvusClient(uri=uri, timeout=CONNECT_TIMEOUT_S)
        except Exception as e:  # pymilvus raises its own types, or grpc's, for an unreachable server
            raise BundleError(f"{where}: cannot connect: {type(e).__name__}: {e}") from e
        try:
            return cls._checked(client, collection, where, version, n_items, timeout_s)
        except BaseException:
            client.close()
            raise

    @classmethod
    def _checked(cls, client: MilvusClient, collection: str, where: str, version: str, n_items: int,
                 timeout_s: float) -> "MilvusBackend":
        name = collection_name(collection, version)
        if not client.has_collection(name):
            others = sorted(c for c in client.list_collections() if c.startswith(f"{collection}_v"))
            raise BundleError(f"{where}: no collection {name!r} for this bundle's embeddings (sha256 {version[:16]}...);"
                              f" published versions: {others or 'none'} (publish with `recstack export --publish`)")
        desc = client.describe_collection(name)
        try:
            meta = json.loads((desc.get("properties") or {}).get(VERSION_PROPERTY) or "{}")
        except json.JSONDecodeError:
            meta = {}
        if meta.get("sha256") != version:
            raise BundleError(f"{where}: {name!r} holds embedding version {meta.get('sha256')!r} (none: its publishing "
                              f"did not finish), the bundle was built with {version!r}")
        vec = next((f for f in desc["fields"] if f["name"] == VECTOR_FIELD), None)
        dim = int(vec["params"]["dim"]) if vec else -1
        rows = int(client.get_collection_stats(name).get("row_count", -1))
        if rows != n_items or meta.get("n_items") != n_items or dim != meta.get("dim"):
            raise BundleError(f"{where}: {name!r} holds {rows} vectors of dimension {dim}; the bundle has {n_items} "
                              f"items of dimension {meta.get('dim')}")
        if "Loaded" not in str(client.get_load_state(name).get("state", "")):
            client.load_collection(name)  # loading again when loaded would rebuild milvus-lite's index
        index_type = ""
        for index in client.list_indexes(name):
            index_type = str(client.describe_index(name, index).get("index_type", ""))
        return cls(client, name, dim, n_items, timeout_s, index_type)

    def search(self, queries: np.ndarray, k: int | Sequence[int], timeout_s: float | None = None) -> np.ndarray:
        """queries (Q, D) float32, k one for all rows or one per row -> (Q, max k) int64, -1 padded
        (also past a row's own k); one remote call for all the rows at the largest k (one round
        trip), bounded by timeout_s (None: this backend's default timeout)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if timeout <= 0:
            raise RetrievalUnavailable("milvus search: no time left for the remote call")
        ks = row_ks(k, len(queries))
        top = int(ks.max(initial=0))
        limit = min(top, MAX_LIMIT, self.n_items)
        try:
            hits = self.client.search(self.collection, data=np.asarray(queries, np.float32).tolist(), limit=limit,
                                      anns_field=VECTOR_FIELD, search_params=self.search_params, timeout=timeout)
        except Exception as e:  # a timeout, a refused connection, a server error: the search did not happen
            raise RetrievalUnavailable(f"milvus search: {type(e).__name__}: {str(e)[:200]}") from e
        out = np.full((len(queries), top), -1, np.int64)
        for row, found in enumerate(hits):
            ids = list(found.ids)[:ks[row]]  # the primary keys (item ids), best first
            out[row, :len(ids)] = ids
        return out

    def close(self) -> None:
        self.client.close()
