"""How a shard process shares its cores among concurrent requests: small tensors on one thread.

A shard serves many requests at once (one thread per data-channel connection, gRPC's pool). torch
runs an op on its intra-op (OpenMP) team when the op is large, but the fused Adam kernel starts the
team for a tensor of any size, and MKL's dot product for a few thousand elements: with eight
workers pushing 100 k-parameter models at a 2-core shard, every handler's Adam step and NaN/Inf
check woke a team of its own, and the teams competed for the cores the handlers needed
(docs/MEASUREMENTS.md, "A shard's threads"). One thread is faster for such tensors even alone; a
64 MiB key's Adam step wants every core.

torch's thread count is per process, or, with torch's OpenMP backend, per thread once a thread has
set it (libgomp then keeps it in the thread's own task). `IntraOpThreads` works
under either: an operation says how large its tensors are (`sized`) and sets, in its own thread, on
entry and on exit, the count the operations running then want: 1 while only small ones run, the
shard's count while any large one runs (or none at all, as torch would have it). A small op that
starts while a large one runs keeps the large count (it only loses its own speed-up); a large op
never runs short of threads because of a small one. Unsized torch ops run at the count their thread
last set. Only the count changes: the fused kernel computes every element alone, so its results do
not depend on it (tests/unit/test_threads.py).

Only a shard process (`optserve serve`) is managed (`manage`): a shard running inside a training
process (the demo, tests) leaves that process's torch settings alone.
"""
from __future__ import annotations

import contextlib
import threading

import torch

# A tensor at least this long (elements) is worth the team: on the 2-core machine of
# docs/MEASUREMENTS.md one thread was faster for fused Adam up to ~512 K elements and twice as slow at
# 1 M on a quiet machine; the dot product's crossover lies lower, its cost far below Adam's.
PARALLEL_ELEMENTS = 1 << 19


class IntraOpThreads:
    def __init__(self):
        self._lock = threading.Lock()  # a leaf: nothing is taken inside it
        self._threads = 0  # the count for large ops; 0 or 1: not managed (nothing is changed)
        self._small = 0  # sized ops running, by kind
        self._large = 0

    def manage(self, threads: int) -> None:
        """Let large ops use `threads` (the process's count) and small ones one (1 or less: no change)."""
        with self._lock:
            self._threads = threads
            if threads > 1:
                torch.set_num_threads(threads)

    @property
    def managed(self) -> bool:
        return self._threads > 1

    @contextlib.contextmanager
    def sized(self, elements: int):
        """Run the torch ops inside (on this thread) on tensors of at most `elements` elements."""
        if self._threads <= 1:
            yield
            return
        large = elements >= PARALLEL_ELEMENTS
        with self._lock:
            if large:
                self._large += 1
            else:
                self._small += 1
            torch.set_num_threads(self._want())
        try:
            yield
        finally:
            with self._lock:
                if large:
                    self._large -= 1
                else:
                    self._small -= 1
                torch.set_num_threads(self._want())

    def _want(self) -> int:
        return 1 if self._small and not self._large else self._threads


# The process's one arbiter (torch's setting is per process).
INTRA_OP = IntraOpThreads()
