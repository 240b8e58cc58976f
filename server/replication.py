"""Replicated shards: primary-backup per shard index, with an epoch (docs/ARCHITECTURE.md "Replication").

Two replicas of one shard index run with the same `--replicas A,B` (their gRPC addresses, in order)
and each its own `--replica-index`. At any time at most one of them is *primary*: it orders every
state change (push, Register, SetState) under one lock (`Replicator._seq`), applies it through the
ordinary path (RequestCore -> Dedupe -> Policy -> Store), then FORWARDs it (the request's head and its
float32 tensors, read from the buffers it was applied from) to the *backup* over the backup's data
channel, and acknowledges the worker only once the backup has applied it through the same path. Adam
is deterministic given the order, so both replicas hold the same bits. The rules:

- The primary never acknowledges alone, except *solo* after a takeover (below). When a forward (or
  an idle heartbeat) cannot reach the backup for `timeout` seconds, the primary is *deposed*: it
  answers nothing more (reason `not_primary`) and keeps its state only to hand it on.
- A backup that heard nothing from its primary for `timeout` seconds asks it (Hello); when it cannot
  be reached, or says it is no longer primary, the backup takes over: epoch + 1, solo. Every
  operation the old primary ever acknowledged had been applied here first, so nothing acknowledged
  is lost; forwards of the old epoch are refused (`stale_epoch`), so the old primary, if alive, can
  acknowledge nothing more either. With two replicas a partition cannot be told from a crash: this is
  why the side that keeps the primary's role (without a backup) stops, and only the side that takes
  over goes on alone.
- A replica without a role (*joining*: started, or its state refused; *deposed*) asks its peer: a
  primary is joined (state transfer: a checkpoint of server/checkpoint.py's format, copied at one
  point of the primary's order, sent over the data channel and verified while pushes go on; then
  JOINED, the pushes applied meanwhile are forwarded, and it is the backup: a solo primary
  acknowledges with it again). A deposed replica whose peer is joining (an empty
  replica, so no newer state exists anywhere) becomes primary at epoch + 1 with its state; two
  joining replicas (a cold start) make the first in `--replicas` primary.
- No replica goes on from older state. With `--checkpoint-dir`, each replica keeps its epoch and role
  in `replica.json` there (written atomically at every change), and a restarted replica reports that
  epoch while it joins. A deposed replica whose peer comes back joining with a higher epoch (it held
  epoch N, acknowledged alone, and lost that state) is *blocked*, not promoted; so is the joiner. Both
  refuse every request (FAILED_PRECONDITION, reason `lost_epoch`, saying what the operator can do)
  until the operator decides which state goes on. Two joining replicas: the higher epoch begins.

The forward is the only copy of an acknowledged update's effect besides the primary's own: R = 2
survives one failure at a time (`optserve status` shows when the backup is in sync again), not two.
"""
from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import os
import select
import struct
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from optserve.errors import LOST_EPOCH, NOT_PRIMARY, STALE_EPOCH, RequestError, StatusCode, invalid
from optserve.frames import (AUTH, FORWARD, HEARTBEAT, JOIN, JOINED, ProtocolError, parse_error,
                             read_header, read_meta, recv_exact, send_frame, send_header, tune)
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server.checkpoint import CheckpointData, load_checkpoint, write_checkpoint, write_json_atomic

log = logging.getLogger("optserve.server")

PRIMARY, BACKUP, JOINING, DEPOSED = "primary", "backup", "joining", "deposed"
_LEN = struct.Struct("<I")
MAX_STATE_FILE_BYTES = 1 << 40  # a joining replica's bound on one file of a state transfer
STATE_FILE = "replica.json"  # in --checkpoint-dir: {"epoch": ..., "role": ...}, this replica's last


@dataclass(frozen=True)
class ReplicaConfig:
    replicas: tuple[str, ...]  # gRPC addresses of the shard index's replicas, in order
    index: int  # this replica's place in `replicas`
    timeout: float = 5.0  # silence after which a backup takes over, and a forward gives up
    token: str = ""
    # TLS towards the peer (its data channel and gRPC): the CA its certificate is checked against, and
    # this shard's own certificate and key, shown when the peer asks for one (mutual TLS)
    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls: bool = False
    state_dir: str = ""  # --checkpoint-dir: where the epoch and role are kept across restarts

    def __post_init__(self):
        if len(self.replicas) != 2:
            raise ValueError(f"--replicas names {len(self.replicas)} addresses; replication runs with "
                             f"exactly 2 replicas per shard index (more are not built)")
        if len(set(self.replicas)) != len(self.replicas):
            raise ValueError(f"--replicas names an address twice: {list(self.replicas)}")
        if not 0 <= self.index < len(self.replicas):
            raise ValueError(f"--replica-index must be in 0..{len(self.replicas) - 1}, got {self.index}")
        if not self.timeout > 0:
            raise ValueError(f"--replica-timeout must be > 0 seconds, got {self.timeout}")

    @property
    def me(self) -> str:
        return self.replicas[self.index]

    @property
    def peer(self) -> str:
        return self.replicas[1 - self.index]


def pack_meta(header: dict, message: bytes = b"") -> bytes:
    """A replication frame's meta: a JSON header (length-prefixed), then a serialized request."""
    raw = json.dumps(header).encode()
    return _LEN.pack(len(raw)) + raw + message


