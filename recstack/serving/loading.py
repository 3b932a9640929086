"""Loading a bundle's files for serving, each checked before it serves: the feature-store
snapshot (ids in order, counts matching the vocabulary, finite positive prices), the ONNX
models (loadable, declaring only inputs serving provides), the FAISS index (inner product,
one vector per item, finite) and the item vectors (shapes and dtypes). Every refusal is a
BundleError naming the bundle file.

Export runs the same index check (`check_index_finite`) before it writes a bundle.
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq

from recstack import features as F
from recstack import ids as IDS
from recstack.bundle import SNAPSHOT_BEHAVIOURS, SNAPSHOT_ITEMS, SNAPSHOT_USERS, Bundle, BundleError, count_non_finite
from recstack.bundle_files import COARSE_ITEM_VECTORS, IDS_ITEMS, IDS_USERS, RETRIEVAL_INDEX, RETRIEVAL_ITEM_EMB


def onnx_session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    # one request's tensors are small: intra-op threads mostly add contention between
    # concurrent requests, so the default is 1 and parallelism comes from gRPC workers
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad models
        raise BundleError(f"bundle file {path.name!r} ({path}): onnxruntime cannot load it: {e}") from e


class OnnxModel:
    """An ONNX session fed by input name from a dict of available feature tensors."""

    def __init__(self, bundle: Bundle, relpath: str, allowed: set[str], threads: int):
        self.relpath = relpath
        self.session = onnx_session(bundle.path(relpath), threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        unknown = set(self.inputs) - allowed
        if unknown:
            raise BundleError(f"bundle file {relpath!r} declares inputs {sorted(unknown)}; serving provides {sorted(allowed)}")

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {n: feeds[n] for n in self.inputs})[0]


def read_table(bundle: Bundle, relpath: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        table = pq.read_table(bundle.path(relpath))
    except BundleError:
        raise
    except Exception as e:
        raise BundleError(f"bundle file {relpath!r}: cannot read parquet: {e}") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise BundleError(f"bundle file {relpath!r}: missing columns {missing}")
    return {c: table.column(c).to_numpy() for c in columns}


def read_snapshot(bundle: Bundle, vocab: F.Vocab) -> tuple[F.UserTable, F.ItemTable, tuple[np.ndarray, ...]]:
    """The feature-store snapshot: users, items, and the behaviours sorted user-major, newest
    first -> (user_id, seconds_ago, item_id, kind, dwell, start), where user u's behaviours
    are rows start[u]:start[u + 1]."""
    u = read_table(bundle, SNAPSHOT_USERS, ("user_id", "age_bucket", "gender", "activity"))
    if not np.array_equal(u["user_id"], np.arange(len(u["user_id"]))):
        raise BundleError(f"bundle file {SNAPSHOT_USERS!r}: user_id must be 0..n-1 in order")
    users = F.UserTable(u["age_bucket"], u["gender"], u["activity"])
    it = read_table(bundle, SNAPSHOT_ITEMS, ("item_id", "category", "shop", "brand", "price_bucket", "price"))
    if not np.array_equal(it["item_id"], np.arange(len(it["item_id"]))):
        raise BundleError(f"bundle file {SNAPSHOT_ITEMS!r}: item_id must be 0..n-1 in order")
    if not (np.all(np.isfinite(it["price"])) and np.all(it["price"] > 0)):
        raise BundleError(f"bundle file {SNAPSHOT_ITEMS!r}: prices must be finite and > 0")
    items = F.ItemTable(it["category"], it["shop"], it["brand"], it["price_bucket"], it["price"],
                        vocab.log_price_mean, vocab.log_price_std)
    n_users, n_items = users.n, items.n
    if n_items == 0:
        raise BundleError(f"bundle file {SNAPSHOT_ITEMS!r}: the corpus is empty")
    if n_items != vocab.n_items:
        raise BundleError(f"bundle file {SNAPSHOT_ITEMS!r}: {n_items} items, vocab says {vocab.n_items}")
    if n_users != vocab.n_users:
        raise BundleError(f"bundle file {SNAPSHOT_USERS!r}: {n_users} users, vocab says {vocab.n_users}")
    b = read_table(bundle, SNAPSHOT_BEHAVIOURS, ("user_id", "seconds_ago", "item_id", "kind", "dwell"))
    order = np.lexsort((b["seconds_ago"], b["user_id"]))  # user-major, newest first
    beh_user = b["user_id"].astype(np.int64)[order]
    if len(beh_user) and (beh_user[0] < 0 or beh_user[-1] >= n_users):
        raise BundleError(f"bundle file {SNAPSHOT_BEHAVIOURS!r}: user_id outside [0, {n_users})")
    beh_seconds = b["seconds_ago"].astype(np.float64)[order]
    beh_item = b["item_id"].astype(np.int64)[order]
    beh_kind = b["kind"].astype(np.int8)[order]
    beh_dwell = b["dwell"].astype(np.float32)[order]
    if not items.known(beh_item).all():
        raise BundleError(f"bundle file {SNAPSHOT_BEHAVIOURS!r}: item_id outside [0, {n_items})")
    beh_start = np.searchsorted(beh_user, np.arange(n_users + 1)).astype(np.int64)  # (U+1,)
    return users, items, (beh_user, beh_seconds, beh_item, beh_kind, beh_dwell, beh_start)


def read_ids(bundle: Bundle, n_users: int, n_items: int) -> IDS.BundleIds:
    """The external id maps (recstack.ids); a side without its file in the manifest is the identity."""
    maps = []
    for rel, n in ((IDS_USERS, n_users), (IDS_ITEMS, n_items)):
        if rel not in bundle.manifest.get("files", {}):
            maps.append(IDS.IdMap.identity(n))
            continue
        try:
            maps.append(IDS.IdMap(read_table(bundle, rel, (IDS.EXTERNAL_ID,))[IDS.EXTERNAL_ID], n, f"bundle file {rel!r}"))
        except IDS.IdError as e:
            raise BundleError(str(e)) from None
    return IDS.BundleIds(*maps)


def read_index(bundle: Bundle, n_items: int):
    """The retrieval index: one finite vector per item, searched by inner product."""
    try:
        index = faiss.read_index(str(bundle.path(RETRIEVAL_INDEX)))
    except RuntimeError as e:
        raise BundleError(f"bundle file {RETRIEVAL_INDEX!r}: faiss cannot read it: {e}") from e
    if index.ntotal != n_items:
        raise BundleError(f"bundle file {RETRIEVAL_INDEX!r}: {index.ntotal} vectors for {n_items} items")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"bundle file {RETRIEVAL_INDEX!r}: expected an inner-product index (training metric)")
    check_index_finite(index, RETRIEVAL_INDEX)
    return index


def read_item_emb(bundle: Bundle, n_items: int, dim: int) -> np.ndarray | None:
    """Item vectors for the item-to-item source, memory-mapped: a request reads only its
    seeds' rows (1e6 x 64 floats stay on disk / in the page cache). None for a bundle without
    the file (it serves ANN only)."""
    if RETRIEVAL_ITEM_EMB not in bundle.manifest.get("files", {}):
        return None
    try:
        emb = np.load(bundle.path(RETRIEVAL_ITEM_EMB), mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"bundle file {RETRIEVAL_ITEM_EMB!r}: {e}") from e
    if emb.ndim != 2 or emb.shape != (n_items, dim) or emb.dtype != np.float32:
        raise BundleError(f"bundle file {RETRIEVAL_ITEM_EMB!r}: {emb.dtype} {emb.shape}, expected float32 "
                          f"({n_items}, {dim})")
    return emb


def read_coarse_vectors(bundle: Bundle, n_items: int) -> np.ndarray:
    """The coarse stage's precomputed item vectors (I, D) float32, score scale folded in."""
    try:
        vecs = np.load(bundle.path(COARSE_ITEM_VECTORS), allow_pickle=False)
    except ValueError as e:
        raise BundleError(f"bundle file {COARSE_ITEM_VECTORS!r}: {e}") from e
    if vecs.ndim != 2 or vecs.shape[0] != n_items:
        raise BundleError(f"bundle file {COARSE_ITEM_VECTORS!r}: shape {vecs.shape}, expected ({n_items}, D)")
    return np.ascontiguousarray(vecs, dtype=np.float32)


