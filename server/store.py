"""A shard's keys: parameters, Adam state, versions and counters, under one lock.

The store owns the tensors and the lock discipline; it calls server/adam.py for the math and does no
network I/O. Every method either changes nothing and raises RequestError, or completes.

Lock discipline (docs/ARCHITECTURE.md): one `threading.Lock` per shard guards every key's tensors,
step and counters. Decoding and validating a request's bytes happen outside it (keys are never
removed and their shapes never change, so a validated key stays valid); under it run only the checks
that read versions, the Adam step over all keys of one push (so a push is atomic over its key set and
no update is lost under concurrent clients), and the copies that snapshot keys for a pull.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import heapq
import json
import math
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Sequence, TextIO

import torch

from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.errors import AHEAD, ROLLBACK, RequestError, StatusCode, invalid
from optserve.hyper import AdamConfig
from optserve.server.adam import adam_fast
from optserve.server.checkpoint import KeyRecord

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


# A key's tensors by wire part (Key.part, Key.replace_part).
_PART_NAMES = {pb.PARAM: "param", pb.EXP_AVG: "exp_avg", pb.EXP_AVG_SQ: "exp_avg_sq",
               pb.MAX_EXP_AVG_SQ: "max_exp_avg_sq"}


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

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def version(self) -> int:
        return self.step

    def part(self, part: int) -> torch.Tensor:
        name = _PART_NAMES.get(part)
        if name is None:
            raise invalid(f"key {self.name!r}: part {part} is not a tensor of a key")
        if part == pb.MAX_EXP_AVG_SQ and self.max_exp_avg_sq is None:
            self.max_exp_avg_sq = torch.zeros_like(self.param)
        return getattr(self, name)

    def replace_part(self, part: int, tensor: torch.Tensor) -> None:
        setattr(self, _PART_NAMES[part], tensor)


@dataclass(frozen=True)
class GradEntry:
    """One key of a decoded push: the gradient as (offset, float32 view) pieces covering the key."""
    key: Key
    version_read: int
    cfg: AdamConfig
    pieces: Sequence[tuple[int, torch.Tensor]]


@dataclass(frozen=True)
class PushResult:
    versions: list[int]
    staleness: list[int]
    dropped: list[str] = field(default_factory=list)


@dataclass
class _Record:
    """One (client_id, seq) in the table: what the push was, and its result (an Event while in flight).
    Results are kept as int64 arrays: a push of many keys costs 16 bytes a key, not ~70 as lists."""
    fingerprint: int | None  # None: unknown (restored from a format-1 checkpoint), any retry matches
    outcome: threading.Event | tuple[array, array, tuple[str, ...]]

    def result(self) -> PushResult:
        versions, staleness, dropped = self.outcome
        return PushResult(versions.tolist(), staleness.tolist(), list(dropped))


class Dedupe:
    """Which pushes, by (client_id, seq), were applied, with their results: each applies at most once.

    A retried push whose original is still in flight waits for it and gets its result; one whose
    original was applied gets the recorded result; one whose original failed is applied anew. A
    retry is the same push: one whose keys, versions or options differ from the original's (its
    `fingerprint`) is refused, since it means two clients share an id. Per client the newest `window`
    results are kept; a seq older than those and not among them is refused rather than risk applying
    it twice. A client with no push for `idle_seconds` is forgotten (retries come within the client's
    retry budget, a minute by default). Pushes without a client id (or with seq 0) are not tracked.
    The table is part of the shard's state: a checkpoint keeps each client's newest `kept` results
    (retries after a restart are of the pushes in flight at the stop) and the floor below them.
    """

    def __init__(self, window: int = 1024, kept: int = 64, idle_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.kept = kept
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, dict[int, _Record]] = {}
        self._floor: dict[str, int] = {}  # per client: the newest seq dropped from the window
        self._done: dict[str, list[int]] = {}  # per client: a min-heap of the seqs with results
        self._last: dict[str, float] = {}  # per client: clock() of its last push
        self._next_sweep = clock() + idle_seconds

    def begin(self, client_id: str, seq: int, fingerprint: int = 0,
              waiting=contextlib.nullcontext) -> PushResult | None:
        """None: the caller applies the push, then calls finish or abort. Else: the original result.

        `waiting()` is entered around the wait for an original still in flight (the data channel
        lends its request slot meanwhile: see service.RequestSlots)."""
        if not client_id or not seq:
            return None
        while True:
            with self._lock:
                self._last[client_id] = self._clock()
                seen = self._clients.setdefault(client_id, {})
                entry = seen.get(seq)
                if entry is None:
                    if seq <= self._floor.get(client_id, 0):
                        raise RequestError(StatusCode.FAILED_PRECONDITION,
                                           f"push {seq} of client {client_id!r} is older than the last "
                                           f"{self.window} this shard remembers; it may have been applied")
                    seen[seq] = _Record(fingerprint, threading.Event())  # in flight
                    return None
                if entry.fingerprint is not None and entry.fingerprint != fingerprint:
                    raise RequestError(StatusCode.FAILED_PRECONDITION,
                                       f"push {seq} of client {client_id!r} differs from the push this shard "
                                       f"took under that seq (other keys, versions or options): do two "
                                       f"clients share the client id?")
                if not isinstance(entry.outcome, threading.Event):
                    return entry.result()
                event = entry.outcome
            with waiting():
                event.wait()  # the original is in flight: its outcome decides

    def finish(self, client_id: str, seq: int, result: PushResult) -> None:
        if not client_id or not seq:
            return
        with self._lock:
            seen = self._clients[client_id]
            record = seen[seq]
            event = record.outcome
            record.outcome = (array("q", result.versions), array("q", result.staleness), tuple(result.dropped))
            done = self._done.setdefault(client_id, [])
            heapq.heappush(done, seq)
            while len(done) > self.window:  # forget the oldest results beyond the window
                old = heapq.heappop(done)
                del seen[old]
                self._floor[client_id] = max(self._floor.get(client_id, 0), old)
            self._sweep()
        event.set()

    def abort(self, client_id: str, seq: int) -> None:
        if not client_id or not seq:
            return
        with self._lock:
            event = self._clients[client_id].pop(seq).outcome
        event.set()

    def forget(self, client_id: str, seq: int) -> None:
        """Drop a finished record: its push counts as never applied (a sync round a restore drops)."""
        with self._lock:
            record = self._clients.get(client_id, {}).pop(seq, None)
            if record is not None and seq in self._done.get(client_id, ()):
                self._done[client_id].remove(seq)
                heapq.heapify(self._done[client_id])

    def _sweep(self) -> None:
        """(Under the lock, at most once per idle_seconds.) Forget clients idle that long, unless a
        push of theirs is in flight."""
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.idle_seconds
        for client, last in list(self._last.items()):
            seen = self._clients.get(client, {})
            if now - last >= self.idle_seconds and not any(
                    isinstance(r.outcome, threading.Event) for r in seen.values()):
                for table in (self._clients, self._floor, self._done, self._last):
                    table.pop(client, None)

    def __len__(self) -> int:
        """Clients remembered."""
        return len(self._clients)

    def to_json(self) -> dict:
        """Each client's newest `kept` finished records, and the floor below them (in-flight ones are
        not applied yet)."""
        with self._lock:
            clients, floor = {}, dict(self._floor)
            for c, seen in self._clients.items():
                done = sorted(s for s, r in seen.items() if not isinstance(r.outcome, threading.Event))
                if not done and c not in floor:
                    continue  # a client whose pushes were all refused: nothing to remember
                cut = len(done) - self.kept
                in_flight = [s for s, r in seen.items() if isinstance(r.outcome, threading.Event)]
                if in_flight:  # the floor stays below a push in flight: after a restart it is retried
                    cut = min(cut, bisect.bisect_left(done, min(in_flight)))
                if cut > 0:
                    floor[c] = max(floor.get(c, 0), done[cut - 1])
                clients[c] = {str(s): {"fp": seen[s].fingerprint, **dataclasses.asdict(seen[s].result())}
                              for s in done[max(cut, 0):]}
            return {"floor": floor, "clients": clients}

    def load_json(self, data: dict) -> None:
        floor = {str(c): int(f) for c, f in data.get("floor", {}).items()}
        clients = {str(c): {int(s): _Record(None if r.get("fp") is None else int(r["fp"]),
                                            (array("q", r["versions"]), array("q", r["staleness"]),
                                             tuple(str(d) for d in r["dropped"])))
                            for s, r in seen.items()}
                   for c, seen in data.get("clients", {}).items()}
        now = self._clock()
        with self._lock:
            self._floor, self._clients = floor, clients
            self._done = {c: sorted(seen) for c, seen in clients.items()}  # a sorted list is a heap
            self._last = {c: now for c in clients}


@dataclass(frozen=True)
class StoreLimits:
    max_keys: int = 1 << 20
    max_tensor_elements: int = 1 << 34
    max_shard_elements: int = 1 << 36


class BufferPool:
    """Reusable flat float32 host buffers, by size: staging for pushed gradients and pull snapshots.

    A large tensor that is freed goes back to the OS, and a fresh one costs a page fault per 4 KiB on
    first touch (~3 GB/s here, against ~40 GB/s into warm memory: ../shared/ANCHORS.md). Reusing
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


