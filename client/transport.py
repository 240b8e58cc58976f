"""Channels to shards: one `ShardClient` per shard, with deadlines, and the streaming byte path.

Tensor-carrying calls use the codec of optserve/serde.py (raw `bytes` in and out of grpc); pulled
bytes are copied once, straight into the caller's destination tensors (the model's parameters). This
module knows nothing about models or Adam: RemoteAdam (remote_adam.py) decides what to send.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optserve.client.data import DataCallError, DataChannel, client_ssl_context
from optserve.errors import REASON_METADATA
from optserve.client.security import Security
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import (DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, Assembler, Outgoing,
                            chunk_stream, decode, pull_expected)

log = logging.getLogger("optserve.client")

_METHOD = "/optserve.v1.OptServe/"

# Destinations of a pull: for each (entry, part) of the head, a flat tensor to copy the bytes into.
Sink = Callable[[pb.PullHead], dict[tuple[int, int], torch.Tensor]]


# CANCELLED too: optserve never cancels its own calls, so a CANCELLED comes from a shard shutting down
# with the call in flight; retrying is safe because every push is applied once per (client_id, seq).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED})
# An UNAVAILABLE that is a failed TLS handshake will not heal by waiting: it is not retried. Phrases
# of handshake failures only (grpc's "Tls handshake failed ... SSL_ERROR_SSL", the data channel's
# "TLS handshake failed", Python's "certificate verify failed"), matched with the target address
# taken out of the details: a shard named "ps-tls-0" that is briefly down is still waited for.
_TLS_FAILURE = ("handshake failed", "ssl_error", "certificate verify failed")
T = TypeVar("T")
# A shard restarted at a new address under the same name (a rescheduled pod or Swarm task) is followed
# within about a second: gRPC re-resolves the name when a connection fails, but by default no sooner
# than 30 s after the last resolution, and backs off reconnecting for up to 120 s; a worker then dials
# the old address for most of its retry budget. The data channel resolves on every connect.
PROGRESS_EVERY = 5.0
FOLLOW_MOVES = (("grpc.dns_min_time_between_resolutions_ms", 1000),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000))


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for UNAVAILABLE and DEADLINE_EXCEEDED: full jitter, exponential, within a budget."""
    budget: float = 60.0  # seconds from the first attempt after which the error is raised
    initial: float = 0.05
    maximum: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.budget < 0 or self.initial <= 0 or self.maximum < self.initial or self.multiplier < 1:
            raise ValueError(f"bad retry policy {self}: need budget >= 0, 0 < initial <= maximum, "
                             f"multiplier >= 1")


