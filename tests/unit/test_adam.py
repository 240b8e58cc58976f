"""Tests for optserve.server.adam: config validation, fast kernels vs the reference, reference vs torch.optim."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from optserve.server.adam import (
    AdamConfig,
    adam_fast,
    adam_foreach,
    adam_fused,
    adam_reference,
    fused_supported,
)

SHAPES = [(7,), (3, 5), (2, 3, 4), (1,), (33, 17)]  # odd sizes: exercise vector tails; ~700 elements
STEPS = 200

# Fast kernels vs the reference. foreach/fused reorder a few fp32 ops (lerp for m; fused evaluates
# the textbook form with eps / sqrt(bc2) folded in), so they differ by a few ulps per step, which
# accumulate over the 200 steps. Measured worst case over 300 draws (30 are tested):
# max |fast - ref| / (1 + |ref|) = 5.2e-7 (fused params), 4.3e-7 (foreach params), i.e. ~4 ulps at 1.0.
# rtol = atol = 1e-6 holds with ~2x margin.
FAST_TOL = dict(rtol=1e-6, atol=1e-6)

FAST_KERNELS = [
    pytest.param(adam_foreach, id="foreach"),
    pytest.param(
        adam_fused, id="fused",
        marks=pytest.mark.skipif(not fused_supported(torch.device("cpu")), reason="no CPU fused Adam"),
    ),
]


# --- helpers -----------------------------------------------------------------------------------


class _State:
    """Parameters and Adam state for a list of shapes (separate tensors)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [p.clone() for p in params]
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.vmax = [torch.zeros_like(p) for p in params]

    def tensors(self) -> list[torch.Tensor]:
        return self.params + self.m + self.v + self.vmax


def _random_params(gen: torch.Generator, shapes=SHAPES) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen) for s in shapes]


def _random_grads(gen: torch.Generator, shapes=SHAPES) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen) for s in shapes]


def _reference_step(state: _State, grads, steps, cfg: AdamConfig) -> None:
    for i, grad in enumerate(grads):
        vmax = state.vmax[i] if cfg.amsgrad else None
        adam_reference(state.params[i], grad, state.m[i], state.v[i], vmax, steps[i], cfg)


def _kernel_step(kernel, state: _State, grads, steps, cfg: AdamConfig) -> None:
    kernel(state.params, grads, state.m, state.v, state.vmax, steps, cfg)


def _draw_config(rng: random.Random) -> AdamConfig:
    return AdamConfig(
        lr=10 ** rng.uniform(-4, -1),
        beta1=rng.uniform(0.0, 0.99),
        beta2=rng.uniform(0.9, 0.9999),
        eps=rng.choice([1e-16, 1e-8, 1e-6]),
        weight_decay=rng.choice([0.0, 1e-2]),
        weight_decouple=rng.random() < 0.5,
        absolute=rng.random() < 0.5,
        optimized_update=rng.random() < 0.5,
        amsgrad=rng.random() < 0.5,
    )


def _assert_states_close(actual: _State, expected: _State, **tol) -> None:
    for name, a, e in zip(("params", "m", "v", "vmax"),
                          (actual.params, actual.m, actual.v, actual.vmax),
                          (expected.params, expected.m, expected.v, expected.vmax)):
        for i, (x, y) in enumerate(zip(a, e)):
            torch.testing.assert_close(x, y, **tol, msg=lambda s, n=name, i=i: f"{n}[{i}]: {s}")


# --- 1. AdamConfig -----------------------------------------------------------------------------


def test_config_defaults_equal_the_seed():
    # Arrange / Act
    cfg = AdamConfig()

    # Assert
    assert (cfg.lr, (cfg.beta1, cfg.beta2), cfg.eps) == (1e-3, (0.9, 0.999), 1e-16)
    assert cfg.optimized_update is True
    assert (cfg.weight_decay, cfg.weight_decouple, cfg.absolute) == (0.0, True, False)
    assert cfg.amsgrad is False


