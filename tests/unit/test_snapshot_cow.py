"""Pull snapshots on a CPU shard are copy on write (server/store.py): a pull that no push races
copies nothing, and a push never changes what a pull in flight is sending."""
from __future__ import annotations

import torch

from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.server.store import GradEntry, Store

N = 1000


def store_with_key() -> tuple[Store, object]:
    store = Store("cpu")
    [(key, _)] = store.create([("w", (N,), torch.arange(N, dtype=torch.float32), {})])
    return store, key


def push(store: Store, key, version_read: int) -> None:
    store.apply([GradEntry(key=key, version_read=version_read, cfg=AdamConfig(lr=0.1),
                           pieces=[(0, torch.ones(N))])])


def test_a_pull_that_no_push_races_copies_nothing():
    store, key = store_with_key()

    snap = store.snapshot([key], [pb.PARAM])
    sent = snap.parts[(0, pb.PARAM)]
    store.release(snap)

    assert sent is key.param  # the key's own tensor was read, not a copy
    assert len(store._leases) == 0 and store.buffers._kept == 0


def test_a_push_during_a_pull_moves_the_key_to_a_copy_and_leaves_the_pulled_tensor_alone():
    store, key = store_with_key()
    before = key.param.clone()
    snap = store.snapshot([key], [pb.PARAM])
    sent = snap.parts[(0, pb.PARAM)]

    push(store, key, 0)

    assert torch.equal(sent, before)  # what the pull sends is version 0, whole
    assert key.param is not sent and not torch.equal(key.param, before)
    assert snap.versions == [0] and key.version == 1
    store.release(snap)
    assert len(store._leases) == 0 and store.buffers._kept == N  # the retired tensor is pooled


def test_a_second_push_while_the_same_pull_is_in_flight_copies_no_more():
    store, key = store_with_key()
    snap = store.snapshot([key], [pb.PARAM])
    push(store, key, 0)
    moved_to = key.param

    push(store, key, 1)

    assert key.param is moved_to  # the copy belongs to the key alone: written in place
    store.release(snap)


def test_set_state_during_a_pull_does_not_change_the_pulled_tensor():
    store, key = store_with_key()
    before = key.param.clone()
    snap = store.snapshot([key], [pb.PARAM, pb.EXP_AVG])

    store.set_state([(key, 7, None, {pb.PARAM: torch.full((N,), 3.0), pb.EXP_AVG: torch.full((N,), 4.0)})])

    assert torch.equal(snap.parts[(0, pb.PARAM)], before)
    assert torch.equal(snap.parts[(0, pb.EXP_AVG)], torch.zeros(N))
    assert torch.equal(key.param, torch.full((N,), 3.0)) and torch.equal(key.exp_avg, torch.full((N,), 4.0))
    store.release(snap)
    assert len(store._leases) == 0


def test_overlapping_pulls_share_one_lease_until_the_last_ends():
    store, key = store_with_key()
    first = store.snapshot([key], [pb.PARAM])
    second = store.snapshot([key], [pb.PARAM])
    push(store, key, 0)

    store.release(first)
    assert store.buffers._kept == 0  # the second pull still reads it
    store.release(second)
    assert store.buffers._kept == N