def unpack_meta(meta: bytes) -> tuple[dict, bytes]:
    if len(meta) < _LEN.size:
        raise invalid("a replication frame without its header")
    (n,) = _LEN.unpack_from(meta)
    try:
        header = json.loads(meta[_LEN.size:_LEN.size + n].decode())
    except ValueError:
        raise invalid("a replication frame with a malformed header") from None
    if not isinstance(header, dict):
        raise invalid("a replication frame's header is not an object")
    return header, meta[_LEN.size + n:]


class _Link:
    """The primary's connection to its backup's data channel. Frames go out in the replicas' order,
    several may be in flight (the backup reads and answers them one by one, in order); only the
    forwarding thread (`Replicator._pipe`) uses it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, kind: int, meta: bytes, items: Sequence[Outgoing] = ()) -> None:
        send_frame(self.sock, kind, meta, items, torch.float32)

    def answer(self) -> None:
        """The backup's answer to the oldest frame in flight: None when it applied it, else the
        refusal (RequestError)."""
        status, meta_len, data_len = read_header(self.sock)
        reply = read_meta(self.sock, meta_len)
        if data_len:
            raise ProtocolError(f"a replication reply with {data_len} bytes of data")
        if status != StatusCode.OK:
            message, reason = parse_error(reply)
            raise RequestError(StatusCode(status) if status in StatusCode._value2member_map_
                               else StatusCode.UNKNOWN, message, reason)

    def readable(self, timeout: float, wake: int) -> bool:
        """Whether an answer is waiting (TLS may hold one already read off the socket), waiting up
        to `timeout` seconds or until `wake` (a pipe) is written to."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        ready, _, _ = select.select([self.sock, wake], [], [], timeout)
        return self.sock in ready

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Forward:
    """One frame for the backup (a FORWARD, with its place `index` in the order; a HEARTBEAT), queued
    in the replicas' order. `outcome` once `done`: None when the backup applied it (or answered the
    heartbeat), else its refusal or the failure that made the primary give up (the error to answer)."""

    __slots__ = ("kind", "meta", "items", "index", "depose", "done", "outcome")

    def __init__(self, kind: int, meta: bytes, items: Sequence[Outgoing] = (), index: int = 0,
                 depose: bool = True):
        self.kind, self.meta, self.items, self.index, self.depose = kind, meta, items, index, depose
        self.done = threading.Event()
        self.outcome: BaseException | None = None

    def resolve(self, outcome: BaseException | None) -> None:
        self.outcome = outcome
        self.done.set()