class ShardError(RuntimeError):
    """A shard refused or failed a call; carries the gRPC code and the shard's message."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str, reason: str = ""):
        super().__init__(f"{method} on {address}: {code.name}: {details}")
        self.address = address
        self.method = method
        self.code = code
        self.details = details
        # the shard's `optserve-reason` trailing metadata (errors.STALE, errors.AHEAD, ...)
        self.reason = reason


class ShardClient:
    """Calls to one shard. Thread-safe: calls may run concurrently on the one channel."""

    def __init__(self, address: str, *, timeout: float = 300.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retry: RetryPolicy = RetryPolicy(), security: Security | None = None,
                 data_channel: bool = True, shm: bool = True):
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.retry = retry
        security = security or Security.from_env()
        self._md = security.metadata()
        self.channel = security.channel(address, [("grpc.max_receive_message_length", max_message_bytes),
                                                  ("grpc.max_send_message_length", max_message_bytes),
                                                  *FOLLOW_MOVES])
        c = self.channel
        self._hello = c.unary_unary(_METHOD + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                    response_deserializer=pb.HelloReply.FromString)
        self._register = c.stream_unary(_METHOD + "Register",
                                        response_deserializer=pb.RegisterReply.FromString)
        self._push = c.stream_unary(_METHOD + "Push", response_deserializer=pb.PushReply.FromString)
        self._pull = c.unary_stream(_METHOD + "Pull", request_serializer=pb.PullRequest.SerializeToString)
        self._push_pull = c.stream_stream(_METHOD + "PushPull")
        self._set_state = c.stream_unary(_METHOD + "SetState",
                                         response_deserializer=pb.SetStateReply.FromString)
        self._stats = c.unary_unary(_METHOD + "Stats", request_serializer=pb.StatsRequest.SerializeToString,
                                    response_deserializer=pb.StatsReply.FromString)
        self._checkpoint = c.unary_unary(_METHOD + "Checkpoint",
                                         request_serializer=pb.CheckpointRequest.SerializeToString,
                                         response_deserializer=pb.CheckpointReply.FromString)
        # Push, Pull and PushPull go over the shard's data channel when it announces one (and
        # data_channel is True), else over gRPC; both reach the same handlers (server/data.py).
        self.data = None
        if data_channel:
            tls = client_ssl_context(security.root_certificates, security.certificate_chain,
                                     security.private_key) if security.tls else None
            self.data = DataChannel(address, self._hello_once, timeout, security.token, tls, shm)

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.channel.close()

    def _either(self, over_data: Callable, over_grpc: Callable[[], T]) -> T:
        return over_grpc() if self.data is None else self.data.call(over_data, over_grpc)

    def _call(self, method: str, attempt: Callable[[], T], budget: float | None = None) -> T:
        """Run attempt() until it succeeds, retrying UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED with
        exponential backoff and full jitter within the retry budget; any other code fails at once.

        Retrying a push is safe: it carries the same (client_id, seq), which the shard applies once.
        """
        start = time.monotonic()
        give_up = start + (self.retry.budget if budget is None else budget)
        delay = self.retry.initial
        said = start  # a waiting worker says so every PROGRESS_EVERY seconds, at WARNING
        while True:
            try:
                return attempt()
            except (grpc.RpcError, DataCallError) as exc:
                code = exc.code()
                pause = random.uniform(0, delay)
                details = (exc.details() or "").lower().replace(self.address.lower(), "")
                tls_failure = any(phrase in details for phrase in _TLS_FAILURE)
                if code not in RETRYABLE or tls_failure or time.monotonic() + pause > give_up:
                    trailing = dict(exc.trailing_metadata() or ()) \
                        if hasattr(exc, "trailing_metadata") else {}
                    raise ShardError(self.address, method, code, exc.details(),
                                     trailing.get(REASON_METADATA, "")) from None
                log.info("%s on %s: %s (%s); retrying in %.2f s", method, self.address, code.name,
                         exc.details(), pause)
                if time.monotonic() - said >= PROGRESS_EVERY:
                    said = time.monotonic()
                    log.warning("waiting for shard %s (%s): %.0f s so far, giving up after %.0f s",
                                self.address, code.name, said - start, give_up - start)
                time.sleep(pause)
                delay = min(self.retry.maximum, delay * self.retry.multiplier)

    # -- calls -----------------------------------------------------------------------------------

    def hello(self, wait: float | None = None) -> pb.HelloReply:
        """Hello; with `wait`, retries for up to that many seconds while the shard comes up (a TLS
        or token mistake still fails at once)."""
        return self._call("Hello", self._hello_once, budget=wait)

    def _hello_once(self) -> pb.HelloReply:
        return self._hello(pb.HelloRequest(), timeout=self.timeout, metadata=self._md)

    def stats(self) -> pb.StatsReply:
        return self._call("Stats", lambda: self._stats(pb.StatsRequest(), timeout=self.timeout,
                                                       metadata=self._md))

    def checkpoint(self) -> pb.CheckpointReply:
        return self._call("Checkpoint", lambda: self._checkpoint(pb.CheckpointRequest(), timeout=self.timeout,
                                                                 metadata=self._md))

    def register(self, head: pb.RegisterHead, values: Sequence[Outgoing] = ()) -> pb.RegisterReply:
        return self._call("Register", lambda: self._register(
            self._stream(pb.RegisterRequest, head, values, torch.float32), timeout=self.timeout,
            metadata=self._md))

    def push(self, head: pb.PushHead, grads: Sequence[Outgoing], wire_dtype: torch.dtype) -> pb.PushReply:
        return self._call("Push", lambda: self._either(
            lambda conn: self.data.push(conn, head, grads, wire_dtype),
            lambda: self._push(self._stream(pb.PushRequest, head, grads, wire_dtype), timeout=self.timeout,
                               metadata=self._md)))

    def push_pull(self, head: pb.PushHead, grads: Sequence[Outgoing], wire_dtype: torch.dtype,
                  sink: Sink) -> pb.PullHead:
        """Push gradients, then receive the fresh parameters into sink's tensors; returns the head."""
        return self._call("PushPull", lambda: self._either(
            lambda conn: self.data.push_pull(conn, head, grads, wire_dtype, sink),
            lambda: receive(self._push_pull(self._stream(pb.PushRequest, head, grads, wire_dtype),
                                            timeout=self.timeout, metadata=self._md), sink)))

    def pull(self, request: pb.PullRequest, sink: Sink) -> pb.PullHead:
        if not request.chunk_bytes:
            request.chunk_bytes = self.chunk_bytes
        return self._call("Pull", lambda: self._either(
            lambda conn: self.data.pull(conn, request, sink),
            lambda: receive(self._pull(request, timeout=self.timeout, metadata=self._md), sink)))

    def set_state(self, head: pb.SetStateHead, items: Sequence[Outgoing]) -> pb.SetStateReply:
        return self._call("SetState", lambda: self._set_state(
            self._stream(pb.SetStateRequest, head, items, torch.float32), timeout=self.timeout,
            metadata=self._md))

    def health(self) -> str:
        """The standard grpc.health.v1 status of the shard ("SERVING", "NOT_SERVING", ...)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._call("Health", lambda: stub.Check(health_pb2.HealthCheckRequest(service=""),
                                                        timeout=self.timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _stream(self, message_type, head, items: Iterable[Outgoing], dtype: torch.dtype) -> Iterator[bytes]:
        def meta(segments, first):
            msg = message_type(head=head) if first else message_type()
            msg.segments.extend(segments)
            return msg.SerializeToString()

        # A generator: grpc pulls the next chunk while the previous one is on the wire.
        return chunk_stream(items, dtype, self.chunk_bytes, meta)


def receive(responses: Iterable[bytes], sink: Sink) -> pb.PullHead:
    """Copy a PullReply stream into the sink's tensors (one copy per byte); returns the head."""
    head = assembler = dests = None
    for raw in responses:
        meta, data = decode(raw, pb.PullReply)
        if head is None:
            if not meta.HasField("head"):
                raise ValueError("shard sent a pull stream without a head")
            head = meta.head
            dests = sink(head)
            assembler = Assembler(pull_expected(head, dests))
        assembler.copy(meta.segments, data, dests)
    if head is None:
        raise ValueError("shard sent an empty pull stream")
    assembler.finish()
    return head
