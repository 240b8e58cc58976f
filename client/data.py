"""A shard's data channel seen from a client (optserve/frames.py; the shard side is server/data.py).

`DataChannel` learns the port from the shard's Hello, keeps a pool of open connections (one call
at a time each; a connection goes back to the pool after a call that completed, refused or not) and
runs Push, Pull and PushPull over them: gradients leave with `sendall` from the gradient's memory,
pulled parameters land with `recv_into` straight in the model's parameters. Failures are reported
as `DataCallError`, which reads like a grpc.RpcError, so ShardClient's one retry loop covers both
paths: a broken connection is UNAVAILABLE (retried: every push carries its (client_id, seq)), a
timeout DEADLINE_EXCEEDED, a refusal the shard's own code, message and reason.

If the announced port cannot be reached (a firewall, a docker port not published), the client logs
it once and uses gRPC for FALLBACK_SECONDS before it tries the data channel again.

With `shm=True` (the default) a connection also asks the shard for a shared-memory segment
(optserve/shm.py) the first time a call's bytes are known: a worker on the shard's host (or sharing
its /dev/shm) then writes gradients into it and reads parameters out of it, and only the frames' heads
cross the socket. A worker that cannot open the segment (another host, another user), or a shard
that offers none, leaves this DataChannel on the socket path for good: nothing else changes.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import grpc
import torch

from optserve.errors import REASON_METADATA, StatusCode
from optserve.frames import (AUTH, MAX_REPLY_META_BYTES, PROVISIONAL, PULL, PUSH, PUSH_PULL, SHM_CONFIRM,
                             SHM_OPEN, SHM_PULL, SHM_PUSH, SHM_PUSH_PULL, ProtocolError, Receiver,
                             parse_error, read_header, read_meta, send_frame, send_header, tune,
                             whole_segments)
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing, pull_expected
from optserve.shm import SIZE, Segment, ShmUnavailable, fill, nbytes_of, place

log = logging.getLogger("optserve.client")

FALLBACK_SECONDS = 30.0
FALLBACK_MAX_SECONDS = 600.0
CONNECT_SECONDS = 3.0
_CODES = {c.value[0]: c for c in grpc.StatusCode}
_GOING_AWAY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
T = TypeVar("T")


class DataCallError(Exception):
    """A failed data-channel call, shaped like grpc.RpcError (code(), details(), trailing_metadata())."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = ""):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self._reason = code, details, reason

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return ((REASON_METADATA, self._reason),) if self._reason else ()


class _Conn:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.receiver = Receiver(sock)
        self.shm: Segment | None = None  # this connection's confirmed segment
        self.shm_max = 0  # the largest segment the shard would grant (its SHM_OPEN reply); -1: none
        self.commit = False  # the last reply was PROVISIONAL: its commit frame follows

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        try:
            self.sock.close()
        except OSError:
            pass