class Replicator:
    """One replica's side of replication; RequestCore calls `check_serving` and `apply`, the data
    channel hands it the replication frames (`serve`), a thread (`_watch`) heartbeats, takes over,
    joins or re-promotes."""

    def __init__(self, core, cfg: ReplicaConfig, shard_index: int, num_shards: int,
                 sleep: Callable[[float], None] = time.sleep):
        self.core = core
        self.cfg = cfg
        self.shard_index = shard_index
        self.num_shards = num_shards
        self._sleep = sleep
        # the order of state changes: held to take an index, queue the forward and apply it here
        self._seq = threading.RLock()
        self._lock = threading.Lock()  # the fields below (a leaf)
        self._answered = threading.Condition(self._lock)  # an answer came, or the role changed
        self.role = JOINING
        self.epoch = 0
        self.index = 0  # operations applied, in order (the primary's count; a backup's position)
        self.solo = False
        self.primary = ""
        self._backup_in_sync = False
        self._backup_index = 0
        self._backup_error = "not joined yet"
        self._link: _Link | None = None  # the forwarding thread's (`_pipe`)
        self._queue: deque[_Forward] = deque()  # frames for the backup not sent yet, in order
        self._flight: deque[_Forward] = deque()  # sent, not answered yet, in order
        self._wake_r, self._wake_w = os.pipe()  # wakes `_pipe` when a frame is queued
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._backup_data: tuple[str, int] | None = None
        # while a replica joins: (index, op, message, items) of each change applied after its state
        self._catch_up: list | None = None
        self._heard = time.monotonic()  # backup: the primary's last forward or heartbeat
        self._sent = time.monotonic()  # primary: the last forward or heartbeat the backup answered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="replication", daemon=True)
        self._sender = threading.Thread(target=self._pipe, name="replication-send", daemon=True)
        self._peer_client = None
        # a test's partition: while set, this replica reaches its peer's data channel no more and
        # refuses the peer's replication frames (tests/system/test_replication.py)
        self.partitioned = threading.Event()
        self._blocked = ""  # why this replica refuses to go on (a lost epoch); "" when not blocked
        self._state_path = Path(cfg.state_dir) / STATE_FILE if cfg.state_dir else None
        self._state_lock = threading.Lock()  # one write of the state file at a time (a leaf)
        self.epoch = self._load_epoch()
        self._ssl: ssl.SSLContext | None = None
        if cfg.tls:
            from optserve.client.data import client_ssl_context
            self._ssl = client_ssl_context(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)

    # -- the epoch kept in --checkpoint-dir ------------------------------------------------------

    def _load_epoch(self) -> int:
        """The epoch this replica last held (its state file), 0 without one; a file that is not one
        stops the start (ValueError), since going on without it could let older state win."""
        path = self._state_path
        if path is None or not path.exists():
            return 0
        try:
            saved = json.loads(path.read_text())
            epoch = int(saved["epoch"])
            if epoch < 0:
                raise ValueError(f"epoch {epoch}")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a replica state file ({type(exc).__name__}: {exc}); it keeps "
                             f"the epoch this replica held: restore it, or delete it if the replica's "
                             f"state may be lost") from None
        log.info("replica %s: held epoch %d as %s before this start (%s)", self.cfg.me, epoch,
                 saved.get("role"), path)
        return epoch

    def _save_epoch(self, epoch: int | None = None, role: str | None = None) -> None:
        """Write the epoch and role (default: the current ones) to the state file (atomically), with
        --checkpoint-dir. A takeover writes the ones it is about to take, before it takes them: a file
        that cannot be written leaves the replica as it was (the watcher logs it and tries again)."""
        if self._state_path is None:
            return
        with self._state_lock:
            with self._lock:
                state = {"epoch": self.epoch if epoch is None else epoch,
                         "role": self.role if role is None else role}
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._state_path, state)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._sender.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        for thread in (self._thread, self._sender):
            if thread.is_alive():
                thread.join(timeout=10)
        self._fail_all(RequestError(StatusCode.UNAVAILABLE, f"shard {self.shard_index} is stopping",
                                    reason=NOT_PRIMARY))
        self._drop_link()
        if self._peer_client is not None:
            self._peer_client.close()

    # -- what RequestCore asks -------------------------------------------------------------------

    def check_serving(self, read: bool = False) -> None:
        """Refuse (UNAVAILABLE, reason not_primary: the client tries the next replica) unless this
        replica is the primary and may acknowledge: with its backup in sync, or solo. A `read` (Pull)
        is served by a backup too: it holds every acknowledged change (and perhaps one in flight)."""
        with self._lock:
            if self.role == PRIMARY and (self.solo or self._backup_in_sync):
                return
            if read and self.role in (PRIMARY, BACKUP):
                return
            role, primary, blocked = self.role, self.primary, self._blocked
        if blocked:
            raise RequestError(StatusCode.FAILED_PRECONDITION, f"shard {self.shard_index}: {blocked}",
                               reason=LOST_EPOCH)
        if role == PRIMARY:
            why = "the primary waits for its backup to join"
        elif role == BACKUP:
            why = f"this replica is a backup; the primary is {primary}"
        else:
            why = f"this replica is {role}; it takes no requests until it has a role"
        raise RequestError(StatusCode.UNAVAILABLE, f"shard {self.shard_index}: {why}", reason=NOT_PRIMARY)

    def apply(self, op: str, message: bytes, items: Sequence[Outgoing], local: Callable[[], object],
              header: dict | None = None) -> tuple[object, _Forward | None]:
        """Run `local()` (the state change) in the replicas' order and queue its forward to the
        backup: (its result, the forward to `commit` before acknowledging; None when there is no
        backup to wait for); `header` goes into the forward's header (the gradients' bounds). The order
        lock is held only to take the index, queue the forward and
        apply here, so the forwards of several requests are in flight at once, answered in order.

        The forward is sent while `local()` runs (its bytes are the request's, which `local()` only
        reads; the caller keeps them until `commit`), so the backup receives and applies while the
        primary applies. Both run the same checks on the same state: a refusal of `local()` (nothing
        changed) is the backup's refusal too, and is raised once the backup has answered (the next
        operation takes the same index). Should they ever differ (the backup applied what `local()`
        refused: a device out of memory here), this replica is deposed and answers UNAVAILABLE, and
        the retry of the same (client_id, seq) gets the backup's result."""
        with self._seq:
            self.check_serving()
            with self._lock:
                index, epoch, forward = self.index + 1, self.epoch, self._backup_in_sync
            if not forward:
                result = local()
                with self._lock:
                    self.index = index
                if self._catch_up is not None:  # a replica is joining: it gets this after the state
                    self._catch_up.append((index, op, message,
                                           [Outgoing(it.entry, it.part, it.tensor.clone()) for it in items]))
                return result, None
            meta = pack_meta({**(header or {}), "op": op, "epoch": epoch, "index": index}, message)
            sent = self._enqueue(_Forward(FORWARD, meta, items, index))
            try:
                result = local()
            except BaseException as exc:
                # (its slot kept: lent, it would be taken back while holding _seq, which the
                # requests holding the slots may be waiting for)
                outcome = self._wait(sent)
                if isinstance(outcome, RequestError) and outcome.reason != STALE_EPOCH and \
                        outcome.code != StatusCode.UNAVAILABLE:
                    raise  # refused on both replicas: nothing changed anywhere
                # applied on the backup only, or not known (the link broke): never acknowledged
                raise self._depose(f"operation {index} was refused here ({type(exc).__name__}: {exc}) "
                                   f"but the backup's outcome is {outcome or 'applied'}") from None
            with self._lock:
                self.index = index
            return result, sent

    def commit(self, sent: _Forward | None) -> RequestError | None:
        """Wait for the backup's answer to an operation `apply` forwarded (lending the request's
        data-channel slot meanwhile): None when it applied it (the operation may be acknowledged),
        else the error to answer instead (this replica is deposed then)."""
        if sent is None:
            return None
        with self.core.slots.lent():
            outcome = self._wait(sent)
        if outcome is None:
            return None
        if isinstance(outcome, RequestError) and outcome.reason == NOT_PRIMARY:
            return outcome  # the forwarding gave up: deposed already
        return self._depose(f"the backup refused operation {sent.index}, which this replica applied: "
                            f"{getattr(outcome, 'message', outcome)}")

    def settled(self) -> None:
        """Wait until the backup has answered every operation applied here so far (a retry answered
        from the exactly-once table: its original may still be in flight), or this replica stopped
        forwarding (its caller checks the role then: `check_serving`)."""
        give_up = time.monotonic() + 2 * self.cfg.timeout  # the forwarding deposes within one
        with self.core.slots.lent(), self._lock:  # (the slot is taken back after _lock is released)
            index = self.index
            while self._backup_index < index and self.role == PRIMARY and self._backup_in_sync:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise RequestError(StatusCode.UNAVAILABLE, f"shard {self.shard_index}: the backup "
                                       f"has not answered operation {index}; retry", reason=NOT_PRIMARY)
                self._answered.wait(min(left, 0.5))

    # -- the forwarding thread ----------------------------------------------------------------------

    def _enqueue(self, frame: _Forward) -> _Forward:
        with self._lock:
            stopped = self._stop.is_set()
            if not stopped:
                self._queue.append(frame)
        if stopped:  # no thread will send it
            frame.resolve(RequestError(StatusCode.UNAVAILABLE, f"shard {self.shard_index} is stopping",
                                       reason=NOT_PRIMARY))
        self._wake()
        return frame

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # full (the thread will look anyway) or closed (stopped)

    @staticmethod
    def _wait(frame: _Forward) -> BaseException | None:
        frame.done.wait()
        return frame.outcome

    def _pipe(self) -> None:
        """(The forwarding thread.) Send the queued frames in order and read the backup's answers as
        they come (`select`, woken by `_wake` when a frame is queued), several frames in flight on
        the one link. When the link breaks (or the backup answers UNAVAILABLE), every frame not
        answered is sent again, in order, on a new one (the backup answers a resend of what it
        applied OK), for at most the timeout; then this primary is deposed and every frame fails."""
        give_up = None  # when resending stops: the timeout after the first failure since an answer
        waiting = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                nxt = self._queue[0] if self._queue else None
                flying = len(self._flight)
                primary = self.role == PRIMARY
            if nxt is None and not flying:
                select.select([self._wake_r], [], [], 1.0)
                self._drain_wake()
                continue
            if not primary:  # deposed meanwhile: nothing more goes out
                self._drop_link()
                self._fail_all(RequestError(StatusCode.UNAVAILABLE, f"shard {self.shard_index}: this "
                                            f"replica is no longer primary; retry on the next replica",
                                            reason=NOT_PRIMARY))
                continue
            try:
                link = self._connect()
                if nxt is not None:
                    if not flying:
                        waiting = time.monotonic()  # for the backup's answer, since
                    link.send(nxt.kind, nxt.meta, nxt.items)
                    with self._lock:
                        self._flight.append(self._queue.popleft())
                    flying += 1
                while flying:
                    with self._lock:
                        more = bool(self._queue)
                    if more and not link.readable(0, self._wake_r):
                        break  # send the next frame; the answers wait in the socket
                    if not more and not link.readable(1.0, self._wake_r):
                        self._drain_wake()
                        if time.monotonic() - waiting > self._answer_seconds:
                            raise TimeoutError(f"no answer for {self._answer_seconds:g} s")
                        break
                    try:
                        link.answer()
                        outcome = None
                    except RequestError as exc:
                        if exc.code == StatusCode.UNAVAILABLE and exc.reason != STALE_EPOCH:
                            raise ConnectionError(f"the backup answered UNAVAILABLE: {exc.message}") from None
                        outcome = exc
                    self._answer(outcome)
                    flying -= 1
                    waiting, give_up = time.monotonic(), None
            except (OSError, ProtocolError) as exc:
                self._drop_link()
                with self._lock:  # sent again, in order, on the next link
                    self._queue.extendleft(reversed(self._flight))
                    self._flight.clear()
                    primary = self.role == PRIMARY
                problem = str(exc) or type(exc).__name__
                now = time.monotonic()
                give_up = give_up or now + self.cfg.timeout
                if not primary:
                    give_up = None
                    continue  # the frames fail at the top of the loop
                if now >= give_up:
                    give_up = None
                    self._give_up(f"the backup {self.cfg.peer} did not answer for {self.cfg.timeout:g} s: "
                                  f"{problem}")
                    continue
                self._sleep(min(0.1, self.cfg.timeout / 20))
            except Exception as exc:  # noqa: BLE001 - a bug: every frame fails rather than hangs
                log.exception("replica %s: forwarding failed", self.cfg.me)
                self._drop_link()
                self._give_up(f"forwarding failed: {type(exc).__name__}: {exc}")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _answer(self, outcome: RequestError | None) -> None:
        """The oldest frame in flight was answered."""
        with self._lock:
            frame = self._flight.popleft()
            if outcome is None:
                self._sent = time.monotonic()
                if frame.kind == FORWARD:
                    self._backup_index = max(self._backup_index, frame.index)
            self._answered.notify_all()
        frame.resolve(outcome)

    def _give_up(self, why: str) -> None:
        """The frames not answered fail: this primary is deposed when any of them was to be
        acknowledged (a forward of an in-sync backup, a heartbeat); a joiner's catch-up only fails."""
        with self._lock:
            frames = list(self._flight) + list(self._queue)
        error = self._depose(why) if any(f.depose for f in frames) else \
            RequestError(StatusCode.UNAVAILABLE, why, reason=NOT_PRIMARY)
        self._fail_all(error)

    def _fail_all(self, error: RequestError) -> None:
        with self._lock:
            frames = list(self._flight) + list(self._queue)
            self._flight.clear()
            self._queue.clear()
            self._answered.notify_all()
        for frame in frames:
            frame.resolve(error)

    def _drain(self) -> None:
        """(Under _seq.) Wait until every queued frame is answered or failed: nothing else can be
        queued meanwhile, and the link is the caller's to drop."""
        with self._lock:
            while self._queue or self._flight:
                self._answered.wait(1.0)

    def _forward(self, kind: int, meta: bytes, items: Sequence[Outgoing], index: int,
                 depose: bool = True) -> RequestError | None:
        """One frame to the backup through the forwarding thread, waiting for its answer: None when
        applied, else the error to answer (a refusal deposes this primary, or with depose=False, for
        a joiner's catch-up, only says why)."""
        outcome = self._wait(self._enqueue(_Forward(kind, meta, items, index, depose)))
        if outcome is None:
            return None
        if isinstance(outcome, RequestError) and outcome.reason == NOT_PRIMARY:
            return outcome
        why = f"the backup refused a forward: {getattr(outcome, 'message', outcome)}"
        if depose:
            return self._depose(why)
        return RequestError(StatusCode.UNAVAILABLE, why, reason=NOT_PRIMARY)

    def _depose(self, why: str) -> RequestError:
        with self._lock:
            was = self.role
            self.role = DEPOSED
            self._backup_in_sync = False
            self._backup_error = why
            self.solo = False
            self.primary = ""
            self._answered.notify_all()
        self._save_epoch()
        if was != DEPOSED:
            log.warning("replica %s: deposed at epoch %d: %s; it acknowledges nothing more and hands its "
                        "state on", self.cfg.me, self.epoch, why)
        self._wake()  # the forwarding thread fails what is left
        self.core.store.wake()
        return RequestError(StatusCode.UNAVAILABLE, f"shard {self.shard_index}: this primary lost its "
                            f"backup ({why}); retry on the next replica", reason=NOT_PRIMARY)

    @property
    def _answer_seconds(self) -> float:
        """How long the backup may take to answer the oldest frame in flight (its socket's timeout
        for a large forward, as for every read and write on the link), before the link is dropped."""
        return max(self.cfg.timeout, 30.0)

    def _connect(self) -> _Link:
        """(The forwarding thread.) The link, dialled when there is none."""
        if self.partitioned.is_set():
            raise ConnectionRefusedError("partitioned (test)")
        if self._link is not None:
            return self._link
        with self._lock:
            backup = self._backup_data
        if backup is None:
            raise ConnectionError("the backup's data channel is not known")
        # a large forward takes its time to send
        self._link = _Link(self._dial(*backup, self._answer_seconds, "backup"))
        return self._link

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()


    # -- frames from the peer (server/data.py) ---------------------------------------------------

    def serve(self, conn, kind: int, meta: bytes, receive_with: Callable, slots) -> None:
        """A replication frame on this shard's data channel; the reply is sent here (RequestError:
        the data channel refuses it)."""
        if self.partitioned.is_set():
            raise ConnectionResetError("partitioned (test)")
        header, message = unpack_meta(meta)
        if kind == JOIN:
            self._serve_join(conn, header, slots)
            return
        epoch = int(header.get("epoch", -1))
        if kind not in (HEARTBEAT, FORWARD):
            raise invalid(f"unexpected replication frame kind {kind}")
        with self._seq:  # the role is checked in the order a takeover (also under _seq) changes it
            with self._lock:
                mine, role = self.epoch, self.role
                if role != BACKUP or epoch != mine:
                    raise RequestError(StatusCode.FAILED_PRECONDITION,
                                       f"replica {self.cfg.me} is {role} at epoch {mine}; a forward of "
                                       f"epoch {epoch} is refused", reason=STALE_EPOCH)
                self._heard = time.monotonic()
            if kind == HEARTBEAT:
                send_header(conn, StatusCode.OK, b"", 0)
                return
            index = int(header["index"])
            if index <= self.index:  # a resend of an operation applied already
                send_header(conn, StatusCode.OK, b"", 0)
                return
            if index != self.index + 1:
                raise RequestError(StatusCode.FAILED_PRECONDITION,
                                   f"forward {index} after {self.index}: operations are missing here",
                                   reason=STALE_EPOCH)
            self._apply_forward(header, message, receive_with)
            with self._lock:
                self.index = index
                self._heard = time.monotonic()
        send_header(conn, StatusCode.OK, b"", 0)

    def _apply_forward(self, header: dict, message: bytes, receive_with: Callable) -> None:
        from optserve.server.requests import parse
        core, op = self.core, str(header.get("op"))
        if op == "push":
            first = parse(message, pb.PushRequest)
            core.push(first, receive_with(first.segments), forwarded=True, bounds=header.get("bounds"))
        elif op == "register":
            first = parse(message, pb.RegisterRequest)
            core.register(first, receive_with(first.segments), forwarded=True)
        elif op == "set_state":
            first = parse(message, pb.SetStateRequest)
            core.set_state(first, receive_with(first.segments), forwarded=True)
        else:
            raise invalid(f"unknown forwarded operation {op!r}")

    def _serve_join(self, conn, header: dict, slots) -> None:
        """(Primary.) Send the state as a checkpoint, taken at one point of the replicas' order; the
        changes applied after that point (a solo primary goes on acknowledging) are kept and forwarded,
        in order, once the joiner has installed the state; then it is the backup."""
        with self._seq:
            self._drain()  # the forwards in flight are answered (or this primary deposed) first
            with self._lock:
                if self.role != PRIMARY:
                    raise RequestError(StatusCode.UNAVAILABLE, f"replica {self.cfg.me} is {self.role}",
                                       reason=NOT_PRIMARY)
                epoch, index = self.epoch, self.index
                self._backup_in_sync = False
                self._backup_error = "joining"
            self._drop_link()
            data = self._snapshot()  # copies, under the policy's and the store's locks
            self._catch_up = []  # apply() keeps what it applies from here on
        try:
            tmp = Path(tempfile.mkdtemp(prefix="optserve-join-"))
            try:
                path = write_checkpoint(tmp, data, keep=1)
                files = [(f.name, f.read_bytes()) for f in sorted(path.iterdir())]
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            del data
            reply = json.dumps({"epoch": epoch, "index": index,
                                "files": [[name, len(b)] for name, b in files]}).encode()
            send_header(conn, StatusCode.OK, reply, sum(len(b) for _, b in files))
            for _, b in files:
                conn.sendall(b)
            del files
            with slots.lent():
                kind, meta_len, data_len = read_header(conn)
                joined = json.loads(read_meta(conn, meta_len).decode() or "{}")
            if kind != JOINED or data_len:
                raise ProtocolError(f"expected JOINED after a state transfer, got kind {kind}")
            with self._seq:
                with self._lock:
                    if self.role != PRIMARY or self.epoch != epoch:
                        raise RequestError(StatusCode.UNAVAILABLE, f"replica {self.cfg.me} is no longer "
                                           f"primary at epoch {epoch}", reason=NOT_PRIMARY)
                    self._backup_data = (str(joined["host"]), int(joined["data_port"]))
                    self._backup_index = index
                caught_up = len(self._catch_up)
                for op_index, op, message, items in self._catch_up:  # in order, before anything new
                    meta = pack_meta({"op": op, "epoch": epoch, "index": op_index}, message)
                    failed = self._forward(FORWARD, meta, items, op_index, depose=False)
                    if failed is not None:
                        raise failed
                self._catch_up = None
                with self._lock:
                    self._backup_in_sync = True
                    self._backup_error = ""
                    self.solo = False
                self._sent = time.monotonic()
                send_header(conn, StatusCode.OK, b"", 0)
        finally:
            with self._seq:
                self._catch_up = None
                if not self._backup_in_sync:
                    self._drop_link()
        log.info("replica %s: %s joined as backup at epoch %d, operation %d (%d more forwarded after the "
                 "state)", self.cfg.me, self.cfg.peer, epoch, index, caught_up)

    def _snapshot(self) -> CheckpointData:
        """(Under _seq.) The state as a checkpoint: keys, the exactly-once table, open sync rounds."""
        store, policy = self.core.store, self.core.policy
        with policy.checkpoint_lock():
            records, dedupe = store.checkpoint_records()
            rounds, round_tensors = policy.checkpoint_state()
        return CheckpointData(self.shard_index, self.num_shards, policy.name, records,
                              extra={"dedupe": dedupe, "sync_rounds": rounds}, extra_tensors=round_tensors)

    # -- the watcher: heartbeats, takeover, joining ----------------------------------------------

    def _watch(self) -> None:
        period = min(0.2, self.cfg.timeout / 10)
        failing = ""  # the failure the last tick ended with, said once (a peer may stay away long)
        while not self._stop.wait(period):
            try:
                self._tick()
                failing = ""
            except Exception as exc:  # noqa: BLE001 - keep watching; the next tick tries again
                now = f"{type(exc).__name__}: {exc}"
                if now != failing:
                    log.exception("replica %s: replication watcher (said again only when it changes)",
                                  self.cfg.me)
                else:
                    log.debug("replica %s: replication watcher: %s", self.cfg.me, now)
                failing = now

    def _tick(self) -> None:
        with self._lock:
            role, in_sync = self.role, self._backup_in_sync
        now = time.monotonic()
        if role == PRIMARY:
            if in_sync and now - self._sent > self.cfg.timeout / 5:
                if self._seq.acquire(timeout=self.cfg.timeout / 5):
                    try:
                        if self.role == PRIMARY and self._backup_in_sync:
                            self._forward(HEARTBEAT, pack_meta({"epoch": self.epoch}), (), 0)
                    finally:
                        self._seq.release()
            elif not in_sync:
                peer = self._ask_peer()
                if peer is not None and peer.role == PRIMARY and peer.epoch > self.epoch:
                    self._depose(f"{self.cfg.peer} is primary at epoch {peer.epoch}")
            return
        if role == BACKUP:
            if now - self._heard <= self.cfg.timeout:
                return
            peer = self._ask_peer()
            if peer is None or peer.role != PRIMARY or peer.epoch < self.epoch:
                self._take_over("its primary " + (f"is {peer.role} at epoch {peer.epoch}" if peer
                                                  else "cannot be reached") +
                                f" and was silent for {now - self._heard:.1f} s")
            elif peer.epoch > self.epoch:
                self._become(JOINING, f"{self.cfg.peer} is primary at epoch {peer.epoch}")
            return
        peer = self._ask_peer()  # joining or deposed
        if peer is None:
            return
        blocked = self._lost_epoch(role, peer)
        with self._lock:
            was, self._blocked = self._blocked, blocked
        if blocked:
            if blocked != was:
                log.error("replica %s: %s", self.cfg.me, blocked)
            return
        if peer.role == PRIMARY:
            self._join()
        elif peer.role == JOINING and (role == DEPOSED or peer.epoch < self.epoch or
                                       (peer.epoch == self.epoch and self.cfg.index == 0)):
            # Deposed: the only other replica has no state and held no later epoch (its state file),
            # so none newer exists. Both joining (a cold start, or both restarted): the one that held
            # the later epoch begins, the first replica in --replicas at a tie.
            self._promote(peer.epoch, f"{self.cfg.peer} is joining")
        elif peer.role == DEPOSED and role == DEPOSED and \
                (self.epoch, self.index, -self.cfg.index) > (peer.epoch, peer.index, -(1 - self.cfg.index)):
            self._promote(peer.epoch, f"{self.cfg.peer} is deposed with older state")

    def _lost_epoch(self, role: str, peer: pb.Replication) -> str:
        """Why neither replica may go on (\"\" when one may): one of them held a later epoch (its
        state file says so) and came back without that state, while the other has only older state."""
        if role == DEPOSED and peer.role == JOINING and peer.epoch > self.epoch:
            lost, holder, older = peer.epoch, self.cfg.peer, self.cfg.me
        elif role == JOINING and peer.role in (DEPOSED, PRIMARY) and self.epoch > peer.epoch:
            # (a primary of an older epoch is one that has not yet noticed it was replaced)
            lost, holder, older = self.epoch, self.cfg.me, self.cfg.peer
        else:
            return ""
        return (f"replica {holder} held epoch {lost} (it acknowledged updates alone) and restarted without "
                f"that state; replica {older} holds only the older state of epoch "
                f"{min(self.epoch, peer.epoch)}, "
                f"so neither goes on: that would lose what epoch {lost} acknowledged. To keep epoch {lost}'s "
                f"updates, restart both replicas, {holder} from its --checkpoint-dir (the later epoch "
                f"begins; updates since its last checkpoint are lost); to go on from {older}'s older "
                f"state instead (losing epoch {lost}'s updates), delete {STATE_FILE} in {holder}'s "
                f"--checkpoint-dir and restart {holder}")

    def _ask_peer(self) -> pb.Replication | None:
        """The peer's replication state (Hello), or None when it cannot be reached."""
        if self.partitioned.is_set():
            return None
        try:
            reply = self._peer().hello()
        except Exception:  # noqa: BLE001 - unreachable, refused: the same to the rules
            return None
        return reply.replication if reply.HasField("replication") else None

    def _peer(self):
        if self._peer_client is None:
            from optserve.client.security import Security
            from optserve.client.transport import RetryPolicy, ShardClient
            security = Security(tls=self.cfg.tls, root_certificates=self.cfg.tls_ca,
                                certificate_chain=self.cfg.tls_cert, private_key=self.cfg.tls_key,
                                token=self.cfg.token or None)
            self._peer_client = ShardClient(self.cfg.peer, timeout=self.cfg.timeout,
                                            retry=RetryPolicy(budget=0), security=security,
                                            data_channel=False)
        return self._peer_client

    def _become(self, role: str, why: str) -> None:
        with self._lock:
            self.role = role
            self.solo = False
            self._backup_in_sync = False
            self.primary = ""
        self._save_epoch()
        log.warning("replica %s: %s (%s)", self.cfg.me, role, why)

    def _take_over(self, why: str) -> None:
        with self._seq:
            with self._lock:
                if self.role != BACKUP:
                    return
                epoch = self.epoch + 1
            self._save_epoch(epoch, PRIMARY)  # before the first solo acknowledgement
            with self._lock:
                self.role, self.epoch, self.solo, self.primary = PRIMARY, epoch, True, self.cfg.me
                self._backup_in_sync = False
                self._backup_error = "the old primary has not rejoined"
                self._blocked = ""
        log.warning("replica %s: took over as primary at epoch %d, alone until %s rejoins: %s",
                    self.cfg.me, self.epoch, self.cfg.peer, why)

    def _promote(self, peer_epoch: int, why: str) -> None:
        with self._seq:
            with self._lock:
                epoch = max(self.epoch, peer_epoch) + 1
            self._save_epoch(epoch, PRIMARY)
            with self._lock:
                self.role, self.primary, self.solo, self.epoch = PRIMARY, self.cfg.me, False, epoch
                self._backup_in_sync = False
                self._backup_error = "not joined yet"
                self._blocked = ""
        log.warning("replica %s: primary at epoch %d, waiting for %s to join: %s", self.cfg.me, self.epoch,
                    self.cfg.peer, why)

    def _join(self) -> None:
        """Take the primary's state (a checkpoint over its data channel) and become its backup."""
        from optserve.client.transport import ShardError
        client = self._peer()
        try:
            hello = client.hello()
        except ShardError:
            return
        host = client.address.rpartition(":")[0].strip("[]")
        sock = self._dial(host, hello.data_port, max(60.0, self.cfg.timeout), "primary")
        installed = False
        try:
            send_header(sock, JOIN, pack_meta({"replica": self.cfg.index}), 0)
            status, meta_len, data_len = read_header(sock)
            meta = read_meta(sock, meta_len)
            if status != StatusCode.OK:
                log.info("replica %s: join refused: %s", self.cfg.me, parse_error(meta)[0])
                return
            header = json.loads(meta.decode())
            data = self._receive_state(sock, header["files"], data_len)
            if (data.shard_index, data.num_shards) != (self.shard_index, self.num_shards):
                raise ValueError(f"the primary {self.cfg.peer} is shard {data.shard_index} of "
                                 f"{data.num_shards}; this replica is {self.shard_index} of "
                                 f"{self.num_shards}")
            # A backup from here: the primary's next forward may come as soon as it has read JOINED.
            self._install(data, int(header["epoch"]), int(header["index"]))
            installed = True
            send_header(sock, JOINED, json.dumps({"host": self._my_host(),
                                                  "data_port": self.core.data_port}).encode(), 0)
            status, meta_len, _ = read_header(sock)
            meta = read_meta(sock, meta_len)
            if status != StatusCode.OK:
                raise ConnectionError(f"the primary did not take this replica: {parse_error(meta)[0]}")
        except BaseException:
            if installed:
                self._become(JOINING, "the join did not complete")
            raise
        finally:
            sock.close()
        log.info("replica %s: joined %s as backup at epoch %d, operation %d", self.cfg.me, self.cfg.peer,
                 self.epoch, self.index)

    def _dial(self, host: str, port: int, send_timeout: float, whom: str):
        """A data-channel connection to the peer replica (TLS when this shard has it), past AUTH;
        ConnectionError when the peer refuses this shard's token."""
        sock = socket.create_connection((host, port), timeout=self.cfg.timeout)
        try:
            tune(sock)
            sock.settimeout(send_timeout)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=host)
            send_header(sock, AUTH, self.cfg.token.encode(), 0)
            status, meta_len, _ = read_header(sock)
            reply = read_meta(sock, meta_len)
            if status != StatusCode.OK:
                raise ConnectionError(f"the {whom} refused this shard's token: {parse_error(reply)[0]}")
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _receive_state(sock, files, data_len: int) -> CheckpointData:
        """A state transfer's files, into a temporary checkpoint directory, verified and loaded."""
        tmp = Path(tempfile.mkdtemp(prefix="optserve-joined-"))
        try:
            path = tmp / "ckpt-00000001"
            path.mkdir()
            left = data_len
            for name, size in files:
                if "/" in name or name.startswith(".") or not 0 <= size <= min(left, MAX_STATE_FILE_BYTES):
                    raise ProtocolError(f"a state transfer names file {name!r} of {size} bytes")
                buf = bytearray(size)
                recv_exact(sock, memoryview(buf))
                (path / name).write_bytes(buf)
                left -= size
            if left:
                raise ProtocolError(f"a state transfer with {left} bytes no file holds")
            return load_checkpoint(path)  # sizes and digests verified
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _my_host(self) -> str:
        return self.cfg.me.rpartition(":")[0].strip("[]")

    def _install(self, data: CheckpointData, epoch: int, index: int) -> None:
        """Replace this replica's state by the primary's (all or nothing per Store.restore)."""
        store, policy = self.core.store, self.core.policy
        # (no worker request reaches a replica without a role; restore_state takes the policy lock itself)
        with self._seq:
            store.clear()
            try:
                store.restore(data.keys, data.extra.get("dedupe", {}))
                policy.restore_state(data.extra.get("sync_rounds", []), data.extra_tensors, store)
            except BaseException:
                store.clear()
                raise
            with self._lock:
                self.role, self.epoch, self.index, self.primary = BACKUP, epoch, index, self.cfg.peer
                self.solo = False
                self._heard = time.monotonic()
                self._blocked = ""
            self._save_epoch()

    # -- status ----------------------------------------------------------------------------------

    def describe(self) -> pb.Replication:
        with self._lock:
            peers = []
            if self.role == PRIMARY:
                # (the backup may answer an operation before this replica finished applying it)
                lag = max(0, self.index - self._backup_index) if self._backup_in_sync else 0
                peers.append(pb.ReplicaPeer(address=self.cfg.peer, in_sync=self._backup_in_sync, lag=lag,
                                            error=self._backup_error))
            return pb.Replication(role=self.role, epoch=self.epoch, index=self.index,
                                  replicas=list(self.cfg.replicas), replica_index=self.cfg.index,
                                  primary=self.primary, solo=self.solo, peers=peers)
