"""The data channel's framing, shared by shard (server/data.py) and client (client/data.py).

gRPC stays the control plane (Hello, Register, SetState, Stats, Checkpoint, health, reflection) and a
complete fallback; the tensor-carrying calls Push, Pull and PushPull can also travel over a plain TCP
connection (TLS when the shard has a certificate) to the port a shard announces in `Hello.data_port`.
The reason is cost per byte: gRPC Python copies every payload byte into and out of its own buffers
and through HTTP/2 framing; here bytes go from the sender's tensor to the kernel to the receiver's
tensor (`sendall` / `recv_into` on tensor memory), which is what raw TCP reaches.

A frame is a 20-byte header, `meta` and `data`:

    magic "OSD1" | kind or status (u8) | 3 zero bytes | meta length (u32) | data length (u64)

- A connection opens with an AUTH frame (meta: the bearer token, UTF-8, possibly empty); the shard
  answers OK or UNAUTHENTICATED (then closes).
- Requests: PUSH and PUSHPULL carry a serialized PushRequest (head and segments, no `data` field) as
  meta and the segments' bytes as data, in segment order; PULL carries a PullRequest and no data.
- Replies carry a gRPC status code in place of the kind. OK: PushReply (PUSH) or PullReply (head and
  segments) and its bytes. Not OK: meta is JSON {"message": ..., "reason": ...}, no data.
- A replicated shard's primary answers PUSHPULL before its backup has applied the push: the reply
  (PullReply and bytes) comes with status PROVISIONAL, then one more frame, the commit: OK (empty
  meta, no data: the push is acknowledged) or an error (it is not; the client retries the same
  (client_id, seq), whose reply replaces the parameters this one wrote). docs/ARCHITECTURE.md,
  "Replication".
- Same host: SHM_* kinds negotiate a shared-memory segment and carry requests whose bytes are in it
  (optserve/shm.py; docs/ARCHITECTURE.md, "Same-host shared memory").
- The shard always reads a whole request before it answers (on an error it discards the rest), so
  a connection stays usable after a refused call; one call at a time per connection.

Segments mean what they mean on gRPC (serde.Assembler validates them); payload bytes are the
little-endian elements of the wire dtype, so the same codec rules hold on both paths.
"""
from __future__ import annotations

import json
import socket
import ssl
import struct
import time
from typing import Sequence

import torch

from optserve.net import is_loopback
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Assembler, Expected, Outgoing, host_copy, tensor_bytes

MAGIC = b"OSD1"
HEADER = struct.Struct("<4sB3xIQ")
AUTH, PUSH, PULL, PUSH_PULL = 1, 2, 3, 4
# Between the replicas of one shard index (server/replication.py; docs/ARCHITECTURE.md "Replication"):
# the primary's FORWARD of an applied operation and its idle HEARTBEAT; a joining replica's JOIN (the
# reply carries the state transfer) and JOINED (it restored the state: the primary takes it as backup).
FORWARD, HEARTBEAT, JOIN, JOINED = 5, 6, 7, 8
REPLICATION_KINDS = (FORWARD, HEARTBEAT, JOIN, JOINED)
# Same-host shared memory (optserve/shm.py), from 16 up (5-8 are replication's):
# SHM_OPEN (meta JSON {"bytes": n}) asks for a segment, the reply's meta JSON names it; SHM_CONFIRM
# echoes its nonce (empty: this side cannot open it); SHM_PUSH, SHM_PULL, SHM_PUSH_PULL are PUSH,
# PULL, PUSH_PULL with their bytes in the segment: meta is shm.SIZE (the bytes in the segment) then
# the message, and the frame's own data length is 0 (a reply's bytes may come on the socket instead
# when they do not fit: then its SIZE is 0 and its data length says how many follow).
SHM_OPEN, SHM_CONFIRM, SHM_PUSH, SHM_PULL, SHM_PUSH_PULL = 16, 17, 18, 19, 20
SHM_OF = {SHM_PUSH: PUSH, SHM_PULL: PULL, SHM_PUSH_PULL: PUSH_PULL}  # the request each one carries
PROVISIONAL = 128  # a reply's status (no gRPC code): a PUSHPULL reply whose commit frame follows
KINDS = {AUTH: "Auth", PUSH: "Push", PULL: "Pull", PUSH_PULL: "PushPull", FORWARD: "Forward",
         HEARTBEAT: "Heartbeat", JOIN: "Join", JOINED: "Joined", SHM_OPEN: "ShmOpen",
         SHM_CONFIRM: "ShmConfirm", SHM_PUSH: "Push", SHM_PULL: "Pull", SHM_PUSH_PULL: "PushPull"}
