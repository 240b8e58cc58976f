"""A GPU shard's pinned host memory is one bounded pool (server/buffers.py), checked without CUDA:
a fake PinnedHost stands in for pinning and for CUDA events."""
from __future__ import annotations

import torch

from optserve.server.buffers import BufferPool


class FakeEvent:
    def __init__(self):
        self.waited = 0

    def synchronize(self):
        self.waited += 1


class FakeHost:
    """Pins nothing; records what it was asked."""

    def __init__(self, fail: bool = False):
        self.pinned: list[torch.Tensor] = []
        self.events: list[FakeEvent] = []
        self.releases = 0
        self.fail = fail

    def pin(self, numel):
        if self.fail:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        t = torch.empty(numel)
        self.pinned.append(t)
        return t

    def event(self):
        self.events.append(FakeEvent())
        return self.events[-1]

    def release(self):
        self.releases += 1


def _is_pinned(host: FakeHost, t: torch.Tensor) -> bool:
    return any(t is p for p in host.pinned)


def test_pinned_buffers_stay_within_the_budget_and_the_rest_is_pageable():
    host = FakeHost()
    pool = BufferPool(torch.device("cpu"), pinned_budget=lambda: 100, host=host)

    a, b, c = pool.take(60), pool.take(40), pool.take(10)

    assert _is_pinned(host, a) and _is_pinned(host, b)
    assert not _is_pinned(host, c)  # 110 > 100: pageable
    assert pool.pinned_elements == 100


def test_a_given_back_pinned_buffer_is_reused_after_its_event():
    host = FakeHost()
    pool = BufferPool(torch.device("cpu"), pinned_budget=lambda: 100, host=host)
    a = pool.take(60)

    pool.give([a])
    again = pool.take(60)

    assert again is a
    assert len(host.pinned) == 1
    assert [e.waited for e in host.events] == [1]  # waited for the copies queued from it


def test_free_pinned_buffers_of_other_sizes_make_room_and_are_released():
    host = FakeHost()
    pool = BufferPool(torch.device("cpu"), pinned_budget=lambda: 100, host=host)
    pool.give([pool.take(60), pool.take(30)])

    big = pool.take(80)

    assert _is_pinned(host, big)
    assert pool.pinned_elements <= 100
    assert host.releases == 1


def test_pinned_memory_never_passes_the_budget_over_many_sizes():
    host = FakeHost()
    pool = BufferPool(torch.device("cpu"), pinned_budget=lambda: 1000, host=host)
    held = []
    for i in range(200):
        held.append(pool.take(1 + (i * 37) % 400))
        assert pool.pinned_elements <= 1000
        if len(held) > 3:
            pool.give([held.pop(0)])
    assert pool.pinned_elements <= 1000


def test_a_failed_pin_falls_back_to_pageable_memory_and_frees_its_reservation():
    host = FakeHost(fail=True)
    pool = BufferPool(torch.device("cpu"), pinned_budget=lambda: 100, host=host)

    t = pool.take(50)

    assert t.numel() == 50 and not _is_pinned(host, t)
    assert pool.pinned_elements == 0


def test_cpu_pool_pins_nothing():
    pool = BufferPool(torch.device("cpu"))

    pool.give([pool.take(10)])

    assert pool.pinned_elements == 0


def test_a_pinned_buffer_never_given_back_leaves_the_count_when_freed():
    host = FakeHost()
    pool = BufferPool(torch.device("cpu"), pinned_budget=lambda: 100, host=host)
    t = pool.take(60)
    host.pinned.clear()

    del t  # a failed request dropped its staging

    assert pool.pinned_elements == 0
    assert pool.take(100).numel() == 100 and pool.pinned_elements == 100
