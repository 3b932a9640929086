"""A small client for the ranking service (`recstack rank`).

    resp = rank("localhost:50051", user_id=7, k=10)
    print(format_table(resp))

Errors surface as grpc.RpcError (`.code()`, `.details()`). `tls_ca` (a PEM file) switches the
channel to TLS; `admin_token` is sent as `authorization: Bearer <token>` to ModelService.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import grpc

from recstack.v1 import ranking_pb2 as pb
from recstack.v1 import ranking_pb2_grpc as pb_grpc

_KINDS = {"click": pb.BEHAVIOUR_KIND_CLICK, "purchase": pb.BEHAVIOUR_KIND_PURCHASE, "view": pb.BEHAVIOUR_KIND_VIEW,
          "favourite": pb.BEHAVIOUR_KIND_FAVOURITE, "cart": pb.BEHAVIOUR_KIND_CART}


def behaviour(item_id: int, seconds_ago: float = 0.0, kind: str | int = "click", dwell_seconds: float = 0.0) -> pb.Behaviour:
    """One request behaviour; `kind` is "click" / "purchase" or the enum value."""
    kind = _KINDS[kind.lower()] if isinstance(kind, str) else int(kind)
    return pb.Behaviour(item_id=item_id, seconds_ago=seconds_ago, kind=kind, dwell_seconds=dwell_seconds)


def event(user_id: int, item_id: int, timestamp: float, kind: str | int = "click", dwell_seconds: float = 0.0,
          request_id: str | None = None) -> pb.Event:
    """One LogEvents event (absolute `timestamp`, seconds since the epoch); `kind` a name or the enum value."""
    kind = _KINDS[kind.lower()] if isinstance(kind, str) else int(kind)
    ev = pb.Event(user_id=user_id, item_id=item_id, kind=kind, timestamp=timestamp, dwell_seconds=dwell_seconds)
    if request_id is not None:
        ev.request_id = request_id
    return ev


def log_events(target: str, events: Iterable[pb.Event], timeout: float = 10.0) -> pb.LogEventsResponse:
    """Send a batch through EventService.LogEvents (all or nothing; durable once it returns)."""
    with channel(target) as ch:
        return pb_grpc.EventServiceStub(ch).LogEvents(pb.LogEventsRequest(events=list(events)), timeout=timeout)


def make_request(user_id: int, k: int | None = 10, behaviours: Iterable[pb.Behaviour | Mapping] | None = None,
                 debug: bool = True, retrieval_size: int = 0, coarse_size: int = 0) -> pb.RankRequest:
    req = pb.RankRequest(user_id=user_id, debug=debug, retrieval_size=retrieval_size, coarse_size=coarse_size)
    if k is not None:  # None leaves num_results unset: the server default
        req.num_results = k
    for b in behaviours or ():
        req.recent_behaviours.append(b if isinstance(b, pb.Behaviour) else behaviour(**b))
    return req


def channel(target: str, tls_ca: str | None = None, server_name: str | None = None, options=None) -> grpc.Channel:
    """A channel to `target`: plaintext, or TLS verified against the PEM file `tls_ca`
    (`server_name` overrides the name checked against the certificate). `options`: grpc channel args."""
    options = list(options or [])
    if tls_ca is None:
        return grpc.insecure_channel(target, options=options)
    with open(tls_ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=options)


def admin_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def rank(target: str, user_id: int, k: int | None = 10, behaviours: Iterable[pb.Behaviour | Mapping] | None = None,
         debug: bool = True, *, retrieval_size: int = 0, coarse_size: int = 0, timeout: float = 10.0,
         tls_ca: str | None = None) -> pb.RankResponse:
    """One Rank call to `target` ("host:port"); behaviours are pb.Behaviour or dicts of `behaviour`'s arguments."""
    req = make_request(user_id, k, behaviours, debug, retrieval_size, coarse_size)
    with channel(target, tls_ca) as ch:
        return pb_grpc.RankingServiceStub(ch).Rank(req, timeout=timeout)


def model_info(target: str, admin_token: str | None = None, timeout: float = 10.0, tls_ca: str | None = None) -> pb.ModelInfo:
    with channel(target, tls_ca) as ch:
        return pb_grpc.ModelServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                                         metadata=admin_metadata(admin_token))


def reload(target: str, version: str = "", admin_token: str | None = None, timeout: float = 120.0,
           tls_ca: str | None = None) -> pb.ModelInfo:
    """Ask the server to load `version` ("" = follow `current`); raises grpc.RpcError
    FAILED_PRECONDITION, with the reason, if the bundle is refused."""
    with channel(target, tls_ca) as ch:
        return pb_grpc.ModelServiceStub(ch).Reload(pb.ReloadRequest(version=version), timeout=timeout,
                                                   metadata=admin_metadata(admin_token))


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


def score(target: str, item_ids: Iterable[int] = (), user_id: int = 0, *, user_key: str = "",
          item_keys: Iterable[str] = (), behaviours: Iterable[pb.Behaviour | Mapping] | None = None, debug: bool = False,
          timeout: float = 10.0, tls_ca: str | None = None) -> pb.ScoreResponse:
    """One Score call: the fine stage on the candidates named by `item_ids` or `item_keys`, in that order."""
    req = pb.ScoreRequest(user_id=user_id, user_key=user_key, item_ids=list(item_ids), item_keys=list(item_keys),
                          debug=debug)
    for b in behaviours or ():
        req.recent_behaviours.append(b if isinstance(b, pb.Behaviour) else behaviour(**b))
    with channel(target, tls_ca) as ch:
        return pb_grpc.RankingServiceStub(ch).Score(req, timeout=timeout)