MAX_AUTH_BYTES = 4096  # the AUTH frame's token; a longer one closes the connection unread
MAX_REPLY_META_BYTES = 1 << 30  # a client's sanity bound on a shard's reply head
LOOPBACK_BUFFER_BYTES = 256 << 10  # see tune()
CONVERT_ELEMENTS = 1 << 20  # bf16/fp16 payloads are converted through a scratch tensor this long
_IOV_MAX = 1024  # buffers per sendmsg (Linux's IOV_MAX)
META_STEP = 64 << 10  # read_meta allocates a frame's meta at most this far ahead of the bytes received


class ProtocolError(ConnectionError):
    """The peer broke the framing (bad magic, oversized meta): the connection cannot be trusted."""


def _time_left(sock: socket.socket, deadline: float | None) -> None:
    """Let the next read take only the time left before `deadline` (time.monotonic()); none: as set."""
    if deadline is not None:
        sock.settimeout(max(1e-3, deadline - time.monotonic()))


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fill `view` from the socket (ConnectionError when the peer closes first). With a deadline
    (time.monotonic()), every read may take only the time left: socket.timeout once it is past."""
    got, n = 0, len(view)
    while got < n:
        _time_left(sock, deadline)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection mid-frame")
        got += k


def read_header(sock: socket.socket, eof_ok: bool = False,
                deadline: float | None = None) -> tuple[int, int, int] | None:
    """(kind or status, meta length, data length); None on a clean close before a frame when eof_ok.

    The lengths are the peer's word: the caller bounds them before reading or allocating anything."""
    buf = bytearray(HEADER.size)
    view = memoryview(buf)
    _time_left(sock, deadline)
    first = sock.recv_into(view)
    if first == 0:
        if eof_ok:
            return None
        raise ConnectionError("the peer closed the connection")
    recv_exact(sock, view[first:], deadline)
    magic, kind, meta_len, data_len = HEADER.unpack(buf)
    if magic != MAGIC:
        raise ProtocolError(f"not an optserve data frame (magic {bytes(magic)!r})")
    return kind, meta_len, data_len


def read_meta(sock: socket.socket, meta_len: int, deadline: float | None = None) -> bytes:
    """`meta_len` bytes, allocated as they arrive: a header's length is only the peer's word, so a
    buffer never runs ahead of what was received by more than META_STEP or the bytes so far (each
    piece at most doubles the total): a 20-byte header declaring 16 MiB costs 64 KiB, not 16 MiB."""
    pieces, got = [], 0
    while got < meta_len:
        piece = bytearray(min(meta_len - got, max(META_STEP, got)))
        recv_exact(sock, memoryview(piece), deadline)
        pieces.append(piece)
        got += len(piece)
    return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)


def send_header(sock: socket.socket, kind: int, meta: bytes, data_len: int) -> None:
    sock.sendall(HEADER.pack(MAGIC, kind, len(meta), data_len) + meta)


def error_meta(message: str, reason: str = "") -> bytes:
    return json.dumps({"message": message, "reason": reason}).encode()


def parse_error(meta: bytes) -> tuple[str, str]:
    try:
        d = json.loads(meta.decode())
        return str(d.get("message", "")), str(d.get("reason", ""))
    except (ValueError, AttributeError):
        return meta.decode(errors="replace"), ""


def send_tensor(sock: socket.socket, flat: torch.Tensor, wire_dtype: torch.dtype) -> None:
    """Send a flat tensor's elements as `wire_dtype`: straight from its memory when it already is a
    contiguous host tensor of that dtype, else converted piece by piece (a GPU tensor is copied to
    the host first, through pinned memory)."""
    if flat.numel() == 0:
        return
    if flat.device.type == "cpu" and flat.dtype == wire_dtype and flat.is_contiguous():
        sock.sendall(tensor_bytes(flat))
        return
    step = CONVERT_ELEMENTS
    for start in range(0, flat.numel(), step):
        piece = host_copy(flat[start:start + step], wire_dtype).contiguous()
        sock.sendall(tensor_bytes(piece))