@pytest.mark.parametrize("field, value", [
    ("lr", -1e-3), ("lr", math.inf), ("lr", math.nan),
    ("beta1", -0.1), ("beta1", 1.0), ("beta1", math.nan),
    ("beta2", -0.1), ("beta2", 1.0), ("beta2", 1.5),
    ("eps", -1e-8), ("eps", math.inf),
    ("weight_decay", -1e-2), ("weight_decay", math.inf), ("weight_decay", math.nan),
])
def test_config_rejects_out_of_range_value_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as err:
        AdamConfig(**{field: value})

    assert repr(value) in str(err.value)


@pytest.mark.parametrize("field, value", [("beta1", 0.0), ("beta2", 0.0), ("lr", 0.0), ("eps", 0.0)])
def test_config_accepts_range_edges(field, value):
    assert getattr(AdamConfig(**{field: value}), field) == value


# --- 2. fast kernels vs the reference ----------------------------------------------------------


@pytest.mark.parametrize("kernel", FAST_KERNELS)
@pytest.mark.parametrize("seed", range(30))
def test_fast_kernel_matches_reference_over_random_hyperparameters(kernel, seed):
    # Arrange
    cfg = _draw_config(random.Random(seed))
    gen = torch.Generator().manual_seed(seed)
    init = _random_params(gen)
    reference, fast = _State(init), _State(init)

    # Act
    for t in range(1, STEPS + 1):
        grads = _random_grads(gen)
        _reference_step(reference, grads, [t] * len(grads), cfg)
        _kernel_step(kernel, fast, grads, [t] * len(grads), cfg)

    # Assert
    _assert_states_close(fast, reference, **FAST_TOL)


ALL_OPTIONS = AdamConfig(lr=1e-2, weight_decay=1e-2, weight_decouple=False, amsgrad=True)


@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_fast_kernel_on_slices_of_one_flat_tensor_equals_whole_tensors(kernel):
    # Arrange: the same entries, once as separate tensors and once as 1-D views of flat tensors
    gen = torch.Generator().manual_seed(0)
    init = [p.flatten() for p in _random_params(gen)]
    sizes = [p.numel() for p in init]
    whole = _State(init)
    flat = _State([torch.cat(init)])
    views = _State([])
    for name in ("params", "m", "v", "vmax"):
        setattr(views, name, list(getattr(flat, name)[0].split(sizes)))

    # Act
    for t in range(1, 51):
        grads = [g.flatten() for g in _random_grads(gen)]
        flat_grad = torch.cat(grads)
        _kernel_step(kernel, whole, grads, [t] * len(grads), ALL_OPTIONS)
        _kernel_step(kernel, views, list(flat_grad.split(sizes)), [t] * len(grads), ALL_OPTIONS)

    # Assert: elementwise math is the same, only where pieces fall in vector lanes and tails differs.
    # Measured bit-identical here; FAST_TOL leaves room for CPUs whose vector and tail paths round apart.
    _assert_states_close(views, whole, **FAST_TOL)


@pytest.mark.parametrize("optimized_update", [True, False])
@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_fast_kernel_with_mixed_steps_per_entry_matches_reference(kernel, optimized_update):
    # Arrange: entries at steps 1, 5, 5 (and more), advancing together
    cfg = dataclasses.replace(ALL_OPTIONS, optimized_update=optimized_update, eps=1e-8)
    gen = torch.Generator().manual_seed(1)
    init = _random_params(gen)
    reference, fast = _State(init), _State(init)
    steps = [1, 5, 5, 2, 40]

    # Act
    for _ in range(20):
        grads = _random_grads(gen)
        _reference_step(reference, grads, steps, cfg)
        _kernel_step(kernel, fast, grads, steps, cfg)
        steps = [t + 1 for t in steps]

    # Assert
    _assert_states_close(fast, reference, **FAST_TOL)


@pytest.mark.parametrize("kernel", [adam_reference, adam_foreach, adam_fused, adam_fast])
def test_kernel_rejects_step_zero(kernel):
    p = torch.zeros(3)

    with pytest.raises(ValueError, match="t >= 1"):
        if kernel is adam_reference:
            kernel(p, torch.ones(3), torch.zeros(3), torch.zeros(3), None, 0, AdamConfig())
        else:
            kernel([p], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], None, [0], AdamConfig())


