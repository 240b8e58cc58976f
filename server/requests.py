"""The shard's request core: what every request does, whichever door it came through.

Both doors, the gRPC servicer (server/service.py) and the data channel (server/data.py), hand a
request here as (first message, receive) and send back what comes out; neither knows the store or
the policy. Each handler parses and validates the whole request (keys, shapes, options, segments,
NaN/Inf) before anything changes, then hands it on (policy -> store): a refused request raises
RequestError (optserve/errors.py) and leaves the shard exactly as it was. Exactly-once is
`Dedupe.run_once` (server/dedupe.py). No math happens here, no tensor is kept, no grpc is imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from optserve import __version__
from optserve.errors import TIMEOUT, RequestError, StatusCode, invalid
from optserve.frames import whole_segments
from optserve.hyper import MAX_STEP
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import (DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES, STATE_PARTS, Expected, Outgoing,
                            dtype_from_proto, dtype_to_proto, hyper_from_proto, hyper_to_proto)
from optserve.server.dedupe import Origin, PushResult
from optserve.server.policy import Policy
from optserve.server.store import GradEntry, Key, Store, grad_bound_from_squares
from optserve.server.threads import INTRA_OP

log = logging.getLogger("optserve.server")

PROTOCOL = "optserve.v1"
MAX_NAME_LENGTH = 1024
MAX_CLIENT_ID_LENGTH = 256  # the exactly-once table keeps a client's id for an hour after its last push
MAX_DIMS = 64  # torch's own limit on a tensor's dimensions
# How a handler receives a request's tensors, whatever carried them (a gRPC stream, the data
# channel): receive(expected, dests) validates the segments against `expected` and fills the flat
# float32 host tensors `dests`, converting from the wire dtype; RequestError when anything is wrong.
Receive = Callable[[dict[tuple[int, int], Expected], dict[tuple[int, int], torch.Tensor]], None]


@dataclass(frozen=True)
class ShardInfo:
    shard_index: int = 0
    num_shards: int = 1
    policy: str = "async"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    wait_timeout: float = 60.0  # longest a call waits for a version (sync steps, min_versions)


@dataclass(frozen=True)
class PullReply:
    """What a pull sends back, as of one instant (Store.snapshot: copy on write): the reply's head and
    its tensors. `release()` once they are sent, or the send failed."""
    head: pb.PullHead
    items: list[Outgoing]
    dtype: torch.dtype  # of PARAM on the wire (state travels as float32)
    release: Callable[[], None]
    # A replicated push's reply made before the backup answered (push_pull(provisional=True)): the
    # door sends it, then calls this (always, once), which waits for the backup and raises the error
    # to answer instead of the acknowledgement. None: the reply is the acknowledgement.
    commit: Callable[[], None] | None = None


class RequestSlots:
    """How many requests the data channel works on at once (server/data.py): one thread per
    connection, but on CPython the handlers share one GIL, and many threads passing it to and fro
    cost more than they overlap (docs/MEASUREMENTS.md). A request holds a slot from its header to
    its reply, except while it waits: on other requests (a sync round, min_versions, a retry's
    original), or on a peer that stalls (server/data.py's _Peer). Then the slot is lent out
    (`lent`), so waiting can never starve the requests it waits for, and a stopped worker keeps no
    slot. Threads that hold no slot (gRPC's) pass through `lent` unchanged."""

    def __init__(self, slots: int):
        # The free slots as tokens in a queue: C code takes and gives them. threading.Semaphore is
        # Python code around a Condition; under eight workers its release (Condition.notify) held
        # the GIL for 15% of the shard's samples (docs/MEASUREMENTS.md).
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(slots):
            self._free.put(None)
        self._local = threading.local()

    @contextlib.contextmanager
    def held(self):
        self._free.get()
        self._local.held = True
        try:
            yield
        finally:
            self._local.held = False
            self._free.put(None)

    @contextlib.contextmanager
    def lent(self):
        if not getattr(self._local, "held", False):
            yield
            return
        self._local.held = False
        self._free.put(None)
        try:
            yield
        finally:
            self._free.get()
            self._local.held = True


class Counters:
    """What the doors count: bytes in and out, refusals by code, duplicates, data-channel calls."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes_in = self.bytes_out = self.rejected = self.duplicates = 0
        self.data_calls = 0  # Push / Pull / PushPull requests that came over the data channel
        self._rejected: dict[str, int] = {}

    def add(self, bytes_in: int = 0, bytes_out: int = 0, duplicates: int = 0, data_calls: int = 0) -> None:
        with self._lock:
            self.data_calls += data_calls
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out
            self.duplicates += duplicates

    def refused(self, code: StatusCode) -> None:
        with self._lock:
            self.rejected += 1
            self._rejected[code.name] = self._rejected.get(code.name, 0) + 1

    def rejected_by_code(self) -> dict[str, int]:
        with self._lock:
            return dict(self._rejected)


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda's


def _device_memory(method: Callable) -> Callable:
    """A request that runs the shard's device out of memory is RESOURCE_EXHAUSTED, not UNKNOWN. The
    store allocates before it changes anything (Store.create, Store.apply), so such a request leaves
    the keys as they were."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OUT_OF_MEMORY as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"{method.__name__}: the shard's device ({self.store.device}) is out of "
                               f"memory: {first}") from None

    return guarded


class RequestCore:
    """The requests of optserve.v1.OptServe over one shard's store and policy, transport-neutral."""

    def __init__(self, store: Store, policy: Policy, info: ShardInfo, checkpointer=None, metrics=None):
        self.store = store
        self.policy = policy
        self.info = info
        self.checkpointer = checkpointer  # server.main.Checkpointer, when run with a checkpoint dir
        self.metrics = metrics  # server.metrics.ShardMetrics
        self.counters = Counters()
        # Cleared while a checkpoint is restored: calls get UNAVAILABLE (clients retry) meanwhile.
        self.ready = threading.Event()
        self.ready.set()
        self.not_ready = "the shard is restoring a checkpoint"  # what callers are told meanwhile
        self.data_port = 0  # the data channel's port, announced in Hello (server/data.py); 0: none
        self.slots = RequestSlots(max(2, os.cpu_count() or 2))  # held by data-channel requests only
        # Calls that may block at once waiting for versions (0: unbounded). The gRPC door sets it to
        # half its threads for tensors, so waits never take every thread a push needs to end them,
        # and `max_waits_per_caller` to half of that, so one caller (a door's name for its peer: a gRPC
        # connection) cannot take them all (0: no per-caller bound).
        self.max_waits = 0
        self.max_waits_per_caller = 0
        self._waits = 0
        self._waits_by: dict[str, int] = {}
        self._waits_lock = threading.Lock()
        # server/replication.py's Replicator when this shard is one of replicas (None: the only copy):
        # it gates the workers' requests (only the primary takes them) and orders and forwards every
        # state change (`_replicated`); on the backup, forwarded changes come in through `push`,
        # `register` and `set_state` with forwarded=True.
        self.replication = None

    def check_ready(self) -> None:
        if not self.ready.is_set():
            raise RequestError(StatusCode.UNAVAILABLE, self.not_ready)

    def _gate(self, forwarded: bool = False, read: bool = False) -> None:
        """A worker's request on a replica that is not the serving primary (a read: on one that is
        neither primary nor backup, whose state is not the shard's): UNAVAILABLE, not_primary."""
        if self.replication is not None and not forwarded:
            self.replication.check_serving(read)

    def _replicated(self, op: str, request: Callable[[], tuple], local: Callable, forwarded: bool,
                    commit: bool = True):
        """`local()` (a state change), in the replicas' order and forwarded to the backup: (its result,
        None), or (its result, the error to answer instead: the backup was not reached, this replica
        is deposed). `request()` gives what is forwarded: (message, tensors[, what the forward's header
        adds]), the tensors kept by the caller until the backup answered. With commit=False it does not
        wait for that: (its result, what to pass to `replication.commit` before acknowledging)."""
        if self.replication is None or forwarded:
            return local(), None
        message, items, *header = request()
        message.segments.extend(whole_segments(items))
        result, sent = self.replication.apply(op, message.SerializeToString(), items, local, *header)
        return result, (self.replication.commit(sent) if commit else sent)

    def stop_serving(self, why: str) -> None:
        """Refuse new calls with UNAVAILABLE, and end the waits of calls in flight the same way."""
        self.not_ready = why
        self.ready.clear()
        self.store.wake()

    def refused(self, method: str, exc: RequestError) -> None:
        self.counters.refused(exc.code)
        log.info("refused %s: %s: %s", method, exc.code.name, exc.message)

    # -- helpers ---------------------------------------------------------------------------------

    def _keys(self, names: Sequence[str]) -> list[Key]:
        _check_names(names)
        _unique(names)
        return [self.store.get(n) for n in names]

    def _staging(self, expected: dict[tuple[int, int], Expected]) -> dict[tuple[int, int], torch.Tensor]:
        """Receive buffers for Register/SetState values: on a GPU shard the pool's pinned staging, as
        for pushes (given back by `_unstage`), else fresh host tensors (a CPU shard keeps them)."""
        if self.store.device.type == "cpu":
            return _host_buffers(expected)
        return {k: _allocate(lambda: self.store.buffers.take(e.numel), e) for k, e in expected.items()}

    def _unstage(self, dests: dict[tuple[int, int], torch.Tensor]) -> None:
        if self.store.device.type != "cpu":
            self.store.buffers.give(list(dests.values()))

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """A float32 host tensor on the shard's device (itself on a CPU shard)."""
        if self.store.device.type == "cpu":
            return t
        # From pinned memory (BufferPool) the copy is asynchronous, ordered before the Adam step on
        # the same stream; torch's caching host allocator keeps the block until it is done.
        return t.to(self.store.device, non_blocking=True)

    def snapshot(self, keys: Sequence[Key], parts: Sequence[int], dtype: torch.dtype,
                 push: pb.PushReply | None = None) -> PullReply:
        """Keys' parts as of one instant (Store.snapshot: copy on write), ready to send."""
        snap = self.store.snapshot(keys, parts)
        infos = [pb.KeyInfo(key=k.name, shape=k.shape, version=v, step=st,
                            hyper=hyper_to_proto(h) if h else None, param=k.info.get("param", ""),
                            param_shape=k.info.get("param_shape", ()), offset=k.info.get("offset", 0))
                 for k, v, st, h in zip(snap.keys, snap.versions, snap.steps, snap.hypers)]
        head = pb.PullHead(entries=infos, dtype=dtype_to_proto(dtype), push=push)
        items = [Outgoing(i, part, t) for (i, part), t in snap.parts.items()]
        return PullReply(head, items, dtype, lambda: self.store.release(snap))

    # -- requests --------------------------------------------------------------------------------

    def hello(self) -> pb.HelloReply:
        i = self.info
        return pb.HelloReply(
            server_version=__version__, protocol=PROTOCOL, shard_index=i.shard_index,
            num_shards=i.num_shards, policy=i.policy, device=str(self.store.device),
            num_keys=len(self.store), data_port=self.data_port,
            limits=pb.Limits(max_message_bytes=i.max_message_bytes, chunk_bytes=i.chunk_bytes,
                             max_keys=self.store.limits.max_keys,
                             max_tensor_elements=self.store.limits.max_tensor_elements),
            replication=self.replication.describe() if self.replication is not None else None)

    @_device_memory
    def register(self, first: pb.RegisterRequest, receive: Receive,
                 forwarded: bool = False) -> pb.RegisterReply:
        """Create keys (all or none) with the values sent, or, without values, say which exist."""
        self._gate(forwarded)
        head = first.head
        if (head.shard_index, head.num_shards) != (self.info.shard_index, self.info.num_shards):
            raise RequestError(StatusCode.FAILED_PRECONDITION,
                               f"this is shard {self.info.shard_index} of {self.info.num_shards}; the "
                               f"request is addressed to shard {head.shard_index} of {head.num_shards}")
        specs, infos = [], []
        _check_names([k.name for k in head.keys])
        _unique([k.name for k in head.keys])
        for k in head.keys:
            if not k.name or len(k.name) > MAX_NAME_LENGTH:
                raise invalid(f"key name must be 1..{MAX_NAME_LENGTH} characters, got {len(k.name)}")
            if k.dtype != pb.FLOAT32:
                dtype = pb.DType.Name(k.dtype) if k.dtype in pb.DType.values() else k.dtype
                raise invalid(f"key {k.name!r}: dtype {dtype} is not supported; keys are FLOAT32")
            # Provenance (param, param_shape, offset) is kept for ever and echoed in every pull's head
            # and every manifest: bounded like the name, and it must describe where the key sits.
            if len(k.param) > MAX_NAME_LENGTH:
                raise invalid(f"key {k.name!r}: param name must be at most {MAX_NAME_LENGTH} characters, "
                              f"got {len(k.param)}")
            if len(k.shape) > MAX_DIMS or len(k.param_shape) > MAX_DIMS:
                raise invalid(f"key {k.name!r}: shapes have at most {MAX_DIMS} dimensions")
            shape = tuple(int(d) for d in k.shape)
            if k.param and k.param_shape and k.offset + math.prod(shape) > math.prod(k.param_shape):
                raise invalid(f"key {k.name!r}: elements {k.offset}..{k.offset + math.prod(shape)} lie "
                              f"outside its parameter {k.param!r} of shape {list(k.param_shape)}")
            specs.append((k.name, shape, self.store.check_spec(k.name, shape)))
            infos.append({"param": k.param or k.name,
                          "param_shape": list(k.param_shape) if k.param else list(shape),
                          "offset": int(k.offset)})
        if not head.with_values:
            try:
                receive({}, {})  # nothing may follow the head
            except RequestError:
                raise invalid("Register without values must not carry segments") from None
            return pb.RegisterReply(keys=[pb.KeyStatus(name=n, exists=key is not None,
                                                       version=key.version if key else 0)
                                          for n, _, key in specs])
        self.store.check_capacity([(n, s) for n, s, _ in specs])
        expected = {(i, pb.PARAM): Expected(math.prod(s), torch.float32, n)
                    for i, (n, s, _) in enumerate(specs)}
        dests = self._staging(expected)
        receive(expected, dests)
        values = []
        for i, (name, shape, _) in enumerate(specs):
            value = dests[(i, pb.PARAM)]
            check_finite(name, "initial value", value)
            values.append((name, shape, self._on_device(value), infos[i]))
        result, failed = self._replicated(
            "register", lambda: (pb.RegisterRequest(head=head),
                                 [Outgoing(i, pb.PARAM, v) for i, (_, _, v, _) in enumerate(values)]),
            lambda: self.store.create(values), forwarded)
        self._unstage(dests)
        if failed is not None:
            raise failed
        created = [n for (key, c), (n, _, _) in zip(result, specs) if c]
        if created:
            log.info("registered %d keys (%s%s)", len(created), ", ".join(created[:3]),
                     ", ..." if len(created) > 3 else "")
        return pb.RegisterReply(keys=[pb.KeyStatus(name=key.name, exists=True, created=c, version=key.version)
                                      for key, c in result])

    def _decode_push(self, first: pb.PushRequest, receive: Receive, staging: list[torch.Tensor],
                     bounds: Sequence[float] | None = None) -> tuple[pb.PushHead, list[GradEntry]]:
        """Validate a push and receive its gradients into pool buffers appended to `staging`. With
        `bounds` (a forwarded push: the primary checked its gradients) the NaN/Inf check is not run
        again; the bounds it found go to the overflow guard as they are, so both replicas decide alike."""
        head = first.head
        if bounds is not None and (len(bounds) != len(head.entries) or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and b >= 0 for b in bounds)):
            raise invalid(f"a forwarded push's gradient bounds must be {len(head.entries)} numbers >= 0")
        if len(head.client_id) > MAX_CLIENT_ID_LENGTH:
            raise invalid(f"client_id has {len(head.client_id)} characters; at most {MAX_CLIENT_ID_LENGTH}")
        _check_names(head.pull_keys)
        wire = dtype_from_proto(head.wire_dtype, default=torch.float32)
        keys = self._keys([e.key for e in head.entries])
        configs = [hyper_from_proto(h, f"hyper[{i}]") for i, h in enumerate(head.hyper)]
        for e in head.entries:
            if e.hyper >= len(configs):
                raise invalid(f"key {e.key!r}: hyper index {e.hyper} out of range ({len(configs)} sets sent)")
        expected = {(i, pb.GRAD): Expected(k.numel, wire, k.name) for i, k in enumerate(keys)}
        dests = {}
        for (i, part), e in expected.items():
            # float32: the copy converts bf16/fp16
            dests[(i, part)] = _allocate(lambda: self.store.buffers.take(e.numel), e)
            staging.append(dests[(i, part)])
        receive(expected, dests)
        entries = []
        for i, (e, key) in enumerate(zip(head.entries, keys)):
            grad = dests[(i, pb.GRAD)]
            # The check gives the overflow guard the gradient's bound (server/store.py), which it would
            # otherwise compute from its squares.
            bound = float(bounds[i]) if bounds is not None else \
                check_finite(key.name, "gradient", grad, squares=True)
            entries.append(GradEntry(key=key, version_read=e.version_read, cfg=configs[e.hyper],
                                     pieces=[(0, self._on_device(grad))], grad_bound=bound))
        return head, entries

    def _submit(self, head: pb.PushHead, entries: Sequence[GradEntry],
                forwarded: bool = False) -> tuple[pb.PushReply, Callable[[], None]]:
        """Hand a push to the policy once per (client_id, seq); a retry gets the original's result.
        Returns the reply and what to call before it is acknowledged (with the gradients still held:
        they are forwarded from): on a replicated shard it waits for the backup, and raises the error
        to answer instead when the backup did not apply the push (or, for a retry, its original)."""
        # What makes a retry the same push: its keys, the versions they were read at, the options.
        fingerprint = zlib.crc32(pb.PushHead(entries=head.entries, hyper=head.hyper).SerializeToString())
        sent: list = []  # what replication.commit waits for

        def apply(origin: Origin) -> PushResult:
            start = time.perf_counter()
            # The store (or the sync policy) records the result under the lock that applies it.
            def forward() -> tuple[pb.PushRequest, list[Outgoing], dict]:  # float32, from the staging buffers
                return (pb.PushRequest(head=pb.PushHead(client_id=head.client_id, seq=head.seq,
                                                        wire_dtype=pb.FLOAT32, entries=head.entries,
                                                        hyper=head.hyper)),
                        [Outgoing(i, pb.GRAD, e.pieces[0][1]) for i, e in enumerate(entries)],
                        {"bounds": [e.grad_bound for e in entries]})

            result, pending = self._replicated(
                "push", forward, lambda: self.policy.submit(self.store, entries, origin), forwarded,
                commit=False)
            sent.append(pending)
            if self.metrics is not None:
                self.metrics.update_seconds.observe(time.perf_counter() - start)
            return result

        result, duplicate = self.store.dedupe.run_once(head.client_id, head.seq, fingerprint, apply,
                                                       self.slots.lent, keys=len(entries))

        def commit() -> None:
            if self.replication is None or forwarded:
                return
            if duplicate:  # its original may still be in flight to the backup
                self.replication.settled()
            else:
                error = self.replication.commit(sent[0])
                if error is not None:  # applied and recorded here, but not on the backup
                    raise error
            # A duplicate's original may have failed to reach the backup: then this replica is deposed.
            self._gate()

        if duplicate:
            self.counters.add(duplicates=1)
            return pb.PushReply(versions=result.versions, staleness=result.staleness,
                                dropped=result.dropped, duplicate=True), commit
        return pb.PushReply(versions=result.versions, staleness=result.staleness,
                            dropped=result.dropped), commit

    @contextlib.contextmanager
    def _waiting(self, caller: str = ""):
        """One of `max_waits` places to block in, and of `max_waits_per_caller` for `caller` (when
        named); UNAVAILABLE (retried) when none is free."""
        with self._waits_lock:
            if self.max_waits and self._waits >= self.max_waits:
                raise RequestError(StatusCode.UNAVAILABLE,
                                   f"the shard is busy: {self._waits} calls are waiting for versions "
                                   f"already (at most {self.max_waits}); retry")
            mine = self._waits_by.get(caller, 0)
            if caller and self.max_waits_per_caller and mine >= self.max_waits_per_caller:
                raise RequestError(StatusCode.UNAVAILABLE,
                                   f"the shard is busy: {mine} calls of this caller are waiting for versions "
                                   f"already (at most {self.max_waits_per_caller} per caller); retry")
            self._waits += 1
            if caller:
                self._waits_by[caller] = mine + 1
        try:
            yield
        finally:
            with self._waits_lock:
                self._waits -= 1
                if caller:
                    self._waits_by[caller] -= 1
                    if not self._waits_by[caller]:
                        del self._waits_by[caller]

    def _wait(self, keys: Sequence[Key], minimum: Sequence[int], alive: Callable[[], bool],
              caller: str = "") -> None:
        """Block until the keys reach these versions (a sync step); ABORTED after the wait timeout.
        `alive()` false (the caller went away; the door wakes the store then) ends the wait at once."""
        if all(k.version >= m for k, m in zip(keys, minimum)):
            return
        with self._waiting(caller), self.slots.lent():
            reached = self.store.wait_versions(keys, minimum, self.info.wait_timeout,
                                               stop=lambda: not self.ready.is_set() or not alive())
        if not alive():
            raise RequestError(StatusCode.CANCELLED, "the caller went away while waiting")
        self.check_ready()  # a stopping shard ends its waits at once: UNAVAILABLE, retried
        if not reached:
            behind = [k for k, m in zip(keys, minimum) if k.version < m]
            raise RequestError(StatusCode.ABORTED,
                               f"waited {self.info.wait_timeout:g} s for version "
                               f"{minimum[keys.index(behind[0])]} of key {behind[0].name!r}: "
                               f"{self.policy.describe_wait(behind[0])}",
                               reason=TIMEOUT)

    @_device_memory
    def push(self, first: pb.PushRequest, receive: Receive, forwarded: bool = False,
             bounds: Sequence[float] | None = None) -> pb.PushReply:
        """A push: validate, receive, apply once (`forwarded`: the primary's, on its backup, with the
        `bounds` on its gradients the primary's check found)."""
        self._gate(forwarded)
        staging: list[torch.Tensor] = []
        try:
            head, entries = self._decode_push(first, receive, staging, bounds)
            if not entries:
                raise invalid("a Push must carry at least one key")
            reply, commit = self._submit(head, entries, forwarded)
            commit()
            return reply
        finally:
            self.store.buffers.give(staging)

    @_device_memory
    def push_pull(self, first: pb.PushRequest, receive: Receive, alive: Callable[[], bool] = lambda: True,
                  caller: str = "", provisional: bool = False) -> PullReply:
        """A push (possibly of no keys), then the pull of its keys and `pull_keys`, after the policy's
        wait (sync: until the step the push joined has been taken). `provisional` (a door that can
        send a reply before its acknowledgement: the data channel): on a replicated shard under a
        policy that does not wait, the reply is made without waiting for the backup, and carries the
        wait (`PullReply.commit`)."""
        self._gate()
        staging: list[torch.Tensor] = []
        commit = None  # (provisional) the backup's answer to wait for; the staging is kept till then
        try:
            head, entries = self._decode_push(first, receive, staging)
            pull_names = list(dict.fromkeys([e.key for e in head.entries] + list(head.pull_keys)))
            pull_keys = [self.store.get(n) for n in pull_names]
            dtype = dtype_from_proto(head.pull_dtype, default=torch.float32)
            reply = None
            if entries:
                reply, pending = self._submit(head, entries)
                # (under a policy that waits, the round takes longer than the backup: no reply to
                # overlap, and the gradients are not kept through the wait)
                if provisional and self.replication is not None and not self.policy.waits:
                    commit = pending
                else:
                    pending()
        finally:
            if commit is None:
                self.store.buffers.give(staging)
        if commit is None:
            return self._pulled(reply, entries, pull_keys, dtype, alive, caller)

        def settle() -> None:
            try:
                commit()
            finally:
                self.store.buffers.give(staging)

        try:
            return dataclasses.replace(self._pulled(reply, entries, pull_keys, dtype, alive, caller),
                                       commit=settle)
        except BaseException:
            with contextlib.suppress(RequestError):
                settle()
            raise

    def _pulled(self, reply: pb.PushReply | None, entries: Sequence[GradEntry], pull_keys: Sequence[Key],
                dtype: torch.dtype, alive: Callable[[], bool], caller: str) -> PullReply:
        """A PushPull's pull: after the policy's wait for the step its push joined, the snapshot."""
        if reply is not None and self.policy.waits:
            stepped = [e for e in entries if e.key.name not in set(reply.dropped)]
            self._wait([e.key for e in stepped], [e.version_read + 1 for e in stepped], alive, caller)
        return self.snapshot(pull_keys, [pb.PARAM], dtype, reply)

    @_device_memory
    def pull(self, request: pb.PullRequest, alive: Callable[[], bool] = lambda: True,
             caller: str = "") -> PullReply:
        """Validate a pull, wait for its min_versions, and snapshot what it asks for."""
        self._gate(read=True)
        keys = self._keys(list(request.keys))
        parts = _state_parts(request.parts) or [pb.PARAM]
        dtype = dtype_from_proto(request.dtype, default=torch.float32)
        if dtype != torch.float32 and parts != [pb.PARAM]:
            raise invalid("Adam state travels as FLOAT32; ask for another dtype with parts=[PARAM] only")
        if request.min_versions:
            if len(request.min_versions) != len(keys):
                raise invalid(f"min_versions has {len(request.min_versions)} values for {len(keys)} keys")
            for key, m in zip(keys, request.min_versions):
                # A key moves one version per step: a wait is for the next one at most (the one a
                # push in flight or a sync round makes). Further is unreachable: refused, not waited on.
                if m > key.version + 1:
                    raise RequestError(StatusCode.FAILED_PRECONDITION,
                                       f"key {key.name!r} is at version {key.version}; a pull waits for at "
                                       f"most the next version ({key.version + 1}), not {m}")
            self._wait(keys, list(request.min_versions), alive, caller)
        return self.snapshot(keys, parts, dtype)

    @_device_memory
    def set_state(self, first: pb.SetStateRequest, receive: Receive,
                  forwarded: bool = False) -> pb.SetStateReply:
        """Overwrite keys' step, options and parts (load_state_dict), conditionally on max_version."""
        self._gate(forwarded)
        head = first.head
        keys = self._keys([e.key for e in head.entries])
        for e in head.entries:
            if e.step > MAX_STEP:
                raise invalid(f"key {e.key!r}: step {e.step} is past the highest step a key may reach, "
                              f"{MAX_STEP}")
        parts = _state_parts(head.parts, name_them=False)
        configs = [hyper_from_proto(e.hyper, f"key {e.key!r}") if e.HasField("hyper") else None
                   for e in head.entries]
        expected = {(i, p): Expected(k.numel, torch.float32, k.name)
                    for i, k in enumerate(keys) for p in parts}
        dests = self._staging(expected)
        receive(expected, dests)
        updates = []
        for i, (e, key) in enumerate(zip(head.entries, keys)):
            values = {}
            for p in parts:
                check_finite(key.name, pb.Part.Name(p), dests[(i, p)])
                if p in (pb.EXP_AVG_SQ, pb.MAX_EXP_AVG_SQ):
                    check_second_moment(key.name, pb.Part.Name(p), dests[(i, p)])
                values[p] = self._on_device(dests[(i, p)])
            updates.append((key, e.step, configs[i], values))
        bounds = [e.max_version if e.HasField("max_version") else None for e in head.entries]
        versions, failed = self._replicated(
            "set_state", lambda: (pb.SetStateRequest(head=head), [
                Outgoing(i, p, values[p]) for i, (_, _, _, values) in enumerate(updates) for p in parts]),
            lambda: self.policy.set_state(self.store, updates, bounds), forwarded)
        self._unstage(dests)
        if failed is not None:
            raise failed
        return pb.SetStateReply(versions=versions)

    @_device_memory
    def checkpoint(self) -> pb.CheckpointReply:
        if self.checkpointer is None:
            raise RequestError(StatusCode.FAILED_PRECONDITION,
                               "this shard runs without --checkpoint-dir; it cannot checkpoint")
        try:
            path, keys, seconds = self.checkpointer.write()
        except OSError as exc:
            raise checkpoint_failed(exc, self.checkpointer.directory) from None
        return pb.CheckpointReply(path=str(path), keys=keys, seconds=seconds)

    def stats(self) -> pb.StatsReply:
        """The shard's totals, and per-key stats in name order for as many keys as fit in one message
        (`shard.num_keys` says how many there are): Stats always fits, whatever the keys' names."""
        store = self.store
        room = self.info.max_message_bytes - (64 << 10)  # the totals and the shard's Hello fit in this
        keys, names = [], sorted(store.names())  # keys are only ever added: sorted outside the lock
        with store.locked():
            for name in names:
                k = store.get(name)
                ks = pb.KeyStats(key=k.name, shape=k.shape, version=k.version, pushes=k.pushes,
                                 dropped=k.dropped, staleness=k.staleness.to_proto())
                room -= ks.ByteSize() + 8  # the field's tag and length
                if room < 0:
                    break
                keys.append(ks)
            totals = dict(pushes=store.pushes, pulls=store.pulls, dropped=store.dropped,
                          staleness=store.staleness.to_proto())
        c = self.counters
        ckpt = self.checkpointer.last() if self.checkpointer else ("", 0.0)
        return pb.StatsReply(shard=self.hello(), keys=keys, bytes_in=c.bytes_in, bytes_out=c.bytes_out,
                             rejected=c.rejected, duplicates=c.duplicates, data_calls=c.data_calls,
                             checkpoint=ckpt[0], checkpoint_age=ckpt[1], **totals)


