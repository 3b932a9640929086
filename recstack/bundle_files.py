"""The bundle's model files: one table of their names, per stage directory.

The stage exporters write these files and the server reads them; both take the names from
here, so a renamed file cannot leave one side behind. Paths in a bundle are
"<stage>/<file>" (`path`). Names only: this module imports nothing.
"""
from __future__ import annotations

# stage directory -> {role: file name}; the order is the order the exporter lists them in
FILES: dict[str, dict[str, str]] = {
    "retrieval": {"user_tower": "user_tower.onnx", "item_emb": "item_emb.npy", "index": "index.faiss"},
    "coarse": {"user_tower": "user_tower.onnx", "item_vectors": "item_vectors.npy", "item_codes": "item_codes.npy",
               "item_scales": "item_scales.npy"},
    # ranker: CTR and CVR in one graph (one session call); ranker_int8: its int8 copy, written
    # only when it passes the export's quality checks; ctr / cvr: the older two-graph layout
    # item_stats: the item statistics table the rankers read on the serving day (recstack.item_stats)
    "fine": {"ranker": "ranker.onnx", "ranker_int8": "ranker_int8.onnx", "ctr": "ctr.onnx", "cvr": "cvr.onnx",
             "item_stats": "item_stats.npy"},
    # optional: the data's own user / item ids (recstack.ids), one `external_id` column each
    "ids": {"users": "users.parquet", "items": "items.parquet"},
}


def path(stage: str, role: str) -> str:
    """The file's path relative to the bundle root, e.g. path("coarse", "user_tower")."""
    return f"{stage}/{FILES[stage][role]}"


RETRIEVAL_TOWER = path("retrieval", "user_tower")
RETRIEVAL_ITEM_EMB = path("retrieval", "item_emb")
RETRIEVAL_INDEX = path("retrieval", "index")
COARSE_TOWER = path("coarse", "user_tower")
COARSE_ITEM_VECTORS = path("coarse", "item_vectors")
COARSE_ITEM_CODES = path("coarse", "item_codes")
COARSE_ITEM_SCALES = path("coarse", "item_scales")
FINE_RANKER = path("fine", "ranker")
FINE_RANKER_INT8 = path("fine", "ranker_int8")
FINE_CTR = path("fine", "ctr")
FINE_CVR = path("fine", "cvr")
FINE_ITEM_STATS = path("fine", "item_stats")
IDS_USERS = path("ids", "users")
IDS_ITEMS = path("ids", "items")
