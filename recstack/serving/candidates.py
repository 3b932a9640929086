"""Where the retrieval stage's nearest-neighbour searches run: a backend interface and its
embedded FAISS implementation (the default). The Milvus implementation is
recstack.serving.milvus_backend; recstack.serving.backends.open_backend picks one by URI and
imports pymilvus only when a `milvus://` URI selects it.

    backend = open_backend(bundle, n_items, "faiss")             # the bundle's index.faiss, in process
    backend = open_backend(bundle, n_items, "milvus://host:19530/items")
    ids = backend.search(queries, k, timeout_s=0.02)              # (Q, D) float32 -> (Q, k) int64, -1 padded
    ids = backend.search(queries, [k, s, s], timeout_s=0.02)      # a k per row -> (Q, max k), each row -1 padded past its own

Both candidate sources go through one `search` call: row 0 of `queries` is the user vector
(ANN, asked for the request's k), the rest are the item-to-item seeds' vectors, each asked only
for its own share. A backend answers rows with different k as it can do best: FAISS in one
search per distinct k (an IVF search's cost grows with k: its result heaps), a row with a k of
WIDE_K or more over an IVF-Flat index by scoring its probed lists directly
(recstack.serving.ivf_scan), a remote engine in one call for the largest k.

A backend that cannot answer (unreachable, or slower than the timeout it was given) raises
RetrievalUnavailable; the cascade then serves popularity candidates and flags the response
(`degraded_retrieval`), never an error. A backend whose data does not match the bundle
(another embedding version, another item count or dimension) is refused at load with a
BundleError, like a bad bundle file.
"""
from __future__ import annotations

from typing import Protocol, Sequence
from urllib.parse import urlsplit

import faiss
import numpy as np

from recstack.bundle import Bundle, BundleError
from recstack.bundle_files import RETRIEVAL_ITEM_EMB
from recstack.serving.ivf_scan import WIDE_K, IvfScan
from recstack.serving.loading import read_index

FAISS = "faiss"
MILVUS_SCHEME = "milvus"


def row_ks(k: int | Sequence[int], n_rows: int) -> np.ndarray:
    """A search's k, one for all rows or one per row -> (n_rows,) int64; raises ValueError naming
    the problem (a wrong count, a negative k)."""
    ks = np.asarray(k, dtype=np.int64)
    if ks.ndim == 0:
        ks = np.full(n_rows, int(ks), np.int64)
    if ks.shape != (n_rows,):
        raise ValueError(f"search k: expected one k or {n_rows} (one per query row), got shape {ks.shape}")
    if (ks < 0).any():
        raise ValueError(f"search k: must be >= 0, got {ks.min()}")
    return ks


class RetrievalUnavailable(RuntimeError):
    """The retrieval backend did not answer (down, unreachable, or past its timeout)."""


class RetrievalBackend(Protocol):
    """A nearest-neighbour search over the bundle's item vectors by inner product."""

    name: str  # "faiss" or "milvus", for logs, metrics and the benchmark
    dim: int

    def search(self, queries: np.ndarray, k: int | Sequence[int], timeout_s: float | None = None) -> np.ndarray:
        """queries (Q, D) float32, k one for all rows or one per row -> (Q, max k) int64 item ids,
        best first, -1 where fewer were found and past a row's own k. Raises RetrievalUnavailable
        when the answer cannot come within timeout_s (None: no bound)."""

    def close(self) -> None:
        """Release connections; the backend is not used afterwards."""


