"""optserve's own words for a refused request: status codes, reasons, `RequestError`. No grpc here.

Everything behind the doors (the request core, store, policies, the codec) raises `RequestError`
with a `StatusCode`; only the doors translate it: the gRPC servicer (server/service.py) into the
call's `grpc.StatusCode`, the data channel (server/data.py) into its frame's status byte, and the
client (client/transport.py, client/data.py) back into `grpc.StatusCode`. The numbers are gRPC's, so
a status travels as the same integer on both paths.
"""
from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    """gRPC's status codes, by the numbers gRPC gives them (the data channel sends these bytes)."""
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# Trailing metadata (gRPC) or the error frame's "reason" (data channel): why a call was refused, in
# a word a client can act on.
REASON_METADATA = "optserve-reason"
STALE = "stale"  # ssp: the gradient is over the staleness bound; drop it and pull
AHEAD = "ahead"  # the gradient was computed from a version the key has not reached; pull
ROLLBACK = "rollback"  # a conditional SetState would undo applied steps
TIMEOUT = "timeout"  # a wait for versions (a sync step, min_versions) ran out
NOT_PRIMARY = "not_primary"  # a replica that does not take pushes now: try the shard's next replica
STALE_EPOCH = "stale_epoch"  # a forward from a primary whose epoch is over (server/replication.py)
LOST_EPOCH = "lost_epoch"  # a replica set whose later epoch's state was lost: an operator decides
DROP_GRADIENT = (STALE, AHEAD)  # reasons after which a client drops the gradient and re-pulls


class RequestError(Exception):
    """A request that must be refused with `code`; raised before any state changes."""

    def __init__(self, code: StatusCode, message: str, reason: str = ""):
        super().__init__(message)
        self.code = StatusCode(code)
        self.message = message
        # A machine-readable cause (STALE, AHEAD, ...) sent beside the code, so a client can tell a
        # gradient it should drop and re-pull from a real error.
        self.reason = reason


def invalid(message: str) -> RequestError:
    return RequestError(StatusCode.INVALID_ARGUMENT, message)
