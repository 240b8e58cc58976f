"""The shard's data channel: Push, Pull and PushPull as raw frames over TCP (optserve/frames.py).

Translation only, like service.py: every request goes to the same Servicer methods the gRPC handlers
call (validation, dedupe, policy, waits, snapshot), so the two paths refuse, apply and answer alike;
only the carriage differs. Gradients are read with `recv_into` straight into the staging buffers the
gRPC path copies into, and pulled tensors leave with `sendall` from the snapshot copy.

Threads: one accepts connections; each connection has its own thread, serving one request at a time
(a worker keeps its connections open across steps). `stop(grace)` stops accepting, lets requests in
flight finish for up to `grace` seconds (the servicer already refuses new ones with UNAVAILABLE),
then closes every connection.
"""
from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading

import grpc

from optserve.frames import (AUTH, HEADER, KINDS, PULL, PUSH, PUSH_PULL, ProtocolError, Receiver,
                             error_meta, read_header, read_meta, send_header, send_tensor, tune,
                             whole_segments)
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Assembler, RequestError, invalid
from optserve.server.service import Servicer, _parse

log = logging.getLogger("optserve.server")

_OK = grpc.StatusCode.OK.value[0]
AUTH_SECONDS = 10.0


class DataServer:
    def __init__(self, servicer: Servicer, host: str, port: int, token: str = "",
                 ssl_context: ssl.SSLContext | None = None, max_connections: int = 256):
        self.servicer = servicer
        self._token = token.encode()
        self._ssl = ssl_context
        self._max_connections = max_connections
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        self._sock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Condition()
        self._conns: set[socket.socket] = set()
        self._in_flight = 0
        self._closing = False
        self._thread = threading.Thread(target=self._accept, name="data-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float | None = None) -> None:
        with self._lock:
            self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._sock.close()
        self._thread.join()
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=grace or 0)
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- connections -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return  # stop() shut the socket
            with self._lock:
                if self._closing or len(self._conns) >= self._max_connections:
                    log.warning("data channel: refusing a connection from %s (%s)", peer,
                                "shutting down" if self._closing else f"{len(self._conns)} connections open")
                    conn.close()
                    continue
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), name="data-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        raw = conn
        try:
            tune(conn)
            # Until the peer has shown the token, it gets AUTH_SECONDS: connections that never
            # authenticate do not hold threads (or the connection limit) for long.
            conn.settimeout(AUTH_SECONDS)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(conn, server_side=True)
            if not self._authenticate(conn):
                return
            conn.settimeout(None)  # an authenticated worker may keep its connection idle
            receiver = Receiver(conn)
            while True:
                header = read_header(conn, eof_ok=True)
                if header is None:
                    return
                with self._lock:
                    self._in_flight += 1
                try:
                    self._handle(conn, receiver, *header)
                finally:
                    with self._lock:
                        self._in_flight -= 1
                        self._lock.notify_all()
        except ProtocolError as exc:
            log.warning("data channel: closing the connection from %s: %s", peer, exc)
        except (OSError, ConnectionError) as exc:  # the peer went away, or stop() closed us
            log.debug("data channel: connection from %s ended: %s", peer, exc)
        except Exception:  # noqa: BLE001 - a bug must not kill the shard; it is logged whole
            log.exception("data channel: connection from %s failed", peer)
        finally:
            with self._lock:
                self._conns.discard(raw)
            conn.close()

    def _authenticate(self, conn) -> bool:
        kind, meta_len, data_len = read_header(conn)
        if kind != AUTH or data_len:
            raise ProtocolError(f"a connection must open with an AUTH frame, got kind {kind}")
        given = read_meta(conn, meta_len)
        if self._token and not hmac.compare_digest(given, self._token):
            exc = RequestError(grpc.StatusCode.UNAUTHENTICATED,
                               "missing bearer token" if not given else "wrong bearer token")
            self.servicer.refused("Auth", exc)
            send_header(conn, exc.code.value[0], error_meta(exc.message), 0)
            return False
        send_header(conn, _OK, b"", 0)
        return True

    # -- requests --------------------------------------------------------------------------------

    def _handle(self, conn, receiver: Receiver, kind: int, meta_len: int, data_len: int) -> None:
        meta = read_meta(conn, meta_len)
        self.servicer.counters.add(bytes_in=HEADER.size + meta_len + data_len, data_calls=1)
        left = [data_len]  # payload bytes not read yet; discarded when the request is refused
        method = KINDS.get(kind, f"kind {kind}")
        try:
            self.servicer.check_ready()
            if kind in (PUSH, PUSH_PULL):
                first = _parse(meta, pb.PushRequest)

                def receive(expected, dests):
                    assembler = Assembler(expected)
                    spans = assembler.plan(first.segments, left[0])
                    assembler.finish()
                    for seg, want in spans:
                        receiver.into(dests[(seg.entry, seg.part)][seg.offset:seg.offset + seg.count], want.dtype)
                        left[0] -= seg.count * want.dtype.itemsize

                if kind == PUSH:
                    reply = self.servicer.push(first, receive)
                    send_header(conn, _OK, reply.SerializeToString(), 0)
                    return
                keys, dtype, reply = self.servicer.push_pull(first, receive)
                parts = [pb.PARAM]
            elif kind == PULL:
                if data_len:
                    raise invalid(f"a Pull carries no data; this one declares {data_len} bytes")
                keys, parts, dtype = self.servicer.pull(_parse(meta, pb.PullRequest))
                reply = None
            else:
                raise invalid(f"unknown request kind {kind}")
        except RequestError as exc:
            self.servicer.refused(method, exc)
            self._refuse(conn, receiver, left, exc.code, exc.message, exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - answered as INTERNAL, like grpc does, and logged
            if isinstance(exc, (OSError, ConnectionError)):
                raise
            log.exception("data channel: %s failed", method)
            self._refuse(conn, receiver, left, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            return
        head, items, release = self.servicer.snapshot(keys, parts, dtype, reply)
        try:
            segments, nbytes = whole_segments(items, dtype, pb.Segment)
            out = pb.PullReply(head=head, segments=segments).SerializeToString()
            send_header(conn, _OK, out, nbytes)
            for item in items:
                send_tensor(conn, item.tensor.reshape(-1), dtype)
            self.servicer.counters.add(bytes_out=HEADER.size + len(out) + nbytes)
        finally:
            release()

    @staticmethod
    def _refuse(conn, receiver: Receiver, left: list[int], code: grpc.StatusCode, message: str,
                reason: str = "") -> None:
        receiver.discard(left[0])
        left[0] = 0
        send_header(conn, code.value[0], error_meta(message, reason), 0)

