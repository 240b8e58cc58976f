"""Host memory a shard reuses: the buffer pool, and the copy-on-write leases of pull snapshots.

`BufferPool` keeps flat float32 buffers warm for pushed gradients' staging and for the copies that
copy on write makes. `Leases` tracks the key tensors a pull is sending in place (CPU shards): a
push or SetState about to change one moves the key onto a copy first (`Store._own`) and retires the
leased tensor, which returns to the pool when its last reader ends. Neither does tensor math or
network I/O; `Leases` is guarded by the store's lock (it has none of its own).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


PINNED_BYTES = 2 << 30  # a GPU shard's pinned host memory, at most (staging, snapshots, SetState)


class PinnedHost:
    """How a GPU shard pins host memory and knows when an asynchronous copy out of it is done.
    Tests replace it (tests/unit/test_pinned_pool.py), so the pool's bound is checked without CUDA."""

    def pin(self, numel: int) -> torch.Tensor:
        return torch.empty(numel, dtype=torch.float32, pin_memory=True)

    def event(self):
        """Recorded on the current stream now: every copy already queued there is done when it is."""
        event = torch.cuda.Event()
        event.record()
        return event

    def release(self) -> None:
        """Hand the pinned blocks no tensor uses back to the driver (torch's cache keeps them otherwise)."""
        empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
        if empty is not None:
            empty()


class BufferPool:
    """Reusable flat float32 host buffers, by size: staging for pushed gradients and pull snapshots.

    A large tensor that is freed goes back to the OS, and a fresh one costs a page fault per 4 KiB on
    first touch, several times slower than a copy into warm memory (docs/MEASUREMENTS.md). Reusing
    buffers keeps every copy warm.

    A GPU shard's buffers are pinned, so host <-> device copies are asynchronous, within one bound:
    pinned elements in use or kept free never pass `pinned_budget` (default `PINNED_BYTES`). A buffer
    that would pass it is pageable instead (its copies are synchronous; correct, slower). torch's
    caching host allocator alone rounds every request up to a power of two and never frees, so the
    pool keeps its own free lists, drops free pinned buffers of other sizes to make room (and asks
    torch to free them), and records an event when a buffer comes back: a copy queued from it must
    be done before the buffer is handed out again.
    """

    def __init__(self, device: torch.device, budget: Callable[[], int] = lambda: 1 << 30,
                 pinned_budget: Callable[[], int] = lambda: PINNED_BYTES // 4,
                 host: PinnedHost | None = None):
        self._pinned = device.type == "cuda" or host is not None
        self._host = host or PinnedHost()
        # Free buffers are kept up to this many elements in all (asked at each give): the store
        # passes twice its parameter count, one whole push's staging plus one whole pull's snapshot,
        # so a worker's steady state never allocates, however many same-sized slices it has.
        self._budget = budget
        self._free: dict[int, list[torch.Tensor]] = {}
        self._kept = 0  # elements in _free
        self._pinned_budget = pinned_budget  # elements
        self._pinned_free: dict[int, list[tuple[torch.Tensor, object]]] = {}  # numel -> (buffer, event)
        self._pinned_ids: set[int] = set()  # id() of every pinned buffer the pool made and holds or lent
        self.pinned_elements = 0  # pinned elements in use or free: never above pinned_budget()
        self._lock = threading.Lock()

    def take(self, numel: int) -> torch.Tensor:
        if self._pinned:
            pinned = self._take_pinned(numel)
            if pinned is not None:
                return pinned
        with self._lock:
            free = self._free.get(numel)
            if free:
                self._kept -= numel
                return free.pop()
        return torch.empty(numel, dtype=torch.float32)

    def _take_pinned(self, numel: int) -> torch.Tensor | None:
        dropped = False
        with self._lock:
            free = self._pinned_free.get(numel)
            if free:
                buf, event = free.pop()
            else:
                budget = self._pinned_budget()
                # Make room by dropping free pinned buffers of other sizes, largest first.
                for size in sorted(self._pinned_free, reverse=True):
                    while self.pinned_elements + numel > budget and self._pinned_free[size]:
                        old, _ = self._pinned_free[size].pop()
                        self._pinned_ids.discard(id(old))
                        self.pinned_elements -= size
                        dropped = True
                if self.pinned_elements + numel > budget:
                    return None  # the bound is reached by buffers in use: pageable
                self.pinned_elements += numel  # reserved before allocating, outside the lock
                buf = event = None
        if dropped:
            self._host.release()
        if buf is not None:
            if event is not None:
                event.synchronize()  # a copy queued from it is done (long since, as a rule)
            return buf
        try:
            buf = self._host.pin(numel)
        except (RuntimeError, MemoryError):
            with self._lock:
                self.pinned_elements -= numel
            return None
        with self._lock:
            self._pinned_ids.add(id(buf))
        # A buffer a failed request never gave back leaves the pool's count when it is freed.
        weakref.finalize(buf, self._forget, id(buf), numel)
        return buf

    def _forget(self, ident: int, numel: int) -> None:
        with self._lock:
            if ident in self._pinned_ids:
                self._pinned_ids.discard(ident)
                self.pinned_elements -= numel

    def event(self):
        """An event recorded now on the device's current stream (`synchronize()` waits for it)."""
        return self._host.event()

    def give(self, buffers: Sequence[torch.Tensor]) -> None:
        if self._pinned:
            pinned = [t for t in buffers if id(t) in self._pinned_ids]
            if pinned:
                event = self._host.event()  # after every copy queued so far, those out of these included
                with self._lock:
                    for t in pinned:
                        self._pinned_free.setdefault(t.numel(), []).append((t, event))
                buffers = [t for t in buffers if id(t) not in self._pinned_ids]
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
