"""Opening the retrieval backend a URI names (recstack.serving.candidates.parse_backend_uri):
the bundle's FAISS index, or a Milvus collection (pymilvus is imported only then)."""
from __future__ import annotations

from recstack.bundle import Bundle
from recstack.serving.candidates import FAISS, FaissBackend, RetrievalBackend, embedding_version, parse_backend_uri


def open_backend(bundle: Bundle, n_items: int, uri: str = FAISS, timeout_s: float = 0.05) -> RetrievalBackend:
    """The backend `uri` names (see parse_backend_uri), checked against the bundle: a FAISS
    index must hold n_items inner-product vectors; a Milvus collection must hold this bundle's
    embedding version. `timeout_s` bounds each remote call (the request's deadline may bound
    it further)."""
    kind, client_uri, collection = parse_backend_uri(uri)
    if kind == FAISS:
        return FaissBackend.from_bundle(bundle, n_items)
    from recstack.serving.milvus_backend import MilvusBackend  # pymilvus only when selected

    return MilvusBackend.connect(client_uri, collection, version=embedding_version(bundle), n_items=n_items,
                                 timeout_s=timeout_s)
