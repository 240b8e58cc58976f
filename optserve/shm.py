"""Same-host shared memory for the data channel: the segment, its layout and the two copies.

A worker on the shard's host (or in a container sharing its /dev/shm) can move a request's tensor
bytes through a file both processes map instead of through a socket: the control frames still go
over the data-channel connection (optserve/frames.py, kinds SHM_*), only the bytes take the segment.
The shard creates the segment (mode 0600, a random name, its pages reserved with posix_fallocate so a
full /dev/shm is an error at creation, not a SIGBUS later) and writes a random nonce in its first
page; the worker opens it, reads the nonce and echoes it over the connection, which proves it sees
the same file (same host or shared IPC namespace, same user); then both unlink the name, so nothing
is left in /dev/shm once both have it mapped.

This module only maps and copies; it trusts nothing in the segment: the shard bounds every length
it is told (`Segment.data`) and checks segments with the codec's `serde.Assembler`, as for bytes
read from a socket. It must not apply anything: a segment is scratch space that its other side may
scribble on at any time, so bytes are always copied out of it before they are checked or used.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import stat
import struct
import threading
from typing import Sequence

import torch

from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Assembler, Expected, Outgoing, host_copy, view_tensor

SHM_DIR = "/dev/shm"
NAME_PREFIX = "optserve-shm-"
HEADER_BYTES = 4096  # the first page holds LAYOUT; the data region starts page-aligned after it
MAGIC = b"OSHM"
VERSION = 1
NONCE_BYTES = 32
LAYOUT = struct.Struct("<4sIQ32s")  # magic, version, data capacity in bytes, nonce
SIZE = struct.Struct("<Q")  # the byte count a SHM_* frame's meta starts with (see frames.py)
SPLIT_BYTES = 4 << 20  # a call's copies are shared among threads in parts of at least this (_Moves)


class ShmUnavailable(OSError):
    """This side cannot use the segment (another host, another user, no such directory, a full
    tmpfs): the call goes through the socket instead."""


class Segment:
    """A mapped segment: `region` is the data area as a flat uint8 tensor of `capacity` bytes."""

    def __init__(self, mm: mmap.mmap, path: str, capacity: int, nonce: bytes):
        self._mm = mm
        self.path = path
        self.capacity = capacity
        self.nonce = nonce
        self.region = torch.frombuffer(mm, dtype=torch.uint8, offset=HEADER_BYTES, count=capacity) \
            if capacity else torch.empty(0, dtype=torch.uint8)

    @classmethod
    def create(cls, directory: str, capacity: int) -> Segment:
        """A new segment of `capacity` data bytes in `directory` (ShmUnavailable when it cannot be)."""
        path = os.path.join(directory, NAME_PREFIX + secrets.token_hex(16))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ShmUnavailable(exc.errno, f"cannot create a segment in {directory}: "
                                            f"{exc.strerror}") from None
        try:
            # Reserve the pages now: on a full tmpfs a write into a mapped hole is a SIGBUS, not an error.
            os.posix_fallocate(fd, 0, HEADER_BYTES + capacity)
            mm = mmap.mmap(fd, HEADER_BYTES + capacity)
        except OSError as exc:
            _unlink(path)
            raise ShmUnavailable(exc.errno, f"cannot reserve {HEADER_BYTES + capacity} bytes in "
                                            f"{directory}: {exc.strerror}") from None
        finally:
            os.close(fd)
        nonce = secrets.token_bytes(NONCE_BYTES)
        mm[:LAYOUT.size] = LAYOUT.pack(MAGIC, VERSION, capacity, nonce)
        return cls(mm, path, capacity, nonce)

    @classmethod
    def open(cls, path: str, capacity: int) -> Segment:
        """Map the segment a shard announced (ShmUnavailable when this process cannot, or the file is
        not an optserve segment of that size: the name is only the shard's word)."""
        if not os.path.basename(path).startswith(NAME_PREFIX) or capacity < 0:
            raise ShmUnavailable(0, f"{path!r} is not an optserve segment name")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ShmUnavailable(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                    or st.st_size != HEADER_BYTES + capacity:
                raise ShmUnavailable(0, f"{path} is not a {HEADER_BYTES + capacity}-byte segment of "
                                        f"this user")
            mm = mmap.mmap(fd, HEADER_BYTES + capacity)
        finally:
            os.close(fd)
        magic, version, cap, nonce = LAYOUT.unpack_from(mm)
        if (magic, version, cap) != (MAGIC, VERSION, capacity):
            mm.close()
            raise ShmUnavailable(0, f"{path} does not hold an optserve segment of {capacity} bytes")
        return cls(mm, path, capacity, nonce)

    def data(self, nbytes: int) -> memoryview:
        """The first `nbytes` of the data region; ValueError when the segment is smaller."""
        if not 0 <= nbytes <= self.capacity:
            raise ValueError(f"{nbytes} bytes declared in a segment of {self.capacity}")
        return memoryview(self.region[:nbytes].numpy()) if nbytes else memoryview(b"")

    def unlink(self) -> None:
        """Remove the name (the mapping stays until close); either side may, more than once."""
        _unlink(self.path)

    def close(self) -> None:
        """Drop this side's mapping (unmapped once no tensor views it any more)."""
        self.region = torch.empty(0, dtype=torch.uint8)
        self._mm = None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def nbytes_of(items: Sequence[Outgoing], wire_dtype: torch.dtype) -> int:
    return sum(item.tensor.numel() for item in items) * wire_dtype.itemsize


def place(items: Sequence[Outgoing], wire_dtype: torch.dtype, segment: Segment) -> int:
    """Copy the items' elements as `wire_dtype`, back to back in item order (what
    `frames.whole_segments(items)` describes), into the segment's data region; returns the byte count.
    One copy per byte (converting on the way when the dtype differs; from a GPU, through the host)."""
    region, pos, moves = segment.region, 0, _Moves()
    for item in items:
        flat = item.tensor.reshape(-1)
        n = flat.numel() * wire_dtype.itemsize
        if not n:
            continue
        if pos + n > region.numel():
            raise ValueError(f"{pos + n} bytes do not fit a segment of {region.numel()}")
        dest = region[pos:pos + n]
        if _same_bytes(dest, flat, wire_dtype):
            moves.add(dest, flat, n)
        elif pos % wire_dtype.itemsize == 0:
            dest.view(wire_dtype).copy_(flat)
        else:  # after an odd count of 2-byte elements: through a temporary, as bytes
            dest.copy_(host_copy(flat, wire_dtype).contiguous().view(torch.uint8))
        pos += n
    moves.run()
    return pos


def fill(expected: dict[tuple[int, int], Expected], segments: Sequence[pb.Segment], data: memoryview,
         dests: dict[tuple[int, int], torch.Tensor]) -> None:
    """Copy the segment's `data` into flat `dests` after the same checks as bytes from a socket
    (serde.Assembler: declared, in order, in range, complete, the byte count exact): nothing is
    written unless all of them pass."""
    assembler = Assembler(expected)
    spans = assembler.plan(segments, len(data))
    assembler.finish()
    start, moves = 0, _Moves()
    for seg, want in spans:
        n = seg.count * want.dtype.itemsize
        dest = dests[(seg.entry, seg.part)][seg.offset:seg.offset + seg.count]
        source = view_tensor(data[start:start + n], want.dtype)
        if _same_bytes(dest, source, want.dtype):
            moves.add(dest, source, n)
        else:
            dest.copy_(source)
        start += n
    moves.run()


def _same_bytes(dest: torch.Tensor, source: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `source`'s bytes are what `dest` (of `dtype`, or the segment's raw bytes) takes."""
    return (dest.device.type == source.device.type == "cpu" and source.dtype == dtype
            and dest.dtype in (dtype, torch.uint8) and dest.is_contiguous() and source.is_contiguous())


class _Moves:
    """A call's same-dtype copies between host buffers, run together by `run()` as `memmove`s,
    without the GIL (ctypes releases it). A call of k x SPLIT_BYTES or more (k >= 2) is cut into k
    parts of equal size, at most torch's intra-op thread count, all but one copied on threads started
    for the call: one thread's memmove of 64 MiB reaches about half of what two reach here
    (docs/MEASUREMENTS.md). Smaller calls copy on this thread: torch's copy_ would hand anything over
    32 K elements to its intra-op threads, whose wake-ups cost a small step more than the copy."""

    def __init__(self):
        self._moves: list[tuple[int, int, int]] = []
        self._keep: list[torch.Tensor] = []  # the tensors the addresses point into, alive until run()
        self.nbytes = 0

    def add(self, dest: torch.Tensor, source: torch.Tensor, n: int) -> None:
        self._moves.append((dest.data_ptr(), source.data_ptr(), n))
        self._keep += (dest, source)
        self.nbytes += n

    def run(self) -> None:
        parts = self.nbytes // SPLIT_BYTES
        if parts >= 2:
            parts = min(parts, torch.get_num_threads())
        if parts < 2:
            _memmove_all(self._moves)
        else:
            cuts, helpers = _cut(self._moves, parts), []
            try:
                for part in cuts[1:]:
                    helper = threading.Thread(target=_memmove_all, args=(part,), name="shm-copy", daemon=True)
                    try:
                        helper.start()
                    except RuntimeError:  # no thread to be had (the process is at its limit): copied here
                        _memmove_all(part)
                        continue
                    helpers.append(helper)
                _memmove_all(cuts[0])
            finally:
                _join_all(helpers)  # the buffers stay referenced until no helper writes into them
        self._moves, self._keep, self.nbytes = [], [], 0


def _cut(moves: Sequence[tuple[int, int, int]], parts: int) -> list[list[tuple[int, int, int]]]:
    """`moves` as `parts` lists of about the same byte count (a move may be split between two)."""
    total = sum(n for _, _, n in moves)
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    share, k, room = -(-total // parts), 0, -(-total // parts)
    for dest, source, n in moves:
        while n:
            take = min(n, room)
            out[k].append((dest, source, take))
            dest, source, n, room = dest + take, source + take, n - take, room - take
            if not room and k < parts - 1:
                k, room = k + 1, share
    return out


def _join_all(threads: Sequence[threading.Thread]) -> None:
    """Join every thread, even through a KeyboardInterrupt (raised once all have ended)."""
    interrupted = None
    for t in threads:
        while t.is_alive():
            try:
                t.join()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the copies end
                interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _memmove_all(moves: Sequence[tuple[int, int, int]]) -> None:
    for dest, source, n in moves:
        ctypes.memmove(dest, source, n)
