"""Scoring outside the cascade: the fine stage on the caller's own candidates (`Score`).

The pattern of a Triton ensemble step or a Vespa rank profile over given documents: the
service looks up the user's features (snapshot + request behaviours, exactly as Rank does)
and runs the served fine stage (`Cascade.fine_scores`, the code Rank runs on its coarse
survivors) on the candidates in the order given.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from recstack.serving.cascade import Cascade, DeadlineExceeded, Query
from recstack.v1 import ranking_pb2 as pb


@dataclass
class Scores:
    """The fine stage's answer for given candidates: (M,) arrays in the request's order."""

    item_ids: np.ndarray  # internal indices
    pctr: np.ndarray
    pcvr: np.ndarray
    price: np.ndarray
    scores: np.ndarray
    cold_start: bool
    timings_ms: dict[str, float]


def score_candidates(cascade: Cascade, q: Query, cands: np.ndarray,
                     time_remaining: Callable[[], float | None] | None = None) -> Scores:
    """q (user and request behaviours, validated), cands (M,) int64 internal -> Scores; raises
    DeadlineExceeded once `time_remaining` reaches 0 before the features, pCTR or pCVR."""

    def check(stage: str) -> None:
        left = time_remaining() if time_remaining is not None else None
        if left is not None and left <= 0:
            raise DeadlineExceeded(f"deadline exceeded before the {stage} stage")

    t0 = time.perf_counter()
    check("features")
    seq_items, seq_extras, cold = cascade.sequence(q)  # (1, L, 5), (1, L, 3)
    user_feats = cascade.users.feats(np.array([q.user_id], dtype=np.int64))  # (1, 4), zeros when cold
    t1 = time.perf_counter()
    check("fine")
    pctr, pcvr, price, score = cascade.fine_scores(user_feats, seq_items, seq_extras, cands, check,
                                                   cascade.interacted_for(q))
    t2 = time.perf_counter()
    timings = {"features_ms": (t1 - t0) * 1e3, "fine_ms": (t2 - t1) * 1e3, "total_ms": (t2 - t0) * 1e3}
    return Scores(cands, pctr, pcvr, price, score, cold, timings)


def response_from_scores(s: Scores, cascade: Cascade, debug: bool) -> pb.ScoreResponse:
    resp = pb.ScoreResponse(model_version=cascade.version, cold_start=s.cold_start)
    add = resp.items.add
    for item_id, key, score, pctr, pcvr, price in zip(
            cascade.ids.items.ints(s.item_ids).tolist(), cascade.ids.items.keys(s.item_ids), s.scores.tolist(),
            s.pctr.tolist(), s.pcvr.tolist(), s.price.tolist()):
        add(item_id=item_id, item_key=key, score=score, pctr=pctr, pcvr=pcvr, price=price)
    if debug:
        resp.timings.CopyFrom(pb.StageTimings(**s.timings_ms))
    return resp


def log_user_key(request) -> dict:
    """The access log's external user id, when the request named one (bounded: it is the caller's text)."""
    return {"user_key": request.user_key[:64]} if request.user_key else {}