@dataclass(frozen=True)
class Snapshot:
    """Keys as they were at one instant: their versions, options, and copies of the parts asked for."""
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
                 apply_log: TextIO | None = None):
        self.device = torch.device(device)
        # One JSON line per applied push, written under the lock: the exact order of updates, so a
        # run can be replayed (tests/system) or audited.
        self.apply_log = apply_log
        self.limits = limits
        self._keys: dict[str, Key] = {}
        self._elements = 0
        self.buffers = BufferPool(self.device, lambda: 2 * self._elements)
        self._leases: dict[int, list] = {}  # id(tensor) -> [tensor, snapshots reading it, retired]
        self.dedupe = Dedupe()
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

    def create(self, items: Sequence[tuple[str, tuple[int, ...], torch.Tensor, dict]]) -> list[tuple[Key, bool]]:
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
                self._keys[name] = key
                self._elements += key.numel
                out.append((key, True))
            return out

    # -- the update -------------------------------------------------------------------------------

    def apply(self, entries: Sequence[GradEntry],
              decide: Callable[[Key, int, AdamConfig], AdamConfig] | None = None,
              origin: tuple[str, int] = ("", 0)) -> PushResult:
        """One Adam step on every key of a push, atomically; returns versions and staleness.

        decide(key, staleness, cfg) lets the policy refuse a push (raise RequestError) or change the
        options of a step (ssp's lr scaling); it runs for every entry before anything changes.
        origin (client_id, seq) is recorded in the dedupe table under the same lock as the step, so a
        checkpoint holds a push's effect exactly when it holds its record.
        """
        with self._lock:
            configs = []
            for e in entries:
                if e.version_read > e.key.version:
                    raise RequestError(StatusCode.FAILED_PRECONDITION,
                                       f"key {e.key.name!r}: gradient computed from version "
                                       f"{e.version_read}, ahead of the shard's version {e.key.version}; "
                                       f"pull again", reason=AHEAD)
                s = e.key.version - e.version_read
                configs.append(decide(e.key, s, e.cfg) if decide is not None else e.cfg)
            staleness = []
            groups: dict[AdamConfig, list[GradEntry]] = {}
            for e, cfg in zip(entries, configs):
                s = e.key.version - e.version_read
                staleness.append(s)
                e.key.staleness.record(s)
                e.key.step += 1
                e.key.pushes += 1
                e.key.hyper = cfg
                groups.setdefault(cfg, []).append(e)
            self.staleness.record(max(staleness))  # per push: how far behind its oldest key was
            if self._leases:  # a pull is sending some tensors from their keys: never write those
                for e in entries:
                    for part in (pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ) + ((pb.MAX_EXP_AVG_SQ,)
                                                                        if e.key.max_exp_avg_sq is not None else ()):
                        self._own(e.key, part)
            for cfg, group in groups.items():
                _adam_step(group, cfg)
            self.pushes += 1
            self._changed.notify_all()
            result = PushResult([e.key.version for e in entries], staleness)
            if self.apply_log is not None:
                self.apply_log.write(json.dumps({
                    "client_id": origin[0], "seq": origin[1], "keys": [e.key.name for e in entries],
                    "version_read": [e.version_read for e in entries], "versions": result.versions,
                    "lr": [cfg.lr for cfg in configs]}) + "\n")
                self.apply_log.flush()
            self.dedupe.finish(*origin, result)
            return result

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
        GPU shard: the parts are copied to host buffers (the network needs host memory anyway)."""
        if self.device.type != "cpu":
            buffers = {(i, part): self.buffers.take(k.numel) for i, k in enumerate(keys) for part in parts}
        with self._lock:
            if self.device.type == "cpu":
                views = {}
                for i, k in enumerate(keys):
                    for part in parts:
                        t = k.part(part)
                        lease = self._leases.setdefault(id(t), [t, 0, False])  # tensor, leases, retired
                        lease[1] += 1
                        views[(i, part)] = t
            else:
                views = buffers
                for (i, part), buf in buffers.items():
                    buf.copy_(keys[i].part(part))  # to host; from a GPU this copy is synchronous
            self.pulls += 1
            return Snapshot(list(keys), [k.version for k in keys], [k.step for k in keys],
                            [k.hyper for k in keys], views)

    def release(self, snapshot: Snapshot) -> None:
        """The snapshot's tensors are no longer read (sent, or the send failed)."""
        if self.device.type != "cpu":
            self.buffers.give(list(snapshot.parts.values()))
            return
        retired = []
        with self._lock:
            for t in snapshot.parts.values():
                lease = self._leases[id(t)]
                lease[1] -= 1
                if lease[1] == 0:
                    del self._leases[id(t)]
                    if lease[2]:
                        retired.append(t)
        self.buffers.give(retired)

    def _own(self, key: Key, part: int, keep_values: bool = True) -> None:
        """(Under the lock, before `part` of `key` changes in place.) Copy on write: if a snapshot
        holds the tensor, move the key onto a copy (or a blank buffer, when every value is about to
        be overwritten) and retire the leased one."""
        t = key.part(part)
        lease = self._leases.get(id(t))
        if lease is None:
            return
        fresh = self.buffers.take(t.numel())
        if keep_values:
            fresh.copy_(t)
        key.replace_part(part, fresh)
        lease[2] = True

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
                key.step = step
                if cfg is not None:
                    key.hyper = cfg
            self._changed.notify_all()
            return [key.version for key, *_ in updates]

    def checkpoint_records(self) -> tuple[list[KeyRecord], dict]:
        """Copies of every key and of the dedupe table, taken at one instant (the lock is held for the
        copies only; writing them out happens after, without it)."""
        with self._lock:
            records = []
            for key in self._keys.values():
                tensors = {"param": key.param.to("cpu", copy=True), "exp_avg": key.exp_avg.to("cpu", copy=True),
                           "exp_avg_sq": key.exp_avg_sq.to("cpu", copy=True)}
                if key.max_exp_avg_sq is not None:
                    tensors["max_exp_avg_sq"] = key.max_exp_avg_sq.to("cpu", copy=True)
                records.append(KeyRecord(name=key.name, shape=key.shape, step=key.step,
                                         hyper=dataclasses.asdict(key.hyper) if key.hyper else None,
                                         tensors=tensors, info=dict(key.info)))
            return records, self.dedupe.to_json()

    def restore(self, records: Sequence[KeyRecord], dedupe: dict) -> None:
        """Load keys (and the dedupe table) from a checkpoint into an empty store: all or nothing
        (ValueError, KeyError or TypeError for contents that do not make a valid shard)."""
        with self._lock:
            if self._keys:
                raise RuntimeError("restore needs an empty store")
            keys = {}
            for r in records:
                t = {n: v.to(self.device) for n, v in r.tensors.items()}
                keys[r.name] = Key(name=r.name, shape=tuple(r.shape), param=t["param"], exp_avg=t["exp_avg"],
                                   exp_avg_sq=t["exp_avg_sq"], max_exp_avg_sq=t.get("max_exp_avg_sq"),
                                   step=r.step, hyper=AdamConfig(**r.hyper) if r.hyper else None,
                                   info=dict(r.info))
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


def _adam_step(group: Sequence[GradEntry], cfg: AdamConfig) -> None:
    """Build the kernel's parallel lists from the pieces of every key of one option set."""
    params, grads, ms, vs, vmaxes, steps = [], [], [], [], [], []
    for e in group:
        k = e.key
        if cfg.amsgrad and k.max_exp_avg_sq is None:
            k.max_exp_avg_sq = torch.zeros_like(k.param)
        for offset, g in e.pieces:
            stop = offset + g.numel()
            params.append(k.param[offset:stop])
            grads.append(g)
            ms.append(k.exp_avg[offset:stop])
            vs.append(k.exp_avg_sq[offset:stop])
            if cfg.amsgrad:
                vmaxes.append(k.max_exp_avg_sq[offset:stop])
            steps.append(k.step)
    adam_fast(params, grads, ms, vs, vmaxes if cfg.amsgrad else None, steps, cfg)