def check_index_finite(index, rel: str, chunk: int = 65_536) -> bool:
    """Refuse a FAISS index holding a NaN or infinite vector (or centroid). Flat, HNSW-flat and
    IVF-flat storage is read in full; for other encodings the float parameters (coarse and
    PQ centroids) are. Returns False when the index type offers nothing to read (unchecked)."""
    def reconstructed(ix) -> int:
        return sum(count_non_finite(ix.reconstruct_n(s, min(chunk, ix.ntotal - s))) for s in range(0, ix.ntotal, chunk))

    ivf = faiss.try_extract_index_ivf(index)
    try:
        if ivf is not None:
            ivf = faiss.downcast_index(ivf)  # the concrete class (IndexIVFFlat, IndexIVFPQ, ...)
            bad = reconstructed(ivf.quantizer)
            flat = isinstance(ivf, faiss.IndexIVFFlat) and ivf.code_size == 4 * ivf.d
            for l in range(ivf.nlist) if flat else ():
                n = ivf.invlists.list_size(l)
                if n:
                    codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(l), n * ivf.code_size)
                    bad += count_non_finite(np.frombuffer(codes, np.uint8).view(np.float32))
            pq = getattr(ivf, "pq", None)
            if pq is not None:
                bad += count_non_finite(faiss.vector_to_array(pq.centroids))
        else:
            bad = reconstructed(index)
    except RuntimeError:  # this index type does not reconstruct its vectors
        return False
    if bad:
        raise BundleError(f"bundle file {rel!r}: {bad} NaN or infinite values in the index; a model file must be "
                          "finite (did training diverge?)")
    return True


def snapshot_time(manifest: dict) -> float:
    """When the bundle's snapshot was taken, in seconds since the epoch: the time of its data's
    last event when the data's times are absolute (`snapshot.epoch`: a world written from a
    server's log), else its export time (`created`, ISO 8601). BundleError when that is missing
    or unparsable."""
    epoch = (manifest.get("snapshot") or {}).get("epoch")
    if epoch is not None:
        if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or not math.isfinite(epoch) or epoch <= 0:
            raise BundleError(f"manifest.json: snapshot.epoch: {epoch!r} is not a time in seconds since the epoch")
        return float(epoch)
    created = manifest.get("created")
    try:
        t = _dt.datetime.fromisoformat(str(created))
    except ValueError:
        raise BundleError(f"manifest.json: created: {created!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()
