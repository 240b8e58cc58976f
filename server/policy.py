"""When and how a shard applies a push: the training-mode policies (DESIGN.md "Policies").

A policy receives a decoded, validated push from the request core (server/requests.py) and decides
when it reaches `Store.apply` and with which options; it never does tensor math beyond summing
gradients of one sync round. `Policy` is the seam, with its lock and checkpoint rules written on it;
tests/unit/test_policy.py drives each policy against a bare Store.

- `async`: every push is applied at once, one Adam step per push; never waits.
- `sync:W[-b]`: per key, gradients of W workers computed on the key's current version are averaged
  into one step; with b backup workers the step happens after the first W - b, and gradients that
  arrive later for a version already stepped are dropped (counted). Callers that want the next
  version wait for it (`Store.wait_versions`), bounded by the server's wait timeout.
- `ssp:S`: bounded staleness. A push more than S versions behind is refused (FAILED_PRECONDITION with
  reason "stale": the client re-pulls and drops the gradient, counted) or, with `scale`, applied with
  the learning rate divided by (staleness + 1) (Zhang et al., IJCAI 2016).
- `async` with `--compensate dc:λ` or `dca:λ0[:m]`: async, each stale gradient first delay-compensated
  (DC-ASGD, Zheng et al., ICML 2017; the math and its state are server/compensate.py's).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import ContextManager, Protocol, Sequence, runtime_checkable

import torch

from optserve.hyper import AdamConfig
from optserve.errors import STALE, RequestError, StatusCode
from optserve.server.compensate import DEFAULT_DEPTH, Compensator, DCSpec, parse_compensate
from optserve.server.dedupe import Origin, PushResult
from optserve.server.store import GradEntry, Key, Store

STALE_ACTIONS = ("reject", "scale")

log = logging.getLogger("optserve.server")


# A SetState's updates, as Store.set_state takes them: (key, step, options or None, {part: values}).
Update = tuple[Key, int, "AdamConfig | None", dict[int, torch.Tensor]]


@runtime_checkable
class Policy(Protocol):
    """When a validated push reaches `Store.apply`, and with which options: the seam between the
    request core (server/requests.py) and the store.

    Locks. A policy that keeps state between pushes (sync's open rounds) guards it with a lock of its
    own, always taken *before* the store's lock, never after (`Store.apply`, `set_state`,
    `count_dropped` and `get` may be called while holding it; nothing the store calls calls back
    into the policy). A policy never holds its lock while it waits for versions: waiting is the
    request core's (`Store.wait_versions`), after `submit` returns.

    Checkpoints. `checkpoint_lock()` is held by the checkpointer (server/main.py) around
    `Store.checkpoint_records()` and `checkpoint_state()`, so the keys, the exactly-once table and the
    policy's own state are copied at one instant: a push is in a checkpoint with its effect and its
    record, or not at all. `restore_state` runs once, at start, after `Store.restore`, before any
    request; it may step the store.

    Exactly once. `submit` calls `origin.record(result)` (server/dedupe.py) exactly once when it
    returns, under the lock that makes the push take effect; when it raises, the request core aborts
    the record and the push counts as not applied.
    """

    name: str  # as Hello and checkpoints report it
    waits: bool  # True: a PushPull waits for the step its push joined before it pulls

    def submit(self, store: Store, entries: Sequence[GradEntry], origin: Origin) -> PushResult:
        """Apply (or hold, or drop) a validated push; RequestError (nothing changed) to refuse it."""

    def set_state(self, store: Store, updates: Sequence[Update],
                  max_versions: Sequence[int | None] = ()) -> list[int]:
        """`Store.set_state` (load_state_dict), and whatever the policy keeps about those keys."""

    def describe_wait(self, key: Key) -> str:
        """Why a wait for `key`'s next version may not have ended (for the ABORTED message)."""

    def checkpoint_lock(self) -> ContextManager:
        """Held while a checkpoint copies the store and `checkpoint_state()`."""

    def checkpoint_state(self) -> tuple[list, dict[str, torch.Tensor]]:
        """What a checkpoint keeps besides the store: JSON-able state and shard-level tensors."""

    def restore_state(self, state: list, tensors: dict[str, torch.Tensor], store: Store) -> None:
        """Take back `checkpoint_state()`'s output (possibly another policy's); raise ValueError,
        KeyError or TypeError for contents that do not fit the store."""


