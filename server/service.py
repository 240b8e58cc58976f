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

import contextlib
import logging
import threading
import time
from typing import Callable, Iterable, Iterator

import grpc
import torch

from optserve.errors import REASON_METADATA, RequestError, StatusCode, invalid
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Assembler, chunk_stream, decode
from optserve.serde import hyper_to_proto  # noqa: F401 - bench/transport.py imports it from here
from optserve.server.requests import PullReply, RequestCore, parse

SERVICE_NAME = "optserve.v1.OptServe"
GRPC_CODES = {c.value[0]: c for c in grpc.StatusCode}  # errors.StatusCode (an int) -> grpc.StatusCode
# gRPC threads kept for calls that never block (Hello, Stats, health checks): the methods that read
# tensor streams or wait (LIMITED) may hold at most `threads - RESERVED_THREADS` of them at once.
RESERVED_THREADS = 2
LIMITED = ("Register", "Push", "PushPull", "Pull", "SetState", "Checkpoint")
DEFAULT_IDLE_TIMEOUT = 30.0  # seconds a call may wait on its peer for one message (--idle-timeout)
# The longest a Pull or PushPull reply may take to stream, as the data channel's replies (server/data.py
# _Peer): then the call is cancelled and its snapshot's lease ends (a leased key is copied by every push).
PULL_SECONDS = 60.0
PULL_SECONDS_PER_MIB = 1.0

log = logging.getLogger("optserve.server")


class IdleWatch:
    """Ends (cancels) calls whose peer neither sends the next request message nor takes the next reply
    message for `timeout` seconds, so a stalled or hostile client cannot keep a gRPC thread. Only the
    time spent waiting on the peer counts: a call that is working, or waiting for versions, is not idle.
    It also ends calls past a deadline of their own (`until`: a reply's whole stream). One daemon thread
    checks a few times a second; watching a message costs a dict write."""

    def __init__(self, timeout: float = DEFAULT_IDLE_TIMEOUT):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._since: dict[int, tuple[float, object]] = {}  # id(context) -> (waiting since, context)
        self._deadlines: dict[int, tuple[float, object]] = {}  # id(context) -> (time.monotonic(), context)
        self._streams: set[int] = set()  # id(context) of the calls reading their request stream (messages)
        self._ended: dict[int, object] = {}  # id(context) -> context: request streams ended for idleness
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def on_peer(self, context):
        """Around a wait for the peer (its next message, or its taking ours)."""
        key = id(context)
        with self._lock:
            self._since[key] = (time.monotonic(), context)
            self._start()
        try:
            yield
        finally:
            with self._lock:
                self._since.pop(key, None)

    def until(self, context, deadline: float) -> None:
        """End the call at `deadline` (time.monotonic()) unless it ended before (`done`)."""
        with self._lock:
            self._deadlines[id(context)] = (deadline, context)
            self._start()

    def done(self, context) -> None:
        with self._lock:
            self._deadlines.pop(id(context), None)

    def _start(self) -> None:
        """(Under the lock.)"""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="grpc-idle-watch", daemon=True)
            self._thread.start()

    def messages(self, iterator: Iterable, context) -> Iterator:
        """`iterator`'s items, each read under the watch. A stream this watch (or anyone) ended is
        refused (CANCELLED), not taken as complete: grpc turns a cancelled call's pending receive
        into the end of the stream before it marks the call inactive, so a request whose bytes had
        all come would otherwise be applied by a call the client saw cancelled."""
        iterator = iter(iterator)
        key = id(context)
        with self._lock:
            self._streams.add(key)
        try:
            while True:
                with self.on_peer(context):
                    try:
                        item = next(iterator)
                    except StopIteration:
                        with self._lock:
                            ended = self._ended.get(key) is context
                        if ended or not context.is_active():
                            raise RequestError(StatusCode.CANCELLED, "the call was ended before its request "
                                               f"stream was (idle for more than {self.timeout:g} s, or "
                                               "cancelled)") from None
                        return
                yield item
        finally:
            with self._lock:
                self._streams.discard(key)
                self._ended.pop(key, None)

    def _run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._closed.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [(key, c) for key, (since, c) in self._since.items() if now - since > self.timeout]
                for key, c in idle:
                    del self._since[key]
                    if key in self._streams:  # before the cancel: its stream's end is read after it
                        self._ended[key] = c
                late = [(key, c) for key, (deadline, c) in self._deadlines.items() if now > deadline]
                for key, _ in late:
                    del self._deadlines[key]
            for _, context in idle:
                log.info("ending a call whose peer was idle for more than %g s", self.timeout)
                context.cancel()
            for _, context in late:
                log.info("ending a reply its peer took longer than its deadline to read")
                context.cancel()

    def close(self) -> None:
        self._closed.set()


class CallLimit:
    """At most `slots` LIMITED calls at once (a non-blocking count); UNAVAILABLE beyond, which
    clients retry."""

    def __init__(self, slots: int):
        self.slots = slots
        self._lock = threading.Lock()
        self._held = 0

    def take(self, method: str) -> None:
        with self._lock:
            if self._held >= self.slots:
                raise RequestError(StatusCode.UNAVAILABLE,
                                   f"the shard is busy: {self._held} calls hold its {self.slots} threads for "
                                   f"tensors; {method} retried later will get one")
            self._held += 1

    def give(self) -> None:
        with self._lock:
            self._held -= 1


