"""Adam kernels for the parameter server: the seed's math (labml_nn ``Adam``) as pure functions.

What it is for: updating parameter shards in place from gradients, with

* ``adam_reference`` -- one tensor, written line for line from the seed; it *is* the spec;
* ``adam_foreach``   -- the same math over lists with ``torch._foreach_*`` ops;
* ``adam_fused``     -- the same math via torch's fused Adam kernel (CPU since torch 2.4, CUDA);
* ``adam_fast``      -- the server's kernel: fused where the device has it, else foreach.

The fast kernels are checked against the reference in ``tests/unit/test_adam.py``.

* ``step_bounds``    -- bounds on what one step can make of a key's state, from scalars alone: the
  store's guard against an update whose result would overflow float32 (``tests/unit/test_adam_bounds.py``).

What it must not do: own state, know about keys, shards, gRPC or serialisation (the store passes
lists of tensors and per-key step numbers), write to gradients, or re-validate hyperparameters
(``AdamConfig`` checks them once, at the edge; the kernels trust it).

The update for step t (the seed's ``step_param``; weight decay as labml's ``WeightDecay``):

    g_t = g_t + lambda * theta_{t-1}                       (coupled weight decay, L2)
    theta_{t-1} = theta_{t-1} * (1 - alpha * lambda)       (decoupled weight decay, AdamW)
    theta_{t-1} = theta_{t-1} * (1 - lambda)               (decoupled, absolute)
    m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    vmax_t = max(vmax_{t-1}, v_t)                          (AMSGrad; the update then uses vmax_t for v_t)
    theta_t = theta_{t-1} - alpha * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v_t) + eps_hat)
                                                           (optimized_update=True, eps is eps_hat)
    theta_t = theta_{t-1} - alpha / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps)
                                                           (optimized_update=False, textbook form)
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor

from optserve.hyper import AdamConfig

__all__ = [
    "AdamConfig",
    "adam_reference",
    "adam_foreach",
    "adam_fused",
    "adam_fast",
    "fused_supported",
    "Bounds",
    "step_bounds",
    "SAFE_MAGNITUDE",
]


def _check_step(step: int) -> None:
    # Step 0 would divide by 1 - beta1^0 = 0: the caller must increment t before the update.
    if step < 1:
        raise ValueError(f"Adam step: expected the step number t of this update (t >= 1), got {step!r}")


def _bias_corrections(step: int, cfg: AdamConfig) -> tuple[float, float]:
    """(1 - beta1^t, 1 - beta2^t) in Python floats (double), as the seed computes them."""
    # Bias correction term for m_hat_t, 1 - beta1^t
    bias_correction1 = 1 - cfg.beta1 ** step
    # Bias correction term for v_hat_t, 1 - beta2^t
    bias_correction2 = 1 - cfg.beta2 ** step
    return bias_correction1, bias_correction2


@torch.no_grad()
def adam_reference(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: int,
    cfg: AdamConfig,
) -> None:
    """One seed Adam step on one tensor, in place, written line for line from the seed.

    ``step`` is the step number t of THIS update (>= 1: the caller has already incremented it).
    ``max_exp_avg_sq`` is None unless ``cfg.amsgrad``. ``grad`` is never modified.
    """
    _check_step(step)
    if cfg.amsgrad and max_exp_avg_sq is None:
        raise ValueError("adam_reference: cfg.amsgrad is True, expected a max_exp_avg_sq tensor, got None")

    # Weight decay (labml WeightDecay), applied before the moments are updated
    if cfg.weight_decay != 0:
        if cfg.weight_decouple:
            if cfg.absolute:
                # theta_{t-1} <- theta_{t-1} (1 - lambda)
                param.mul_(1.0 - cfg.weight_decay)
            else:
                # theta_{t-1} <- theta_{t-1} (1 - alpha lambda)
                param.mul_(1.0 - cfg.lr * cfg.weight_decay)
        else:
            # g_t <- g_t + lambda theta_{t-1}; `add` (not `add_`) makes a new tensor: grad stays as given
            grad = grad.add(param, alpha=cfg.weight_decay)

    beta1, beta2 = cfg.beta1, cfg.beta2
    m, v = exp_avg, exp_avg_sq
    # m_t <- beta1 m_{t-1} + (1 - beta1) g_t
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    # v_t <- beta2 v_{t-1} + (1 - beta2) g_t^2
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if cfg.amsgrad:
        # vmax_t <- max(vmax_{t-1}, v_t), over the uncorrected v; v_t itself is stored as usual
        torch.maximum(max_exp_avg_sq, v, out=max_exp_avg_sq)
        v = max_exp_avg_sq

    bias_correction1, bias_correction2 = _bias_corrections(step, cfg)
    if cfg.optimized_update:
        # sqrt(v_t) + eps_hat
        denominator = v.sqrt().add_(cfg.eps)
        # alpha sqrt(1 - beta2^t) / (1 - beta1^t)
        step_size = cfg.lr * math.sqrt(bias_correction2) / bias_correction1
    else:
        # sqrt(v_t) / sqrt(1 - beta2^t) + eps
        denominator = (v.sqrt() / math.sqrt(bias_correction2)).add_(cfg.eps)
        # alpha / (1 - beta1^t)
        step_size = cfg.lr / bias_correction1
    # theta_t <- theta_{t-1} - step_size * m_t / denominator
    param.addcdiv_(m, denominator, value=-step_size)


def _check_lists(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[int],
    cfg: AdamConfig,
) -> None:
    """Parallel lists of equal length (max_exp_avg_sqs only with amsgrad) and every step t >= 1."""
    lengths = {
        "params": len(params), "grads": len(grads), "exp_avgs": len(exp_avgs),
        "exp_avg_sqs": len(exp_avg_sqs), "steps": len(steps),
    }
    if cfg.amsgrad:
        lengths["max_exp_avg_sqs"] = 0 if max_exp_avg_sqs is None else len(max_exp_avg_sqs)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"Adam lists: expected parallel lists of one length, got lengths {lengths}")
    for step in steps:
        _check_step(step)


def _indices_by_step(steps: Sequence[int]) -> dict[int, list[int]]:
    """Entry indices grouped by step number, in first-seen order."""
    groups: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        groups.setdefault(step, []).append(i)
    return groups


@torch.no_grad()
def adam_foreach(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[int],
    cfg: AdamConfig,
) -> None:
    """Same math as ``adam_reference`` over parallel lists, with ``torch._foreach_*`` ops.

    Each entry may be a 1-D view (slice) of a larger tensor. Entries with equal step share their
    scalars. ``max_exp_avg_sqs`` is used only if ``cfg.amsgrad``. ``grads`` are never modified.
    """
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cfg)
    if not params:
        return
    params, exp_avgs, exp_avg_sqs = list(params), list(exp_avgs), list(exp_avg_sqs)

    # Weight decay: only the decoupled forms write params; the coupled form makes new gradient tensors
    if cfg.weight_decay != 0:
        if cfg.weight_decouple:
            # theta_{t-1} <- theta_{t-1} (1 - lambda)  or  theta_{t-1} (1 - alpha lambda)
            decay = cfg.weight_decay if cfg.absolute else cfg.lr * cfg.weight_decay
            torch._foreach_mul_(params, 1.0 - decay)
        else:
            # g_t <- g_t + lambda theta_{t-1}, out of place
            grads = torch._foreach_add(list(grads), params, alpha=cfg.weight_decay)
    grads = list(grads)

    beta1, beta2 = cfg.beta1, cfg.beta2
    # m_t <- beta1 m_{t-1} + (1 - beta1) g_t, as m + (1 - beta1)(g - m): one pass over m instead of two
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    # v_t <- beta2 v_{t-1} + (1 - beta2) g_t^2
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    v = exp_avg_sqs
    if cfg.amsgrad:
        # vmax_t <- max(vmax_{t-1}, v_t), over the uncorrected v
        max_exp_avg_sqs = list(max_exp_avg_sqs)
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        v = max_exp_avg_sqs

    # The only step-dependent part is scalar: compute it once per distinct step, then per entry.
    neg_step_size: dict[int, float] = {}
    sqrt_bias_correction2: dict[int, float] = {}
    for step in _indices_by_step(steps):
        bias_correction1, bias_correction2 = _bias_corrections(step, cfg)
        sqrt_bias_correction2[step] = math.sqrt(bias_correction2)
        if cfg.optimized_update:
            # alpha sqrt(1 - beta2^t) / (1 - beta1^t)
            neg_step_size[step] = -(cfg.lr * sqrt_bias_correction2[step] / bias_correction1)
        else:
            # alpha / (1 - beta1^t)
            neg_step_size[step] = -(cfg.lr / bias_correction1)

    denominator = torch._foreach_sqrt(v)
    if not cfg.optimized_update:
        # sqrt(v_t) / sqrt(1 - beta2^t)
        torch._foreach_div_(denominator, [sqrt_bias_correction2[s] for s in steps])
    # ... + eps (eps_hat when optimized_update)
    torch._foreach_add_(denominator, cfg.eps)
    # theta_t <- theta_{t-1} - step_size * m_t / denominator
    torch._foreach_addcdiv_(params, exp_avgs, denominator, [neg_step_size[s] for s in steps])


@lru_cache(maxsize=None)
def _has_fused_kernel(device_type: str) -> bool:
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None or not hasattr(torch, "_fused_adam_"):
        return False
    # CPU fused Adam arrived in torch 2.4; ask the dispatcher rather than parse version strings.
    return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_adam_", dispatch_key)


def fused_supported(device: torch.device | str) -> bool:
    """Whether ``adam_fused`` runs on this device's type (cpu, cuda) with the installed torch."""
    return _has_fused_kernel(torch.device(device).type)


