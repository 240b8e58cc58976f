"""Delay compensation for asynchronous pushes: DC-ASGD (Zheng et al., ICML 2017) on the shard.

What it is for: a push computed from version r of a key that is now at version v > r carries the
gradient g(θ_r); DC-ASGD replaces it, before Adam, by the first-order Taylor estimate of g(θ_v) with
the Hessian approximated by λ g ⊙ g (the paper's eq. 8-10):

    g_dc = g + λ ⊙ g ⊙ g ⊙ (θ_v − θ_r)                            (elementwise)

with λ either constant (`dc:λ`, the paper's DC-ASGD-c) or adaptive (`dca:λ0[:m]`, DC-ASGD-a):

    MeanSquare_t = m · MeanSquare_{t−1} + (1 − m) · g_t ⊙ g_t      (per key and element, every applied push)
    λ_t          = λ0 / sqrt(MeanSquare_t + ε),   ε = 1e-7          (MeanSquare_t includes this push's g)

θ_r comes from a bounded ring of each key's recent parameter values, shared by all workers
(`VersionRing`): every applied push first copies the key's θ at its current version into the ring,
so the ring holds the last `depth` versions before the current one. A push at staleness s = v − r:
s = 0, the gradient is untouched (bitwise plain async); 1 <= s and θ_r in the ring, compensated; θ_r
not in the ring (s > depth, or the ring was emptied by a restart or a SetState), refused with
FAILED_PRECONDITION reason STALE, like ssp's bound: the client drops the gradient and pulls. A
compensated gradient that is not finite (λ g² Δ overflowed float32) is refused (INVALID_ARGUMENT).

What it must not do: change anything before the push is certain to apply (`Compensator.prepare` is
pure; `Pending.commit` writes the ring and MeanSquare, under the store's lock, right before Adam),
write to the pushed gradient tensors, or keep state outside its policy's lock and the store's.
`dc_gradient` is the one kernel (the store path and the parity test both use it).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from optserve.errors import STALE, RequestError, StatusCode, invalid
from optserve.server.store import GradEntry, Key

ADAPTIVE_EPS = 1e-7  # ε in λ0 / sqrt(MeanSquare + ε) (the paper's; it keeps λ finite where g was always 0)
DEFAULT_MOMENTUM = 0.95  # m of MeanSquare (the paper's)
DEFAULT_DEPTH = 8  # versions kept per key: compensable staleness 1..8


@dataclass(frozen=True)
class DCSpec:
    """`dc:λ` (constant) or `dca:λ0[:m]` (adaptive), validated once here."""
    lam: float
    adaptive: bool = False
    momentum: float = DEFAULT_MOMENTUM

    def __post_init__(self):
        if not 0.0 <= self.lam < math.inf:
            raise ValueError(f"DC-ASGD λ must be a finite number >= 0, got {self.lam}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"DC-ASGD-a momentum m must be in [0, 1), got {self.momentum}")

    @property
    def name(self) -> str:
        return f"dca:{self.lam:g}:{self.momentum:g}" if self.adaptive else f"dc:{self.lam:g}"


def parse_compensate(spec: str) -> DCSpec:
    """`dc:λ` -> constant λ; `dca:λ0` or `dca:λ0:m` -> adaptive (m default 0.95)."""
    head, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    try:
        if head == "dc" and len(parts) == 1:
            return DCSpec(float(parts[0]))
        if head == "dca" and len(parts) in (1, 2):
            return DCSpec(float(parts[0]), adaptive=True,
                          momentum=float(parts[1]) if len(parts) == 2 else DEFAULT_MOMENTUM)
    except ValueError as exc:
        if "DC-ASGD" in str(exc):
            raise
    raise ValueError(f"--compensate takes dc:LAMBDA (constant, e.g. dc:0.04) or dca:LAMBDA0[:M] (adaptive, "
                     f"e.g. dca:2 or dca:2:0.95); got {spec!r}")


def dc_gradient(g: torch.Tensor, theta_now: torch.Tensor, theta_read: torch.Tensor,
                lam: float | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """g + λ ⊙ g ⊙ g ⊙ (θ_now − θ_read), into `out` (a new tensor when None; g is not written). λ: a
    float or a tensor of g's shape (adaptive). One fixed order of operations: every caller gets the
    same bits."""
    # Δ = θ_now − θ_read
    out = torch.sub(theta_now, theta_read, out=out)
    # g ⊙ g ⊙ Δ
    out.mul_(g).mul_(g)
    # λ ⊙ g ⊙ g ⊙ Δ
    out.mul_(lam)
    # g + λ ⊙ g ⊙ g ⊙ Δ
    return out.add_(g)


def mean_square_update(mean_square: torch.Tensor, g: torch.Tensor, m: float,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """MeanSquare_t = m · MeanSquare_{t−1} + (1 − m) · g ⊙ g, into `out` (new when None)."""
    return torch.mul(mean_square, m, out=out).addcmul_(g, g, value=1 - m)


def adaptive_lambda(mean_square: torch.Tensor, lam0: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """λ_t = λ0 / sqrt(MeanSquare_t + ε), into `out` (new when None)."""
    return torch.add(mean_square, ADAPTIVE_EPS, out=out).rsqrt_().mul_(lam0)


@dataclass
class VersionRing:
    """One key's parameter values at its last `depth` versions (oldest first), buffers reused."""
    depth: int
    entries: deque = field(default_factory=deque)  # (version, flat tensor)

    def get(self, version: int) -> torch.Tensor | None:
        for v, t in self.entries:
            if v == version:
                return t
        return None

    def record(self, version: int, param: torch.Tensor) -> None:
        if self.entries and self.entries[-1][0] == version:
            return  # recorded already: only a step changes θ at a version (SetState empties the ring)
        if len(self.entries) >= self.depth:
            _, buf = self.entries.popleft()
            buf.copy_(param)  # the oldest version's buffer takes the newest value: no allocation
        else:
            buf = param.clone()
        self.entries.append((version, buf))

    def versions(self) -> list[int]:
        return [v for v, _ in self.entries]


