"""Publishing a bundle's item embeddings to an external retrieval backend (Milvus).

    publish_bundle("artifacts/v20260101-000000", "milvus://milvus:19530/items")
    publish_bundle(bundle_dir, "milvus:///data/items.db/items")        # milvus-lite file

The collection is versioned by the embeddings' sha256 as the bundle's manifest records it
(recstack.serving.milvus_backend), so a server loading the bundle with that backend finds
exactly the vectors the bundle was built with, or refuses it. `recstack export --publish`
runs this before it moves `current`, so a replica following `current` never loads a bundle
whose collection is not there yet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recstack.bundle import Bundle
from recstack.bundle_files import RETRIEVAL_ITEM_EMB
from recstack.serving.candidates import FAISS, embedding_version, parse_backend_uri


class PublishError(RuntimeError):
    """The embeddings could not be published; the message names the backend and the reason."""


def publish_bundle(bundle_dir: str | Path, uri: str, index_type: str = "FLAT") -> str:
    """Publish the bundle's retrieval/item_emb.npy to the collection `uri` names, under the
    bundle's embedding version; -> the physical collection name. `index_type`: FLAT (exact),
    IVF_FLAT or HNSW."""
    kind, client_uri, collection = parse_backend_uri(uri)
    if kind == FAISS:
        raise PublishError(f"--publish {uri!r}: expected a milvus:// URI (the FAISS index ships inside the bundle)")
    from recstack.serving.milvus_backend import publish  # pymilvus only when publishing

    bundle = Bundle.open(bundle_dir, verify=True)
    version = embedding_version(bundle)
    emb = np.load(bundle.path(RETRIEVAL_ITEM_EMB), mmap_mode="r", allow_pickle=False)
    try:
        return publish(emb, client_uri, collection, version, index_type=index_type)
    except ValueError:
        raise
    except Exception as e:  # pymilvus / grpc errors: unreachable server, refused insert, ...
        raise PublishError(f"--publish {uri}: {type(e).__name__}: {str(e)[:300]}") from e