@torch.no_grad()
def adam_fused(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[int],
    cfg: AdamConfig,
) -> None:
    """Same math as ``adam_reference`` via ``torch._fused_adam_`` (decoupled decay by a foreach multiply).

    All tensors on one device where ``fused_supported`` holds. One kernel call per distinct step.
    ``max_exp_avg_sqs`` is used only if ``cfg.amsgrad``. ``grads`` are never modified.
    """
    _check_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cfg)
    if not params:
        return
    device = params[0].device

    # torch's fused kernels implement the textbook update (our optimized_update=False):
    #     theta_t = theta_{t-1} - alpha / (1 - beta1^t) * m_t / (sqrt(v_t) / sqrt(1 - beta2^t) + eps_torch)
    # and L2 decay (_fused_adam_: g + lambda theta inside the kernel, grad not written), which we use.
    # Decoupled decay is done here, before the kernel, with the reference's arithmetic: one multiply
    # by float32(1 - alpha lambda) (or 1 - lambda, absolute). torch's CUDA _fused_adamw_ computes
    # theta - alpha lambda theta instead, whose rounding differs from the multiply in the same direction
    # every step and drifts past the reference's tolerance in a few hundred steps.
    # The kernel reads t from a float32 tensor on the params' device (torch's wrapper increments it
    # before the call; our t is already incremented). float32 holds t exactly up to 2^24. They are
    # made before anything is written: out of device memory, this kernel changes nothing.
    by_step = _indices_by_step(steps)
    state_steps = {step: torch.full((), float(step), dtype=torch.float32, device=device) for step in by_step}
    kernel_weight_decay = 0.0
    if cfg.weight_decay != 0:
        if cfg.weight_decouple:
            # theta_{t-1} <- theta_{t-1} (1 - lambda) or theta_{t-1} (1 - alpha lambda); the kernel: none
            decay = cfg.weight_decay if cfg.absolute else cfg.lr * cfg.weight_decay
            torch._foreach_mul_(list(params), 1.0 - decay)
        else:
            kernel_weight_decay = cfg.weight_decay

    for step, indices in by_step.items():
        _, bias_correction2 = _bias_corrections(step, cfg)
        if cfg.optimized_update:
            # The seed's optimized form equals the textbook form with eps_torch = eps_hat / sqrt(1 - beta2^t):
            #   alpha sqrt(bc2) / bc1 * m / (sqrt(v) + eps_hat)
            #     = alpha / bc1 * m / ((sqrt(v) + eps_hat) / sqrt(bc2))          (move sqrt(bc2) down)
            #     = alpha / bc1 * m / (sqrt(v) / sqrt(bc2) + eps_hat / sqrt(bc2)),  bc_i = 1 - beta_i^t
            eps_torch = cfg.eps / math.sqrt(bias_correction2)
        else:
            eps_torch = cfg.eps
        torch._fused_adam_(
            [params[i] for i in indices],
            [grads[i] for i in indices],
            [exp_avgs[i] for i in indices],
            [exp_avg_sqs[i] for i in indices],
            [max_exp_avg_sqs[i] for i in indices] if cfg.amsgrad else [],
            [state_steps[step]] * len(indices),
            lr=cfg.lr,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            weight_decay=kernel_weight_decay,
            eps=eps_torch,
            amsgrad=cfg.amsgrad,
            # maximize would negate and grad_scale would unscale grads: both off, so grads are only read
            maximize=False,
            grad_scale=None,
            found_inf=None,
        )