class FaissBackend:
    """The bundle's FAISS index, in this process: one `search` over all the query rows. Never
    unavailable, so `timeout_s` is ignored (the search is bounded by the index's own cost)."""

    name = FAISS

    def __init__(self, index: faiss.Index):
        self.index = index
        self.dim = index.d
        self.search_params: dict[str, int] = {}
        self.wide = IvfScan.of(index)  # rows with k >= WIDE_K skip FAISS's result heaps (ivf_scan)

    @classmethod
    def from_bundle(cls, bundle: Bundle, n_items: int) -> "FaissBackend":
        backend = cls(read_index(bundle, n_items))
        backend.apply_search_params(bundle.stage("retrieval").get("meta", {}))
        return backend

    def apply_search_params(self, meta: dict) -> None:
        """The exporter's search-time knobs; the retrieval config carries them whatever the index
        type, so one that does not apply (nprobe on a flat index) is skipped."""
        space = faiss.ParameterSpace()
        for key, faiss_name in (("nprobe", "nprobe"), ("ef_search", "efSearch")):
            if meta.get(key):
                try:
                    space.set_index_parameter(self.index, faiss_name, int(meta[key]))
                except RuntimeError:  # not a parameter of this index type
                    continue
                self.search_params[key] = int(meta[key])

    def search(self, queries: np.ndarray, k: int | Sequence[int], timeout_s: float | None = None) -> np.ndarray:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ks = row_ks(k, len(queries))
        top = int(ks.max(initial=0))
        wide = ks >= WIDE_K if self.wide is not None else np.zeros(len(ks), bool)
        if (ks == top).all() and not wide.any():
            return self.index.search(queries, top)[1]  # (Q, k)
        out = np.full((len(queries), top), -1, np.int64)
        for row in np.flatnonzero(wide):
            found = self.wide.search(queries[row], int(ks[row]))
            out[row, : len(found)] = found
        for each in np.unique(ks[(ks > 0) & ~wide]):  # one search per distinct k: the seeds' rows share theirs
            rows = np.flatnonzero((ks == each) & ~wide)
            out[rows, :each] = self.index.search(queries[rows], int(each))[1]
        return out

    def close(self) -> None:
        pass


def embedding_version(bundle: Bundle) -> str:
    """The version of the item embeddings a bundle was built with: the sha256 its manifest
    records for retrieval/item_emb.npy. An external vector store must hold exactly these
    vectors (checked at load); a bundle without the file cannot use one."""
    entry = bundle.manifest.get("files", {}).get(RETRIEVAL_ITEM_EMB)
    if not entry:
        raise BundleError(f"bundle file {RETRIEVAL_ITEM_EMB!r} is missing: an external retrieval backend serves "
                          "those vectors, so the bundle must carry them")
    return str(entry["sha256"])


def parse_backend_uri(uri: str) -> tuple[str, str, str]:
    """`faiss` | `milvus://HOST:PORT/COLLECTION` | `milvus:///PATH/TO/FILE.db/COLLECTION` (a
    milvus-lite file) -> (kind, client uri, collection). Raises ValueError naming the problem."""
    if uri in ("", FAISS):
        return FAISS, "", ""
    parts = urlsplit(uri)
    if parts.scheme != MILVUS_SCHEME:
        raise ValueError(f"retrieval backend {uri!r}: expected 'faiss' or 'milvus://HOST:PORT/COLLECTION'")
    head, _, collection = parts.path.rstrip("/").rpartition("/")
    if not collection:
        raise ValueError(f"retrieval backend {uri!r}: no collection name after the address")
    if parts.netloc:
        if head:
            raise ValueError(f"retrieval backend {uri!r}: the path must be just /COLLECTION")
        return MILVUS_SCHEME, f"http://{parts.netloc}", collection
    if not head.endswith(".db"):
        raise ValueError(f"retrieval backend {uri!r}: a local milvus-lite file must end in .db")
    return MILVUS_SCHEME, head, collection


def popularity_order(item_ids: np.ndarray, n_items: int) -> np.ndarray:
    """Items by how often the snapshot's behaviours name them, most first (ties: smaller id
    first) -> (n_items,) int64: the degraded retrieval's candidates."""
    counts = np.bincount(np.asarray(item_ids, np.int64), minlength=n_items)[:n_items]
    return np.lexsort((np.arange(n_items), -counts)).astype(np.int64)


__all__ = ["FAISS", "FaissBackend", "RetrievalBackend", "RetrievalUnavailable", "embedding_version",
           "parse_backend_uri", "popularity_order"]
