"""A shard's keys: parameters, Adam state, versions and counters, under one lock.

The store owns the tensors and the lock discipline; it calls server/adam.py for the math and does no
network I/O. Every method either changes nothing and raises RequestError, or completes. Its helpers
have their own homes: the exactly-once table (server/dedupe.py), the buffer pool and the
copy-on-write leases of pull snapshots (server/buffers.py).

Lock discipline (docs/ARCHITECTURE.md): one `threading.Lock` per shard guards every key's tensors,
step and counters. Decoding and validating a request's bytes happen outside it (keys are never
removed and their shapes never change, so a validated key stays valid); under it run only the checks
that read versions, the Adam step over all keys of one push (so a push is atomic over its key set and
no update is lost under concurrent clients), and the leases that snapshot keys for a pull (copy on
write: a push moves a leased key onto a copy first, `_own`).
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from optserve.errors import AHEAD, ROLLBACK, RequestError, StatusCode, invalid
from optserve.hyper import MAX_STEP, AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import PART_NAMES
from optserve.server.adam import Bounds, adam_fast, step_bounds
from optserve.server.applylog import ApplyLog
from optserve.server.buffers import BufferPool, Leases
from optserve.server.checkpoint import KeyRecord
from optserve.server.dedupe import DEFAULT_MAX_BYTES, NO_ORIGIN, Dedupe, Origin, PushResult
from optserve.server.threads import INTRA_OP, PARALLEL_ELEMENTS

STALENESS_BUCKETS = 32  # histogram[i] counts staleness i; the last bucket collects >= 31


@dataclass
class StalenessStats:
    count: int = 0
    total: int = 0
    max: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * STALENESS_BUCKETS)

    def record(self, staleness: int) -> None:
        self.count += 1
        self.total += staleness
        self.max = max(self.max, staleness)
        self.histogram[min(staleness, STALENESS_BUCKETS - 1)] += 1

    def to_proto(self) -> pb.StalenessStats:
        mean = self.total / self.count if self.count else 0.0
        return pb.StalenessStats(count=self.count, mean=mean, max=self.max, histogram=self.histogram)


@dataclass
class Key:
    """One key's tensors, flat and float32 on the shard's device. Its version is its step count."""
    name: str
    shape: tuple[int, ...]
    param: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: torch.Tensor | None = None  # allocated on the first amsgrad step
    step: int = 0  # per key: advances only when a gradient for this key is applied
    hyper: AdamConfig | None = None  # the options of the last applied step
    info: dict = field(default_factory=dict)  # provenance: param, param_shape, offset (for export)
    pushes: int = 0
    dropped: int = 0  # gradients a policy discarded
    staleness: StalenessStats = field(default_factory=StalenessStats)
    # Upper bounds on the magnitudes of the key's tensors (server/adam.py, step_bounds), carried from
    # step to step without reading them; None: unknown (a new, restored or SetState key), so its next
    # step is checked on a copy, which also gives exact bounds again.
    bounds: Bounds | None = None

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def version(self) -> int:
        return self.step

    def part(self, part: int) -> torch.Tensor:
        name = PART_NAMES.get(part)
        if name is None:
            raise invalid(f"key {self.name!r}: part {part} is not a tensor of a key")
        if part == pb.MAX_EXP_AVG_SQ and self.max_exp_avg_sq is None:
            self.max_exp_avg_sq = torch.zeros_like(self.param)
        return getattr(self, name)

    def read(self, part: int) -> torch.Tensor:
        """A part to read. max_exp_avg_sq before amsgrad used it reads as zeros (what torch's Adam would
        start it from) without giving the key that tensor: a read never grows a key or checkpoints."""
        if part == pb.MAX_EXP_AVG_SQ and self.max_exp_avg_sq is None:
            return torch.zeros_like(self.param)
        return self.part(part)

    def replace_part(self, part: int, tensor: torch.Tensor) -> None:
        setattr(self, PART_NAMES[part], tensor)

    def held_parts(self) -> list[int]:
        """The parts this key holds a tensor for (max_exp_avg_sq only once amsgrad has used it)."""
        return [part for part, name in PART_NAMES.items() if getattr(self, name) is not None]


@dataclass(frozen=True)
class GradEntry:
    """One key of a decoded push: the gradient as (offset, float32 view) pieces covering the key."""
    key: Key
    version_read: int
    cfg: AdamConfig
    pieces: Sequence[tuple[int, torch.Tensor]]
    grad_bound: float = math.inf  # >= max|g| (from the gradient's NaN/Inf check); inf: not known

    def refuse_if_ahead(self) -> None:
        """A gradient computed from a version the key has not reached cannot be applied:
        FAILED_PRECONDITION, reason AHEAD (the client re-pulls). Called under a lock that orders it
        with the key's steps: the store's (Store.apply), or the sync policy's (its rounds)."""
        if self.version_read > self.key.version:
            raise RequestError(StatusCode.FAILED_PRECONDITION,
                               f"key {self.key.name!r}: gradient computed from version {self.version_read}, "
                               f"ahead of the shard's version {self.key.version}; pull again", reason=AHEAD)