def adam_fast(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    steps: Sequence[int],
    cfg: AdamConfig,
) -> None:
    """The server's kernel: ``adam_fused`` where ``fused_supported(params[0].device)``, else
    ``adam_foreach``."""
    # Empty lists go to adam_foreach, which checks them and returns.
    kernel = adam_fused if params and fused_supported(params[0].device) else adam_foreach
    kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cfg)


# -- overflow bounds -------------------------------------------------------------------------------
#
# Every value a kernel computes for one step is bounded by scalars known before the step: upper bounds
# on the state's magnitudes (tracked per key), the gradient's (from its NaN/Inf check) and the options.
# While every such bound stays below SAFE_MAGNITUDE, float32 (max ~2^128) cannot overflow; only a step
# whose bounds pass it needs its result checked element by element (the store does that on a copy).
# The slack on each bound covers float32 rounding: a few roundings of at most 2^-24 each, relative to
# the sum of the magnitudes combined (lerp computes m + w (g - m), whose rounding is relative to |g| + |m|,
# not to the smaller result).

SAFE_MAGNITUDE = 2.0 ** 100
_SLACK = 2.0 ** -20


@dataclass(frozen=True)
class Bounds:
    """Upper bounds on max|theta|, max|m|, max v and max vmax of one key (vmax 0 until amsgrad used it).
    Python floats: they never overflow where float32 would."""
    param: float
    exp_avg: float
    exp_avg_sq: float
    max_exp_avg_sq: float = 0.0


