"""The shard's data channel: Push, Pull and PushPull as raw frames over TCP (optserve/frames.py).

Translation only, like service.py: every request goes to the same request core the gRPC handlers
call (server/requests.py: validation, dedupe, policy, waits, snapshot), so the two paths refuse,
apply and answer alike; only the carriage differs. Gradients are read with `recv_into` straight into
the staging buffers the gRPC path copies into, and pulled tensors leave with `sendall` from the
snapshot: on a CPU shard the key's own tensor, leased (copy on write: server/buffers.py).

Threads: one accepts connections; each connection has its own thread, serving one request at a time
(a worker keeps its connections open across steps). `stop(grace)` stops accepting, lets requests in
flight finish for up to `grace` seconds (the core already refuses new ones with UNAVAILABLE), then
closes every connection.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
import select
import socket
import ssl
import struct
import threading
import time

from optserve.frames import (AUTH, HEADER, KINDS, MAX_AUTH_BYTES, PROVISIONAL, PULL, PUSH, PUSH_PULL,
                             REPLICATION_KINDS, SHM_CONFIRM, SHM_OF, SHM_OPEN, ProtocolError, Receiver,
                             error_meta, read_header, read_meta, send_frame, send_header, tune,
                             whole_segments)
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.errors import RequestError, StatusCode, invalid
from optserve.serde import DEFAULT_MAX_MESSAGE_BYTES
from optserve.server.requests import RequestCore, parse
from optserve.server.shm import DEFAULT_MAX_BYTES, ShmBudget, ShmLink
from optserve.shm import SHM_DIR, SIZE, fill, nbytes_of, place

log = logging.getLogger("optserve.server")

_OK = StatusCode.OK
AUTH_SECONDS = 10.0  # from accept to an accepted token (TLS handshake included), at most
# Connections not yet authenticated cannot lock out those with the token (issue 13): at most
# MAX_PENDING wait for their AUTH, at most MAX_PENDING_PER_ADDRESS from one address; a connection
# over either cap closes the oldest waiting one (of its address, else of all) to make room, and one
# accepted while half of MAX_PENDING are waiting has PRESSED_AUTH_SECONDS to authenticate. A worker
# sends AUTH as soon as it connects, so it is only ever pending for a round trip (and a handshake).
MAX_PENDING = 64
MAX_PENDING_PER_ADDRESS = 8
PRESSED_AUTH_SECONDS = 1.0


PEER_WAIT_SECONDS = 0.05  # what a request may wait on its peer holding a slot; then it lends it
# A reply's writes may wait on the peer SEND_SECONDS in all, plus a second per SEND_BYTES_PER_SECOND
# it has taken; then the connection is closed, which ends the reply's snapshot lease: a puller that
# never reads (or reads slower than that) cannot keep a key leased, and every push to it copying the
# key (issue 13). A worker reads its reply as it arrives; a link slower than 1 MiB/s fails large pulls.
SEND_SECONDS = 60.0
SEND_BYTES_PER_SECOND = 1 << 20
_PEER_TIMEVAL = struct.pack("ll", 0, int(PEER_WAIT_SECONDS * 1e6))  # SO_RCVTIMEO / SO_SNDTIMEO
_NO_TIMEVAL = struct.pack("ll", 0, 0)


class _Peer:
    """A connection as its requests use it. A request holds a slot (requests.RequestSlots) while it
    runs, but once it has waited on its peer for PEER_WAIT_SECONDS in all (reads that found no
    bytes yet, writes that found the peer's window full; one call may wait that long, so up to twice
    that), every further read and write of the request waits with the slot lent out, as a plain
    blocking call: a worker that stops mid-request (SIGSTOP, a debugger, a paused VM) or sends slowly
    (a slow link, a trickle) keeps no slot from the others, and costs no wake-ups while it waits. A
    loopback request of a few hundred KB waits well under that, so the fast path keeps its slot:
    lending around every payload and reply costs a quarter of the steps/s (docs/MEASUREMENTS.md).

    Plain TCP stays a blocking socket with kernel timeouts (SO_RCVTIMEO, SO_SNDTIMEO): a read or
    write blocked that long returns what it moved, or EAGAIN having moved nothing, and is simply
    tried again; no poll() precedes each call, as Python's own socket timeouts do (a measurable cost
    per step: docs/MEASUREMENTS.md). TLS uses Python's timeouts, and since a TLS write cannot be resumed
    after one, on TLS every write waits with the slot lent (`raw` tells frames.send_frame which)."""

    def __init__(self, sock: socket.socket, slots):
        self.raw = sock
        self._slots = slots
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._waited = 0.0
        self._blocking = False  # this request has used its wait: plain blocking calls, slot lent
        self.received = 0  # bytes read since the last take_received()
        self._send_from: float | None = None  # when this request's first blocking write began
        self._sent = 0  # bytes this request has written
        self._timeouts(PEER_WAIT_SECONDS)

    def take_received(self) -> int:
        """Bytes received since the last call: what Stats counts as bytes_in (never a declared length)."""
        n, self.received = self.received, 0
        return n

    def next_request(self) -> None:
        """Wait, with no timeout and no slot, until the peer sends its next request (or closes)."""
        if not (self._tls and self.raw.pending()):
            poller = select.poll()
            poller.register(self.raw, select.POLLIN)
            poller.poll()
        self._waited = 0.0
        self._send_from = None
        self._sent = 0
        if self._blocking:
            self._blocking = False
            self._timeouts(PEER_WAIT_SECONDS)

    def _patient(self, op, *args, retryable: bool = True, write: bool = False):
        while retryable and not self._blocking:
            start = time.monotonic()
            try:
                return op(*args)
            except (BlockingIOError, socket.timeout):  # waited a kernel timeout, moved nothing
                pass
            finally:
                self._waited += time.monotonic() - start
                if self._waited >= PEER_WAIT_SECONDS:
                    self._go_blocking()
        if not self._blocking:  # a TLS write, which is never retried after a timeout
            self._go_blocking()
        if write:
            self._send_deadline()
        with self._slots.lent():
            return op(*args)

    def _send_deadline(self) -> None:
        """Let the next blocking write wait only until SEND_SECONDS after the first one, plus a second
        per SEND_BYTES_PER_SECOND written; TimeoutError (the connection is closed) once that has passed."""
        now = time.monotonic()
        if self._send_from is None:
            self._send_from = now
        left = self._send_from + SEND_SECONDS + self._sent / SEND_BYTES_PER_SECOND - now
        if left <= 0:
            raise TimeoutError(f"the peer took {self._sent} bytes of its reply in "
                               f"{now - self._send_from:.0f} s")
        if self._tls:
            self.raw.settimeout(left)
        else:
            seconds = int(left)
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                struct.pack("ll", seconds, max(1000, int((left - seconds) * 1e6))))

    def _go_blocking(self) -> None:
        self._blocking = True
        self._timeouts(None)

    def _timeouts(self, seconds: float | None) -> None:
        if self._tls:
            self.raw.settimeout(seconds)
            return
        value = _NO_TIMEVAL if seconds is None else _PEER_TIMEVAL
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            self.raw.setsockopt(socket.SOL_SOCKET, option, value)

    def recv_into(self, view, nbytes: int = 0) -> int:
        if self._tls and self._blocking and self._send_from is not None:
            self.raw.settimeout(None)  # (not reached today: a request's reads come before its reply)
        k = self._patient(self.raw.recv_into, view, nbytes)
        self.received += k
        return k

    def sendmsg(self, buffers) -> int:
        k = self._patient(self.raw.sendmsg, buffers, write=True)
        self._sent += k
        return k

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            k = self._patient(self.raw.send, view, retryable=not self._tls, write=True)
            self._sent += k
            view = view[k:]

    def settimeout(self, timeout) -> None:  # frames' deadlines are the client's; a shard sets none
        raise AssertionError("a shard's data connection keeps its own timeouts")


class _Accepted:
    """An accepted connection: `sock` is the socket it is served on (the TLS socket once wrapped);
    `handle`, a duplicate of its descriptor while it authenticates, is what the AUTH deadline and
    eviction shut down (wrapping in TLS detaches the accepted socket object from the connection)."""

    def __init__(self, sock: socket.socket, host: str, auth_seconds: float):
        self.sock = sock
        self.host = host
        self.auth_seconds = auth_seconds
        self.handle = sock.dup()


class _Payload:
    """A request's payload as the shard reads it: bytes not read yet, discarded when it is refused."""

    def __init__(self, unread: int):
        self.unread = unread


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class DataServer:
    """The data channel's listener: `bind()` takes the port, `start()` accepts, `stop()` drains."""

    def __init__(self, core: RequestCore, host: str, port: int, token: str = "",
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 256,
                 max_meta_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, shm_max_bytes: int = DEFAULT_MAX_BYTES,
                 shm_dir: str = SHM_DIR):
        self.core = core
        self._shm = (shm_dir, ShmBudget(shm_max_bytes))  # each connection's ShmLink (server/shm.py)
        self._token = token.encode()
        self._ssl = ssl_context
        self._max_connections = max_connections
        self._max_meta = max_meta_bytes  # a request's head, bounded like a gRPC message
        self._address = (host.strip("[]"), port)
        self._sock: socket.socket | None = None
        self.port = 0  # bound: the port taken (any free one for 0)
        self._lock = threading.Condition()
        self._conns: set[socket.socket] = set()  # as served: the TLS socket once wrapped
        self._pending: dict[_Accepted, None] = {}  # accepted, not yet authenticated: oldest first
        self._in_flight = 0
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="data-accept", daemon=True)

    def bind(self) -> None:
        family = socket.AF_INET6 if ":" in self._address[0] else socket.AF_INET
        self._sock = socket.create_server(self._address, family=family, backlog=128)
        self.port = self._sock.getsockname()[1]

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting; wait up to `grace` s for requests in flight; shut every connection.

        After this returns no reply can leave: an acknowledgement either went out before, or the
        client sees a broken connection and retries (exactly once, against the restarted shard)."""
        with self._lock:
            self._closing = True
        if self._sock is None:  # never bound
            return
        _shutdown(self._sock)  # wakes the blocked accept()
        self._sock.close()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=grace or 0)
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)

    # -- connections -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError as exc:
                if self._closing:
                    return
                log.warning("data channel: accept failed: %s; retrying", exc)  # EMFILE, ENOBUFS...
                time.sleep(0.1)
                continue
            with self._lock:
                if self._closing or not self._make_room(peer):
                    conn.close()
                    continue
                pressed = len(self._pending) >= MAX_PENDING // 2
                try:
                    accepted = _Accepted(conn, peer[0], PRESSED_AUTH_SECONDS if pressed else AUTH_SECONDS)
                except OSError as exc:  # EMFILE on dup
                    log.warning("data channel: refusing a connection from %s: %s", peer, exc)
                    conn.close()
                    continue
                self._conns.add(conn)
                self._pending[accepted] = None
            threading.Thread(target=self._serve, args=(accepted, peer), name="data-conn", daemon=True).start()

    def _make_room(self, peer) -> bool:
        """Under the lock, before a connection from `peer` is served: over a cap on connections not
        yet authenticated, close the oldest of them (of the peer's address first); False when the
        connection cannot be served (every one of max_connections has authenticated)."""
        same = [a for a in self._pending if a.host == peer[0]]
        victim = None
        if len(same) >= MAX_PENDING_PER_ADDRESS:
            victim = same[0]
        full = len(self._conns) >= self._max_connections
        if victim is None and (len(self._pending) >= MAX_PENDING or (self._pending and full)):
            victim = next(iter(self._pending))
        elif victim is None and full:
            log.warning("data channel: refusing a connection from %s (%d open, all authenticated)",
                        peer, len(self._conns))
            return False
        if victim is not None:
            log.warning("data channel: closing a connection from %s that has not authenticated, to make "
                        "room for one from %s (%d waiting)", victim.host, peer[0], len(self._pending))
            del self._pending[victim]
            _shutdown(victim.handle)
        return True

    def _open(self, conn: _Accepted) -> bool:
        """TLS handshake and AUTH, within its auth_seconds in all (a deadline, not a per-read timeout).

        True: the peer showed the token (or none is needed)."""
        raw = conn.sock
        timer = threading.Timer(conn.auth_seconds, _shutdown, (conn.handle,))
        timer.start()
        try:
            tune(raw)
            raw.settimeout(conn.auth_seconds)
            if self._ssl is not None:
                conn.sock = self._ssl.wrap_socket(raw, server_side=True)
                with self._lock:  # stop() must reach the socket that is served from now on
                    self._conns.discard(raw)
                    self._conns.add(conn.sock)
                    if self._closing:
                        _shutdown(conn.sock)
            if not self._authenticate(conn.sock):
                return False
            conn.sock.settimeout(None)  # an authenticated worker may keep its connection idle
            return True
        finally:
            timer.cancel()
            with self._lock:
                self._pending.pop(conn, None)
            conn.handle.close()

    def _serve(self, accepted: _Accepted, peer) -> None:
        raw = accepted.sock
        stack = contextlib.ExitStack()
        try:
            if not self._open(accepted):
                return
            conn = _Peer(accepted.sock, self.core.slots)
            receiver = Receiver(conn)
            shm = ShmLink(*self._shm)
            stack.callback(shm.drop)  # the connection's segment goes with it
            while True:
                conn.next_request()
                header = read_header(conn, eof_ok=True)
                if header is None:
                    return
                with self._lock:
                    self._in_flight += 1
                try:
                    with self.core.slots.held():
                        self._handle(conn, receiver, shm, *header)
                finally:
                    self.core.counters.add(bytes_in=conn.take_received())
                    with self._lock:
                        self._in_flight -= 1
                        self._lock.notify_all()
        except ProtocolError as exc:
            log.warning("data channel: closing the connection from %s: %s", peer, exc)
        except OSError as exc:  # the peer went away, a deadline passed, or stop() closed us
            log.debug("data channel: connection from %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - a bug must not kill the shard; it is logged whole
            log.exception("data channel: connection from %s failed", peer)
        finally:
            stack.close()
            with self._lock:
                self._conns.discard(raw)
                self._conns.discard(accepted.sock)
            accepted.sock.close()

    def _authenticate(self, conn) -> bool:
        kind, meta_len, data_len = read_header(conn)
        if kind != AUTH or data_len:
            raise ProtocolError(f"a connection must open with an AUTH frame, got kind {kind}")
        if meta_len > MAX_AUTH_BYTES:
            raise ProtocolError(f"an AUTH frame of {meta_len} bytes (at most {MAX_AUTH_BYTES})")
        given = read_meta(conn, meta_len)
        if self._token and not hmac.compare_digest(given, self._token):
            exc = RequestError(StatusCode.UNAUTHENTICATED,
                               "missing bearer token" if not given else "wrong bearer token")
            self.core.refused("Auth", exc)
            send_header(conn, exc.code, error_meta(exc.message), 0)
            return False
        send_header(conn, _OK, b"", 0)
        return True

    # -- requests --------------------------------------------------------------------------------

    def _handle(self, conn, receiver: Receiver, shm: ShmLink, kind: int, meta_len: int,
                data_len: int) -> None:
        if kind not in (SHM_OPEN, SHM_CONFIRM) and kind not in REPLICATION_KINDS:
            # Push, Pull, PushPull (and strays), not the handshake, nor the other replica's frames
            self.core.counters.add(data_calls=1)  # bytes_in: as received (_serve), not as declared
        payload = _Payload(data_len)
        method = KINDS.get(kind, f"kind {kind}")
        if meta_len > self._max_meta:  # as grpc refuses a message over max_message_bytes
            payload.unread += meta_len
            exc = RequestError(StatusCode.RESOURCE_EXHAUSTED, f"request head of {meta_len} bytes is "
                               f"over this shard's max_message_bytes ({self._max_meta})")
            self.core.refused(method, exc)
            self._refuse(conn, receiver, payload, exc.code, exc.message)
            return
        meta = read_meta(conn, meta_len)
        segment = None  # a SHM_* request: its bytes are in the connection's segment, its reply's too
        try:
            if kind in (SHM_OPEN, SHM_CONFIRM):
                if data_len:
                    raise invalid(f"a {method} frame carries no data; this one declares {data_len} bytes")
                out = shm.open(meta) if kind == SHM_OPEN else shm.confirm(meta) or b""
                send_header(conn, _OK, out, 0)
                return
            self.core.check_ready()
            if kind in SHM_OF:
                if data_len:
                    raise invalid(f"a shared-memory {method} carries its bytes in the segment; this one "
                                  f"declares {data_len} on the socket")
                if len(meta) < SIZE.size:
                    raise invalid(f"a shared-memory {method} of {len(meta)} meta bytes has no size")
                segment = shm.usable()
                (in_segment,), meta, kind = SIZE.unpack_from(meta), meta[SIZE.size:], SHM_OF[kind]
                if kind == PULL and in_segment:
                    raise invalid(f"a Pull carries no data; this one declares {in_segment} bytes")
            if kind in (PUSH, PUSH_PULL):
                first = parse(meta, pb.PushRequest)

                def receive(expected, dests):
                    if segment is None:
                        receiver.segments(expected, first.segments, payload.unread, dests)
                        payload.unread = 0
                        return
                    fill(expected, first.segments, shm.data(in_segment), dests)
                    self.core.counters.add(bytes_in=in_segment)

                if kind == PUSH:
                    pushed = self.core.push(first, receive)
                    send_header(conn, _OK, pushed.SerializeToString(), 0)
                    return
                reply = self.core.push_pull(first, receive, provisional=True)
            elif kind in REPLICATION_KINDS:  # from the shard's other replica (server/replication.py)
                if self.core.replication is None:
                    raise invalid("this shard is not replicated: it takes no replication frames")

                def receive_with(segments):
                    def receive(expected, dests):
                        receiver.segments(expected, segments, payload.unread, dests)
                        payload.unread = 0
                    return receive

                self.core.replication.serve(conn, kind, meta, receive_with, self.core.slots)
                return
            elif kind == PULL:
                if data_len:
                    raise invalid(f"a Pull carries no data; this one declares {data_len} bytes")
                reply = self.core.pull(parse(meta, pb.PullRequest))
            else:
                raise invalid(f"unknown request kind {kind}")
        except RequestError as exc:
            self.core.refused(method, exc)
            self._refuse(conn, receiver, payload, exc.code, exc.message, exc.reason)
            return
        except OSError:
            raise  # the connection broke: nothing can be answered on it
        except Exception as exc:  # noqa: BLE001 - answered UNKNOWN, as grpc answers a handler's exception
            log.exception("data channel: %s failed", method)
            self._refuse(conn, receiver, payload, StatusCode.UNKNOWN,
                         f"Exception calling application: {type(exc).__name__}: {exc}")
            return
        if reply.commit is None:
            self._send_pull(conn, segment, reply, _OK)
            return
        # A replicated push: its parameters go out while the backup applies it, then the commit.
        try:
            self._send_pull(conn, segment, reply, PROVISIONAL)
        except BaseException:
            with contextlib.suppress(RequestError):
                reply.commit()  # (the push's gradients are kept until the backup answered)
            raise
        try:
            reply.commit()
        except RequestError as exc:
            self.core.refused(method, exc)
            send_header(conn, exc.code, error_meta(exc.message, exc.reason), 0)
            return
        send_header(conn, _OK, b"", 0)

    def _send_pull(self, conn, segment, reply, status: int) -> None:
        """A PullReply and its bytes (in the connection's segment when it was a SHM_* request and
        they fit), with `status`; the snapshot's lease ends once they are out."""
        out = pb.PullReply(head=reply.head, segments=whole_segments(reply.items)).SerializeToString()
        if segment is not None and nbytes_of(reply.items, reply.dtype) <= segment.capacity:
            # Into the segment (the lease ends as soon as it is copied), then the head on the socket.
            try:
                in_segment = place(reply.items, reply.dtype, segment)
            finally:
                reply.release()
            send_header(conn, status, SIZE.pack(in_segment) + out, 0)
            self.core.counters.add(bytes_out=HEADER.size + SIZE.size + len(out) + in_segment)
            return
        if segment is not None:  # too large for the segment: on the socket, 0 bytes in the segment
            out = SIZE.pack(0) + out
        try:
            nbytes = send_frame(conn, status, out, reply.items, reply.dtype)
            self.core.counters.add(bytes_out=HEADER.size + len(out) + nbytes)
        finally:
            reply.release()

    @staticmethod
    def _refuse(conn, receiver: Receiver, payload: _Payload, code: StatusCode, message: str,
                reason: str = "") -> None:
        receiver.discard(payload.unread)
        payload.unread = 0
        send_header(conn, code, error_meta(message, reason), 0)

