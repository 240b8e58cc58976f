"""The exactly-once table of a shard: which pushes, by (client_id, seq), were applied, and their results.

A push's exactly-once life is `Dedupe.run_once`: begin (a retry of an applied push gets its recorded
result, one of a push in flight waits for it), apply through the policy, and either the result is
recorded (`Origin.record`, called by whoever makes the push take effect, under the lock that does it:
`Store.apply`, or the sync policy when the push joins its round) or the push is aborted. The table is
part of the shard's state: checkpoints hold it (`to_json` / `load_json`). No tensors, no I/O here.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import heapq
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable

from optserve.errors import RequestError, StatusCode


@dataclass(frozen=True)
class PushResult:
    """What a push got: each key's version after it, its staleness, and the keys a policy dropped."""
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

    def run_once(self, client_id: str, seq: int, fingerprint: int, apply: Callable[[Origin], PushResult],
                 waiting=contextlib.nullcontext) -> tuple[PushResult, bool]:
        """Apply a push at most once: returns (result, duplicate). This is the whole of a push's
        exactly-once life: `begin`, then `apply(origin)` (which records the result through
        `origin.record`, under the lock that makes the push take effect), or `abort` when it raises,
        so that a retry is applied anew."""
        earlier = self.begin(client_id, seq, fingerprint, waiting)
        if earlier is not None:
            return earlier, True
        try:
            return apply(Origin(client_id, seq, self)), False
        except BaseException:
            self.abort(client_id, seq)
            raise

    def begin(self, client_id: str, seq: int, fingerprint: int = 0,
              waiting=contextlib.nullcontext) -> PushResult | None:
        """None: the caller applies the push, then calls finish or abort. Else: the original result.

        `waiting()` is entered around the wait for an original still in flight (the data channel
        lends its request slot meanwhile: see requests.RequestSlots)."""
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
            record.outcome = (array("q", result.versions), array("q", result.staleness),
                              tuple(result.dropped))
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
class Origin:
    """A push as the table knows it: who sent it (client_id, seq), and where its result is recorded.

    `record(result)` must be called under the lock whose critical section makes the push take effect
    (the store's for an applied step, the sync policy's for a push joining its round), so that a
    checkpoint holds a push's effect exactly when it holds its record."""
    client_id: str = ""
    seq: int = 0
    table: Dedupe | None = None

    def record(self, result: PushResult) -> None:
        if self.table is not None:
            self.table.finish(self.client_id, self.seq, result)


NO_ORIGIN = Origin()  # a step the shard takes itself (a sync round's average): nothing to record
