"""A shard whose device runs out of memory answers RESOURCE_EXHAUSTED (not UNKNOWN) and changes
nothing. CUDA's out-of-memory error is injected on a CPU shard, where the same code paths run."""
from __future__ import annotations

import contextlib

import grpc
import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.transport import ShardError
from optserve.server import store as store_module
from optserve.server.main import ServerConfig, Shard
from optserve.server.requests import OUT_OF_MEMORY

OOM_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 139.8 GiB total capacity)"


@contextlib.contextmanager
def running(**options):
    shard = Shard(ServerConfig(port=0, **options))
    shard.start()
    try:
        yield shard
    finally:
        shard.stop()


def _oom(*args, **kwargs):
    raise OUT_OF_MEMORY(OOM_MESSAGE)


def test_torchs_out_of_memory_error_is_the_one_caught():
    assert issubclass(torch.cuda.OutOfMemoryError, OUT_OF_MEMORY)


@pytest.mark.parametrize("data_channel", [True, False])
def test_a_step_whose_state_does_not_fit_is_resource_exhausted_and_changes_nothing(monkeypatch, data_channel):
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    with running() as shard, RemoteAdam(model.named_parameters(), [shard.address], amsgrad=True,
                                        data_channel=data_channel) as opt:
        store = shard.core.store
        before = {n: (store.get(n).step, store.get(n).param.clone()) for n in store.names()}
        # AMSGrad's max_exp_avg_sq is allocated on the first amsgrad step: it does not fit
        monkeypatch.setattr(store_module.torch, "zeros_like", _oom)

        model(torch.randn(2, 8)).sum().backward()
        with pytest.raises(ShardError) as err:
            opt.step()
        monkeypatch.undo()

        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "out of memory" in err.value.details
        for name, (step, param) in before.items():
            key = store.get(name)
            assert key.step == step and torch.equal(key.param, param) and key.max_exp_avg_sq is None


def test_out_of_memory_inside_the_kernel_is_resource_exhausted(monkeypatch):
    model = nn.Linear(8, 4)
    with running() as shard, RemoteAdam(model.named_parameters(), [shard.address]) as opt:
        monkeypatch.setattr(store_module, "adam_fast", _oom)
        model(torch.randn(2, 8)).sum().backward()

        with pytest.raises(ShardError) as err:
            opt.step()

        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_register_out_of_device_memory_creates_no_key(monkeypatch):
    calls = []
    real = store_module.torch.zeros_like

    def zeros_like_then_oom(t, *a, **kw):
        calls.append(1)
        if len(calls) > 2:  # the first key's m and v fit, the second key's do not
            _oom()
        return real(t, *a, **kw)

    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
    with running() as shard:
        monkeypatch.setattr(store_module.torch, "zeros_like", zeros_like_then_oom)
        with pytest.raises(ShardError) as err:
            RemoteAdam(model.named_parameters(), [shard.address])
        monkeypatch.undo()

        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(shard.core.store) == 0 and shard.core.store.elements == 0