@dataclass
class Pending:
    """A prepared compensation: the entries Adam will see, and what `commit` writes to the state."""
    entries: list[GradEntry]
    commit: Callable[[], None]


class Compensator:
    """The state DC-ASGD keeps per key (ring; MeanSquare when adaptive) and the compensation of a push.

    Memory, per element of every pushed key: 4 × depth bytes (the ring) + 4 (the compensated
    gradient's buffer), and with the adaptive λ 12 more (MeanSquare, its next value, λ): with the
    default depth 8, 36 bytes (48 adaptive) beside the store's 24. Buffers are kept and reused
    (a fresh ~MB tensor per push costs more than the arithmetic). Called only under the store's
    lock (through `Store.apply`) and the policy's lock (checkpoints, SetState)."""

    def __init__(self, spec: DCSpec, depth: int = DEFAULT_DEPTH):
        if depth < 1:
            raise ValueError(f"--max-dc-versions must be >= 1, got {depth}")
        self.spec = spec
        self.depth = depth
        self.rings: dict[str, VersionRing] = {}
        self.mean_square: dict[str, torch.Tensor] = {}
        # Scratch, per key, reused by every push: the compensated gradient, λ, MeanSquare's next value
        # (swapped with the current one on commit). Only read within one Store.apply, under its lock.
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}
        self.compensated = 0  # entries whose gradient was changed
        self.refused = 0  # entries refused: θ_read out of the ring

    def _buffer(self, key: Key, what: str) -> torch.Tensor:
        buf = self._scratch.get((key.name, what))
        if buf is None:
            buf = self._scratch[(key.name, what)] = torch.empty_like(key.param)
        return buf

    def prepare(self, entries: Sequence[GradEntry]) -> Pending:
        """(Under the store's lock, before anything changes.) The compensated entries, or
        RequestError; nothing is written until `commit` but scratch buffers."""
        out, new_ms = [], {}
        for e in entries:
            key, s = e.key, e.key.version - e.version_read
            ms = None
            if self.spec.adaptive:
                old = self.mean_square.get(key.name)
                if old is None:
                    old = torch.zeros_like(key.param)
                ms = new_ms[key.name] = self._buffer(key, "mean_square_next")
                for offset, g in e.pieces:
                    stop = offset + g.numel()
                    mean_square_update(old[offset:stop], g, self.spec.momentum, out=ms[offset:stop])
            if s == 0:
                out.append(e)  # Δ = 0: the gradient is the pushed one, bit for bit
                continue
            ring = self.rings.get(key.name)
            theta_read = ring.get(e.version_read) if ring is not None else None
            if theta_read is None:
                self.refused += 1
                kept = ring.versions() if ring is not None else []
                raise RequestError(
                    StatusCode.FAILED_PRECONDITION,
                    f"key {key.name!r}: gradient is {s} versions behind (read version {e.version_read}, "
                    f"shard at {key.version}); DC-ASGD keeps the parameters of versions "
                    f"{kept[0] if kept else '-'}..{kept[-1] if kept else '-'} only (--max-dc-versions "
                    f"{self.depth}, emptied on restart and SetState); pull and recompute", reason=STALE)
            compensated, pieces = self._buffer(key, "gradient"), []
            for offset, g in e.pieces:
                stop = offset + g.numel()
                lam = (adaptive_lambda(ms[offset:stop], self.spec.lam,
                                       out=self._buffer(key, "lambda")[offset:stop])
                       if self.spec.adaptive else self.spec.lam)
                c = dc_gradient(g, key.param[offset:stop], theta_read[offset:stop], lam,
                                out=compensated[offset:stop])
                # One sum first (a NaN or Inf element makes it non-finite; ~15x cheaper than isfinite):
                # the element-wise check runs only when the sum is not finite (possibly by overflow).
                if not bool(torch.isfinite(c.sum())) and not bool(torch.isfinite(c).all()):
                    raise invalid(f"key {key.name!r}: the delay-compensated gradient (staleness {s}) is not "
                                  f"finite: λ g² (θ_now − θ_read) overflowed float32; lower λ "
                                  f"({self.spec.name}) or the gradient's scale")
                pieces.append((offset, c))
            out.append(GradEntry(key=key, version_read=e.version_read, cfg=e.cfg, pieces=pieces))

        def commit() -> None:
            for e in entries:  # θ at the current version, before this push's step changes it
                ring = self.rings.get(e.key.name)
                if ring is None:
                    ring = self.rings[e.key.name] = VersionRing(self.depth)
                ring.record(e.key.version, e.key.param)
            for name, ms in new_ms.items():  # the new MeanSquare becomes current; the old, scratch
                old = self.mean_square.get(name)
                self.mean_square[name] = ms
                if old is not None:
                    self._scratch[(name, "mean_square_next")] = old
                else:
                    del self._scratch[(name, "mean_square_next")]
            self.compensated += sum(a is not b for a, b in zip(out, entries))

        return Pending(out, commit)

    def forget(self, keys: Sequence[Key]) -> None:
        """SetState rewrote these keys: their past versions' values no longer are theirs."""
        for key in keys:
            self.rings.pop(key.name, None)

    def bytes_held(self) -> int:
        tensors = [t for r in self.rings.values() for _, t in r.entries]
        tensors += [*self.mean_square.values(), *self._scratch.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