class Servicer:
    """Handlers of optserve.v1.OptServe: gRPC's side of the shard's request core."""

    def __init__(self, core: RequestCore, threads: int = 16, idle_timeout: float = DEFAULT_IDLE_TIMEOUT):
        self.core = core
        self.limit = CallLimit(max(1, threads - RESERVED_THREADS))
        self.idle = IdleWatch(idle_timeout)
        if not core.max_waits:  # waits never hold more than half the threads that pushes need too
            core.max_waits = max(1, self.limit.slots // 2)
        if not core.max_waits_per_caller:  # nor one connection more than half of those
            core.max_waits_per_caller = max(1, core.max_waits // 2)

    def _messages(self, request_iterator: Iterable[bytes], message_type, context):
        """Decode a request stream; the head must be in the first message and only there."""
        first = True
        for raw in self.idle.messages(request_iterator, context):
            self.core.counters.add(bytes_in=len(raw))
            meta, data = decode(raw, message_type)
            if first != meta.HasField("head"):
                raise invalid("the head must be in the first message of the stream" if first
                              else "only the first message of the stream may carry a head")
            first = False
            yield meta, data
        if first:
            raise invalid("empty stream: the first message must carry the head")

    def _request(self, request_iterator, message_type, context) -> tuple:
        """(first message, receive) of a request stream, as the core takes them (requests.Receive):
        receive copies the whole stream into the core's buffers, validating as it goes; each message
        is released once copied, so the next one reuses its (warm) memory."""
        messages = self._messages(request_iterator, message_type, context)
        first, data = next(messages)

        def receive(expected, dests) -> None:
            assembler = Assembler(expected)
            assembler.copy(first.segments, data, dests)
            for meta, more in messages:
                assembler.copy(meta.segments, more, dests)
            assembler.finish()

        return first, receive

    def _stream(self, reply: PullReply, chunk_bytes: int, context) -> Iterator[bytes]:
        """Stream a snapshot chunk by chunk (outside the store lock). Its lease ends with the call,
        however the call ends (streamed, failed, cancelled, or never started), and the call is ended
        PULL_SECONDS + PULL_SECONDS_PER_MIB per MiB after this, so a peer reading one message just
        before each idle timeout cannot hold the lease longer."""
        info = self.core.info
        chunk = max(4096, min(chunk_bytes or info.chunk_bytes, info.max_message_bytes - (64 << 10)))
        lock, released = threading.Lock(), []

        def release() -> None:
            with lock:
                if released:
                    return
                released.append(True)
            self.idle.done(context)
            reply.release()

        if not context.add_callback(release):  # the call is over already
            release()
        itemsize = torch.empty((), dtype=reply.dtype).element_size()
        size = sum(item.tensor.numel() for item in reply.items) * itemsize
        self.idle.until(context, time.monotonic() + PULL_SECONDS + PULL_SECONDS_PER_MIB * size / 2**20)

        def meta(segments, first):
            msg = pb.PullReply(head=reply.head) if first else pb.PullReply()
            msg.segments.extend(segments)
            return msg.SerializeToString()

        def messages() -> Iterator[bytes]:
            try:
                for message in chunk_stream(reply.items, reply.dtype, chunk, meta):
                    self.core.counters.add(bytes_out=len(message))
                    with self.idle.on_peer(context):  # grpc sends it before asking for the next
                        yield message
            finally:  # also when the client goes away mid-stream
                release()

        return messages()

    # -- handlers --------------------------------------------------------------------------------

    def Hello(self, request: bytes, context) -> pb.HelloReply:
        parse(request, pb.HelloRequest)
        return self.core.hello()

    def Register(self, request_iterator, context) -> pb.RegisterReply:
        return self.core.register(*self._request(request_iterator, pb.RegisterRequest, context))

    def Push(self, request_iterator, context) -> pb.PushReply:
        return self.core.push(*self._request(request_iterator, pb.PushRequest, context))

    def PushPull(self, request_iterator, context) -> Iterator[bytes]:
        context.add_callback(self.core.store.wake)  # a wait of this call ends when the call does
        reply = self.core.push_pull(*self._request(request_iterator, pb.PushRequest, context),
                                    alive=context.is_active, caller=context.peer())
        return self._stream(reply, 0, context)

    def Pull(self, request: bytes, context) -> Iterator[bytes]:
        self.core.counters.add(bytes_in=len(request))
        request = parse(request, pb.PullRequest)
        context.add_callback(self.core.store.wake)  # a wait of this call ends when the call does
        reply = self.core.pull(request, alive=context.is_active, caller=context.peer())
        return self._stream(reply, request.chunk_bytes, context)

    def SetState(self, request_iterator, context) -> pb.SetStateReply:
        return self.core.set_state(*self._request(request_iterator, pb.SetStateRequest, context))

    def Checkpoint(self, request: bytes, context) -> pb.CheckpointReply:
        parse(request, pb.CheckpointRequest)
        return self.core.checkpoint()

    def Stats(self, request: bytes, context) -> pb.StatsReply:
        parse(request, pb.StatsRequest)
        return self.core.stats()


# -- wiring the handlers into grpc -----------------------------------------------------------------

def _guard(core: RequestCore, fn: Callable, limit: CallLimit | None = None) -> Callable:
    """Turn RequestError into the call's status; count it. With `limit`, the call holds one of its
    slots until it ends (the stream of a reply included)."""

    def handler(request, context):
        try:
            core.check_ready()
            if limit is not None:
                limit.take(fn.__name__)
                if not context.add_callback(limit.give):  # runs when the call ends, however it ends
                    limit.give()
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
        return _guard(servicer.core, fn, servicer.limit if fn.__name__ in LIMITED else None)

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
