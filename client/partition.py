"""The shard map: which shard holds which key. A pure function every worker computes alike.

A key is a parameter's name, or, for a tensor larger than `slice_elements`, a contiguous slice of
its flattened elements named `name[start:stop]`. Slices start at multiples of hyper.CUT_ELEMENTS
(`slice_elements` is rounded up to one), which keeps the numbers bitwise identical to one shard.
Placement is greedy: each key goes to the shard holding the fewest elements so far (the lowest index
on ties). Slices of large tensors are placed first and whole tensors after, each in name order, so
the large pieces spread first and the small ones fill the gaps. Adam is elementwise, so any partition gives
the same numbers as one shard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from optserve.hyper import CUT_ELEMENTS

DEFAULT_SLICE_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Placement:
    """One key: the parameter it belongs to, its flat element range there, and its shard."""
    key: str
    param: str
    start: int
    stop: int
    shape: tuple[int, ...]
    shard: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def partition(named_shapes: Sequence[tuple[str, Sequence[int]]], num_shards: int,
              slice_elements: int = DEFAULT_SLICE_ELEMENTS,
              load: Sequence[int] | None = None) -> list[Placement]:
    """Place every parameter on the shards; returns placements in parameter order, slices in order.

    load: the elements each shard already holds (parameters placed before, by add_param_group); the
    new ones fill in around them, so earlier placements never move.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if slice_elements < 1:
        raise ValueError(f"slice_elements must be >= 1, got {slice_elements}")
    names = [n for n, _ in named_shapes]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"parameter name {dup!r} appears twice")
    slice_elements = -(-slice_elements // CUT_ELEMENTS) * CUT_ELEMENTS
    shapes = {n: tuple(int(d) for d in s) for n, s in named_shapes}
    sliced, whole = [], []
    for name in sorted(names):
        numel = math.prod(shapes[name])
        if numel > slice_elements:
            for start in range(0, numel, slice_elements):
                stop = min(start + slice_elements, numel)
                sliced.append((f"{name}[{start}:{stop}]", name, start, stop, (stop - start,)))
        else:
            whole.append((name, name, 0, numel, shapes[name]))
    load = [0] * num_shards if load is None else list(load)
    if len(load) != num_shards:
        raise ValueError(f"load has {len(load)} values for {num_shards} shards")
    placed: dict[str, list[Placement]] = {n: [] for n in names}
    for key, name, start, stop, shape in sliced + whole:
        shard = min(range(num_shards), key=lambda s: (load[s], s))
        load[shard] += stop - start
        placed[name].append(Placement(key, name, start, stop, shape, shard))
    return [p for n in names for p in sorted(placed[n], key=lambda p: p.start)]
