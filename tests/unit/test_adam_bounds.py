"""server/adam.py's step_bounds: what it returns bounds what every kernel computes, step after step,
so that the store may skip checking a step's result whenever the bounds are below SAFE_MAGNITUDE."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optserve.server.adam import (SAFE_MAGNITUDE, AdamConfig, Bounds, adam_foreach, adam_fused, adam_reference,
                                  fused_supported, step_bounds)

KERNELS = ["reference", "foreach"] + (["fused"] if fused_supported("cpu") else [])


def _step(kernel: str, state: dict, grad: torch.Tensor, step: int, cfg: AdamConfig) -> None:
    vmax = state["vmax"] if cfg.amsgrad else None
    if kernel == "reference":
        adam_reference(state["param"], grad, state["m"], state["v"], vmax, step, cfg)
    else:
        fn = adam_foreach if kernel == "foreach" else adam_fused
        fn([state["param"]], [grad], [state["m"]], [state["v"]], [vmax] if cfg.amsgrad else None, [step], cfg)


def _magnitudes(state: dict) -> Bounds:
    return Bounds(float(state["param"].abs().max()), float(state["m"].abs().max()), float(state["v"].max()),
                  float(state["vmax"].max()))


configs = st.builds(
    AdamConfig,
    lr=st.sampled_from([0.0, 1e-3, 0.1, 3.0, 1e6]),
    beta1=st.sampled_from([0.0, 0.5, 0.9, 0.999999]),
    beta2=st.sampled_from([0.0, 0.9, 0.999, 0.99999999]),
    eps=st.sampled_from([1e-45, 1e-16, 1e-8, 1.0]),
    weight_decay=st.sampled_from([0.0, 0.01, 2.0]),
    weight_decouple=st.booleans(),
    absolute=st.booleans(),
    amsgrad=st.booleans(),
    optimized_update=st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(cfg=configs, kernel=st.sampled_from(KERNELS), scale=st.sampled_from([1e-30, 1.0, 1e10]),
       seed=st.integers(0, 2**16))
def test_the_bounds_hold_for_every_kernel_over_many_steps(cfg, kernel, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    state = {"param": torch.randn(64, generator=gen) * scale, "m": torch.randn(64, generator=gen) * scale,
             "v": torch.rand(64, generator=gen) * scale, "vmax": torch.rand(64, generator=gen) * scale}
    bounds = _magnitudes(state)
    for step in range(1, 21):
        grad = torch.randn(64, generator=gen) * scale * 10.0 ** float(torch.randint(-3, 4, (), generator=gen))
        grad_bound = float(grad.abs().max())
        bounds = step_bounds(bounds, grad_bound, step, cfg)
        _step(kernel, state, grad, step, cfg)
        if bounds is None:  # a bound reached the safe magnitude: the store checks results from here on
            return
        actual = _magnitudes(state)
        for name in ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert getattr(actual, name) <= getattr(bounds, name), (name, step)
        assert max(vars(bounds).values()) < SAFE_MAGNITUDE


def test_bounds_of_an_overflowing_learning_rate_say_check_the_result():
    b = Bounds(param=1.0, exp_avg=1.0, exp_avg_sq=1.0)
    assert step_bounds(b, 1.0, 1, AdamConfig(lr=1e38, eps=1e-8)) is None


def test_bounds_with_zero_eps_say_check_the_result():
    assert step_bounds(Bounds(1.0, 1.0, 1.0), 1.0, 1, AdamConfig(eps=0.0)) is None


def test_bounds_of_an_ordinary_step_are_small_and_finite():
    b = step_bounds(Bounds(1.0, 0.0, 0.0), 1.0, 1, AdamConfig(lr=1e-3, eps=1e-8))
    assert b is not None and all(math.isfinite(x) for x in vars(b).values())
    assert b.exp_avg <= 0.11 and b.exp_avg_sq <= 0.0011
