"""Client-side load balancing over N stateless ranking replicas (docs/SCALING.md, "Replicas").

    ch = balanced_channel(["10.0.0.5:50051", "10.0.0.6:50051"])   # a static list of replicas
    ch = balanced_channel("dns:///ranking.svc.cluster.local:50051")  # every A record of a DNS name
    stub = RankingServiceStub(ch)

The channel keeps a connection to every replica and spreads calls over the READY ones
(`round_robin`). Its service config (SERVICE_CONFIG) also
- health-checks each replica with grpc.health.v1 `Watch` on the ranking service, so a replica
  that starts draining (SIGTERM: it reports NOT_SERVING at once, then finishes its calls in
  flight) stops receiving new calls before it closes its port;
- retries a call that failed with UNAVAILABLE (a replica that went away between the pick and
  the send) on another replica, up to 5 attempts with exponential backoff (Rank reads only,
  so a retry is safe). Every other status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED, ...) is the answer; retries never outlive the call's deadline.
"""
from __future__ import annotations

import json
from typing import Sequence

import grpc

from recstack.v1 import ranking_pb2 as pb

RANKING_SERVICE = pb.DESCRIPTOR.services_by_name["RankingService"].full_name

SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": RANKING_SERVICE},
    "methodConfig": [{
        "name": [{"service": RANKING_SERVICE}],
        "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}


def target_of(replicas: str | Sequence[str]) -> str:
    """A gRPC target for the replicas: a name with a resolver scheme (`dns:///host:port`) as it
    is, or a list of host:port (IPv4 or [IPv6]) as one `ipv4:` / `ipv6:` target."""
    if isinstance(replicas, str):
        if "://" not in replicas and ":///" not in replicas and not replicas.startswith(("ipv4:", "ipv6:", "unix:")):
            raise ValueError(f"replicas {replicas!r}: expected dns:///HOST:PORT or a list of HOST:PORT")
        return replicas
    if not replicas:
        raise ValueError("replicas: the list is empty")
    v6 = [r.startswith("[") for r in replicas]
    if any(v6) and not all(v6):
        raise ValueError("replicas: mix of IPv4 and IPv6 addresses; use a DNS name instead")
    return ("ipv6:" if all(v6) else "ipv4:") + ",".join(replicas)


def balanced_channel(replicas: str | Sequence[str], options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """An insecure channel spreading calls over the replicas (see the module docstring)."""
    opts = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1), *options]
    return grpc.insecure_channel(target_of(replicas), options=opts)
