"""A shard's intra-op threads by tensor size (server/threads.py) and its request slots (requests.RequestSlots).

The thread count is an arbiter's business only: what the store computes must not change with it."""
from __future__ import annotations

import threading

import pytest
import torch

from optserve.hyper import AdamConfig
from optserve.server import threads as threads_module
from optserve.server.requests import RequestSlots
from optserve.server.store import GradEntry, Store
from optserve.server.threads import INTRA_OP, PARALLEL_ELEMENTS, IntraOpThreads


@pytest.fixture
def torch_threads():
    """Leave torch's thread count (and the process's arbiter) as the test found them."""
    before = torch.get_num_threads()
    yield before
    INTRA_OP.manage(0)
    torch.set_num_threads(before)


@pytest.fixture
def counts(monkeypatch):
    """The counts the arbiter sets, in order (torch's own setting is left alone)."""
    seen: list[int] = []
    monkeypatch.setattr(threads_module.torch, "set_num_threads", seen.append)
    return seen


def test_small_ops_run_on_one_thread_unless_a_large_one_runs(counts):
    arbiter = IntraOpThreads()
    arbiter.manage(3)
    assert counts == [3]
    with arbiter.sized(10):
        assert counts[-1] == 1
        with arbiter.sized(PARALLEL_ELEMENTS):  # a large op (here nested; usually another thread's)
            assert counts[-1] == 3
            with arbiter.sized(10):  # a small one meanwhile keeps the large count
                assert counts[-1] == 3
            assert counts[-1] == 3
        assert counts[-1] == 1
    assert counts[-1] == 3  # at rest: the shard's count


def test_a_small_op_ending_leaves_one_thread_to_the_small_ops_still_running(counts):
    arbiter = IntraOpThreads()
    arbiter.manage(2)
    inside, leave = threading.Event(), threading.Event()

    def other():
        with arbiter.sized(10):
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with arbiter.sized(10):
        t.start()
        assert inside.wait(10)
    assert counts[-1] == 1  # the other thread's small op still runs
    leave.set()
    t.join()
    assert counts[-1] == 2


def test_the_count_is_set_in_the_thread_that_runs_the_op(torch_threads):
    arbiter = IntraOpThreads()
    arbiter.manage(2)
    with arbiter.sized(10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_an_unmanaged_process_keeps_its_thread_count(counts):
    arbiter = IntraOpThreads()  # a shard inside a training process: never managed
    with arbiter.sized(10):
        pass
    arbiter.manage(1)  # one thread: nothing to arbitrate
    with arbiter.sized(10):
        pass
    assert counts == []


def _run(managed: bool, cfg: AdamConfig, sizes: list[int], steps: int = 3) -> list[torch.Tensor]:
    """A store's keys after `steps` pushes of the same gradients, with the arbiter managed or not."""
    INTRA_OP.manage(2 if managed else 0)
    try:
        store = Store("cpu")
        gen = torch.Generator().manual_seed(1)
        names = [f"k{i}" for i in range(len(sizes))]
        store.create([(n, (s,), torch.randn(s, generator=gen), {}) for n, s in zip(names, sizes)])
        for step in range(steps):  # the first step of a key is the checked one (on copies)
            store.apply([GradEntry(key=store.get(n), version_read=step, cfg=cfg,
                                   pieces=[(0, torch.randn(s, generator=gen))])
                         for n, s in zip(names, sizes)])
        return [t for n in names for t in (store.get(n).param, store.get(n).exp_avg, store.get(n).exp_avg_sq)
                + ((store.get(n).max_exp_avg_sq,) if cfg.amsgrad else ())]
    finally:
        INTRA_OP.manage(0)


@pytest.mark.parametrize("cfg", [AdamConfig(lr=1e-2), AdamConfig(lr=1e-2, amsgrad=True),
                                 AdamConfig(lr=1e-2, weight_decay=0.1, weight_decouple=True),
                                 AdamConfig(lr=1e-2, weight_decay=0.1, weight_decouple=False)],
                         ids=["plain", "amsgrad", "decoupled", "l2"])
def test_a_managed_shard_computes_bit_for_bit_what_an_unmanaged_one_does(torch_threads, cfg):
    # One push mixing small keys (one thread) and a large one (the shard's threads): two kernel calls
    # where an unmanaged store makes one; odd sizes reach every tail of the fused kernel.
    torch.set_num_threads(2)
    sizes = [1696, PARALLEL_ELEMENTS + 17, 32768, 5]
    for a, b in zip(_run(False, cfg, sizes), _run(True, cfg, sizes)):
        assert torch.equal(a, b)


def test_the_store_splits_a_managed_kernel_call_by_tensor_size(torch_threads, monkeypatch):
    seen = []
    real = threads_module.IntraOpThreads.sized

    def sized(self, elements):
        seen.append((elements, torch.get_num_threads()))
        return real(self, elements)

    monkeypatch.setattr(threads_module.IntraOpThreads, "sized", sized)
    torch.set_num_threads(2)
    _run(True, AdamConfig(), [10, PARALLEL_ELEMENTS + 1, 20], steps=2)
    # the second step (not checked): one call for the small keys, one for the large key
    assert (20, 2) in seen and (PARALLEL_ELEMENTS + 1, 2) in seen


def test_request_slots_bound_requests_and_lend_while_waiting():
    slots = RequestSlots(1)
    got = threading.Event()

    def second():
        with slots.held():
            got.set()

    with slots.held():
        t = threading.Thread(target=second)
        t.start()
        assert not got.wait(0.2)  # the only slot is held
        with slots.lent():  # waiting on something else: the slot is lent
            assert got.wait(10)
            t.join(10)
    with slots.lent():  # a thread holding no slot passes through
        pass
    with slots.held():  # and the slot is free again
        pass
