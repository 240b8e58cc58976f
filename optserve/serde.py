"""Tensor <-> wire conversion, shared by server and client (the one place that touches tensor bytes).

Every optserve message that carries tensors is laid out as `<head fields> segments data=15` (see
proto/optserve/v1/optserve.proto). Protobuf would copy the payload three times (construct, serialize,
parse) into fresh, page-faulting buffers; this module writes the same bytes without that:

- encode: the small fields go through protobuf, then the payload is appended as field 15 with one
  copy, tensor memory -> the message's `bytes` (grpc accepts only `bytes`, so that copy is the floor).
- decode: field 15 is located by walking the top-level fields, and the payload is handed out as
  zero-copy tensor views of the received `bytes`; only the small fields are parsed by protobuf.

The output is valid protobuf, so any stub speaks to optserve and optserve to any stub. Field 14 pads
the prefix so the payload starts 16-byte aligned within the message.

This module does no I/O and keeps no state; validation errors raise RequestError (optserve/errors.py).
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from optserve.errors import RequestError, StatusCode, invalid
from optserve.hyper import CUT_ELEMENTS, AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb

if sys.byteorder != "little":  # the wire is little-endian and tensors are copied as they lie in memory
    raise ImportError("optserve needs a little-endian host")

# torch.frombuffer warns that a `bytes` is not writable; the views are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

DEFAULT_CHUNK_BYTES = 4 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
# Segments cost Python work each (about 2 us to walk past in `decode`, more to check in `Assembler`)
# and can be as small as 4 bytes, so a request of empty segments is CPU bought cheaply (issue 13).
# Bounds, checked before any segment is looked at (RESOURCE_EXHAUSTED):
# - a message holds at most MAX_SEGMENTS_PER_MESSAGE top-level fields (chunk_stream closes a message
#   at that many segments, so optserve's own streams never reach it);
# - a request's segments are at most one per tensor it declares per message, plus SEGMENT_SLACK (a
#   foreign encoder may cut tensors more finely than optserve does): what optserve sends is one
#   segment per tensor plus at most one cut per further message.
MAX_SEGMENTS_PER_MESSAGE = 1 << 14
SEGMENT_SLACK = 64

_DATA_FIELD = 15
_PAD_FIELD = 14
_DATA_TAG = bytes([(_DATA_FIELD << 3) | 2])
_PAD_TAG = bytes([(_PAD_FIELD << 3) | 2])
_ALIGN = 16

_TO_PROTO = {torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.float16: pb.FLOAT16}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}
WIRE_DTYPES = tuple(_TO_PROTO)


# A key's tensors by wire part, named as torch's Adam names its state (and as checkpoints and the
# shard's Key name them).
PART_NAMES = {pb.PARAM: "param", pb.EXP_AVG: "exp_avg", pb.EXP_AVG_SQ: "exp_avg_sq",
              pb.MAX_EXP_AVG_SQ: "max_exp_avg_sq"}
STATE_PARTS = tuple(PART_NAMES)  # every part a Pull or SetState may name
ADAM_STATE = {name: part for part, name in PART_NAMES.items() if part != pb.PARAM}  # torch's state keys

# AdamConfig's fields and HyperParams' are the same names (tests/unit/test_serde.py checks it).
_HYPER_FIELDS = tuple(f.name for f in dataclasses.fields(AdamConfig))


def hyper_to_proto(cfg: AdamConfig) -> pb.HyperParams:
    return pb.HyperParams(**{name: getattr(cfg, name) for name in _HYPER_FIELDS})


def hyper_from_proto(h: pb.HyperParams, where: str) -> AdamConfig:
    """The options a message carries, validated (INVALID_ARGUMENT naming `where` when out of range)."""
    try:
        return AdamConfig(**{name: getattr(h, name) for name in _HYPER_FIELDS})
    except ValueError as exc:
        raise invalid(f"{where}: {exc}") from None


def dtype_to_proto(dtype: torch.dtype) -> int:
    try:
        return _TO_PROTO[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel; use one of {list(_TO_PROTO)}") from None


def dtype_from_proto(value: int, default: torch.dtype | None = None) -> torch.dtype:
    if value == pb.DTYPE_UNSPECIFIED and default is not None:
        return default
    try:
        return _FROM_PROTO[value]
    except KeyError:
        raise invalid(f"dtype {pb.DType.Name(value) if value in pb.DType.values() else value} "
                      f"is not one of {[pb.DType.Name(v) for v in _FROM_PROTO]}") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(buf)
    while True:
        if pos >= end or shift > 63:
            raise invalid("malformed message: truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def encode(meta: bytes, payload: Sequence[memoryview | bytes]) -> bytes:
    """One message: the serialized small fields, then field 15 holding the payload parts, concatenated.

    meta must be a serialization of the message without fields 14 and 15.
    """
    size = sum(len(p) for p in payload)
    length = _varint(size)
    prefix = len(meta) + len(_DATA_TAG) + len(length)
    # Field 14 takes 2 + n bytes (tag, one-byte length, n pad bytes); choose n so the payload starts
    # at a multiple of _ALIGN, which lets the receiver view it as a tensor without copying.
    n = (-(prefix + 2)) % _ALIGN
    return b"".join((meta, _PAD_TAG, bytes([n]), bytes(n), _DATA_TAG, length, *payload))


def decode(raw: bytes, message_type):
    """Split a received message into (parsed small fields, payload memoryview)."""
    view = memoryview(raw)
    pos, data_span, end = 0, None, len(view)
    fields = 0
    while pos < end:
        fields += 1
        if fields > MAX_SEGMENTS_PER_MESSAGE + 16:  # head, padding, data: a handful besides segments
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"a {message_type.DESCRIPTOR.name} of more than {MAX_SEGMENTS_PER_MESSAGE} "
                               f"segments (at most {MAX_SEGMENTS_PER_MESSAGE} a message)")
        tag_start = pos
        tag, pos = _read_varint(view, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, pos = _read_varint(view, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(view, pos)
            if field == _DATA_FIELD:
                if data_span is not None:
                    raise invalid("malformed message: field 'data' appears twice")
                data_span = (tag_start, pos, pos + length)
            pos += length
        else:
            raise invalid(f"malformed message: wire type {wire_type} at byte {tag_start}")
        if pos > end:
            raise invalid(f"malformed message: a field runs past the end ({pos} > {end} bytes)")
    try:
        if data_span is None:
            return message_type.FromString(raw), view[0:0]
        tag_start, start, stop = data_span
        meta = message_type.FromString(bytes(view[:tag_start]) + bytes(view[stop:]))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a malformed request
        raise invalid(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from None
    return meta, view[start:stop]


# ----------------------------------------------------------------------------------------------
# Chunking: tensors -> a stream of messages


@dataclass(frozen=True)
class Outgoing:
    """One tensor to send: entry index in the head, part, and a flat tensor (any device, any dtype)."""
    entry: int
    part: int
    tensor: torch.Tensor


def chunk_stream(items: Iterable[Outgoing], wire_dtype: torch.dtype, chunk_bytes: int,
                 make_meta) -> Iterator[bytes]:
    """Encode `items` as messages of at most `chunk_bytes` payload each.

    make_meta(segments, first) returns the serialized small fields of one message (first is True for
    the first message, which carries the head). Always yields at least one message. A tensor that
    does not fit the room left in a message is cut at a multiple of CUT_ELEMENTS.
    """
    itemsize = torch.empty((), dtype=wire_dtype).element_size()
    per_chunk = chunk_bytes // itemsize
    if per_chunk < CUT_ELEMENTS:
        raise ValueError(f"chunk_bytes {chunk_bytes} holds fewer than {CUT_ELEMENTS} elements of "
                         f"{wire_dtype}")
    segments: list[pb.Segment] = []
    parts: list[memoryview] = []
    room = per_chunk
    first = True
    for item in items:
        flat = item.tensor.reshape(-1)
        n = flat.numel()
        offset = 0
        while offset < n:  # an empty tensor sends no segment: it is complete with 0 elements
            take = n - offset if n - offset <= room else room - room % CUT_ELEMENTS
            if take == 0:  # less room than one cut: close this message early
                yield encode(make_meta(segments, first), parts)
                first = False
                segments, parts, room = [], [], per_chunk
                continue
            piece = host_copy(flat[offset:offset + take], wire_dtype)
            segments.append(pb.Segment(entry=item.entry, part=item.part, offset=offset, count=take))
            parts.append(tensor_bytes(piece.contiguous()))
            offset += take
            room -= take
            if room == 0 or len(segments) == MAX_SEGMENTS_PER_MESSAGE:
                yield encode(make_meta(segments, first), parts)
                first = False
                segments, parts, room = [], [], per_chunk
    if segments or first:
        yield encode(make_meta(segments, first), parts)


def host_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype` in host memory: itself when it already is; through pinned memory from a GPU."""
    if t.device.type == "cpu":
        return t if t.dtype == dtype else t.to(dtype)
    t = t.to(dtype)  # convert on the device: fewer bytes cross the bus
    host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    host.copy_(t)  # synchronous: the bytes are read right after
    return host