@pytest.mark.parametrize("kernel", [adam_foreach, adam_fused, adam_fast])
def test_kernel_rejects_lists_of_different_lengths(kernel):
    with pytest.raises(ValueError, match="lengths"):
        kernel([torch.zeros(3)], [], [torch.zeros(3)], [torch.zeros(3)], None, [1], AdamConfig())


@pytest.mark.parametrize("kernel", [adam_foreach, adam_fused, adam_fast])
def test_kernel_on_empty_lists_is_a_no_op(kernel):
    kernel([], [], [], [], None, [], AdamConfig(amsgrad=True))


def test_fast_uses_fused_kernel_on_cpu_when_supported():
    # adam_fast must equal whichever kernel fused_supported selects, bit for bit
    gen = torch.Generator().manual_seed(2)
    init, grads = _random_params(gen), _random_grads(gen)
    fast, chosen = _State(init), _State(init)
    expected_kernel = adam_fused if fused_supported(torch.device("cpu")) else adam_foreach

    _kernel_step(adam_fast, fast, grads, [3] * len(grads), ALL_OPTIONS)
    _kernel_step(expected_kernel, chosen, grads, [3] * len(grads), ALL_OPTIONS)

    _assert_states_close(fast, chosen, rtol=0, atol=0)


def test_fused_supported_on_cpu_and_not_on_meta():
    assert fused_supported(torch.device("cpu")) is True  # torch >= 2.4 is a dependency
    assert fused_supported(torch.device("meta")) is False


# --- 3. the reference vs torch.optim -----------------------------------------------------------

# Reference vs torch.optim (single-tensor path, foreach=False). torch runs the same textbook ops in
# the same order except m, which it updates with lerp instead of mul + add: ~1 ulp per step in m, which
# reaches the params (and, through L2 decay, v). Measured worst case over 200 steps, all four cases:
# max |ref - torch| / (1 + |torch|) = 2.4e-7 (params, adam-l2), 1.6e-7 (m), 1.3e-8 (v); 0 for v in the others.
# rtol = atol = 5e-7 holds with ~2x margin.
TORCH_TOL = dict(rtol=5e-7, atol=5e-7)

TORCH_CASES = [
    pytest.param(AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-8, foreach=False), id="adam"),
    pytest.param(AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, weight_decay=1e-2),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-2, eps=1e-8, weight_decay=1e-2, foreach=False),
                 id="adamw"),
    pytest.param(AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, weight_decay=1e-2,
                            weight_decouple=False),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-8, weight_decay=1e-2, foreach=False),
                 id="adam-l2"),
    pytest.param(AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, amsgrad=True),
                 lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=1e-8, amsgrad=True, foreach=False),
                 id="amsgrad"),
]


def _run_reference_and_torch(cfg: AdamConfig, make_optimizer, steps: int):
    gen = torch.Generator().manual_seed(3)
    init = _random_params(gen)
    reference = _State(init)
    torch_params = [torch.nn.Parameter(p.clone()) for p in init]
    optimizer = make_optimizer(torch_params)
    for t in range(1, steps + 1):
        grads = _random_grads(gen)
        _reference_step(reference, grads, [t] * len(grads), cfg)
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        optimizer.step()
    return reference, torch_params, optimizer


@pytest.mark.parametrize("cfg, make_optimizer", TORCH_CASES)
def test_reference_matches_torch_optim(cfg, make_optimizer):
    # Arrange / Act
    reference, torch_params, optimizer = _run_reference_and_torch(cfg, make_optimizer, STEPS)

    # Assert
    for i, p in enumerate(torch_params):
        state = optimizer.state[p]
        torch.testing.assert_close(reference.params[i], p.detach(), **TORCH_TOL)
        torch.testing.assert_close(reference.m[i], state["exp_avg"], **TORCH_TOL)
        torch.testing.assert_close(reference.v[i], state["exp_avg_sq"], **TORCH_TOL)
        if cfg.amsgrad:
            torch.testing.assert_close(reference.vmax[i], state["max_exp_avg_sq"], **TORCH_TOL)


# --- 4. a hand-computed step -------------------------------------------------------------------