def client_ssl_context(root_certificates: bytes | None, certificate_chain: bytes | None,
                       private_key: bytes | None) -> ssl.SSLContext:
    """TLS as grpc.ssl_channel_credentials does it: the given roots (else the system's), the
    server's name checked, and optionally a client certificate (ssl loads those only from files:
    they are written to a private temporary directory for the call and removed)."""
    ctx = ssl.create_default_context(cadata=root_certificates.decode() if root_certificates else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certificate_chain is not None:
        with tempfile.TemporaryDirectory(prefix="optserve-tls-") as d:
            cert, key = Path(d, "cert.pem"), Path(d, "key.pem")
            cert.write_bytes(certificate_chain)
            key.touch(mode=0o600)
            key.write_bytes(private_key)
            ctx.load_cert_chain(cert, key)
    return ctx


def split_address(address: str) -> tuple[str, int] | None:
    """("host", port) of "host:port" or "[v6]:port"; None for grpc target forms it cannot dial."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host:
        return None
    return host.strip("[]"), int(port)


class DataChannel:
    def __init__(self, address: str, hello: Callable[[], pb.HelloReply], timeout: float,
                 token: str | None, ssl_context: ssl.SSLContext | None, shm: bool = True):
        self.address = address
        self._shm = shm  # False once this shard's segments proved unusable here
        self._shm_want = 0  # bytes a segment should hold: the largest push or reply seen so far
        self._target = split_address(address)
        self._hello = hello  # one Hello attempt over gRPC (raises grpc.RpcError)
        self._timeout = timeout
        self._token = (token or "").encode()
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._port: int | None = None  # None: not asked yet; 0: the shard has no data channel
        self._idle: list[_Conn] = []
        self._fallback_until = 0.0
        self._fallback_seconds = FALLBACK_SECONDS

    # -- connections -----------------------------------------------------------------------------

    def _connection(self) -> _Conn | None:
        """An open connection for one call, or None: this call goes over gRPC."""
        if self._target is None or time.monotonic() < self._fallback_until:
            return None
        with self._lock:
            if self._idle:
                return self._idle.pop()
            port = self._port
        fresh = port is None
        if fresh:
            port = self._hello().data_port
            with self._lock:
                self._port = port
        if not port:
            return None
        host = self._target[0]
        sock = None
        try:
            sock = socket.create_connection((host, port), timeout=min(self._timeout, CONNECT_SECONDS))
            tune(sock)
            sock.settimeout(self._timeout)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
            conn = _Conn(sock)
            send_header(conn.sock, AUTH, self._token, 0)
            self._reply(conn)  # DataCallError(UNAUTHENTICATED) when the token is refused
        except ssl.SSLError as exc:
            if sock is not None:
                sock.close()
            if not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                # certificates or protocol: an error, as it is on gRPC (not retried)
                raise DataCallError(grpc.StatusCode.UNAVAILABLE, "data channel: TLS handshake failed: "
                                                                 f"{exc}") from None
            return self._unreachable(port, exc)  # the peer hung up mid-handshake
        except OSError as exc:  # refused, timed out, or not an optserve data port
            if sock is not None:
                sock.close()
            # A port learnt earlier, or one whose shard has since gone (Hello fails, or names
            # another port): the shard restarted; retry, asking Hello again. Announced by a shard
            # that still announces it, yet unreachable: a firewall, say: use gRPC for a while.
            if fresh and self._hello().data_port == port:
                return self._unreachable(port, exc)
            self._forget()
            raise DataCallError(grpc.StatusCode.UNAVAILABLE, f"data channel: port {port}: {exc}") from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        with self._lock:
            self._fallback_seconds = FALLBACK_SECONDS
        return conn

    def _unreachable(self, port: int, exc: BaseException) -> None:
        """Use gRPC for a while: 30 s, doubling while the port stays unreachable (up to 10 min)."""
        with self._lock:
            wait = self._fallback_seconds
            self._fallback_seconds = min(FALLBACK_MAX_SECONDS, wait * 2)
            self._port = None
            self._fallback_until = time.monotonic() + wait
        log.warning("data channel of %s (port %d) unreachable: %s; tensors go over gRPC for %.0f s",
                    self.address, port, exc, wait)
        return None

    def _forget(self) -> None:
        """After a broken connection: drop pooled ones (the shard may have restarted, perhaps on
        another port) and ask Hello again on the next call."""
        with self._lock:
            idle, self._idle, self._port = self._idle, [], None
        for conn in idle:
            conn.close()

    def _failure(self, exc: BaseException) -> BaseException:
        """What a call that failed on an open connection raises."""
        if isinstance(exc, DataCallError):
            return exc
        if isinstance(exc, socket.timeout):
            self._forget()
            return DataCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"data channel: the call did not "
                                                                     f"finish within {self._timeout:g} s")
        if isinstance(exc, OSError):  # ssl errors too: after the handshake they mean a broken link
            self._forget()
            # Not worded as a handshake failure (transport._TLS_FAILURE): ShardClient retries it.
            return DataCallError(grpc.StatusCode.UNAVAILABLE, f"data channel: the connection broke "
                                                              f"({exc.errno or type(exc).__name__})")
        return exc

    def call(self, fn: Callable[[_Conn], T], over_grpc: Callable[[], T]) -> T:
        """fn over a data connection, or over_grpc() when there is none to use."""
        conn = self._connection()
        if conn is None:
            return over_grpc()
        # One deadline for the whole call, as gRPC has: sends (sendall, sendmsg) get the time left,
        # and so does every read (frames.recv_exact).
        conn.receiver.deadline = time.monotonic() + self._timeout
        conn.sock.settimeout(self._timeout)
        try:
            result = fn(conn)
        except DataCallError as exc:  # the shard refused the call: the connection is fine
            if exc.code() in _GOING_AWAY:
                conn.close()  # the shard is going away (or failed): do not reuse
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._forget()  # it may come back on another port: ask Hello again
            else:
                with self._lock:
                    self._idle.append(conn)
            raise
        except BaseException as exc:  # noqa: BLE001 - closed, and raised again as what it means
            conn.close()
            raise self._failure(exc) from None
        with self._lock:
            self._idle.append(conn)
        return result

    def close(self) -> None:
        self._forget()

    # -- calls -----------------------------------------------------------------------------------

    def _reply(self, conn: _Conn, provisional: bool = False) -> tuple[bytes, int]:
        """A reply's meta and data length; DataCallError when it is a refusal. With `provisional` (a
        PUSHPULL), a PROVISIONAL reply is taken too: `conn.commit` says whether its commit follows."""
        deadline = conn.receiver.deadline
        status, meta_len, data_len = read_header(conn.sock, deadline=deadline)
        if meta_len > MAX_REPLY_META_BYTES:
            raise ProtocolError(f"a reply head of {meta_len} bytes")
        meta = read_meta(conn.sock, meta_len, deadline)
        conn.commit = provisional and status == PROVISIONAL
        if status != StatusCode.OK and not conn.commit:
            message, reason = parse_error(meta)
            code = _CODES.get(status, grpc.StatusCode.UNKNOWN)
            raise DataCallError(code, message, reason)
        return meta, data_len

    def _segment(self, conn: _Conn, nbytes: int) -> Segment | None:
        """The connection's segment when the call's `nbytes` (and the largest reply seen) fit in
        it, asking the shard for one (or a larger one) first; None: this call uses the socket."""
        with self._lock:
            want = self._shm_want = max(self._shm_want, nbytes)
            if not self._shm or not want:
                return None
        if conn.shm is not None and (want <= conn.shm.capacity or conn.shm.capacity >= conn.shm_max):
            return conn.shm if nbytes <= conn.shm.capacity else None
        if conn.shm is not None:
            conn.shm.close()
            conn.shm = None
        if conn.shm_max < 0:
            return None
        send_header(conn.sock, SHM_OPEN, json.dumps({"bytes": want}).encode(), 0)
        try:
            meta, _ = self._reply(conn)
        except DataCallError as exc:
            if exc.code() in _GOING_AWAY:
                raise  # the shard is stopping: DataChannel.call closes the connection, the call is retried
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # off, or a shard without SHM_* kinds
                return self._no_shm(f"the shard offers no segment ({exc.details()})")
            conn.shm_max = -1  # none free on the shard's host now: this connection keeps to the socket
            log.info("data channel of %s: no shared memory for one connection: %s", self.address,
                     exc.details())
            return None
        offer = json.loads(meta.decode())
        conn.shm_max = int(offer["max_bytes"])
        try:
            segment = Segment.open(str(offer["path"]), int(offer["bytes"]))
        except ShmUnavailable as exc:  # another host, another user: say so; the shard drops it
            send_header(conn.sock, SHM_CONFIRM, b"", 0)
            self._reply(conn)
            return self._no_shm(f"its segment cannot be opened here ({exc.strerror})")
        try:
            segment.unlink()  # the shard unlinks it too: whichever is first, the name is gone
            send_header(conn.sock, SHM_CONFIRM, segment.nonce, 0)
            self._reply(conn)
        except BaseException:
            segment.close()
            raise
        conn.shm = segment
        return segment if nbytes <= segment.capacity else None

    def _no_shm(self, why: str) -> None:
        with self._lock:
            said, self._shm = self._shm, False
        if said:
            log.info("data channel of %s: shared memory not used: %s", self.address, why)
        return None

    def _send(self, conn: _Conn, kind: int, message, items: Sequence[Outgoing],
              wire_dtype: torch.dtype) -> Segment | None:
        """A PUSH or PUSH_PULL frame; its bytes in the connection's segment when they fit it (which
        is returned; None: they went on the socket)."""
        message.segments.extend(whole_segments(items))
        segment = self._segment(conn, nbytes_of(items, wire_dtype))
        if segment is None:
            send_frame(conn.sock, kind, message.SerializeToString(), items, wire_dtype)
            return None
        nbytes = place(items, wire_dtype, segment)  # all of them before the frame says so
        send_header(conn.sock, SHM_PUSH if kind == PUSH else SHM_PUSH_PULL,
                    SIZE.pack(nbytes) + message.SerializeToString(), 0)
        return segment

    def _receive_pull(self, conn: _Conn, sink, segment: Segment | None) -> pb.PullHead:
        meta, data_len = self._reply(conn, provisional=True)
        in_segment = 0
        if segment is not None:  # a SHM_* request: the reply's meta starts with its bytes in the segment
            if len(meta) < SIZE.size:
                raise ProtocolError(f"a shared-memory reply of {len(meta)} meta bytes")
            (in_segment,), meta = SIZE.unpack_from(meta), meta[SIZE.size:]
            if in_segment and data_len or in_segment > segment.capacity:
                raise ProtocolError(f"a reply of {in_segment} bytes in a segment of {segment.capacity} "
                                    f"and {data_len} on the socket")
        reply = pb.PullReply.FromString(meta)
        if not reply.HasField("head"):
            raise ValueError(f"shard {self.address} sent a pull reply without a head")
        head = reply.head
        dests = sink(head)
        with self._lock:
            self._shm_want = max(self._shm_want, in_segment or data_len)
        if segment is not None and not data_len:
            fill(pull_expected(head, dests), reply.segments, segment.data(in_segment), dests)
        else:
            conn.receiver.segments(pull_expected(head, dests), reply.segments, data_len, dests)
        if conn.commit:
            # A replicated shard's push is acknowledged only now (its backup applied it). A refusal
            # or a broken connection here leaves this call failed, and the parameters it wrote are
            # those of a push that was not acknowledged: the retry (same client_id, seq) overwrites them.
            self._reply(conn)
        return head

    def push(self, conn: _Conn, head: pb.PushHead, grads: Sequence[Outgoing],
             wire_dtype: torch.dtype) -> pb.PushReply:
        self._send(conn, PUSH, pb.PushRequest(head=head), grads, wire_dtype)
        meta, _ = self._reply(conn)
        return pb.PushReply.FromString(meta)

    def push_pull(self, conn: _Conn, head: pb.PushHead, grads: Sequence[Outgoing], wire_dtype: torch.dtype,
                  sink) -> pb.PullHead:
        segment = self._send(conn, PUSH_PULL, pb.PushRequest(head=head), grads, wire_dtype)
        return self._receive_pull(conn, sink, segment)

    def pull(self, conn: _Conn, request: pb.PullRequest, sink) -> pb.PullHead:
        segment = self._segment(conn, 0)
        if segment is None:
            send_header(conn.sock, PULL, request.SerializeToString(), 0)
        else:
            send_header(conn.sock, SHM_PULL, SIZE.pack(0) + request.SerializeToString(), 0)
        return self._receive_pull(conn, sink, segment)
