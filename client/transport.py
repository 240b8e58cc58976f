"""Channels to shards: one `ShardClient` per shard, with deadlines, and the streaming byte path.

Tensor-carrying calls use the codec of optserve/serde.py (raw `bytes` in and out of grpc); pulled
bytes are copied once, straight into the caller's destination tensors (the model's parameters). This
module knows nothing about models or Adam: RemoteAdam (remote_adam.py) decides what to send.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Sequence

import grpc
import torch

from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import (DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, Assembler, Expected,
                            Outgoing, chunk_stream, decode, dtype_from_proto)

log = logging.getLogger("optserve.client")

_METHOD = "/optserve.v1.OptServe/"
REASON_METADATA = "optserve-reason"  # as the shard sends it (server/service.py)

# Destinations of a pull: for each (entry, part) of the head, a flat tensor to copy the bytes into.
Sink = Callable[[pb.PullHead], dict[tuple[int, int], torch.Tensor]]


class ShardError(RuntimeError):
    """A shard refused or failed a call; carries the gRPC code and the shard's message."""

    def __init__(self, address: str, method: str, code: grpc.StatusCode, details: str, reason: str = ""):
        super().__init__(f"{method} on {address}: {code.name}: {details}")
        self.address = address
        self.method = method
        self.code = code
        self.details = details
        self.reason = reason  # the shard's `optserve-reason` trailing metadata ("stale", "ahead", ...)


class ShardClient:
    """Calls to one shard. Thread-safe: calls may run concurrently on the one channel."""

    def __init__(self, address: str, *, timeout: float = 300.0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.address = address
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.channel = grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", max_message_bytes),
                              ("grpc.max_send_message_length", max_message_bytes)])
        c = self.channel
        self._hello = c.unary_unary(_METHOD + "Hello", request_serializer=pb.HelloRequest.SerializeToString,
                                    response_deserializer=pb.HelloReply.FromString)
        self._register = c.stream_unary(_METHOD + "Register", response_deserializer=pb.RegisterReply.FromString)
        self._push = c.stream_unary(_METHOD + "Push", response_deserializer=pb.PushReply.FromString)
        self._pull = c.unary_stream(_METHOD + "Pull", request_serializer=pb.PullRequest.SerializeToString)
        self._push_pull = c.stream_stream(_METHOD + "PushPull")
        self._set_state = c.stream_unary(_METHOD + "SetState", response_deserializer=pb.SetStateReply.FromString)
        self._stats = c.unary_unary(_METHOD + "Stats", request_serializer=pb.StatsRequest.SerializeToString,
                                    response_deserializer=pb.StatsReply.FromString)

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            trailing = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
            raise ShardError(self.address, method, exc.code(), exc.details(),
                             trailing.get(REASON_METADATA, "")) from None

    # -- calls -----------------------------------------------------------------------------------

    def hello(self, wait: float | None = None) -> pb.HelloReply:
        """Hello; with `wait`, waits up to that many seconds for the shard to come up."""
        return self._call("Hello", self._hello, pb.HelloRequest(), timeout=wait or self.timeout,
                          wait_for_ready=wait is not None)

    def stats(self) -> pb.StatsReply:
        return self._call("Stats", self._stats, pb.StatsRequest(), timeout=self.timeout)

    def register(self, head: pb.RegisterHead, values: Sequence[Outgoing] = ()) -> pb.RegisterReply:
        stream = self._stream(pb.RegisterRequest, head, values, torch.float32)
        return self._call("Register", self._register, stream, timeout=self.timeout)

    def push(self, head: pb.PushHead, grads: Sequence[Outgoing], wire_dtype: torch.dtype) -> pb.PushReply:
        stream = self._stream(pb.PushRequest, head, grads, wire_dtype)
        return self._call("Push", self._push, stream, timeout=self.timeout)

    def push_pull(self, head: pb.PushHead, grads: Sequence[Outgoing], wire_dtype: torch.dtype,
                  sink: Sink) -> pb.PullHead:
        """Push gradients, then receive the fresh parameters into sink's tensors; returns the head."""
        stream = self._stream(pb.PushRequest, head, grads, wire_dtype)
        return self._call("PushPull", lambda: receive(self._push_pull(stream, timeout=self.timeout), sink))

    def pull(self, request: pb.PullRequest, sink: Sink) -> pb.PullHead:
        if not request.chunk_bytes:
            request.chunk_bytes = self.chunk_bytes
        return self._call("Pull", lambda: receive(self._pull(request, timeout=self.timeout), sink))

    def set_state(self, head: pb.SetStateHead, items: Sequence[Outgoing]) -> pb.SetStateReply:
        stream = self._stream(pb.SetStateRequest, head, items, torch.float32)
        return self._call("SetState", self._set_state, stream, timeout=self.timeout)

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
            param_dtype = dtype_from_proto(head.dtype, default=torch.float32)
            assembler = Assembler({k: Expected(t.numel(), param_dtype if k[1] == pb.PARAM else torch.float32,
                                               head.entries[k[0]].key) for k, t in dests.items()})
        assembler.copy(meta.segments, data, dests)
    if head is None:
        raise ValueError("shard sent an empty pull stream")
    assembler.finish()
    return head
