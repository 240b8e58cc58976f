"""The data channel's byte path (optserve/frames.py) over a socket pair: every size and dtype case."""
from __future__ import annotations

import socket
import threading

import pytest
import torch

from optserve import frames
from optserve.frames import (CONVERT_ELEMENTS, HEADER, MAGIC, PUSH, ProtocolError, Receiver, error_meta,
                             parse_error, read_header, read_meta, send_header, send_tensor)


def transfer(src: torch.Tensor, wire_dtype: torch.dtype, dest: torch.Tensor) -> None:
    """send_tensor on one end (a thread: the pair's buffers are small), Receiver.into on the other."""
    a, b = socket.socketpair()
    errors = []

    def send():
        try:
            send_tensor(a, src, wire_dtype)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        Receiver(b).into(dest, wire_dtype)
    finally:
        sender.join()
        a.close()
        b.close()
    if errors:
        raise errors[0]


SIZES = [0, 1, 63, 64, CONVERT_ELEMENTS - 1, CONVERT_ELEMENTS, CONVERT_ELEMENTS + 1, 2 * CONVERT_ELEMENTS + 3]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_tensor_arrives_as_its_wire_dtype_rounding_of_itself(numel, wire_dtype):
    src = torch.randn(numel)
    dest = torch.full((numel,), float("nan"))

    transfer(src, wire_dtype, dest)

    assert torch.equal(dest, src.to(wire_dtype).to(torch.float32))


def test_a_destination_that_is_not_contiguous_is_filled_through_the_scratch():
    src = torch.randn(CONVERT_ELEMENTS + 5)
    backing = torch.zeros(2 * src.numel())
    dest = backing[::2]

    transfer(src, torch.float32, dest)

    assert torch.equal(dest, src)
    assert torch.count_nonzero(backing[1::2]) == 0


def test_more_than_one_gib_arrives_bit_exact():
    numel = (1 << 28) + 3  # 1 GiB + 12 bytes of float32: past every 32-bit length
    src = torch.arange(numel, dtype=torch.int32).view(torch.float32)
    dest = torch.empty(numel)

    transfer(src, torch.float32, dest)

    assert torch.equal(dest.view(torch.int32), src.view(torch.int32))


def test_a_frame_header_and_meta_round_trip():
    a, b = socket.socketpair()
    with a, b:
        send_header(a, PUSH, b"meta bytes", 1 << 40)

        kind, meta_len, data_len = read_header(b)

        assert (kind, data_len) == (PUSH, 1 << 40)
        assert read_meta(b, meta_len) == b"meta bytes"


def test_a_frame_with_another_magic_is_a_protocol_error():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(HEADER.pack(b"HTTP", PUSH, 0, 0))

        with pytest.raises(ProtocolError, match="not an optserve data frame"):
            read_header(b)


@pytest.mark.parametrize("cut", [1, HEADER.size - 1])
def test_a_header_cut_short_is_a_closed_connection(cut):
    a, b = socket.socketpair()
    with b:
        a.sendall(HEADER.pack(MAGIC, PUSH, 0, 0)[:cut])
        a.close()

        with pytest.raises(ConnectionError):
            read_header(b)


def test_a_clean_close_between_frames_is_not_an_error_when_allowed():
    a, b = socket.socketpair()
    with b:
        a.close()

        assert read_header(b, eof_ok=True) is None


def test_an_error_meta_carries_message_and_reason():
    assert parse_error(error_meta("too stale", "stale")) == ("too stale", "stale")
    assert parse_error(b"\xff not json") == ("\ufffd not json", "")


class _Trickle:
    """A socket that hands out `data` a few bytes a call and records how big a buffer each read had."""

    def __init__(self, data: bytes):
        self.data, self.asked = data, []

    def settimeout(self, timeout) -> None:
        pass

    def recv_into(self, view, nbytes: int = 0) -> int:
        self.asked.append(len(view))
        k = min(len(view), len(self.data), 7)
        view[:k] = self.data[:k]
        self.data = self.data[k:]
        return k


def test_a_long_meta_is_allocated_as_its_bytes_arrive_not_as_declared():
    declared = 16 << 20
    sock = _Trickle(b"x" * 100)

    with pytest.raises(ConnectionError):  # the peer sent 100 bytes of the 16 MiB it declared
        read_meta(sock, declared)
    assert max(sock.asked) <= frames.META_STEP


@pytest.mark.parametrize("meta_len", [0, 1, 65535, 65536, 65537, 300_001])
def test_meta_read_in_growing_pieces_is_the_bytes_sent(meta_len):
    data = bytes(range(256)) * (meta_len // 256 + 1)
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=a.sendall, args=(data[:meta_len],), daemon=True).start()
        assert read_meta(b, meta_len) == data[:meta_len]
