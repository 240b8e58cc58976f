"""Backward overlap: gradients travel while backward runs, and the numbers equal overlap=False."""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.server.main import ServerConfig, Shard, run_server

BUCKET = 2048  # bytes: small enough that the CNN below fills several buckets


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


def batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(n)]


def loss_of(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def run(servers, overlap, steps=20, micro=1):
    model = small_cnn()
    data = batches(steps * micro)
    with RemoteAdam(model.named_parameters(), servers, lr=1e-2, overlap=overlap, bucket_bytes=BUCKET,
                    slice_elements=100) as opt:
        for s in range(steps):
            opt.zero_grad()
            for m in range(micro):
                last = m == micro - 1
                with opt.no_sync() if not last else contextlib.nullcontext():
                    loss_of(model, data[s * micro + m]).backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_overlap_gives_bitwise_the_same_parameters_as_no_overlap(two_shards):
    plain = run(two_shards, overlap=False)
    with run_server(shard_index=0, num_shards=2) as a, run_server(shard_index=1, num_shards=2) as b:
        overlapped = run([a, b], overlap=True)

    for p, q in zip(plain, overlapped):
        assert torch.equal(p, q)


def test_no_sync_accumulates_micro_batches_like_overlap_off(two_shards):
    plain = run(two_shards, overlap=False, steps=5, micro=3)
    with run_server(shard_index=0, num_shards=2) as a, run_server(shard_index=1, num_shards=2) as b:
        overlapped = run([a, b], overlap=True, steps=5, micro=3)

    for p, q in zip(plain, overlapped):
        assert torch.equal(p, q)


def test_a_second_backward_without_no_sync_is_refused(shard):
    model = small_cnn()
    with RemoteAdam(model.named_parameters(), [shard], overlap=True):
        loss_of(model, batches(1)[0]).backward()

        with pytest.raises(RuntimeError, match="no_sync"):
            loss_of(model, batches(1)[0]).backward()


def test_a_bucket_push_reaches_the_shard_before_backward_returns():
    shard = Shard(ServerConfig())
    applied = threading.Event()
    core = shard.core
    submit = core.policy.submit

    def observed_submit(*args):
        result = submit(*args)
        applied.set()
        return result

    core.policy.submit = observed_submit
    shard.start()
    try:
        model = small_cnn()
        seen_during_backward = []
        x, y = batches(1)[0]
        x.requires_grad_(True)
        # The input's gradient is the last thing backward computes; by then the last layer's bucket
        # has been pushed. Waiting here on the shard's event blocks backward until the push lands,
        # so the push cannot have been sent by step() (the timeout only guards against a hang).
        x.register_hook(lambda g: seen_during_backward.append(applied.wait(timeout=30)))
        with RemoteAdam(model.named_parameters(), [shard.address], overlap=True, bucket_bytes=BUCKET) as opt:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        shard.stop()

    assert seen_during_backward == [True]
