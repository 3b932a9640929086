"""RankRequest and ScoreRequest validation: defaults, maxima and consistency of the stage sizes,
sane behaviours, external ids mapped to the bundle's internal indices (recstack.ids).

Every failure is a ValidationError whose message starts with the offending field
(`recent_behaviours[3].item_id: ...`); the server turns it into INVALID_ARGUMENT.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from recstack import features as F
from recstack.ids import KIND_IDENTITY, KIND_INT, BundleIds
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


def resolve_user(request, ids: BundleIds) -> int:
    """The request's user (user_key when set, else user_id) -> internal index; -1 (or, without
    an id map, the raw id itself) for a user the bundle does not know: a cold start."""
    if request.user_key:
        return int(ids.users.internal_of_keys([request.user_key])[0])
    if ids.users.kind != KIND_INT and request.user_id < 0:
        raise ValidationError("user_id", f"must be >= 0, got {request.user_id}")
    if ids.users.kind == KIND_IDENTITY:  # no map: raw ids, unknown ones served cold as they are
        return int(request.user_id)
    return int(ids.users.internal_of_ints([request.user_id])[0])


def resolve_items(id_values, keys, ids: BundleIds, field_ids: str, field_keys: str) -> np.ndarray:
    """Items named by int64 id or, where its key is set, by key (N,) -> internal indices (N,);
    an unknown one is a ValidationError naming `field_ids[i]` / `field_keys[i]` (format strings)."""
    n_items = ids.items.n
    raw = np.asarray(id_values, dtype=np.int64).reshape(-1)
    has_key = np.array([k != "" for k in keys], dtype=bool).reshape(-1)
    internal = ids.items.internal_of_ints(raw)
    if has_key.any():
        internal[has_key] = ids.items.internal_of_keys([k for k in keys if k])
    bad = has_key & (internal < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValidationError(field_keys.format(i), f"unknown item key {keys[i][:100]!r}")
    bad = internal < 0
    if bad.any():
        i = int(np.argmax(bad))
        if ids.items.kind != KIND_INT and raw[i] < 0:
            raise ValidationError(field_ids.format(i), f"must be >= 0, got {int(raw[i])}")
        corpus = "" if ids.items.kind == KIND_INT else f" (the corpus has items 0..{n_items - 1})"
        raise ValidationError(field_ids.format(i), f"unknown item {int(raw[i])}{corpus}")
    return internal


def validate_behaviours(behaviours, limits: ServingLimits, ids: BundleIds) -> tuple[np.ndarray, ...]:
    """Request behaviours -> (item (K,) int64 internal, seconds_ago (K,), kind (K,) int8, dwell (K,) float32)."""
    if len(behaviours) > limits.behaviours_max:
        raise ValidationError("recent_behaviours", f"at most {limits.behaviours_max} behaviours, got {len(behaviours)}")
    items = resolve_items([b.item_id for b in behaviours], [b.item_key for b in behaviours], ids,
                          "recent_behaviours[{}].item_id", "recent_behaviours[{}].item_key")
    seconds = np.array([b.seconds_ago for b in behaviours], dtype=np.float64)
    kinds = np.array([b.kind for b in behaviours], dtype=np.int64)
    dwell = np.array([b.dwell_seconds for b in behaviours], dtype=np.float64)
    checks = (
        ("seconds_ago", ~np.isfinite(seconds), lambda v: f"must be finite, got {v}"),
        ("seconds_ago", seconds < 0, lambda v: f"must be >= 0, got {v}"),
        ("seconds_ago", seconds > limits.seconds_ago_max, lambda v: f"must be <= {limits.seconds_ago_max:g}, got {v}"),
        ("kind", ~np.isin(kinds, KINDS), lambda v: f"unknown BehaviourKind {v} (0..4 = {', '.join(F.EVENT_KINDS)})"),
        ("dwell_seconds", ~np.isfinite(dwell), lambda v: f"must be finite, got {v}"),
        ("dwell_seconds", dwell < 0, lambda v: f"must be >= 0, got {v}"),
        ("dwell_seconds", dwell > limits.dwell_seconds_max, lambda v: f"must be <= {limits.dwell_seconds_max:g}, got {v}"),
    )
    values = {"seconds_ago": seconds, "kind": kinds, "dwell_seconds": dwell}
    for name, bad, message in checks:
        if bad.any():
            i = int(np.argmax(bad))
            v = values[name][i]
            v = int(v) if name == "kind" else (v if math.isfinite(v) else str(v))
            raise ValidationError(f"recent_behaviours[{i}].{name}", message(v))
    return items, seconds, kinds.astype(np.int8), dwell.astype(np.float32)


def validate_rank_request(request, limits: ServingLimits, n_items: int, ids: BundleIds | None = None) -> Query:
    """recstack.v1.RankRequest -> Query with every size resolved; raises ValidationError.

    Explicit sizes must satisfy num_results <= coarse_size <= retrieval_size; an unset size takes
    its default stretched or shrunk to fit the explicit ones (retrieval_size=50 alone gives
    coarse 50; num_results=300 alone gives coarse 300). All three are then capped by the
    corpus size. `ids` maps the request's external ids (default: none, ids are internal).
    """
    ids = ids if ids is not None else BundleIds.identity(0, n_items)
    user = resolve_user(request, ids)

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

    items, seconds, kinds, dwell = validate_behaviours(request.recent_behaviours, limits, ids)
    retrieval = min(retrieval, n_items)
    coarse = min(coarse, retrieval)
    return Query(
        user_id=user, num_results=min(n, coarse), retrieval_size=retrieval, coarse_size=coarse,
        item_ids=items, seconds_ago=seconds, kinds=kinds, dwell=dwell,
    )


def validate_score_request(request, limits: ServingLimits, ids: BundleIds) -> tuple[Query, np.ndarray]:
    """recstack.v1.ScoreRequest -> (Query of the user and behaviours, candidates (M,) int64 internal)."""
    user = resolve_user(request, ids)
    if len(request.item_ids) and len(request.item_keys):
        raise ValidationError("item_keys", "name the candidates by item_ids or by item_keys, not both")
    m = len(request.item_ids) or len(request.item_keys)
    field = "item_keys" if len(request.item_keys) else "item_ids"
    if m == 0:
        raise ValidationError("item_ids", "at least one candidate (item_ids or item_keys)")
    if m > limits.coarse_size_max:
        raise ValidationError(field, f"at most {limits.coarse_size_max} candidates (the server's coarse_size_max), got {m}")
    if len(request.item_keys):
        cands = resolve_items(np.zeros(m, np.int64), list(request.item_keys), ids, "item_ids[{}]", "item_keys[{}]")
    else:
        cands = resolve_items(np.asarray(request.item_ids, np.int64), [""] * m, ids, "item_ids[{}]", "item_keys[{}]")
    items, seconds, kinds, dwell = validate_behaviours(request.recent_behaviours, limits, ids)
    query = Query(user_id=user, num_results=m, retrieval_size=m, coarse_size=m, item_ids=items, seconds_ago=seconds,
                  kinds=kinds, dwell=dwell)
    return query, cands
