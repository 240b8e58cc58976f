"""The shard's side of same-host shared memory: one segment per data-channel connection.

server/data.py calls this for the SHM_* frames (optserve/frames.py) and otherwise serves requests as
it always does: the request core, the checks and the refusals are the data channel's. What lives
here is the segment's life on one connection: created on SHM_OPEN (the shard's segments together are
bounded by one `ShmBudget`, --shm-max-bytes; a request gets what is free of it, at most what it
asked), usable once the worker has echoed its nonce (SHM_CONFIRM), then
unlinked at once, so its name never outlives the handshake; replaced by the next SHM_OPEN; dropped
when the connection ends. It must not trust the segment: sizes come from the frame and are bounded
by the segment's own capacity (`data`).
"""
from __future__ import annotations

import hmac
import json
import logging
import threading

from optserve.errors import RequestError, StatusCode, invalid
from optserve.shm import SHM_DIR, Segment, ShmUnavailable

log = logging.getLogger("optserve.server")

DEFAULT_MAX_BYTES = 2 << 30  # all of a shard's segments together (--shm-max-bytes; 0: shared memory off)


class ShmBudget:
    """The bytes all of a shard's segments may hold at once (a leaf lock: nothing is taken inside)."""

    def __init__(self, total: int):
        self.total = total
        self._used = 0
        self._lock = threading.Lock()

    def take(self, asked: int) -> int:
        """Up to `asked` bytes of what is free (0: none)."""
        with self._lock:
            granted = max(0, min(asked, self.total - self._used))
            self._used += granted
            return granted

    def give(self, n: int) -> None:
        with self._lock:
            self._used -= n


class ShmLink:
    """One connection's segment, shard side. Not thread-safe: a connection serves one call at a time."""

    def __init__(self, directory: str = SHM_DIR, budget: ShmBudget | None = None):
        self.directory = directory
        self.budget = budget or ShmBudget(DEFAULT_MAX_BYTES)
        self.segment: Segment | None = None
        self.confirmed = False

    def open(self, meta: bytes) -> bytes:
        """SHM_OPEN: create a segment of the bytes asked (at most max_bytes); the reply's meta."""
        self.drop()
        if self.budget.total <= 0:
            raise RequestError(StatusCode.FAILED_PRECONDITION, "shared memory is off on this shard "
                                                               "(--shm-max-bytes 0)")
        try:
            asked = int(json.loads(meta.decode())["bytes"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise invalid('an SHM_OPEN frame carries JSON {"bytes": n}') from None
        if asked < 0:
            raise invalid(f"a segment of {asked} bytes")
        capacity = self.budget.take(asked)
        if asked and not capacity:
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"the shard's segments hold all of its --shm-max-bytes ({self.budget.total})")
        try:
            self.segment = Segment.create(self.directory, capacity)
        except ShmUnavailable as exc:
            self.budget.give(capacity)
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED, f"no shared-memory segment: {exc.strerror}") \
                from None
        # The most a later SHM_OPEN could get: all of it, unless this one was cut to what was free.
        offer = {"path": self.segment.path, "bytes": capacity,
                 "max_bytes": self.budget.total if capacity == asked else capacity}
        return json.dumps(offer).encode()

    def confirm(self, meta: bytes) -> None:
        """SHM_CONFIRM: the worker's echo of the nonce (empty: it cannot open the segment). Either way
        the name is removed now; only a matching nonce makes the segment usable."""
        segment = self.segment
        if segment is None:
            raise RequestError(StatusCode.FAILED_PRECONDITION, "SHM_CONFIRM without an SHM_OPEN before it")
        segment.unlink()
        if not meta:
            self.drop()
            return
        if not hmac.compare_digest(meta, segment.nonce):
            self.drop()
            raise RequestError(StatusCode.PERMISSION_DENIED, "the nonce echoed is not the segment's")
        self.confirmed = True

    def usable(self) -> Segment:
        if self.segment is None or not self.confirmed:
            raise RequestError(StatusCode.FAILED_PRECONDITION, "a shared-memory request on a connection "
                                                               "without a confirmed segment (SHM_OPEN, "
                                                               "SHM_CONFIRM first)")
        return self.segment

    def data(self, nbytes: int) -> memoryview:
        """The request's bytes in the segment: INVALID_ARGUMENT when they cannot be in it."""
        segment = self.usable()
        if not 0 <= nbytes <= segment.capacity:
            raise invalid(f"the request declares {nbytes} bytes in a segment of {segment.capacity}")
        return segment.data(nbytes)

    def drop(self) -> None:
        if self.segment is not None:
            self.segment.unlink()
            self.segment.close()
            self.budget.give(self.segment.capacity)
        self.segment, self.confirmed = None, False