class AsyncPolicy:
    """Every push is applied at once: one Adam step per push, never waiting for other workers."""

    waits = False

    def __init__(self):
        self.name = "async"

    def submit(self, store: Store, entries: Sequence[GradEntry], origin: Origin) -> PushResult:
        return store.apply(entries, origin=origin)

    def describe_wait(self, key: Key) -> str:
        return f"key {key.name!r} is at version {key.version}"

    def checkpoint_lock(self):
        return contextlib.nullcontext()

    def checkpoint_state(self) -> tuple[list, dict[str, torch.Tensor]]:
        """What a checkpoint must keep besides the store (JSON, tensors): nothing here."""
        return [], {}

    def set_state(self, store: Store, updates: Sequence[Update],
                  max_versions: Sequence[int | None] = ()) -> list[int]:
        return store.set_state(updates, max_versions)

    def restore_state(self, state: list, tensors: dict[str, torch.Tensor], store: Store) -> None:
        """A sync checkpoint's open rounds have no place here: they are dropped, and their pushes'
        records with them, so that the workers' retries are applied (as single pushes)."""
        if state:
            log.warning("the checkpoint holds %d open sync rounds; policy %s drops them (their pushes "
                        "count as not applied)", len(state), self.name)
        for r in state:
            for client, seq in r["origins"]:
                store.dedupe.forget(str(client), int(seq))



class SSPPolicy(AsyncPolicy):
    """Bounded staleness: pushes more than `bound` versions behind are refused or scaled down."""


    def __init__(self, bound: int, on_stale: str = "reject"):
        if bound < 0:
            raise ValueError(f"ssp staleness bound must be >= 0, got {bound}")
        if on_stale not in STALE_ACTIONS:
            raise ValueError(f"stale action must be one of {STALE_ACTIONS}, got {on_stale!r}")
        self.bound = bound
        self.on_stale = on_stale
        self.name = f"ssp:{bound}/{on_stale}"

    def _decide(self, key: Key, staleness: int, cfg: AdamConfig) -> AdamConfig:
        if staleness <= self.bound:
            return cfg
        if self.on_stale == "scale":
            # The staleness-aware rule: a gradient s versions old moves the weights 1/(s+1) as far.
            return dataclasses.replace(cfg, lr=cfg.lr / (staleness + 1))
        raise RequestError(StatusCode.FAILED_PRECONDITION,
                           f"key {key.name!r}: gradient is {staleness} versions behind the shard's version "
                           f"{key.version}, over the staleness bound {self.bound}; pull and recompute",
                           reason=STALE)

    def submit(self, store: Store, entries: Sequence[GradEntry], origin: Origin) -> PushResult:
        try:
            return store.apply(entries, self._decide, origin)
        except RequestError as exc:
            if exc.reason == STALE:
                store.count_dropped([e.key for e in entries])
            raise


class DCPolicy(AsyncPolicy):
    """async with delay compensation (DC-ASGD): a push at staleness s >= 1 has its gradient replaced by
    g + λ g ⊙ g ⊙ (θ_now − θ_read) under the store's lock, before Adam; θ_read is the key's value at
    the version the push names, from a ring of the last `depth` versions (server/compensate.py). A
    push whose θ_read is out of the ring is refused as stale (the client drops it and pulls).

    Checkpoints keep MeanSquare (adaptive: it decides future λ), not the ring (depth copies of every
    key): after a restore the ring starts empty, so a push computed before the restart is refused
    as stale rather than compensated against a value the shard no longer knows."""

    MEAN_SQUARE = "dc_mean_square/"  # checkpoint tensor name prefix, then the key's name

    def __init__(self, spec: DCSpec, depth: int = DEFAULT_DEPTH):
        self.compensator = Compensator(spec, depth)
        self.name = f"async+{spec.name}"
        # Order: this lock, then the store's. It makes a checkpoint's copy of MeanSquare the one of
        # the instant its keys are copied (no push between), and orders SetState with pushes.
        self._lock = threading.Lock()

    def submit(self, store: Store, entries: Sequence[GradEntry], origin: Origin) -> PushResult:
        with self._lock:
            try:
                return store.apply(entries, origin=origin, compensate=self.compensator.prepare)
            except RequestError as exc:
                if exc.reason == STALE:
                    store.count_dropped([e.key for e in entries])
                raise

    def set_state(self, store: Store, updates: Sequence[Update],
                  max_versions: Sequence[int | None] = ()) -> list[int]:
        with self._lock:
            versions = store.set_state(updates, max_versions)
            self.compensator.forget([key for key, *_ in updates])
            return versions

    def checkpoint_lock(self):
        return self._lock

    def checkpoint_state(self) -> tuple[list, dict[str, torch.Tensor]]:
        """MeanSquare of every key (adaptive; call with checkpoint_lock() held); no sync rounds."""
        return [], {self.MEAN_SQUARE + name: t.to("cpu", copy=True)
                    for name, t in self.compensator.mean_square.items()}

    def restore_state(self, state: list, tensors: dict[str, torch.Tensor], store: Store) -> None:
        super().restore_state(state, tensors, store)  # a sync checkpoint's open rounds: dropped
        mean_square = {}
        for name, t in tensors.items():
            if not name.startswith(self.MEAN_SQUARE):
                continue
            key = store.get(name[len(self.MEAN_SQUARE):])
            if t.numel() != key.numel:
                raise ValueError(f"DC-ASGD MeanSquare of key {key.name!r} has {t.numel()} elements, the key "
                                 f"{key.numel}")
            mean_square[key.name] = t.reshape(-1).to(key.param.device)
        if self.compensator.spec.adaptive:
            if not mean_square and len(store):
                log.warning("the checkpoint holds no DC-ASGD MeanSquare (written under another policy or "
                            "constant λ); %s starts it at 0", self.name)
            self.compensator.mean_square = mean_square
        elif mean_square:
            log.warning("the checkpoint's DC-ASGD MeanSquare is not used by %s (constant λ)", self.name)