def _float32(x: float) -> float:
    """x rounded to float32, as the kernels see a Python scalar (0.0 for what underflows)."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.inf


def step_bounds(b: Bounds, grad: float, step: int, cfg: AdamConfig) -> Bounds | None:
    """Bounds after one step t = ``step`` of any of this module's kernels, given ``b`` before it and
    max|g| <= ``grad``; None when a value the step computes might reach SAFE_MAGNITUDE (or with eps = 0,
    when m / (sqrt(v) + eps) has no bound): then only the result itself can say whether it is finite."""
    theta, m, v, vmax = b.param, b.exp_avg, b.exp_avg_sq, b.max_exp_avg_sq
    g = grad
    intermediates = [g]
    if cfg.weight_decay != 0:
        if cfg.weight_decouple:
            # theta_{t-1} (1 - lambda) or theta_{t-1} (1 - alpha lambda)
            decay = cfg.weight_decay if cfg.absolute else cfg.lr * cfg.weight_decay
            theta = theta * abs(1.0 - decay) * (1 + _SLACK)
        else:
            # g_t + lambda theta_{t-1}
            g = (g + cfg.weight_decay * theta) * (1 + _SLACK)
    beta1, beta2 = cfg.beta1, cfg.beta2
    # m_t = beta1 m_{t-1} + (1 - beta1) g_t   (computed as m + (1 - beta1)(g - m))
    m_next = beta1 * m + (1 - beta1) * g + _SLACK * (m + g)
    # v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
    v_next = beta2 * v + (1 - beta2) * g * g + _SLACK * (v + g * g)
    vmax_next = max(vmax, v_next) if cfg.amsgrad else vmax
    intermediates += [g, m + g, g * g, m_next, v_next, vmax_next]
    bias_correction1, bias_correction2 = _bias_corrections(step, cfg)
    # The denominator is at least eps as the kernel holds it (float32; the fused form's eps / sqrt(bc2)
    # is no smaller), so |m_t / denominator| <= m_next / eps; the step is at most alpha / (1 - beta1^t)
    # times that (alpha sqrt(1 - beta2^t) / (1 - beta1^t) in the optimized form is smaller).
    eps = _float32(cfg.eps)
    if eps == 0.0:
        return None
    step_size = cfg.lr / bias_correction1
    ratio = m_next / eps
    update = step_size * ratio
    theta_next = (theta + update) * (1 + _SLACK)
    intermediates += [_float32(cfg.eps / math.sqrt(bias_correction2)), ratio, step_size * m_next, update,
                      theta, theta_next]
    if not max(intermediates) < SAFE_MAGNITUDE:  # `not <`: a NaN bound is no bound
        return None
    return Bounds(theta_next, m_next, v_next, vmax_next)
