"""The wire layer of the service: parsing request bytes (size limit first, INVALID_ARGUMENT for
bytes that do not parse) and building the Rank response from a ranking."""
from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from recstack.ids import BundleIds
from recstack.serving.cascade import Ranking
from recstack.serving.validate import ValidationError
from recstack.v1 import ranking_pb2 as pb


def response_from_ranking(r: Ranking, version: str, debug: bool, ids: BundleIds | None = None,
                          degraded: bool = False) -> pb.RankResponse:
    """`ids` turns the internal item indices into the bundle's external ids (default: none)."""
    resp = pb.RankResponse(model_version=version, cold_start=r.cold_start, degraded_features=degraded,
                           degraded_retrieval=r.degraded_retrieval)
    add = resp.items.add
    items = (ids or BundleIds.identity(0, 0)).items
    # one tolist() per column (Python ints / floats at once) instead of a numpy scalar per field: half the cost
    for item_id, key, score, pctr, pcvr, price, coarse, source in zip(
            items.ints(r.item_ids).tolist(), items.keys(r.item_ids), r.scores.tolist(), r.pctr.tolist(),
            r.pcvr.tolist(), r.price.tolist(), r.coarse_scores.tolist(), r.sources):
        add(item_id=item_id, item_key=key, score=score, pctr=pctr, pcvr=pcvr, price=price, coarse_score=coarse,
            source=source)
    if debug:
        resp.timings.CopyFrom(pb.StageTimings(**r.timings_ms))
        resp.stage_counts.CopyFrom(pb.StageCounts(**r.counts))
    return resp


class Abort(Exception):
    """A status to return: raised inside a handler, turned into context.abort by `_guard`."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Malformed:
    """Stands in for a request that is not parsed: the handler answers INVALID_ARGUMENT for bytes
    that do not parse (grpc's own deserialisation failure would be INTERNAL), RESOURCE_EXHAUSTED
    for a message over the size limit (checked before parsing)."""

    def __init__(self, message_type: str, size: int = 0, limit: int = 0):
        self.message_type, self.size, self.limit = message_type, size, limit

    def abort(self):
        if self.limit:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"request: a {self.size}-byte message is over the server's {self.limit}-byte limit")
        raise ValidationError("request", f"cannot parse a {self.message_type} from the message bytes")


def parser(message_cls, max_bytes: int):
    def parse(data: bytes):
        if len(data) > max_bytes:
            return Malformed(message_cls.DESCRIPTOR.full_name, len(data), max_bytes)
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError):
            return Malformed(message_cls.DESCRIPTOR.full_name)

    return parse
