"""Decoupled weight decay in the fused kernel uses the reference's arithmetic on every device.

torch's CUDA `_fused_adamw_` decays with theta - lr*lambda*theta; the reference multiplies by
float32(1 - lr*lambda). The rounding of the two differs in the same direction every step, so over a
few hundred steps CUDA would drift past the fast-kernel tolerance. adam_fused therefore applies the
decay itself (a foreach multiply) and gives the kernel lambda = 0. CUDA's arithmetic is emulated here
on CPU, so the choice is checked where there is no GPU; tests/service/test_gpu.py checks it on one.
"""
from __future__ import annotations

import pytest
import torch

from optserve.hyper import AdamConfig
from optserve.server.adam import adam_fused, adam_reference

FAST_TOL = dict(rtol=1e-6, atol=1e-6)  # tests/unit/test_adam.py: the fast kernels' bound
ADAMW = AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, weight_decay=0.1)


def _cuda_fused_adamw_on_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                             lr, weight_decay, **kw):
    """torch's CUDA _fused_adamw_, emulated: theta -= lr*lambda*theta in float32, then the Adam update."""
    lr_wd = torch.tensor(lr, dtype=torch.float32) * torch.tensor(weight_decay, dtype=torch.float32)
    for p in params:
        p.sub_(p * lr_wd)
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr,
                       weight_decay=0.0, **kw)


def _run(cfg: AdamConfig, steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(1000,), (37, 11), (5,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    fast, ref = [p.clone() for p in init], [p.clone() for p in init]
    state = [[torch.zeros_like(p) for p in init] for _ in range(3)]
    ref_state = [[torch.zeros_like(p) for p in init] for _ in range(3)]
    for t in range(1, steps + 1):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        adam_fused(fast, grads, state[0], state[1], state[2] if cfg.amsgrad else None, [t] * 3, cfg)
        for i in range(3):
            adam_reference(ref[i], grads[i], ref_state[0][i], ref_state[1][i],
                           ref_state[2][i] if cfg.amsgrad else None, t, cfg)
    return fast, ref


def test_fused_kernel_is_given_no_decoupled_decay(monkeypatch):
    seen = []
    real = torch._fused_adam_

    def spy_adam(*args, weight_decay, **kw):
        seen.append(("adam", weight_decay))
        real(*args, weight_decay=weight_decay, **kw)

    monkeypatch.setattr(torch, "_fused_adam_", spy_adam)
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **kw: seen.append(("adamw", kw["weight_decay"])))

    _run(ADAMW, 2)

    assert seen == [("adam", 0.0), ("adam", 0.0)]


@pytest.mark.parametrize("cfg", [ADAMW, AdamConfig(weight_decay=0.1), AdamConfig(weight_decay=0.1, amsgrad=True),
                                 AdamConfig(weight_decay=0.01, absolute=True)],
                         ids=["adamw-textbook", "adamw-seed", "adamw-amsgrad", "absolute"])
def test_fused_adamw_stays_within_the_bound_with_cudas_decay_arithmetic(monkeypatch, cfg):
    # Arrange: the fused AdamW kernel computes decay as CUDA's does
    monkeypatch.setattr(torch, "_fused_adamw_", _cuda_fused_adamw_on_cpu)

    # Act: 200 steps at lambda = 0.1 (the drift is ~3x the bound here when the kernel decays)
    fast, ref = _run(cfg, 200)

    # Assert
    for p, r in zip(fast, ref):
        torch.testing.assert_close(p, r, **FAST_TOL)


def test_cudas_decay_arithmetic_alone_would_drift_past_the_bound():
    """The emulation is faithful enough to matter: CUDA's decay, used for the whole run, leaves the bound."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(4096, generator=gen)
    mul, sub = p0.clone(), p0.clone()
    lr_wd = torch.tensor(ADAMW.lr, dtype=torch.float32) * torch.tensor(ADAMW.weight_decay, dtype=torch.float32)
    for _ in range(200):
        mul.mul_(1.0 - ADAMW.lr * ADAMW.weight_decay)
        sub.sub_(sub * lr_wd)

    assert not torch.equal(mul, sub)
