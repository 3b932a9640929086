"""The bundle export's last check on an int8 fine ranker: does the served cascade still show
the same items? The fine exporter already held the int8 graph to float32's held-out AUC and
calibration; this runs the staged bundle's own cascade (retrieval -> coarse) for 1,000
snapshot users and ranks each request's fine candidates with both graphs: the int8 one
serves only if its top-50 (by pCTR x pCVR x the objective value) holds >= 95 % of float32's on average.

    result = served_top_overlap(bundle_dir)   # {"passed", "mean_overlap", "worst_overlap", ...}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from recstack.bundle import Bundle, verify_bundle
from recstack.serving.cascade import _FINE_INPUTS, Cascade, Query
from recstack.serving.fine import FineScorer

USERS = 1000
TOP_K = 50
MIN_OVERLAP = 0.95
RETRIEVAL_SIZE = 10_000  # the serving benchmark's request: 10,000 -> 500 -> 50
COARSE_SIZE = 500


def served_top_overlap(bundle_dir: str | Path, users: int | None = None, k: int | None = None,
                       min_overlap: float | None = None, retrieval_size: int | None = None,
                       coarse_size: int | None = None) -> dict:
    """Mean (over the first `users` snapshot users, default USERS) share of the float32 fine
    ranker's top-k (default TOP_K, by pCTR x pCVR x the bundle's objective value, as served) that
    the int8 one also returns, on the candidates the bundle's coarse stage passes on; passes at
    `min_overlap` (default MIN_OVERLAP). The bundle must list both fine graphs.
    -> {"passed", "mean_overlap", "worst_overlap", ...}."""
    users = USERS if users is None else users  # read here, not bound at definition: the module's values
    k = TOP_K if k is None else k
    min_overlap = MIN_OVERLAP if min_overlap is None else min_overlap
    root = Path(bundle_dir).resolve()  # a staging directory: its name is not the version yet
    bundle = Bundle(root, verify_bundle(root))
    cascade = Cascade(bundle)
    fp32 = FineScorer.load(bundle, _FINE_INPUTS, 1, precision="fp32")
    int8 = FineScorer.load(bundle, _FINE_INPUTS, 1, precision="int8")
    r = min(RETRIEVAL_SIZE if retrieval_size is None else retrieval_size, cascade.n_items)
    c = min(COARSE_SIZE if coarse_size is None else coarse_size, r)
    overlaps = []
    for u in range(min(users, cascade.n_users)):
        q = Query(user_id=u, num_results=k, retrieval_size=r, coarse_size=c)
        seq_items, seq_extras, _ = cascade.sequence(q)
        user_feats = cascade.users.feats(np.array([u], dtype=np.int64))
        trace: dict = {}
        cascade.fine = fp32
        cascade.rank_features(q, user_feats, seq_items, seq_extras, trace=trace)
        cands = trace["coarse"]
        tops = []
        for scorer in (fp32, int8):
            cascade.fine = scorer
            score = cascade.fine_scores(user_feats, seq_items, seq_extras, cands, lambda stage: None)[3]
            tops.append(cands[np.lexsort((cands, -score))[:k]])  # as Cascade.rank_features orders them
        if len(tops[0]):
            overlaps.append(len(np.intersect1d(tops[0], tops[1])) / len(tops[0]))
    mean = float(np.mean(overlaps)) if overlaps else float("nan")
    return {"passed": bool(overlaps) and mean >= min_overlap, "users": len(overlaps), "top_k": k,
            "min_overlap": min_overlap, "mean_overlap": mean,
            "worst_overlap": float(np.min(overlaps)) if overlaps else float("nan"),
            "p05_overlap": float(np.quantile(overlaps, 0.05)) if overlaps else float("nan"),
            "request": {"retrieval_size": r, "coarse_size": c}}
