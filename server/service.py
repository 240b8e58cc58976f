"""The gRPC door of optserve.v1.OptServe: streams in, streams out, status codes. Nothing else.

Each handler turns a gRPC request into what the request core takes (server/requests.py: the first
message and a `receive` that copies the rest of the stream into the core's buffers), and the core's
answer into messages; `_guard` turns a RequestError into the call's `grpc.StatusCode` and the
`optserve-reason` trailing metadata. Validation, dedupe, policies and waits are the core's: the data
channel (server/data.py) reaches the same methods. Tensor-carrying methods take and return raw
`bytes` (the codec of optserve/serde.py, wire-identical to protobuf); the others use the generated
protobuf classes.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import grpc

from optserve.errors import REASON_METADATA, RequestError, invalid
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Assembler, chunk_stream, decode
from optserve.serde import hyper_to_proto  # noqa: F401 - bench/transport.py imports it from here
from optserve.server.requests import PullReply, RequestCore, parse

SERVICE_NAME = "optserve.v1.OptServe"
GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}  # errors.StatusCode (an int) -> grpc.StatusCode


class Servicer:
    """Handlers of optserve.v1.OptServe: gRPC's side of the shard's request core."""

    def __init__(self, core: RequestCore):
        self.core = core

    def _messages(self, request_iterator: Iterable[bytes], message_type):
        """Decode a request stream; the head must be in the first message and only there."""
        first = True
        for raw in request_iterator:
            self.core.counters.add(bytes_in=len(raw))
            meta, data = decode(raw, message_type)
            if first != meta.HasField("head"):
                raise invalid("the head must be in the first message of the stream" if first
                              else "only the first message of the stream may carry a head")
            first = False
            yield meta, data
        if first:
            raise invalid("empty stream: the first message must carry the head")

    def _request(self, request_iterator, message_type) -> tuple:
        """(first message, receive) of a request stream, as the core takes them (requests.Receive):
        receive copies the whole stream into the core's buffers, validating as it goes; each message
        is released once copied, so the next one reuses its (warm) memory."""
        messages = self._messages(request_iterator, message_type)
        first, data = next(messages)

        def receive(expected, dests) -> None:
            assembler = Assembler(expected)
            assembler.copy(first.segments, data, dests)
            for meta, more in messages:
                assembler.copy(meta.segments, more, dests)
            assembler.finish()

        return first, receive

    def _stream(self, reply: PullReply, chunk_bytes: int) -> Iterator[bytes]:
        """Stream a snapshot chunk by chunk (outside the store lock); release it when the stream ends."""
        info = self.core.info
        chunk = max(4096, min(chunk_bytes or info.chunk_bytes, info.max_message_bytes - (64 << 10)))

        def meta(segments, first):
            msg = pb.PullReply(head=reply.head) if first else pb.PullReply()
            msg.segments.extend(segments)
            return msg.SerializeToString()

        try:
            for message in chunk_stream(reply.items, reply.dtype, chunk, meta):
                self.core.counters.add(bytes_out=len(message))
                yield message
        finally:  # also when the client goes away mid-stream
            reply.release()

    # -- handlers --------------------------------------------------------------------------------

    def Hello(self, request: bytes, context) -> pb.HelloReply:
        parse(request, pb.HelloRequest)
        return self.core.hello()

    def Register(self, request_iterator, context) -> pb.RegisterReply:
        return self.core.register(*self._request(request_iterator, pb.RegisterRequest))

    def Push(self, request_iterator, context) -> pb.PushReply:
        return self.core.push(*self._request(request_iterator, pb.PushRequest))

    def PushPull(self, request_iterator, context) -> Iterator[bytes]:
        reply = self.core.push_pull(*self._request(request_iterator, pb.PushRequest))
        return self._stream(reply, 0)

    def Pull(self, request: bytes, context) -> Iterator[bytes]:
        self.core.counters.add(bytes_in=len(request))
        request = parse(request, pb.PullRequest)
        reply = self.core.pull(request)
        return self._stream(reply, request.chunk_bytes)

    def SetState(self, request_iterator, context) -> pb.SetStateReply:
        return self.core.set_state(*self._request(request_iterator, pb.SetStateRequest))

    def Checkpoint(self, request: bytes, context) -> pb.CheckpointReply:
        parse(request, pb.CheckpointRequest)
        return self.core.checkpoint()

    def Stats(self, request: bytes, context) -> pb.StatsReply:
        parse(request, pb.StatsRequest)
        return self.core.stats()


# -- wiring the handlers into grpc -----------------------------------------------------------------

def _guard(core: RequestCore, fn: Callable) -> Callable:
    """Turn RequestError into the call's status; count it."""

    def handler(request, context):
        try:
            core.check_ready()
            return fn(request, context)
        except RequestError as exc:
            core.refused(fn.__name__, exc)
            if exc.reason:
                context.set_trailing_metadata(((REASON_METADATA, exc.reason),))
            context.abort(GRPC_CODES[exc.code], exc.message)

    handler.__name__ = fn.__name__
    return handler


def generic_handler(servicer: Servicer) -> grpc.GenericRpcHandler:
    def g(fn: Callable) -> Callable:
        return _guard(servicer.core, fn)

    raw = dict(request_deserializer=None, response_serializer=None)
    handlers = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            g(servicer.Hello), request_deserializer=None,
            response_serializer=pb.HelloReply.SerializeToString),
        "Register": grpc.stream_unary_rpc_method_handler(
            g(servicer.Register), request_deserializer=None,
            response_serializer=pb.RegisterReply.SerializeToString),
        "Push": grpc.stream_unary_rpc_method_handler(
            g(servicer.Push), request_deserializer=None, response_serializer=pb.PushReply.SerializeToString),
        "Pull": grpc.unary_stream_rpc_method_handler(g(servicer.Pull), **raw),
        "PushPull": grpc.stream_stream_rpc_method_handler(g(servicer.PushPull), **raw),
        "SetState": grpc.stream_unary_rpc_method_handler(
            g(servicer.SetState), request_deserializer=None,
            response_serializer=pb.SetStateReply.SerializeToString),
        "Stats": grpc.unary_unary_rpc_method_handler(
            g(servicer.Stats), request_deserializer=None,
            response_serializer=pb.StatsReply.SerializeToString),
        "Checkpoint": grpc.unary_unary_rpc_method_handler(
            g(servicer.Checkpoint), request_deserializer=None,
            response_serializer=pb.CheckpointReply.SerializeToString),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