# A gradient element at least this large would make g^2, and so exp_avg_sq, Inf (float32 holds up to
# ~3.4e38): refused with the gradient, so that no finite input makes the shard's state non-finite.
MAX_GRADIENT = 2.0 ** 63


def checkpoint_failed(exc: OSError, directory) -> RequestError:
    """A checkpoint the disk refused: RESOURCE_EXHAUSTED when it is full (or over quota), INTERNAL
    otherwise; the checkpoint files write atomically, so the previous ones are kept either way."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return RequestError(StatusCode.RESOURCE_EXHAUSTED if full else StatusCode.INTERNAL,
                        f"the checkpoint to {directory} failed: {exc.strerror or exc}; the previous "
                        f"checkpoints are kept")


def check_finite(name: str, what: str, t: torch.Tensor, squares: bool = False) -> float:
    """Refuse NaN and Inf (INVALID_ARGUMENT naming the key and the first bad element); with
    `squares` (a gradient) also elements whose square would overflow exp_avg_sq, and return a bound
    on max|t| (store.grad_bound_from_squares: the store's overflow guard uses it); else inf."""
    # One read pass with no allocation and one sync: a float32 sum (or, for a gradient, the sum of
    # squares, a dot product) is non-finite whenever an element is NaN or Inf (or its square
    # overflows). Only then (or when finite values overflow the sum) is the exact elementwise check run.
    if not t.numel():
        return 0.0
    with INTRA_OP.sized(t.numel()):
        total = (torch.dot(t, t) if squares else t.sum()).item()
    if math.isfinite(total):
        return grad_bound_from_squares(total) if squares else math.inf
    bad = (~torch.isfinite(t)).nonzero()
    if bad.numel():
        raise invalid(f"key {name!r}: {what} holds NaN or Inf (first at element {int(bad[0])}); "
                      f"non-finite values are rejected")
    if squares:
        bad = (t.abs() >= MAX_GRADIENT).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise invalid(f"key {name!r}: {what} element {i} is {float(t[i]):g}; its square would overflow "
                          f"exp_avg_sq (gradients must be below {MAX_GRADIENT:g} in magnitude)")
        return float(t.abs().max())  # finite elements whose squares overflow the float32 sum
    return math.inf


def check_second_moment(name: str, what: str, t: torch.Tensor) -> None:
    """Refuse a negative exp_avg_sq or max_exp_avg_sq (SetState): its square root would be NaN."""
    if t.numel() and float(t.min()) < 0:
        i = int((t < 0).nonzero()[0])
        raise invalid(f"key {name!r}: {what} element {i} is {float(t[i]):g}; a second moment is never "
                      f"negative")


def parse(raw: bytes, message_type):
    """A request message that is not a stream (Hello, Pull, ...); INVALID_ARGUMENT when malformed."""
    try:
        return message_type.FromString(raw)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and its relatives
        raise invalid(f"malformed {message_type.DESCRIPTOR.name}: {exc}") from None


def _state_parts(parts: Sequence[int], name_them: bool = True) -> list[int]:
    """Parts a Pull or SetState names: distinct key tensors (INVALID_ARGUMENT otherwise)."""
    parts = list(parts)
    if len(set(parts)) != len(parts) or any(p not in STATE_PARTS for p in parts):
        allowed = [pb.Part.Name(p) for p in STATE_PARTS]
        raise invalid(f"parts must be distinct values of {allowed}"
                      + (f", got {parts}" if name_them else ""))
    return parts


def _host_buffers(expected: dict[tuple[int, int], Expected]) -> dict[tuple[int, int], torch.Tensor]:
    """A fresh float32 host tensor to receive each expected (entry, part) into."""
    return {k: _allocate(lambda: torch.empty(e.numel, dtype=torch.float32), e) for k, e in expected.items()}


def _allocate(make: Callable[[], torch.Tensor], want: Expected) -> torch.Tensor:
    """Allocate a receive buffer; running out of memory is the request's problem, said as such."""
    try:
        return make()
    except (RuntimeError, MemoryError) as exc:
        raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                           f"key {want.name!r}: cannot allocate {want.numel * 4} bytes for it: "
                           f"{exc}") from None


def _check_names(names: Sequence[str]) -> None:
    """Refuse a key name longer than any key's (INVALID_ARGUMENT saying how long, not echoing it)."""
    for i, n in enumerate(names):
        if len(n) > MAX_NAME_LENGTH:
            raise invalid(f"key name {i} has {len(n)} characters; names are at most {MAX_NAME_LENGTH}")


def _unique(names: Sequence[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise invalid(f"key {n!r} is named twice in one request")
        seen.add(n)
