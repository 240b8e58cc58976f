"""server/service.py IdleWatch: a request stream it ends must not read as a complete one."""
from __future__ import annotations

import threading

import pytest

from optserve.errors import RequestError, StatusCode
from optserve.server.service import IdleWatch


class _Context:
    """A gRPC servicer context as the race leaves it: grpc turns a cancelled call's pending
    receive into the end of the stream (its state reads CLOSED, as for a half-close) before the
    cancellation itself is recorded, so is_active() may still be True when the iterator stops."""

    def __init__(self):
        self.cancelled = threading.Event()

    def cancel(self):
        self.cancelled.set()

    def is_active(self):
        return True


def _stream(context: _Context, first: bytes):
    """Sends one message, then waits for the peer that never sends more; the cancel ends it as
    grpc's iterator does, with StopIteration."""
    yield first
    assert context.cancelled.wait(30), "the watch never ended the idle stream"


def test_a_stream_the_watch_ended_for_idleness_is_refused_not_taken_as_complete():
    watch = IdleWatch(timeout=0.05)
    context = _Context()
    try:
        messages = watch.messages(_stream(context, b"head"), context)
        assert next(messages) == b"head"
        with pytest.raises(RequestError) as ended:
            next(messages)
        assert ended.value.code == StatusCode.CANCELLED
    finally:
        watch.close()


def test_a_stream_that_ends_by_itself_ends_normally():
    watch = IdleWatch(timeout=30)
    context = _Context()
    try:
        assert list(watch.messages(iter([b"a", b"b"]), context)) == [b"a", b"b"]
    finally:
        watch.close()
