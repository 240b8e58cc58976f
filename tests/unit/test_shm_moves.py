"""The segment's copies (optserve/shm.py `place`, `fill`): a call large enough is shared among
threads, each byte copied exactly once, bitwise what one thread copies; a small call stays on the
calling thread."""
from __future__ import annotations

import threading

import pytest
import torch

from optserve import shm
from optserve.frames import whole_segments
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Expected, Outgoing
from optserve.shm import Segment, _cut, fill, place


@pytest.mark.parametrize("parts", [2, 3, 4])
def test_cut_covers_every_byte_once_in_parts_of_equal_size(parts):
    moves = [(1000, 50_000, 7), (2000, 60_000, 1), (9000, 70_000, 4096), (20_000, 80_000, 13)]
    total = sum(n for _, _, n in moves)
    cuts = _cut(moves, parts)
    assert len(cuts) == parts
    share = -(-total // parts)
    assert [sum(n for _, _, n in part) for part in cuts[:-1]] == [share] * (parts - 1)
    # Pieces in order rebuild every move: destinations and sources advance together, no gap, no overlap.
    pieces = [p for part in cuts for p in part]
    rebuilt, k = [], 0
    for dest, source, n in moves:
        got = 0
        while got < n:
            d, s, m = pieces[k]
            assert (d, s) == (dest + got, source + got) and m > 0
            got, k = got + m, k + 1
        rebuilt.append(got)
    assert rebuilt == [n for _, _, n in moves] and k == len(pieces)


def _round_trip(tmp_path, items, wire):
    segment = Segment.create(str(tmp_path), sum(i.tensor.numel() for i in items) * wire.itemsize)
    try:
        nbytes = place(items, wire, segment)
        expected = {(i.entry, i.part): Expected(i.tensor.numel(), wire, f"k{i.entry}") for i in items}
        dests = {(i.entry, i.part): torch.full((i.tensor.numel(),), -1.0) for i in items}
        fill(expected, whole_segments(items), segment.data(nbytes), dests)
        return nbytes, dests
    finally:
        segment.close()


def _threads_used(monkeypatch) -> set[str]:
    names: set[str] = set()
    real = shm._memmove_all

    def spy(moves):
        names.add(threading.current_thread().name)
        real(moves)
    monkeypatch.setattr(shm, "_memmove_all", spy)
    return names


def test_a_large_call_is_copied_by_several_threads_bitwise(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    names = _threads_used(monkeypatch)
    torch.manual_seed(0)
    items = [Outgoing(i, pb.GRAD, torch.randn(n)) for i, n in enumerate([1001, 3, 2500, 777])]
    nbytes, dests = _round_trip(tmp_path, items, torch.float32)
    assert nbytes == sum(i.tensor.numel() for i in items) * 4
    for item in items:
        assert torch.equal(dests[(item.entry, item.part)], item.tensor)
    assert names == {"shm-copy", threading.current_thread().name}


def test_a_call_under_twice_split_bytes_stays_on_the_calling_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    names = _threads_used(monkeypatch)
    items = [Outgoing(0, pb.GRAD, torch.randn(shm.SPLIT_BYTES // 2 - 1))]  # 4 bytes under 2 x SPLIT_BYTES
    _, dests = _round_trip(tmp_path, items, torch.float32)
    assert torch.equal(dests[(0, pb.GRAD)], items[0].tensor)
    assert names == {threading.current_thread().name}


def test_a_process_out_of_threads_copies_every_part_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(shm, "SPLIT_BYTES", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)

    def refuse(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    names = _threads_used(monkeypatch)
    items = [Outgoing(0, pb.GRAD, torch.randn(5000)), Outgoing(1, pb.GRAD, torch.randn(123))]
    _, dests = _round_trip(tmp_path, items, torch.float32)
    for item in items:
        assert torch.equal(dests[(item.entry, item.part)], item.tensor)
    assert names == {threading.current_thread().name}
