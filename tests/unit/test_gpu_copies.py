"""A GPU shard's host copies (pull snapshots, checkpoints) never wait on the device under the store's
lock. Checked without CUDA: a CPU store is put on the GPU path (`_host_copies`) with a fake
PinnedHost whose events say whether the lock is held when they are recorded and waited on."""
from __future__ import annotations

import torch

from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.server import store as store_module
from optserve.server.buffers import BufferPool
from optserve.server.store import Store


class LockWatch:
    """A PinnedHost whose events note whether the store's lock is held at record and at wait."""

    def __init__(self, store: Store):
        self.store = store
        self.recorded: list[bool] = []  # lock held when an event was recorded
        self.waited: list[bool] = []  # lock held when one was waited on

    def pin(self, numel):
        return torch.empty(numel)

    def event(self):
        self.recorded.append(self.store.locked().locked())
        watch = self

        class Event:
            def synchronize(self):
                watch.waited.append(watch.store.locked().locked())

        return Event()

    def release(self):
        pass


def _gpu_path_store() -> tuple[Store, LockWatch]:
    store = Store("cpu")
    watch = LockWatch(store)
    store.buffers = BufferPool(torch.device("cpu"), host=watch)
    store._host_copies = True
    gen = torch.Generator().manual_seed(0)
    store.create([(f"k{i}", (100,), torch.randn(100, generator=gen), {}) for i in range(3)])
    return store, watch


def test_a_pull_queues_its_copies_under_the_lock_and_waits_once_outside_it():
    store, watch = _gpu_path_store()
    keys = [store.get(f"k{i}") for i in range(3)]

    snap = store.snapshot(keys, [pb.PARAM, pb.EXP_AVG])

    assert watch.recorded == [True]  # one event for all six copies, recorded behind them
    assert watch.waited == [False]  # and waited on without the lock: no per-key sync under it
    for (i, part), t in snap.parts.items():
        assert torch.equal(t, keys[i].part(part)) and t is not keys[i].part(part)
    store.release(snap)


def test_a_checkpoint_moves_its_copies_to_the_host_outside_the_lock(monkeypatch):
    store, _ = _gpu_path_store()
    moved: list[bool] = []

    def to_host(t):
        moved.append(store.locked().locked())
        return t.to("cpu", copy=True)

    monkeypatch.setattr(store_module, "_to_host", to_host)

    records, _ = store.checkpoint_records()

    assert moved == [False] * 9  # 3 keys x (param, exp_avg, exp_avg_sq), all outside the lock
    for r in records:
        assert torch.equal(r.tensors["param"], store.get(r.name).param)
        assert r.tensors["param"] is not store.get(r.name).param
