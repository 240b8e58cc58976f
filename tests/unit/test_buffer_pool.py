"""The shard's buffer pool: a whole push's worth of same-sized slices is reused, within a budget."""
from __future__ import annotations

import torch

from optserve.server.store import BufferPool, Store


def test_many_buffers_of_one_size_are_all_reused_within_the_budget():
    pool = BufferPool(torch.device("cpu"), budget=lambda: 50 * 1000)
    first = [pool.take(1000) for _ in range(50)]
    pool.give(first)

    again = [pool.take(1000) for _ in range(50)]

    assert {t.data_ptr() for t in again} == {t.data_ptr() for t in first}


def test_buffers_over_the_budget_are_let_go():
    pool = BufferPool(torch.device("cpu"), budget=lambda: 3 * 1000)
    given = [torch.empty(1000) for _ in range(5)]
    pool.give(given)

    taken = [pool.take(1000) for _ in range(5)]

    reused = {t.data_ptr() for t in taken} & {t.data_ptr() for t in given}
    assert len(reused) == 3  # the three within the budget; two fresh ones: take never fails
    assert pool._kept == 0


def test_a_stores_budget_is_twice_its_parameters():
    store = Store("cpu")
    store.create([("w", (4000,), torch.zeros(4000), {})])
    buffers = [store.buffers.take(1000) for _ in range(10)]

    store.buffers.give(buffers)

    assert store.buffers._kept == 8000
