"""Channels to shards: one `ShardClient` per shard, with deadlines, and the streaming byte path.

Tensor-carrying calls use the codec of optserve/serde.py (raw `bytes` in and out of grpc); pulled
bytes are copied once, straight into the caller's destination tensors (the model's parameters). This
module knows nothing about models or Adam: RemoteAdam (remote_adam.py) decides what to send.
"""
from __future__ import annotations

import logging
import random
import threading
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
# While a shard is away (a Swarm service between its old task and the new one's first passing health
# check), gRPC keeps dialling the address it last resolved and its resolver, failing, backs off on its
# own (1 s, x1.6, up to 120 s; not configurable): workers resumed 5-7 s after the new task turned
# healthy. So a call that fails to connect or to resolve opens a fresh channel, which resolves at once.
PROGRESS_EVERY = 5.0
FOLLOW_MOVES = (("grpc.dns_min_time_between_resolutions_ms", 1000),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000))
# grpc's words for an address that refused or timed out, and for a name its native or c-ares resolver
# could not resolve
_ADDRESS_FAILURE = ("failed to connect to all addresses", "errors resolving", "dns resolution failed")


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


# A replicated shard index (server/replication.py) is named by its replicas' addresses joined by "|"
# ("a:50051|b:50051"): calls go to one, and a retryable failure (a replica down, or one that is not
# the primary: reason not_primary) moves them to the next, with the same (client_id, seq).
REPLICA_SEPARATOR = "|"


class _Endpoint:
    """One replica's channel, stubs and data channel."""

    def __init__(self, address: str, security: Security, timeout: float, max_message_bytes: int,
                 data_channel: bool, md, shm: bool = True):
        self.address = address
        self._security = security
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes), *FOLLOW_MOVES]
        self._reopen_lock = threading.Lock()
        self._open(security.channel(address, self._options))
        # Push, Pull and PushPull go over the shard's data channel when it announces one (and
        # data_channel is True), else over gRPC; both reach the same handlers (server/data.py).
        self.data = None
        if data_channel:
            tls = client_ssl_context(security.root_certificates, security.certificate_chain,
                                     security.private_key) if security.tls else None
            self.data = DataChannel(address, lambda: self.hello(pb.HelloRequest(), timeout=timeout,
                                                                metadata=md), timeout, security.token, tls,
                                    shm)

    def _open(self, channel: grpc.Channel) -> None:
        """Use this channel for every gRPC call to this replica from now on."""
        self.channel = c = channel
        self.hello = c.unary_unary(_METHOD + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                   response_deserializer=pb.HelloReply.FromString)
        self.register = c.stream_unary(_METHOD + "Register",
                                       response_deserializer=pb.RegisterReply.FromString)
        self.push = c.stream_unary(_METHOD + "Push", response_deserializer=pb.PushReply.FromString)
        self.pull = c.unary_stream(_METHOD + "Pull", request_serializer=pb.PullRequest.SerializeToString)
        self.push_pull = c.stream_stream(_METHOD + "PushPull")
        self.set_state = c.stream_unary(_METHOD + "SetState",
                                        response_deserializer=pb.SetStateReply.FromString)
        self.stats = c.unary_unary(_METHOD + "Stats", request_serializer=pb.StatsRequest.SerializeToString,
                                   response_deserializer=pb.StatsReply.FromString)
        self.checkpoint = c.unary_unary(_METHOD + "Checkpoint",
                                        request_serializer=pb.CheckpointRequest.SerializeToString,
                                        response_deserializer=pb.CheckpointReply.FromString)

    def reopen(self, failed: grpc.Channel) -> bool:
        """A fresh channel in place of one that could not reach the replica (once per failed channel,
        whichever thread sees it first; True for that one); calls still on the old one end CANCELLED
        and are retried."""
        with self._reopen_lock:
            if self.channel is not failed:
                return False
            self._open(self._security.channel(self.address, self._options))
        failed.close()
        return True

    def close(self) -> None:
        if self.data is not None:
            self.data.close()
        self.channel.close()


class ShardClient:
    """Calls to one shard (one of its replicas at a time). Thread-safe: calls may run concurrently on
    the one channel."""

    def __init__(self, address: str, *, timeout: float = 300.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 retry: RetryPolicy = RetryPolicy(), security: Security | None = None,
                 data_channel: bool = True, shm: bool = True):
        self.replicas = [a.strip() for a in address.split(REPLICA_SEPARATOR)]
        if not all(self.replicas) or len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"shard address {address!r}: replicas are distinct addresses joined by "
                             f"{REPLICA_SEPARATOR!r}")
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.retry = retry
        security = security or Security.from_env()
        self._md = security.metadata()
        self._endpoints = [_Endpoint(a, security, timeout, max_message_bytes, data_channel, self._md,
                                     shm) for a in self.replicas]
        self._switch = threading.Lock()
        self._use(self._endpoints[0])

    def _use(self, ep: _Endpoint) -> None:
        """Send calls to this replica from now on (attributes the calls read when they are made)."""
        self._current = ep
        self.address, self.channel, self.data = ep.address, ep.channel, ep.data
        self._hello, self._register, self._push, self._pull = ep.hello, ep.register, ep.push, ep.pull
        self._push_pull, self._set_state, self._stats = ep.push_pull, ep.set_state, ep.stats
        self._checkpoint = ep.checkpoint

    def _next_replica(self, failed: _Endpoint) -> None:
        """After a retryable failure on `failed`: the next replica (unless a concurrent call moved on)."""
        with self._switch:
            if self._current is failed and len(self._endpoints) > 1:
                nxt = self._endpoints[(self._endpoints.index(failed) + 1) % len(self._endpoints)]
                log.info("shard %s: trying replica %s", failed.address, nxt.address)
                self._use(nxt)

    def _reopen(self, endpoint: _Endpoint, failed: grpc.Channel) -> None:
        """A replica that could not be reached (its name no longer resolves, or its old address is
        dead: it moved) gets a fresh channel, and the calls that use it the fresh stubs."""
        with self._switch:
            if endpoint.reopen(failed) and self._current is endpoint:
                self._use(endpoint)

    def close(self) -> None:
        for ep in self._endpoints:
            ep.close()

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
            endpoint = self._current
            channel = endpoint.channel
            try:
                return attempt()
            except (grpc.RpcError, DataCallError) as exc:
                code = exc.code()
                if code in RETRYABLE:
                    self._next_replica(endpoint)
                pause = random.uniform(0, delay)
                details = (exc.details() or "").lower().replace(endpoint.address.lower(), "")
                if code == grpc.StatusCode.UNAVAILABLE and any(p in details for p in _ADDRESS_FAILURE):
                    self._reopen(endpoint, channel)
                tls_failure = any(phrase in details for phrase in _TLS_FAILURE)
                if code not in RETRYABLE or tls_failure or time.monotonic() + pause > give_up:
                    trailing = dict(exc.trailing_metadata() or ()) \
                        if hasattr(exc, "trailing_metadata") else {}
                    raise ShardError(endpoint.address, method, code, exc.details(),
                                     trailing.get(REASON_METADATA, "")) from None
                log.info("%s on %s: %s (%s); retrying in %.2f s", method, endpoint.address, code.name,
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
        reply = self._call("Health", lambda: health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=self.timeout))
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
