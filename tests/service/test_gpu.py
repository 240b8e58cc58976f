"""The CUDA path: a shard with --device cuda keeps params, m, v on the GPU and equals the reference.

Marked `gpu`: skipped where CUDA is absent (CI has none); run on a lent GPU machine with
bench/device_check.sh (with the kernel benchmark, in one call).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.hyper import AdamConfig
from optserve.server.adam import adam_fast, adam_reference, fused_supported
from optserve.server.main import run_server

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("cfg", [AdamConfig(), AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, amsgrad=True),
                                 AdamConfig(weight_decay=0.1, weight_decouple=False),
                                 AdamConfig(weight_decay=0.1, absolute=True)])
def test_cuda_fast_kernel_equals_the_reference_kernel(cfg):
    torch.manual_seed(0)
    shapes = [(1000,), (37, 11), (5,)]
    params = [torch.randn(s, device="cuda") for s in shapes]
    ref = [p.clone() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    ref_state = [[torch.zeros_like(p) for p in params] for _ in range(3)]

    for t in range(1, 201):
        grads = [torch.randn_like(p) for p in params]
        adam_fast(params, grads, state[0], state[1], state[2] if cfg.amsgrad else None, [t] * 3, cfg)
        for i in range(3):
            adam_reference(ref[i], grads[i], ref_state[0][i], ref_state[1][i],
                           ref_state[2][i] if cfg.amsgrad else None, t, cfg)

    assert fused_supported(torch.device("cuda"))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("data_channel", [True, False])
def test_cuda_shard_trains_like_the_reference_on_cpu(data_channel):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 5))
    ref = [p.detach().clone() for p in model.parameters()]
    ms = [torch.zeros_like(p) for p in ref]
    vs = [torch.zeros_like(p) for p in ref]
    cfg = AdamConfig(lr=3e-3)
    with run_server(device="cuda") as address, RemoteAdam(model.named_parameters(), [address], lr=3e-3,
                                                           slice_elements=500, chunk_bytes=8192,
                                                           data_channel=data_channel) as opt:
        for t in range(1, 31):
            loss = model(torch.randn(16, 30)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            for p, g, m, v in zip(ref, grads, ms, vs):
                adam_reference(p, g, m, v, None, t, cfg)

    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-6)


def test_cuda_shard_accepts_bf16_gradients_and_state_dict_round_trips():
    torch.manual_seed(2)
    model = nn.Linear(100, 100)
    with run_server(device="cuda") as address, RemoteAdam(model.named_parameters(), [address],
                                                           wire_dtype=torch.bfloat16) as opt:
        model(torch.randn(4, 100)).sum().backward()
        opt.step()
        state = opt.state_dict()

    assert state["state"][0]["step"].item() == 1.0
    assert state["state"][0]["exp_avg"].device.type == "cpu"