def send_frame(sock: socket.socket, kind: int, meta: bytes, items: Sequence[Outgoing],
               wire_dtype: torch.dtype) -> int:
    """A whole frame: header, meta (which holds `whole_segments(items)`), then the items' elements
    as `wire_dtype`, in order; returns the data's byte count.

    When every tensor can go from its own memory and the socket is plain TCP, the frame leaves in
    one `sendmsg` (scatter-gather; a loop only for partial sends): one system call and one release
    of the GIL instead of one per tensor, which counts when many small pushes share a shard."""
    flats = [item.tensor.reshape(-1) for item in items]
    nbytes = sum(t.numel() for t in flats) * wire_dtype.itemsize
    head = HEADER.pack(MAGIC, kind, len(meta), nbytes) + meta
    direct = all(t.device.type == "cpu" and t.dtype == wire_dtype and t.is_contiguous() for t in flats)
    if not direct or isinstance(getattr(sock, "raw", sock), ssl.SSLSocket):  # ssl sockets have no sendmsg
        sock.sendall(head)
        for t in flats:
            send_tensor(sock, t, wire_dtype)
        return nbytes
    views = [memoryview(head)] + [tensor_bytes(t) for t in flats if t.numel()]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV_MAX])
        while i < len(views) and sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        if sent:
            views[i] = views[i][sent:]
    return nbytes


class Receiver:
    """Reads payload bytes into destination tensors, converting through one reused scratch tensor
    when the destination is not a contiguous host tensor of the wire dtype."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.deadline: float | None = None  # the current call's (a client's); None: no limit
        self._scratch: dict[torch.dtype, torch.Tensor] = {}

    def into(self, dest: torch.Tensor, wire_dtype: torch.dtype) -> None:
        n = dest.numel()
        if n == 0:
            return
        if dest.device.type == "cpu" and dest.dtype == wire_dtype and dest.is_contiguous():
            recv_exact(self.sock, tensor_bytes(dest), self.deadline)
            return
        scratch = self._scratch.get(wire_dtype)
        if scratch is None:
            scratch = self._scratch[wire_dtype] = torch.empty(CONVERT_ELEMENTS, dtype=wire_dtype)
        for start in range(0, n, CONVERT_ELEMENTS):
            k = min(CONVERT_ELEMENTS, n - start)
            recv_exact(self.sock, tensor_bytes(scratch[:k]), self.deadline)
            dest[start:start + k].copy_(scratch[:k])

    def segments(self, expected: dict[tuple[int, int], Expected], segments, nbytes: int,
                 dests: dict[tuple[int, int], torch.Tensor]) -> None:
        """A frame's data: its segments are checked against `expected` (serde.Assembler: order,
        ranges, completeness, byte count) before a byte is read, then read into flat `dests`."""
        assembler = Assembler(expected)
        spans = assembler.plan(segments, nbytes)
        assembler.finish()
        for seg, want in spans:
            self.into(dests[(seg.entry, seg.part)][seg.offset:seg.offset + seg.count], want.dtype)

    def discard(self, nbytes: int) -> None:
        """Read and drop `nbytes` (the rest of a refused request)."""
        buf = memoryview(bytearray(min(nbytes, 1 << 20) or 1))
        while nbytes > 0:
            k = min(nbytes, len(buf))
            recv_exact(self.sock, buf[:k], self.deadline)
            nbytes -= k


def whole_segments(items: Sequence[Outgoing]) -> list[pb.Segment]:
    """One segment per non-empty item: the whole tensor."""
    return [pb.Segment(entry=item.entry, part=item.part, offset=0, count=item.tensor.numel())
            for item in items if item.tensor.numel()]


def tune(sock: socket.socket) -> None:
    """No Nagle delay (heads are small writes); TCP keepalive, so a peer whose host vanished is
    noticed within about two minutes instead of holding its connection (and buffers) for ever. On
    loopback, small kernel buffers: there "bandwidth" is the kernel copying between two processes'
    memory, and a buffer that stays in the CPU cache beats a large one (docs/MEASUREMENTS.md has
    the step time by buffer size). Between hosts the kernel's autotuning, which sizes buffers to the path's
    bandwidth-delay product, is left alone."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, opt):  # Linux names; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    if is_loopback(sock.getpeername()[0]):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, LOOPBACK_BUFFER_BYTES)
