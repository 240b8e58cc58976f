"""`optserve health ADDR`: one grpc.health.v1 check, light enough for an orchestrator's probe.

It imports grpc, the health stubs and client/security.py only (no torch, no server code): compose,
Swarm and Kubernetes run it every few seconds inside the shard's container, under a timeout that a
torch import on a loaded machine used to overrun (4.5 s of a 4.8 s check). The health service is open
without the token; a token given is sent anyway, and TLS is as for every other client.
"""
from __future__ import annotations

from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client.security import Security

TIMEOUT = 5.0  # seconds for the one call


def health(address: str, security: Security | None = None, timeout: float = TIMEOUT) -> str:
    """The shard's status ("SERVING", "NOT_SERVING", ...), or "unreachable (CODE: details)"."""
    security = security or Security.from_env()
    channel = security.channel(address, [])
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                          timeout=timeout, metadata=security.metadata())
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name}: {exc.details()})"
    finally:
        channel.close()


def health_main(address: str, security: Security | None, out: TextIO, timeout: float = TIMEOUT) -> int:
    """Print the shard's status; exit 0 only when SERVING."""
    status = health(address, security, timeout)
    print(f"{address}: {status}", file=out)
    return 0 if status == "SERVING" else 1
