"""RankRequest validation: defaults, maxima and consistency of the stage sizes, sane behaviours.

Every failure is a ValidationError whose message starts with the offending field
(`recent_behaviours[3].item_id: ...`); the server turns it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from recstack import features as F
from recstack.serving.cascade import Query

KINDS = tuple(range(len(F.EVENT_KINDS)))  # BehaviourKind: CLICK, PURCHASE, VIEW, FAVOURITE, CART


class ValidationError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class ServingLimits:
    """Server defaults (used when a request leaves a size unset) and maxima (hard limits)."""

    num_results_default: int = 10  # items returned
    num_results_max: int = 500  # fine ranking cost grows with it only through coarse_size, but responses grow
    retrieval_size_default: int = 1000  # ANN candidates (capped by the corpus size)
    retrieval_size_max: int = 10_000  # DESIGN: ~1e4 candidates out of retrieval
    coarse_size_default: int = 200  # survivors of the coarse ranker, fine-ranked
    coarse_size_max: int = 2_000  # bounds the fine stage's batch (its cost dominates)
    behaviours_max: int = 50  # request behaviours; the models see at most the 50 newest anyway
    seconds_ago_max: float = 10 * 365 * 86400.0  # older than the world's history is a client bug; also keeps float32 finite
    dwell_seconds_max: float = 86400.0  # a day on one item page is not a dwell; bounds log1p(dwell) for the models

    def __post_init__(self):
        for name in ("num_results", "retrieval_size", "coarse_size"):
            d, m = getattr(self, f"{name}_default"), getattr(self, f"{name}_max")
            if not 1 <= d <= m:
                raise ValueError(f"ServingLimits: need 1 <= {name}_default ({d}) <= {name}_max ({m})")
        if not self.num_results_default <= self.coarse_size_default <= self.retrieval_size_default:
            raise ValueError("ServingLimits: need num_results_default <= coarse_size_default <= retrieval_size_default")
        if self.behaviours_max < 0:
            raise ValueError("ServingLimits: behaviours_max must be >= 0")
        if not (self.seconds_ago_max > 0 and self.dwell_seconds_max > 0):
            raise ValueError("ServingLimits: seconds_ago_max and dwell_seconds_max must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


def _size(value: int, field: str, maximum: int) -> int:
    if value < 0:
        raise ValidationError(field, f"must be >= 0 (0 = server default), got {value}")
    if value > maximum:
        raise ValidationError(field, f"must be <= {maximum} (server maximum), got {value}")
    return value


def validate_rank_request(request, limits: ServingLimits, n_items: int) -> Query:
    """recstack.v1.RankRequest -> Query with every size resolved; raises ValidationError.

    Explicit sizes must satisfy num_results <= coarse_size <= retrieval_size; an unset size takes
    its default stretched or shrunk to fit the explicit ones (retrieval_size=50 alone gives
    coarse 50; num_results=300 alone gives coarse 300). All three are then capped by the
    corpus size.
    """
    if request.user_id < 0:
        raise ValidationError("user_id", f"must be >= 0, got {request.user_id}")

    retrieval = _size(request.retrieval_size, "retrieval_size", limits.retrieval_size_max)
    coarse = _size(request.coarse_size, "coarse_size", limits.coarse_size_max)
    n = 0
    if request.HasField("num_results"):
        n = request.num_results
        if n <= 0:
            raise ValidationError("num_results", f"must be >= 1, got {n}")
        if n > limits.num_results_max:
            raise ValidationError("num_results", f"must be <= {limits.num_results_max} (server maximum), got {n}")
    # unset sizes take the default, stretched or shrunk to fit the explicit ones
    retrieval = retrieval or min(max(limits.retrieval_size_default, coarse, n), limits.retrieval_size_max)
    if coarse > retrieval:
        raise ValidationError("coarse_size", f"must be <= retrieval_size ({retrieval}), got {coarse}")
    coarse = coarse or min(max(limits.coarse_size_default, n), retrieval, limits.coarse_size_max)
    if n > coarse:
        raise ValidationError("num_results", f"must be <= coarse_size ({coarse}), got {n}")
    n = n or min(limits.num_results_default, coarse)

    behaviours = request.recent_behaviours
    if len(behaviours) > limits.behaviours_max:
        raise ValidationError("recent_behaviours", f"at most {limits.behaviours_max} behaviours, got {len(behaviours)}")
    items = np.array([b.item_id for b in behaviours], dtype=np.int64)
    seconds = np.array([b.seconds_ago for b in behaviours], dtype=np.float64)
    kinds = np.array([b.kind for b in behaviours], dtype=np.int64)
    dwell = np.array([b.dwell_seconds for b in behaviours], dtype=np.float64)
    checks = (
        ("item_id", items < 0, lambda v: f"must be >= 0, got {v}"),
        ("item_id", items >= n_items, lambda v: f"unknown item {v} (the corpus has items 0..{n_items - 1})"),
        ("seconds_ago", ~np.isfinite(seconds), lambda v: f"must be finite, got {v}"),
        ("seconds_ago", seconds < 0, lambda v: f"must be >= 0, got {v}"),
        ("seconds_ago", seconds > limits.seconds_ago_max, lambda v: f"must be <= {limits.seconds_ago_max:g}, got {v}"),
        ("kind", ~np.isin(kinds, KINDS), lambda v: f"unknown BehaviourKind {v} (0..4 = {', '.join(F.EVENT_KINDS)})"),
        ("dwell_seconds", ~np.isfinite(dwell), lambda v: f"must be finite, got {v}"),
        ("dwell_seconds", dwell < 0, lambda v: f"must be >= 0, got {v}"),
        ("dwell_seconds", dwell > limits.dwell_seconds_max, lambda v: f"must be <= {limits.dwell_seconds_max:g}, got {v}"),
    )
    values = {"item_id": items, "seconds_ago": seconds, "kind": kinds, "dwell_seconds": dwell}
    for name, bad, message in checks:
        if bad.any():
            i = int(np.argmax(bad))
            v = values[name][i]
            v = int(v) if name in ("item_id", "kind") else (v if math.isfinite(v) else str(v))
            raise ValidationError(f"recent_behaviours[{i}].{name}", message(v))

    retrieval = min(retrieval, n_items)
    coarse = min(coarse, retrieval)
    return Query(
        user_id=int(request.user_id), num_results=min(n, coarse), retrieval_size=retrieval, coarse_size=coarse,
        item_ids=items, seconds_ago=seconds, kinds=kinds.astype(np.int8), dwell=dwell.astype(np.float32),
    )