# What a shard's memory can grow to, by its limits (README: Security; tests/service/test_hostile.py
# measures the per-key figure with the longest names a request may give).
KEY_OVERHEAD_BYTES = 6 << 10  # a key's objects, names and provenance, before its tensors
# param, exp_avg, exp_avg_sq, max_exp_avg_sq (16 bytes), and the buffer pool's free buffers, kept up to
# twice the parameter count (8 bytes; server/buffers.py)
BYTES_PER_ELEMENT = 24


@dataclass(frozen=True)
class StoreLimits:
    """The defaults' worst case (`worst_case_bytes`): 2**16 keys x 6 KiB + 2**29 elements x 24 bytes
    + the exactly-once table's 256 MiB, about 12.6 GiB, which a 24 GiB machine survives; a bigger shard
    raises them by flag."""
    max_keys: int = 1 << 16
    max_tensor_elements: int = 1 << 29
    max_shard_elements: int = 1 << 29
    dedupe_bytes: int = DEFAULT_MAX_BYTES  # the exactly-once table (server/dedupe.py)


def worst_case_bytes(limits: StoreLimits) -> int:
    """The most memory a shard's keys can hold within `limits` (host, or device plus pinned host)."""
    return (limits.max_keys * KEY_OVERHEAD_BYTES + limits.max_shard_elements * BYTES_PER_ELEMENT
            + limits.dedupe_bytes)


@dataclass(frozen=True)
class Snapshot:
    """Keys as they were at one instant: their versions, options, and the parts asked for, unchanging
    until `Store.release` (leased on a CPU shard, copied to host buffers on a GPU shard)."""
    keys: list[Key]
    versions: list[int]
    steps: list[int]
    hypers: list[AdamConfig | None]
    # (entry, part) -> flat float32 host tensor, unchanging until Store.release: on a CPU shard the
    # key's own tensor, leased (copy on write); on a GPU shard a copy in a host buffer
    parts: dict[tuple[int, int], torch.Tensor]


