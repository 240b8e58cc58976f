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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from optserve.errors import RequestError, StatusCode

# What the table's memory cap counts (tests/unit/test_dedupe.py measures them against tracemalloc): per
# record, its objects and its places in the table's indexes, plus 24 bytes per key of the push (two
# int64 results and the slot of a dropped key's name, which is the key's own string); per client, its
# entries in the per-client tables, plus its id.
RECORD_BYTES = 640
BYTES_PER_KEY = 24
CLIENT_BYTES = 1200
DEFAULT_MAX_BYTES = 256 << 20
DEFAULT_RETRY_SECONDS = 120.0  # twice a client's default retry budget (RemoteAdam's retry_budget, 60 s)


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
    size: int = RECORD_BYTES  # what the memory cap counts for it
    done_at: float = 0.0  # clock() when its result was recorded

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

    Memory: the table holds at most `max_bytes` (as RECORD_BYTES, BYTES_PER_KEY and CLIENT_BYTES count
    it). A push that would pass the cap first makes room by forgetting the oldest results recorded
    more than `retry_seconds` ago (their client's floor rises past them, so their retries are refused,
    never applied again), and then clients left with no results and no push for as long; when that
    is not enough, the push is refused (RESOURCE_EXHAUSTED) before it is applied. So a retry within
    `retry_seconds` of its original's result always gets that result.
    """

    def __init__(self, window: int = 1024, kept: int = 64, idle_seconds: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic, max_bytes: int = DEFAULT_MAX_BYTES,
                 retry_seconds: float = DEFAULT_RETRY_SECONDS):
        self.window = window
        self.kept = kept
        self.idle_seconds = idle_seconds
        self.max_bytes = max_bytes
        self.retry_seconds = retry_seconds
        self._clock = clock
        self.bytes = 0  # what the cap counts, now
        self._order: OrderedDict[tuple[str, int], None] = OrderedDict()  # finished records, oldest first
        # Clients whose results were all forgotten at the cap, to be forgotten too once idle that long
        self._bare: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._clients: dict[str, dict[int, _Record]] = {}
        self._floor: dict[str, int] = {}  # per client: the newest seq dropped from the window
        self._done: dict[str, list[int]] = {}  # per client: a min-heap of the seqs with results
        self._last: dict[str, float] = {}  # per client: clock() of its last push
        self._next_sweep = clock() + idle_seconds

    def run_once(self, client_id: str, seq: int, fingerprint: int, apply: Callable[[Origin], PushResult],
                 waiting=contextlib.nullcontext, keys: int = 1) -> tuple[PushResult, bool]:
        """Apply a push (of `keys` keys) at most once: returns (result, duplicate). This is the whole
        of a push's exactly-once life: `begin`, then `apply(origin)` (which records the result through
        `origin.record`, under the lock that makes the push take effect), or `abort` when it raises,
        so that a retry is applied anew."""
        earlier = self.begin(client_id, seq, fingerprint, waiting, keys)
        if earlier is not None:
            return earlier, True
        try:
            return apply(Origin(client_id, seq, self)), False
        except BaseException:
            self.abort(client_id, seq)
            raise

    def begin(self, client_id: str, seq: int, fingerprint: int = 0,
              waiting=contextlib.nullcontext, keys: int = 1) -> PushResult | None:
        """None: the caller applies the push, then calls finish or abort. Else: the original result.

        `waiting()` is entered around the wait for an original still in flight (the data channel
        lends its request slot meanwhile: see requests.RequestSlots)."""
        if not client_id or not seq:
            return None
        while True:
            with self._lock:
                seen = self._clients.get(client_id)
                entry = seen.get(seq) if seen is not None else None
                if entry is None:
                    if seq <= self._floor.get(client_id, 0):
                        self._last[client_id] = self._clock()
                        raise RequestError(StatusCode.FAILED_PRECONDITION,
                                           f"push {seq} of client {client_id!r} is older than the last "
                                           f"{self.window} this shard remembers; it may have been applied")
                    size = RECORD_BYTES + BYTES_PER_KEY * keys
                    known = seen is not None or client_id in self._floor  # counted already
                    need = size + (0 if known else CLIENT_BYTES + len(client_id))
                    self._make_room(need, client_id, seq)
                    self._last[client_id] = self._clock()
                    if seen is None:
                        seen = self._clients[client_id] = {}
                    self.bytes += need
                    seen[seq] = _Record(fingerprint, threading.Event(), size)  # in flight
                    return None
                self._last[client_id] = self._clock()
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
            record.done_at = self._clock()
            self._order[(client_id, seq)] = None
            done = self._done.setdefault(client_id, [])
            heapq.heappush(done, seq)
            while len(done) > self.window:  # forget the oldest results beyond the window
                old = heapq.heappop(done)
                self._drop(client_id, old)
                self._floor[client_id] = max(self._floor.get(client_id, 0), old)
            self._sweep()
        event.set()

    def abort(self, client_id: str, seq: int) -> None:
        if not client_id or not seq:
            return
        with self._lock:
            seen = self._clients[client_id]
            record = seen.pop(seq)
            self.bytes -= record.size
            if not seen and client_id not in self._floor:  # nothing of it to remember
                self._drop_client(client_id)
        record.outcome.set()

    def forget(self, client_id: str, seq: int) -> None:
        """Drop a finished record: its push counts as never applied (a sync round a restore drops)."""
        with self._lock:
            if seq in self._clients.get(client_id, {}):
                self._drop(client_id, seq)
            if seq in self._done.get(client_id, ()):
                self._done[client_id].remove(seq)
                heapq.heapify(self._done[client_id])

    def _drop(self, client_id: str, seq: int) -> None:
        """(Under the lock.) Remove one finished record from the table and its byte count."""
        self.bytes -= self._clients[client_id].pop(seq).size
        self._order.pop((client_id, seq), None)

    def _drop_client(self, client_id: str) -> None:
        """(Under the lock.) Forget a client whose records are gone, and its floor."""
        for table in (self._clients, self._floor, self._done, self._last):
            table.pop(client_id, None)
        self._bare.pop(client_id, None)
        self.bytes -= CLIENT_BYTES + len(client_id)

    def _make_room(self, need: int, client_id: str, seq: int) -> None:
        """(Under the lock.) Forget results (and then clients) idle past retry_seconds, oldest first,
        until `need` more bytes fit under the cap; RESOURCE_EXHAUSTED when they do not."""
        now = self._clock()
        for client in list(self._bare):  # first clients with nothing left but their floor
            if self.bytes + need <= self.max_bytes:
                return
            if self._clients.get(client):  # it has results again
                del self._bare[client]
            elif now - self._last.get(client, now) >= self.retry_seconds:
                self._drop_client(client)
        while self.bytes + need > self.max_bytes and self._order:
            client, old = next(iter(self._order))
            if now - self._clients[client][old].done_at < self.retry_seconds:
                break  # every result left may still be retried
            self._drop(client, old)
            done = self._done[client]
            done.remove(old)
            heapq.heapify(done)
            self._floor[client] = max(self._floor.get(client, 0), old)
            if not self._clients[client]:
                if now - self._last[client] >= self.retry_seconds:
                    self._drop_client(client)
                else:
                    self._bare[client] = None
        if self.bytes + need > self.max_bytes:
            raise RequestError(StatusCode.RESOURCE_EXHAUSTED,
                               f"push {seq} of client {client_id!r}: the exactly-once table is full "
                               f"({self.bytes} of its {self.max_bytes} bytes hold results of the last "
                               f"{self.retry_seconds:g} s, which retries may still ask for); retry later, "
                               f"or raise --dedupe-bytes")

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
                for seq in list(seen):
                    self._drop(client, seq)
                self._drop_client(client)

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
        for c, seen in clients.items():
            for r in seen.values():
                r.size, r.done_at = RECORD_BYTES + BYTES_PER_KEY * len(r.outcome[0]), now
        with self._lock:
            self._floor, self._clients = floor, clients
            self._done = {c: sorted(seen) for c, seen in clients.items()}  # a sorted list is a heap
            self._last = {c: now for c in set(clients) | set(floor)}
            self._order = OrderedDict(((c, s), None) for c, seen in clients.items() for s in sorted(seen))
            self._bare = OrderedDict((c, None) for c in set(clients) | set(floor) if not clients.get(c))
            self.bytes = sum(r.size for seen in clients.values() for r in seen.values()) + sum(
                CLIENT_BYTES + len(c) for c in set(clients) | set(floor))


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