# ----------------------------------------------------------------------------------------------
# Reassembly: a stream of messages -> tensor pieces, validated


@dataclass(frozen=True)
class Expected:
    """What the receiver accepts for one (entry, part): its element count and the dtype of its bytes."""
    numel: int
    dtype: torch.dtype
    name: str


class Assembler:
    """Checks incoming segments against what the head declared and hands out zero-copy pieces.

    Each (entry, part) must arrive in order, without gaps or overlap, and be complete at `finish()`.
    """

    def __init__(self, expected: dict[tuple[int, int], Expected]):
        self._expected = expected
        self._next = {k: 0 for k in expected}
        self._segments = 0  # seen so far in this request
        self._messages = 0

    def _bound(self, segments: Sequence[pb.Segment]) -> None:
        """RESOURCE_EXHAUSTED when this message's segments take the request past its segment bound
        (one per declared tensor per message, plus SEGMENT_SLACK); O(1), before any is looked at."""
        self._segments += len(segments)
        self._messages += 1
        bound = len(self._expected) + self._messages - 1 + SEGMENT_SLACK
        if len(segments) > len(self._expected) + SEGMENT_SLACK or self._segments > bound:
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"{self._segments} segments in {self._messages} message(s) for "
                               f"{len(self._expected)} tensors: at most one per tensor per message plus "
                               f"{SEGMENT_SLACK}")

    def plan(self, segments: Sequence[pb.Segment], nbytes: int) -> list[tuple[pb.Segment, Expected]]:
        """Validate one message's segments against the head and against its `nbytes` of data.

        Returns (segment, what its key expects) in data order; raises RequestError before anything
        is read or copied when a segment is undeclared, out of order, out of range, or the byte
        count does not match.
        """
        self._bound(segments)
        spans = []
        pos = 0
        for seg in segments:
            want = self._expected.get((seg.entry, seg.part))
            if want is None:
                raise invalid(f"segment names entry {seg.entry} part "
                              f"{pb.Part.Name(seg.part) if seg.part in pb.Part.values() else seg.part}, "
                              "which this stream did not declare")
            at = self._next[(seg.entry, seg.part)]
            if seg.offset != at:
                raise invalid(f"key {want.name!r}: segment offset {seg.offset}, expected {at} "
                              f"(segments must be in order, without gaps or overlap)")
            if seg.count > want.numel - at:
                raise invalid(f"key {want.name!r}: segment [{seg.offset}, {seg.offset + seg.count}) "
                              f"runs past the tensor's {want.numel} elements")
            spans.append((seg, want))
            pos += seg.count * want.dtype.itemsize
            self._next[(seg.entry, seg.part)] = at + seg.count
        if pos != nbytes:
            keys = sorted({want.name for _, want in spans})
            raise invalid(f"data holds {nbytes} bytes but the segments describe {pos} "
                          f"(keys {', '.join(map(repr, keys)) or 'none'})")
        return spans

    def pieces(self, segments: Sequence[pb.Segment], data: memoryview
               ) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """Yield (entry, part, offset, tensor view) for each segment of one message."""
        start = 0
        for seg, want in self.plan(segments, len(data)):
            nbytes = seg.count * want.dtype.itemsize
            yield seg.entry, seg.part, seg.offset, view_tensor(data[start:start + nbytes], want.dtype)
            start += nbytes

    def copy(self, segments: Sequence[pb.Segment], data: memoryview,
             dests: dict[tuple[int, int], torch.Tensor]) -> None:
        """Copy one message's segments into the flat tensors dests[(entry, part)] (converting dtype)."""
        for entry, part, offset, view in self.pieces(segments, data):
            dests[(entry, part)][offset:offset + view.numel()].copy_(view)

    def finish(self) -> None:
        for key, want in self._expected.items():
            got = self._next[key]
            if got != want.numel:
                raise invalid(f"key {want.name!r}: stream ended after {got} of {want.numel} elements "
                              f"of {pb.Part.Name(key[1])}")


def pull_expected(head: pb.PullHead, dests: dict[tuple[int, int], torch.Tensor]
                  ) -> dict[tuple[int, int], Expected]:
    """What a pull reply carries for each destination: PARAM in the head's dtype, state in float32."""
    param_dtype = dtype_from_proto(head.dtype, default=torch.float32)
    return {k: Expected(t.numel(), param_dtype if k[1] == pb.PARAM else torch.float32, head.entries[k[0]].key)
            for k, t in dests.items()}


def view_tensor(data: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor over `data` without copying (copied once only if its address is misaligned)."""
    if len(data) == 0:
        return torch.empty(0, dtype=dtype)
    t = torch.frombuffer(data, dtype=dtype)
    if t.data_ptr() % dtype.itemsize:  # a foreign encoder without padding; kernels want alignment
        t = t.clone()
    return t