@dataclass
class _Round:
    """One key's sync round: the gradients of its current version summed so far."""
    version: int
    total: torch.Tensor
    cfg: AdamConfig
    clients: set[str] = field(default_factory=set)
    origins: set[tuple[str, int]] = field(default_factory=set)  # (client_id, seq) of its pushes


class SyncPolicy:
    """Synchronous steps: average the gradients of `workers - backups` workers per key version."""

    waits = True

    def __init__(self, workers: int, backups: int = 0):
        if workers < 1:
            raise ValueError(f"sync needs workers >= 1, got {workers}")
        if not 0 <= backups < workers:
            raise ValueError(f"backup workers must be in 0..{workers - 1}, got {backups}")
        self.workers = workers
        self.backups = backups
        self.quorum = workers - backups
        self.name = f"sync:{workers}" + (f"-{backups}" if backups else "")
        self._lock = threading.Lock()  # order: this lock, then the store's (in Store.apply)
        self._rounds: dict[str, _Round] = {}

    def submit(self, store: Store, entries: Sequence[GradEntry], origin: Origin) -> PushResult:
        client_id = origin.client_id
        with self._lock:
            late, current = [], []
            for e in entries:
                e.refuse_if_ahead()
                if e.version_read < e.key.version:
                    late.append(e)  # its version was stepped already (by the first W - b workers)
                    continue
                r = self._rounds.get(e.key.name)
                if r is not None and client_id in r.clients:
                    raise RequestError(StatusCode.FAILED_PRECONDITION,
                                       f"key {e.key.name!r}: client {client_id!r} already sent a gradient "
                                       f"for version {e.version_read}")
                current.append(e)
            for e in current:
                r = self._rounds.get(e.key.name)
                if r is None:
                    r = self._rounds[e.key.name] = _Round(
                        e.key.version, torch.zeros_like(e.key.param), e.cfg)
                for offset, g in e.pieces:
                    r.total[offset:offset + g.numel()].add_(g)
                r.clients.add(client_id)
                r.origins.add((origin.client_id, origin.seq))
            self._step_complete(store, [e.key for e in current])
            if late:
                store.count_dropped([e.key for e in late])
            result = PushResult([e.key.version for e in entries], [0] * len(entries),
                                dropped=[e.key.name for e in late])
            origin.record(result)  # acknowledged on joining its round: the round is checkpointed with it
            return result

    def _step_complete(self, store: Store, keys: Sequence[Key]) -> None:
        """(Under the policy lock.) Step, in one Store.apply, the rounds of these keys that have their
        quorum: the average of their gradients."""
        step = []
        for key in keys:
            r = self._rounds.get(key.name)
            if r is not None and len(r.clients) >= self.quorum:
                del self._rounds[key.name]
                step.append(GradEntry(key=key, version_read=r.version, cfg=r.cfg,
                                      pieces=[(0, r.total.div_(len(r.clients)))]))
        if not step:
            return
        try:
            store.apply(step)
        except RequestError as refused:
            # The mean, stepped with the round's options, was refused (it would make a key
            # non-finite, or a key is at its last step): nothing changed, and the rounds are void,
            # as SetState voids them. Their acknowledged gradients are counted as dropped, the push
            # that completed them gets the refusal, and the version opens a fresh round; waits for
            # the step end in ABORTED after --wait-timeout.
            store.count_dropped([e.key for e in step])
            log.warning("sync: the step of %s was refused (%s); its round is void and its gradients "
                        "dropped", ", ".join(repr(e.key.name) for e in step), refused.message)
            raise

    def set_state(self, store: Store, updates: Sequence[Update],
                  max_versions: Sequence[int | None] = ()) -> list[int]:
        """SetState (load_state_dict) rewrites keys: a round open on one of them is void, its
        gradients (of a state that no longer is) counted as dropped."""
        with self._lock:
            versions = store.set_state(updates, max_versions)
            void = [key for key, *_ in updates if self._rounds.pop(key.name, None) is not None]
            if void:
                store.count_dropped(void)
            return versions

    def checkpoint_lock(self):
        """Held while a checkpoint copies the store, so no round changes meanwhile."""
        return self._lock

    def checkpoint_state(self) -> tuple[list, dict[str, torch.Tensor]]:
        """The open rounds (call with checkpoint_lock() held): their pushes were acknowledged and
        recorded as applied, so a checkpoint must hold their summed gradients too, or a restart
        would lose them."""
        state, tensors = [], {}
        for i, (name, r) in enumerate(self._rounds.items()):
            state.append({"key": name, "version": r.version, "hyper": dataclasses.asdict(r.cfg),
                          "clients": sorted(r.clients), "origins": sorted([c, s] for c, s in r.origins)})
            tensors[f"round/{i}"] = r.total.to("cpu", copy=True)
        return state, tensors

    def restore_state(self, state: list, tensors: dict[str, torch.Tensor], store: Store) -> None:
        """Reopen the rounds of a checkpoint (ValueError/KeyError/TypeError: malformed), and step
        those that already have this shard's quorum (it may now run with fewer workers)."""
        rounds = {}
        for i, r in enumerate(state):
            key = store.get(r["key"])
            total = tensors[f"round/{i}"]
            if int(r["version"]) != key.version or total.numel() != key.numel:
                raise ValueError(f"sync round {i} of key {key.name!r} does not match the key")
            rounds[key.name] = _Round(key.version, total.to(key.param.device), AdamConfig(**r["hyper"]),
                                      {str(c) for c in r["clients"]},
                                      {(str(c), int(s)) for c, s in r["origins"]})
        with self._lock:
            self._rounds = rounds
            self._step_complete(store, [store.get(name) for name in list(rounds)])

    def describe_wait(self, key: Key) -> str:
        with self._lock:
            r = self._rounds.get(key.name)
            have = len(r.clients) if r is not None and r.version == key.version else 0
        return (f"key {key.name!r}: the sync step of version {key.version} has {have} of {self.quorum} "
                f"gradients ({self.workers} workers, {self.backups} backups)")


def parse_policy(spec: str, workers: int = 0, backups: int = 0, on_stale: str = "reject",
                 compensate: str = "", max_dc_versions: int = DEFAULT_DEPTH) -> Policy:
    """The policy named by `spec` (as given to `optserve serve --policy`): async, sync or ssp:S;
    `compensate` (--compensate dc:λ or dca:λ0[:m]) is for async only."""
    if compensate:
        if spec != "async":
            raise ValueError(f"--compensate {compensate} needs --policy async, got --policy {spec}")
        return DCPolicy(parse_compensate(compensate), max_dc_versions)
    if spec == "async":
        return AsyncPolicy()
    if spec == "sync":
        if workers < 1:
            raise ValueError("--policy sync needs --workers W (the number of workers per step)")
        return SyncPolicy(workers, backups)
    if spec.startswith("ssp:"):
        try:
            bound = int(spec[4:])
        except ValueError:
            raise ValueError(f"ssp policy takes an integer staleness bound, as ssp:3; got {spec!r}") from None
        return SSPPolicy(bound, on_stale)
    raise ValueError(f"unknown policy {spec!r}; choose async, sync or ssp:S")
