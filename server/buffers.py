"""Host memory a shard reuses: the buffer pool, and the copy-on-write leases of pull snapshots.

`BufferPool` keeps flat float32 buffers warm for pushed gradients' staging and for the copies that
copy on write makes. `Leases` tracks the key tensors a pull is sending in place (CPU shards): a
push or SetState about to change one moves the key onto a copy first (`Store._own`) and retires the
leased tensor, which returns to the pool when its last reader ends. Neither does tensor math or
network I/O; `Leases` is guarded by the store's lock (it has none of its own).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


class BufferPool:
    """Reusable flat float32 host buffers, by size: staging for pushed gradients and pull snapshots.

    A large tensor that is freed goes back to the OS, and a fresh one costs a page fault per 4 KiB on
    first touch, several times slower than a copy into warm memory (docs/MEASUREMENTS.md). Reusing
    buffers keeps every copy warm. For a GPU shard the buffers are pinned and come from torch's
    caching host allocator instead, which already reuses them and knows when an asynchronous copy
    out of one has finished; `give` is then a no-op.
    """

    def __init__(self, device: torch.device, budget: Callable[[], int] = lambda: 1 << 30):
        self._pinned = device.type == "cuda"
        # Free buffers are kept up to this many elements in all (asked at each give): the store
        # passes twice its parameter count, one whole push's staging plus one whole pull's snapshot,
        # so a worker's steady state never allocates, however many same-sized slices it has.
        self._budget = budget
        self._free: dict[int, list[torch.Tensor]] = {}
        self._kept = 0  # elements in _free
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        if self._pinned:
            return torch.empty(numel, dtype=torch.float32, pin_memory=True)
        with self._lock:
            free = self._free.get(numel)
            if free:
                self._kept -= numel
                return free.pop()
        return torch.empty(numel, dtype=torch.float32)

    def give(self, buffers: Sequence[torch.Tensor]) -> None:
        if self._pinned:
            return
        budget = self._budget()
        with self._lock:
            for t in buffers:
                if self._kept + t.numel() <= budget:
                    self._free.setdefault(t.numel(), []).append(t)
                    self._kept += t.numel()


@dataclass(eq=False)
class Lease:
    """A key's tensor that snapshots are reading in place."""
    tensor: torch.Tensor
    readers: int = 0  # snapshots reading it
    retired: bool = False  # no key's tensor any more (the key moved onto a copy): pooled at the end


class Leases:
    """The tensors snapshots read in place, by identity. Call under the store's lock."""

    def __init__(self):
        self._by_id: dict[int, Lease] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def take(self, tensor: torch.Tensor) -> None:
        """One more snapshot reads `tensor`."""
        lease = self._by_id.setdefault(id(tensor), Lease(tensor))
        lease.readers += 1

    def end(self, tensor: torch.Tensor) -> bool:
        """One snapshot is done with `tensor`; True when it was the last and the tensor is retired
        (the caller gives it back to the pool)."""
        lease = self._by_id[id(tensor)]
        lease.readers -= 1
        if lease.readers:
            return False
        del self._by_id[id(tensor)]
        return lease.retired

    def retire(self, tensor: torch.Tensor) -> bool:
        """The key moves off `tensor` if a snapshot reads it: True (the caller gives the key a copy),
        and the tensor is pooled when its last reader ends. False: no snapshot reads it."""
        lease = self._by_id.get(id(tensor))
        if lease is None:
            return False
        lease.retired = True
        return True