class Store:
    """The keys of one shard."""

    def __init__(self, device: torch.device | str = "cpu", limits: StoreLimits = StoreLimits(),
                 apply_log: ApplyLog | None = None):
        self.device = torch.device(device)
        # One JSON line per applied push, written under the lock: the exact order of updates, with
        # digests (and gradients, bounded), so a run can be replayed (`optserve replay`) or audited.
        self.apply_log = apply_log
        self.limits = limits
        self._keys: dict[str, Key] = {}
        self._elements = 0
        self.buffers = BufferPool(self.device, lambda: 2 * self._elements)
        # Keys outside host memory (a GPU shard): pulls and checkpoints copy to host buffers instead of
        # leasing the keys' own tensors.
        self._host_copies = self.device.type != "cpu"
        self._leases = Leases()  # the key tensors pull snapshots are sending in place (copy on write)
        self.dedupe = Dedupe(max_bytes=limits.dedupe_bytes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified whenever versions change
        self.pushes = 0
        self.pulls = 0
        self.dropped = 0
        self.staleness = StalenessStats()

    # -- lookup (no lock: keys are only ever added, and dict reads are atomic) -----------------

    def get(self, name: str) -> Key:
        key = self._keys.get(name)
        if key is None:
            raise RequestError(StatusCode.NOT_FOUND, f"key {name!r} is not registered on this shard")
        return key

    @property
    def elements(self) -> int:
        return self._elements

    def names(self) -> list[str]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    # -- registration -----------------------------------------------------------------------------

    def check_spec(self, name: str, shape: tuple[int, ...]) -> Key | None:
        """The existing key of this name (refusing another shape), or None when it is missing."""
        key = self._keys.get(name)
        if key is not None and key.shape != shape:
            raise RequestError(StatusCode.FAILED_PRECONDITION,
                               f"key {name!r} is registered with shape {list(key.shape)} float32; "
                               f"refusing shape {list(shape)}")
        return key

    def check_capacity(self, new: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        """Refuse (RESOURCE_EXHAUSTED) keys that would pass the shard's limits."""
        lim = self.limits
        for name, shape in new:
            numel = math.prod(shape)
            if numel > lim.max_tensor_elements:
                raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                                   f"key {name!r}: {numel} elements exceed the limit of "
                                   f"{lim.max_tensor_elements} per tensor")
        missing = [(n, s) for n, s in new if n not in self._keys]
        if len(self._keys) + len(missing) > lim.max_keys:
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"{len(missing)} new keys would exceed the limit of {lim.max_keys} keys "
                               f"per shard ({len(self._keys)} registered)")
        total = self._elements + sum(math.prod(s) for _, s in missing)
        if total > lim.max_shard_elements:
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"new keys would bring the shard to {total} elements, over the limit of "
                               f"{lim.max_shard_elements}")

    def create(self, items: Sequence[tuple[str, tuple[int, ...], torch.Tensor, dict]]
               ) -> list[tuple[Key, bool]]:
        """Insert keys with these initial (flat, float32, on-device) values, all or none.

        Returns (key, created) per item. A key that exists already (perhaps created meanwhile by
        another worker) is kept as it is: the caller adopts the server's value by pulling.
        """
        with self._lock:
            existing = [self.check_spec(name, shape) for name, shape, _, _ in items]
            self.check_capacity([(name, shape) for name, shape, _, _ in items])
            out = []
            for (name, shape, value, info), key in zip(items, existing):
                if key is not None:
                    out.append((key, False))
                    continue
                key = Key(name=name, shape=shape, param=value, info=info,
                          exp_avg=torch.zeros_like(value), exp_avg_sq=torch.zeros_like(value))
                out.append((key, True))
            for key, created in out:  # every allocation came first: out of device memory inserts none
                if created:
                    self._keys[key.name] = key
                    self._elements += key.numel
            return out

    # -- the update -------------------------------------------------------------------------------

    def apply(self, entries: Sequence[GradEntry],
              decide: Callable[[Key, int, AdamConfig], AdamConfig] | None = None,
              origin: Origin = NO_ORIGIN, compensate: Callable | None = None) -> PushResult:
        """One Adam step on every key of a push, atomically; returns versions and staleness.

        decide(key, staleness, cfg) lets the policy refuse a push (raise RequestError) or change the
        options of a step (ssp's lr scaling); it runs for every entry before anything changes.
        The result is recorded through `origin` (server/dedupe.py) under the same lock as the step, so
        a checkpoint holds a push's effect exactly when it holds its record.
        compensate(entries) -> Pending (server/compensate.py, DC-ASGD) replaces the gradients after
        `decide`, changing nothing (or raising RequestError); its `commit()` runs right before Adam.
        """
        with self._lock:
            configs = []
            for e in entries:
                e.refuse_if_ahead()
                if e.key.step >= MAX_STEP:  # before anything changes: no counter may pass its bound
                    raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                                       f"key {e.key.name!r} is at step {e.key.step}, the highest a key may "
                                       f"reach ({MAX_STEP}); SetState a lower step to train it further")
                s = e.key.version - e.version_read
                configs.append(decide(e.key, s, e.cfg) if decide is not None else e.cfg)
            pending = compensate(entries) if compensate is not None else None
            if pending is not None:
                entries = pending.entries
            for e, cfg in zip(entries, configs):
                if cfg.eps == 0:
                    _refuse_zero_denominator(e, cfg)
            # No step may make a key non-finite: bounded from scalars (no pass over memory), or, where
            # the bounds cannot rule overflow out, computed on copies and checked (one device sync for
            # the push); a non-finite result is refused here, before anything changes.
            predicted = self._predict(entries, configs)
            unsure = [(e, cfg) for e, cfg, b in zip(entries, configs, predicted) if b is None]
            checked = _checked_steps(unsure, self._copy, self._give)
            for e, cfg, b in zip(entries, configs, predicted):
                if cfg.amsgrad and b is not None:  # allocated before anything changes: out of memory
                    e.key.part(pb.MAX_EXP_AVG_SQ)   # changes nothing
            if pending is not None:  # nothing can refuse the push past here: the compensation's state
                pending.commit()
            staleness = []
            groups: dict[AdamConfig, list[GradEntry]] = {}
            for e, cfg, b in zip(entries, configs, predicted):
                s = e.key.version - e.version_read
                staleness.append(s)
                e.key.staleness.record(s)
                e.key.step += 1
                e.key.pushes += 1
                e.key.hyper = cfg
                if b is not None:
                    e.key.bounds = b
                    groups.setdefault(cfg, []).append(e)
            self.staleness.record(max(staleness))  # per push: how far behind its oldest key was
            if self._leases:  # a pull is sending some tensors from their keys: never write those
                for group in groups.values():
                    for e in group:
                        for part in e.key.held_parts():
                            self._own(e.key, part)
            for cfg, group in groups.items():
                _adam_step(group, cfg)
            for key, results, bounds in checked:  # the checked copies become the key's tensors
                for part, t in results.items():
                    old = getattr(key, PART_NAMES[part])
                    key.replace_part(part, t)
                    if old is not None:
                        self._leases.retire(old)  # a snapshot reading it pools it when done
                key.bounds = bounds
            self.pushes += 1
            self._changed.notify_all()
            result = PushResult([e.key.version for e in entries], staleness)
            if self.apply_log is not None:
                self.apply_log.write(origin, entries, configs, result)
            origin.record(result)
            return result

    def _predict(self, entries: Sequence[GradEntry], configs: Sequence[AdamConfig]) -> list[Bounds | None]:
        """(Under the lock.) Each entry's key bounds after its step, or None where overflow cannot be
        ruled out from them. A gradient without a bound (a sync round's average) gets one from its
        sum of squares, as a pushed gradient's check computes it: one device sync for all of them."""
        missing = [e for e in entries if not math.isfinite(e.grad_bound) and e.key.bounds is not None]
        if missing:
            squares = torch.stack([sum(torch.dot(g, g) for _, g in e.pieces) for e in missing]).tolist()
            found = {id(e): grad_bound_from_squares(x) for e, x in zip(missing, squares)}
        out = []
        for e, cfg in zip(entries, configs):
            if e.key.numel == 0:
                out.append(Bounds(0.0, 0.0, 0.0))
            elif e.key.bounds is None:
                out.append(None)
            else:
                grad = e.grad_bound if math.isfinite(e.grad_bound) else found[id(e)]
                out.append(step_bounds(e.key.bounds, grad, e.key.step + 1, cfg))
        return out

    def count_dropped(self, keys: Sequence[Key]) -> None:
        """Record gradients a policy discarded (late for sync, too stale for ssp), per key."""
        with self._lock:
            for key in keys:
                key.dropped += 1
            self.dropped += 1

    def wait_versions(self, keys: Sequence[Key], minimum: Sequence[int], timeout: float,
                      stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait until every key's version is at least its minimum; False when `timeout` passed first.
        `stop()` ends the wait early (checked whenever `wake` or a version change notifies)."""
        with self._lock:
            return self._changed.wait_for(
                lambda: stop() or all(k.version >= m for k, m in zip(keys, minimum)), timeout=timeout)

    def wake(self) -> None:
        """Have every wait_versions check its stop() now."""
        with self._lock:
            self._changed.notify_all()

    # -- snapshots and state ----------------------------------------------------------------------

    def snapshot(self, keys: Sequence[Key], parts: Sequence[int]) -> Snapshot:
        """The keys' parts as they are now, unchanging until `release(snapshot)`.

        CPU shard: copy on write. The snapshot leases the keys' own tensors; a push (or SetState)
        that must change a leased tensor first moves the key onto a copy (`_own`), and the leased
        tensor, no longer any key's, goes to the buffer pool when its last lease ends. A pull with
        no push racing it therefore copies nothing; one that races pays the copy it always paid.
        GPU shard: the parts are copied to pinned host buffers (the network needs host memory anyway):
        queued without waiting under the lock, and one event recorded after them is waited on outside
        it, so a pull never holds the lock across a device synchronization."""
        if self._host_copies:
            buffers = {(i, part): self.buffers.take(k.numel) for i, k in enumerate(keys) for part in parts}
        with self._lock:
            if not self._host_copies:
                views = {}
                for i, k in enumerate(keys):
                    for part in parts:
                        t = k.read(part)  # leased; a transient zeros tensor is retired to the pool
                        self._leases.take(t)
                        views[(i, part)] = t
            else:
                views = buffers
                for (i, part), buf in buffers.items():
                    buf.copy_(keys[i].read(part), non_blocking=True)  # queued behind every step
                copied = self.buffers.event()
            self.pulls += 1
            snapshot = Snapshot(list(keys), [k.version for k in keys], [k.step for k in keys],
                                [k.hyper for k in keys], views)
        if self._host_copies:
            copied.synchronize()  # the copies are done: outside the lock
        return snapshot

    def release(self, snapshot: Snapshot) -> None:
        """The snapshot's tensors are no longer read (sent, or the send failed)."""
        if self._host_copies:
            self.buffers.give(list(snapshot.parts.values()))
            return
        with self._lock:
            retired = [t for t in snapshot.parts.values() if self._leases.end(t)]
        self.buffers.give(retired)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """(Under the lock.) A copy of a key's tensor to compute a checked step in: in a pool buffer on
        a CPU shard (warm memory when the pool has one: a fresh 64 MiB clone costs 5x the copy in page
        faults), a clone on a device (the pool holds host buffers there)."""
        if self._host_copies:
            return t.clone()
        return self.buffers.take(t.numel()).copy_(t)

    def _give(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copies of a refused checked step: to the pool on a CPU shard; a device's allocator frees them."""
        if not self._host_copies:
            self.buffers.give(list(tensors))

    def _own(self, key: Key, part: int, keep_values: bool = True) -> None:
        """(Under the lock, before `part` of `key` changes in place.) Copy on write: if a snapshot
        holds the tensor, move the key onto a copy (or a blank buffer, when every value is about to
        be overwritten) and retire the leased one."""
        t = key.part(part)
        if not self._leases.retire(t):
            return
        fresh = self.buffers.take(t.numel())
        if keep_values:
            fresh.copy_(t)
        key.replace_part(part, fresh)

    def set_state(self, updates: Sequence[tuple[Key, int, AdamConfig | None, dict[int, torch.Tensor]]],
                  max_versions: Sequence[int | None] = ()) -> list[int]:
        """Overwrite step, options and tensor parts of keys (load_state_dict); returns versions.

        max_versions (one per update, None for none) makes the write conditional: when any key's
        version is above its bound (the state is older than what the key holds) nothing is written and
        FAILED_PRECONDITION (reason ROLLBACK) is raised. Checked and written under one lock hold.
        """
        with self._lock:
            for (key, step, *_), bound in zip(updates, max_versions):
                if bound is not None and key.version > bound:
                    raise RequestError(StatusCode.FAILED_PRECONDITION,
                                       f"key {key.name!r} is at version {key.version}, newer than the state "
                                       f"written (at most version {bound}): writing it would undo "
                                       f"{key.version - bound} applied step(s)", reason=ROLLBACK)
            for key, step, cfg, parts in updates:
                for part, value in parts.items():
                    self._own(key, part, keep_values=False)
                    key.part(part).copy_(value)
                if parts:
                    key.bounds = None  # its next step is checked on a copy
                key.step = step
                if cfg is not None:
                    key.hyper = cfg
            self._changed.notify_all()
            return [key.version for key, *_ in updates]

    def checkpoint_records(self) -> tuple[list[KeyRecord], dict]:
        """Copies of every key and of the dedupe table, taken at one instant (the lock is held for the
        copies only; writing them out happens after, without it). A GPU shard clones on the device
        under the lock (queued, no wait) and moves the clones to host memory outside it."""
        with self._lock:
            records = []
            for key in self._keys.values():
                tensors = {PART_NAMES[part]: self._checkpoint_copy(key.part(part))
                           for part in key.held_parts()}
                records.append(KeyRecord(name=key.name, shape=key.shape, step=key.step,
                                         hyper=dataclasses.asdict(key.hyper) if key.hyper else None,
                                         tensors=tensors, info=dict(key.info)))
            dedupe = self.dedupe.to_json()
        if self._host_copies:
            for r in records:
                r.tensors = {n: _to_host(t) for n, t in r.tensors.items()}
        return records, dedupe

    def _checkpoint_copy(self, t: torch.Tensor) -> torch.Tensor:
        """(Under the lock.) A copy of a key's tensor that no later step changes: on the device when it
        has room (moved to host outside the lock), else on the host at once."""
        if not self._host_copies:
            return t.to("cpu", copy=True)
        try:
            return t.clone()
        except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):  # torch < 2.5: cuda's
            return t.to("cpu", copy=True)

    def restore(self, records: Sequence[KeyRecord], dedupe: dict) -> None:
        """Load keys (and the dedupe table) from a checkpoint into an empty store: all or nothing
        (ValueError, KeyError or TypeError for contents that do not make a valid shard)."""
        with self._lock:
            if self._keys:
                raise RuntimeError("restore needs an empty store")
            keys = {}
            for r in records:
                t = {n: v.to(self.device) for n, v in r.tensors.items()}
                keys[r.name] = Key(name=r.name, shape=tuple(r.shape), param=t["param"],
                                   exp_avg=t["exp_avg"], exp_avg_sq=t["exp_avg_sq"],
                                   max_exp_avg_sq=t.get("max_exp_avg_sq"), step=r.step,
                                   hyper=AdamConfig(**r.hyper) if r.hyper else None, info=dict(r.info))
            self.dedupe.load_json(dedupe)
            self._keys = keys
            self._elements = sum(k.numel for k in keys.values())
            self._changed.notify_all()

    def clear(self) -> None:
        """Empty the store again (a restore whose policy state was refused)."""
        with self._lock:
            self._keys, self._elements = {}, 0
            self.dedupe.load_json({})

    def locked(self):
        """The store's lock, for callers that must read several counters consistently."""
        return self._lock


def _refuse_zero_denominator(e: GradEntry, cfg: AdamConfig) -> None:
    """(eps = 0 only: one pass over the key, before anything changes.) Adam divides m by sqrt(v) + eps;
    with eps = 0, an element whose v stays 0 (its gradient is 0 now and was before) would become NaN
    or Inf. Refuse the push (INVALID_ARGUMENT, naming the key and the element)."""
    k = e.key
    for offset, g in e.pieces:
        stop = offset + g.numel()
        if cfg.weight_decay and not cfg.weight_decouple:
            g = g + cfg.weight_decay * k.param[offset:stop]  # the gradient Adam sees
        zero = (g == 0) & (k.exp_avg_sq[offset:stop] == 0)
        if cfg.amsgrad and k.max_exp_avg_sq is not None:
            zero &= k.max_exp_avg_sq[offset:stop] == 0
        bad = zero.nonzero()
        if bad.numel():
            raise invalid(f"key {k.name!r}: with eps = 0, element {offset + int(bad[0])} (gradient 0, "
                          f"exp_avg_sq 0) would divide by zero and become NaN; use eps > 0")


def grad_bound_from_squares(squares: float) -> float:
    """A bound on max|g| from a float32 sum of g's squares: rounding is monotone, so the computed sum
    is at least the largest square as rounded (>= g^2 (1 - 2^-24)); inf when the sum overflowed."""
    return math.sqrt(squares) * (1 + 2.0 ** -20) if math.isfinite(squares) else math.inf


def _checked_steps(todo: Sequence[tuple[GradEntry, AdamConfig]], copy: Callable[[torch.Tensor], torch.Tensor],
                   give: Callable[[Sequence[torch.Tensor]], None]
                   ) -> list[tuple[Key, dict[int, torch.Tensor], Bounds]]:
    """(Under the lock, before anything changes.) The step of each entry computed on copies of its
    key's tensors (`copy`), with exact bounds from their extremes, all read in one device sync; a
    result that is not finite is refused (INVALID_ARGUMENT naming the key, the part and the element)
    and the copies given back (`give`): the keys stay as they were."""
    if not todo:
        return []
    done, extremes = [], []
    for e, cfg in todo:
        k = e.key
        with INTRA_OP.sized(k.numel):
            # read: max_exp_avg_sq before amsgrad as zeros
            copies = {p: copy(k.read(p)) for p in _kernel_parts(cfg)}
            _adam_on([(e, copies)], cfg, advance=1)  # before the step's increment: its number is step + 1
            # The extremes of every part the key holds after the step (a max_exp_avg_sq this step leaves
            # alone included, for the bounds of a later amsgrad step); NaN and Inf propagate through them.
            measured = dict(copies)
            if not cfg.amsgrad and k.max_exp_avg_sq is not None:
                measured[pb.MAX_EXP_AVG_SQ] = k.max_exp_avg_sq
            extremes += [torch.stack(torch.aminmax(t)) for t in measured.values()]
        done.append((e, cfg, copies, measured))
    values = iter(torch.stack(extremes).tolist())
    out = []
    for e, cfg, copies, measured in done:
        magnitude = {}
        for part, t in measured.items():
            lo, hi = next(values)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                i = int((~torch.isfinite(t)).nonzero()[0])
                give([c for _, _, copies_, _ in done for c in copies_.values()])
                raise invalid(
                    f"key {e.key.name!r}: this step would make {pb.Part.Name(part).lower()} non-finite "
                    f"(first at element {i}; lr {cfg.lr:g}, eps {cfg.eps:g}, weight_decay "
                    f"{cfg.weight_decay:g}, from the key's state and this gradient); refused, the key is "
                    f"unchanged: lower lr or raise eps, or SetState smaller values")
            magnitude[part] = max(-lo, hi)
        out.append((e.key, copies, Bounds(magnitude[pb.PARAM], magnitude[pb.EXP_AVG],
                                          magnitude[pb.EXP_AVG_SQ], magnitude.get(pb.MAX_EXP_AVG_SQ, 0.0))))
    return out


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A checkpoint's device clone in host memory (waits for the copy; called outside the lock)."""
    return t.to("cpu")


def _adam_step(group: Sequence[GradEntry], cfg: AdamConfig) -> None:
    """Adam on the keys' own tensors, for every key of one option set (after their step's increment)."""
    parts = _kernel_parts(cfg)
    _adam_on([(e, {p: e.key.part(p) for p in parts}) for e in group], cfg)  # part(): vmax allocated


def _kernel_parts(cfg: AdamConfig) -> list[int]:
    """The parts a step with these options reads and writes (param last: a checked step reports the
    first non-finite part in this order)."""
    return [pb.EXP_AVG, pb.EXP_AVG_SQ] + ([pb.MAX_EXP_AVG_SQ] if cfg.amsgrad else []) + [pb.PARAM]


def _adam_on(items: Sequence[tuple[GradEntry, dict[int, torch.Tensor]]], cfg: AdamConfig,
             advance: int = 0) -> None:
    """The kernel over the pieces of every (entry, its key's flat tensors by part): its parallel lists
    slice each part at each piece; the step number is the key's step + `advance`. One call, or, in a
    shard process (server/threads.py), one for the small tensors and one for the large."""
    params, grads, ms, vs, vmaxes, steps = [], [], [], [], [], []
    for e, tensors in items:
        for offset, g in e.pieces:
            stop = offset + g.numel()
            params.append(tensors[pb.PARAM][offset:stop])
            grads.append(g)
            ms.append(tensors[pb.EXP_AVG][offset:stop])
            vs.append(tensors[pb.EXP_AVG_SQ][offset:stop])
            if cfg.amsgrad:
                vmaxes.append(tensors[pb.MAX_EXP_AVG_SQ][offset:stop])
            steps.append(e.key.step + advance)
    if not (INTRA_OP.managed and params and params[0].device.type == "cpu"):
        adam_fast(params, grads, ms, vs, vmaxes if cfg.amsgrad else None, steps, cfg)
        return
    # A shard process: small tensors on one thread, large ones on all (server/threads.py); each
    # tensor's update is computed alone, so two calls give what one gives.
    small = [i for i, t in enumerate(params) if t.numel() < PARALLEL_ELEMENTS]
    large = [i for i, t in enumerate(params) if t.numel() >= PARALLEL_ELEMENTS]
    for indices in (small, large):
        if not indices:
            continue
        with INTRA_OP.sized(max(params[i].numel() for i in indices)):
            adam_fast([params[i] for i in indices], [grads[i] for i in indices], [ms[i] for i in indices],
                      [vs[i] for i in indices], [vmaxes[i] for i in indices] if cfg.amsgrad else None,
                      [steps[i] for i in indices], cfg)
