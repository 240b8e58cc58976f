"""Adam's options as one validated value, shared by the worker (RemoteAdam) and the shard, and the
grid on which both sides cut tensors (`CUT_ELEMENTS`).

Validated once, at the edge (`__post_init__`); the kernels of server/adam.py trust it. No tensors here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Tensors are only ever cut (into slices by client/partition.py, or across messages by
# optserve/serde.py) at multiples of this many elements from their start. torch's fused CPU Adam
# computes the last elements of a tensor in a scalar tail that can round differently from its vector
# body; cutting on this grid keeps every element on the same code path whatever the partition or
# chunking, so results are bitwise identical.
CUT_ELEMENTS = 64
# The highest step (version) a key may reach. Steps travel as uint64 and are kept in int64 tables
# (the exactly-once table's results); bounding them far below both at the edge (SetState, checkpoint
# restore) and refusing a push that would pass it means no counter can overflow after a step.
MAX_STEP = 2**62


@dataclass(frozen=True)
class AdamConfig:
    """Adam hyperparameters; the defaults are the seed's (labml ``Adam`` and ``WeightDecay``).

    * ``lr`` is the learning rate alpha
    * ``beta1``, ``beta2`` are the decay rates of the moments m and v
    * ``eps`` is eps_hat when ``optimized_update`` else eps (see the module docstring)
    * ``weight_decay`` is lambda; ``weight_decouple`` picks AdamW-style decay over L2 on the gradient;
      ``absolute`` makes decoupled decay ``theta * (1 - lambda)`` instead of ``theta * (1 - alpha lambda)``
    * ``optimized_update`` applies the v bias correction to eps instead of to sqrt(v) (the seed's default)
    * ``amsgrad`` uses the running max of v in the denominator (labml ``AMSGrad``)
    """

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-16
    weight_decay: float = 0.0
    weight_decouple: bool = True
    absolute: bool = False
    optimized_update: bool = True
    amsgrad: bool = False

    def __post_init__(self) -> None:
        # Written as `not (in range)` so that NaN is rejected too.
        _check_range("lr", self.lr, "0 <= lr < inf", 0.0 <= self.lr < math.inf)
        _check_range("beta1", self.beta1, "0 <= beta1 < 1", 0.0 <= self.beta1 < 1.0)
        _check_range("beta2", self.beta2, "0 <= beta2 < 1", 0.0 <= self.beta2 < 1.0)
        _check_range("eps", self.eps, "0 <= eps < inf", 0.0 <= self.eps < math.inf)
        _check_range(
            "weight_decay", self.weight_decay, "0 <= weight_decay < inf",
            0.0 <= self.weight_decay < math.inf,
        )


def _check_range(field: str, value: float, allowed: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"AdamConfig.{field}: expected {allowed}, got {value!r}")
