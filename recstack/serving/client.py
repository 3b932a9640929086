"""A small client for the ranking service (`recstack rank`).

    resp = rank("localhost:50051", user_id=7, k=10)
    print(format_table(resp))

Errors surface as grpc.RpcError (`.code()`, `.details()`).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import grpc

from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

_KINDS = {"click": pb.BEHAVIOUR_KIND_CLICK, "purchase": pb.BEHAVIOUR_KIND_PURCHASE}


def behaviour(item_id: int, seconds_ago: float = 0.0, kind: str | int = "click", dwell_seconds: float = 0.0) -> pb.Behaviour:
    """One request behaviour; `kind` is "click" / "purchase" or the enum value."""
    kind = _KINDS[kind.lower()] if isinstance(kind, str) else int(kind)
    return pb.Behaviour(item_id=item_id, seconds_ago=seconds_ago, kind=kind, dwell_seconds=dwell_seconds)


def make_request(user_id: int, k: int | None = 10, behaviours: Iterable[pb.Behaviour | Mapping] | None = None,
                 debug: bool = True, retrieval_size: int = 0, coarse_size: int = 0) -> pb.RankRequest:
    req = pb.RankRequest(user_id=user_id, debug=debug, retrieval_size=retrieval_size, coarse_size=coarse_size)
    if k is not None:  # None leaves num_results unset: the server default
        req.num_results = k
    for b in behaviours or ():
        req.recent_behaviours.append(b if isinstance(b, pb.Behaviour) else behaviour(**b))
    return req


def rank(target: str, user_id: int, k: int | None = 10, behaviours: Iterable[pb.Behaviour | Mapping] | None = None,
         debug: bool = True, *, retrieval_size: int = 0, coarse_size: int = 0, timeout: float = 10.0) -> pb.RankResponse:
    """One Rank call to `target` ("host:port"); behaviours are pb.Behaviour or dicts of `behaviour`'s arguments."""
    req = make_request(user_id, k, behaviours, debug, retrieval_size, coarse_size)
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.RankingServiceStub(channel).Rank(req, timeout=timeout)


def model_info(target: str, timeout: float = 10.0) -> pb.ModelInfo:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.ModelServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)


def format_table(resp: pb.RankResponse) -> str:
    """A readable table of the ranked items, then the model version and per-stage timings."""
    head = f"{'rank':>4}  {'item':>8}  {'score':>10}  {'pctr':>7}  {'pcvr':>7}  {'price':>9}  {'coarse':>8}  source"
    lines = [head, "-" * len(head)]
    for i, it in enumerate(resp.items, 1):
        lines.append(f"{i:>4}  {it.item_id:>8}  {it.score:>10.4f}  {it.pctr:>7.4f}  {it.pcvr:>7.4f}  "
                     f"{it.price:>9.2f}  {it.coarse_score:>8.3f}  {it.source}")
    lines.append(f"model {resp.model_version}" + ("  (cold start: user unknown to the feature store)" if resp.cold_start else ""))
    if resp.HasField("timings"):
        t = resp.timings
        lines.append(f"timings ms: features {t.features_ms:.2f}  retrieval {t.retrieval_ms:.2f}  "
                     f"coarse {t.coarse_ms:.2f}  fine {t.fine_ms:.2f}  total {t.total_ms:.2f}")
    if resp.HasField("stage_counts"):
        c = resp.stage_counts
        lines.append(f"candidates: retrieved {c.retrieved} -> coarse {c.coarse} -> returned {c.returned}"
                     f"  (sequence length {c.sequence_length})")
    return "\n".join(lines)
