"""What one ranking request asks and what the cascade answers (recstack.serving.cascade)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recstack.serving.store.base import Events


class DeadlineExceeded(RuntimeError):
    """The caller's deadline passed (or the caller left) before a stage or a model started."""


@dataclass(frozen=True)
class Query:
    """A validated request (see recstack.serving.validate); behaviour arrays are (K,) each."""

    user_id: int
    num_results: int
    retrieval_size: int
    coarse_size: int
    item_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds_ago: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    kinds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    dwell: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    now: float | None = None  # the request's time (seconds since the epoch); None = the cascade's clock
    # the user's events from the feature store (snapshot + live); None = the bundle's snapshot alone
    history: Events | None = field(default=None, compare=False, repr=False)


@dataclass
class Ranking:
    """The cascade's answer: (N,) arrays sorted by score descending."""

    item_ids: np.ndarray
    scores: np.ndarray
    pctr: np.ndarray
    pcvr: np.ndarray
    price: np.ndarray
    coarse_scores: np.ndarray
    sources: list[str]
    cold_start: bool
    timings_ms: dict[str, float]
    counts: dict[str, int]
    degraded_retrieval: bool = False  # the retrieval backend did not answer: popularity candidates