def test_reference_first_step_with_defaults_equals_hand_computed_value():
    # Arrange: theta_0 = 1, g_1 = 0.5, defaults (optimized_update=True, eps_hat = 1e-16)
    theta0, g = 1.0, 0.5
    lr, beta1, beta2, eps = 1e-3, 0.9, 0.999, 1e-16
    m = (1 - beta1) * g
    v = (1 - beta2) * g * g
    step_size = lr * math.sqrt(1 - beta2 ** 1) / (1 - beta1 ** 1)
    expected = theta0 - step_size * m / (math.sqrt(v) + eps)  # = 0.999: the first step has size lr
    param, exp_avg, exp_avg_sq = torch.tensor([theta0]), torch.zeros(1), torch.zeros(1)

    # Act
    adam_reference(param, torch.tensor([g]), exp_avg, exp_avg_sq, None, 1, AdamConfig())

    # Assert: fp32 vs double, so within one fp32 ulp of each value
    assert param.item() == pytest.approx(expected, rel=2 ** -23, abs=0)
    assert exp_avg.item() == pytest.approx(m, rel=2 ** -23, abs=0)
    assert exp_avg_sq.item() == pytest.approx(v, rel=2 ** -23, abs=0)


# --- 5. gradients are read only ----------------------------------------------------------------

WEIGHT_DECAY_MODES = [
    pytest.param(dict(), id="no-decay"),
    pytest.param(dict(weight_decay=1e-2, weight_decouple=False), id="coupled"),
    pytest.param(dict(weight_decay=1e-2), id="decoupled"),
    pytest.param(dict(weight_decay=1e-2, absolute=True), id="absolute"),
]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("decay", WEIGHT_DECAY_MODES)
@pytest.mark.parametrize("kernel", [adam_reference, adam_foreach, adam_fused, adam_fast])
def test_kernel_does_not_modify_grads(kernel, decay, amsgrad):
    # Arrange
    cfg = AdamConfig(lr=1e-2, amsgrad=amsgrad, **decay)
    gen = torch.Generator().manual_seed(4)
    state = _State(_random_params(gen))
    grads = _random_grads(gen)
    before = [g.clone() for g in grads]

    # Act
    for t in (1, 2):
        if kernel is adam_reference:
            _reference_step(state, grads, [t] * len(grads), cfg)
        else:
            _kernel_step(kernel, state, grads, [t] * len(grads), cfg)

    # Assert
    for g, g0 in zip(grads, before):
        assert torch.equal(g, g0)


# --- 6. step semantics -------------------------------------------------------------------------


def test_reference_step_t_uses_bias_corrections_of_t():
    # Arrange: two steps, numbered 1 and 2 by the caller, vs torch (which counts steps itself)
    cfg, make_optimizer = TORCH_CASES[0].values

    # Act
    reference, torch_params, _ = _run_reference_and_torch(cfg, make_optimizer, steps=2)

    # Assert
    for i, p in enumerate(torch_params):
        torch.testing.assert_close(reference.params[i], p.detach(), **TORCH_TOL)


def test_reference_with_a_later_step_number_takes_a_different_step():
    # Arrange: the same state and gradient, step numbers 1 and 2; bias corrections differ, so must results
    cfg = AdamConfig(optimized_update=False, eps=1e-8)
    param1, param2 = torch.ones(1), torch.ones(1)
    grad = torch.full((1,), 0.5)

    # Act
    adam_reference(param1, grad, torch.zeros(1), torch.zeros(1), None, 1, cfg)
    adam_reference(param2, grad, torch.zeros(1), torch.zeros(1), None, 2, cfg)

    # Assert: step 2 on zero state: m_hat = 0.1 g / 0.19, v_hat = 0.001 g^2 / 0.001999
    m_hat = 0.1 * 0.5 / (1 - 0.9 ** 2)
    v_hat = 0.001 * 0.25 / (1 - 0.999 ** 2)
    expected2 = 1.0 - 1e-3 * m_hat / (math.sqrt(v_hat) + 1e-8)
    assert param1.item() == pytest.approx(1.0 - 1e-3, rel=2 ** -22)
    assert param2.item() == pytest.approx(expected2, rel=2 ** -22)
