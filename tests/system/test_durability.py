"""Durability (issue #5): crash and restore, SIGTERM, a corrupt checkpoint, retried pushes, and load.

Shards run as real `optserve serve` processes (stderr to a log file under tmp_path), except where an
interceptor has to sit inside the server. A shard's state is read back through Pull of PARAM, EXP_AVG
and EXP_AVG_SQ with each key's step, and compared bitwise (sha256 of the raw bytes). Nothing here
waits on time: processes are waited for on their "listening on" line, exit or a shard's Stats, with
generous timeouts as hang guards only. Run as a script (`workers N ADDR...`) this file forks the
load test's worker processes.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc
import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.export import gather
from optserve.client.transport import ShardClient, ShardError
from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import encode
from optserve.server.checkpoint import TENSORS_FILE, list_checkpoints, load_checkpoint
from optserve.server.store import GradEntry, Store

pytestmark = pytest.mark.system

OPTSERVE = [sys.executable, "-m", "optserve.cli"]
# One intra-op thread per process: the machine is small and shared, and these tensors are tiny.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
HANG_GUARD = 180.0  # seconds; only ever reached when something is stuck
PARTS = {"param": pb.PARAM, "exp_avg": pb.EXP_AVG, "exp_avg_sq": pb.EXP_AVG_SQ}


# --- shard processes ---------------------------------------------------------------------------

@dataclass
class ShardProcess:
    proc: subprocess.Popen
    address: str
    log: Path
    args: tuple[str, ...]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


class Shards:
    """Starts `optserve serve` processes and kills whatever is left of them at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def _launch(self, log: Path, args: Sequence[str], port: int) -> subprocess.Popen:
        with open(log, "ab") as err:
            proc = subprocess.Popen([*OPTSERVE, "serve", "--port", str(port), *args], stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=ENV)
        self.procs.append(proc)
        return proc

    def _listening(self, proc: subprocess.Popen, log: Path) -> str:
        ready, _, _ = select.select([proc.stdout], [], [], HANG_GUARD)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            proc.kill()
            proc.wait()
            raise AssertionError(f"shard did not start: {line!r}\n{log.read_text(errors='replace')}")
        return line.split()[-1]

    def start(self, *per_shard_args: Sequence[str]) -> list[ShardProcess]:
        """Start one shard per argument list (index i of len(per_shard_args)), all at once."""
        n = len(per_shard_args)
        launched = []
        for i, extra in enumerate(per_shard_args):
            args = ("--shard-index", str(i), "--num-shards", str(n), *map(str, extra))
            log = self.tmp_path / f"shard{i}.log"
            launched.append((self._launch(log, args, 0), log, args))
        return [ShardProcess(proc, self._listening(proc, log), log, args) for proc, log, args in launched]

    def restart(self, shard: ShardProcess) -> ShardProcess:
        """The same shard again (same arguments, port and log file) after its process ended."""
        assert shard.proc.poll() is not None, "restart a shard only after its process has ended"
        proc = self._launch(shard.log, shard.args, shard.port)
        address = self._listening(proc, shard.log)
        assert address == shard.address
        return ShardProcess(proc, address, shard.log, shard.args)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()


@pytest.fixture
def shards(tmp_path):
    s = Shards(tmp_path)
    try:
        yield s
    finally:
        s.close()


def kill(shard: ShardProcess) -> None:
    shard.proc.send_signal(signal.SIGKILL)
    assert shard.proc.wait(timeout=HANG_GUARD) == -signal.SIGKILL


# --- reading a shard's state -------------------------------------------------------------------

def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def shard_state(address: str) -> dict[str, dict]:
    """Every key of a shard: {key: {"step": int, "param"|"exp_avg"|"exp_avg_sq": sha256 of its bytes}}."""
    client = ShardClient(address, timeout=60.0)
    try:
        client.hello(wait=HANG_GUARD)
        keys = [k.key for k in client.stats().keys]
        tensors: dict[tuple[str, int], torch.Tensor] = {}
        steps: dict[str, int] = {}

        def sink(head: pb.PullHead) -> dict[tuple[int, int], torch.Tensor]:
            out = {}
            for i, info in enumerate(head.entries):
                steps[info.key] = int(info.step)
                for part in PARTS.values():
                    out[(i, part)] = tensors[(info.key, part)] = torch.empty(math.prod(info.shape))
            return out

        client.pull(pb.PullRequest(keys=keys, parts=list(PARTS.values())), sink)
    finally:
        client.close()
    return {k: {"step": steps[k], **{name: _digest(tensors[(k, part)]) for name, part in PARTS.items()}}
            for k in keys}


def checkpoint_state(path: str | Path) -> dict[str, dict]:
    """A checkpoint's keys in shard_state's form."""
    return {r.name: {"step": r.step, **{name: _digest(r.tensors[name]) for name in PARTS}}
            for r in load_checkpoint(path).keys}


def stats(address: str) -> pb.StatsReply:
    client = ShardClient(address, timeout=60.0)
    try:
        return client.stats()
    finally:
        client.close()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll a shard-side condition (Stats) until it holds; the deadline is a hang guard only."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- models and gradients ----------------------------------------------------------------------

def tiny_model() -> nn.Module:
    """8-16-4 MLP with the same weights every time (its own generator; the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(1234)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=gen)
    return model


def synthetic_grad(worker: int, step: int, name: str, shape: Sequence[int]) -> torch.Tensor:
    """The gradient worker `worker` sends for parameter `name` at its step `step`: a pure function."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{worker}/{step}/{name}".encode()))
    return torch.randn(tuple(shape), generator=gen)


def synthetic_step(model: nn.Module, opt: RemoteAdam, worker: int, step: int) -> None:
    for name, p in model.named_parameters():
        p.grad = synthetic_grad(worker, step, name, p.shape)
    opt.step()


def backward_step(model: nn.Module, opt: RemoteAdam, step: int) -> None:
    """A real backward on a batch that depends only on `step` (so two runs see the same gradients)."""
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
    opt.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


# --- 1. crash: SIGKILL mid-push, restore the checkpoint, train on to the demo's accuracy ---------

def test_killed_shard_restores_its_checkpoint_bitwise_and_training_reaches_the_demo_accuracy(tmp_path, shards):
    from optserve import demo

    sklearn, _, _ = demo.require_demo_packages()
    seed, steps_before_checkpoint, total_steps = 0, 40, 200
    x_train, y_train, x_test, y_test = demo.load_digits(sklearn, seed)
    batches = demo.batches(x_train, y_train, 32, total_steps, seed + 1)
    model = demo.make_model(seed)
    shard0, shard1 = shards.start(["--checkpoint-dir", tmp_path / "ckpt0"],
                                  ["--checkpoint-dir", tmp_path / "ckpt1"])
    servers = [shard0.address, shard1.address]

    def train(opt: RemoteAdam, n: int) -> None:
        for xb, yb in itertools.islice(batches, n):
            demo.train_step(model, opt, xb, yb)

    with demo.torch_threads(1), ThreadPoolExecutor(2) as pool, \
            RemoteAdam(model.named_parameters(), servers, lr=3e-3, retry_budget=HANG_GUARD,
                       **demo.ADAM_OPTIONS, **demo.REMOTE_ONLY_OPTIONS) as opt:
        train(opt, steps_before_checkpoint)
        paths = opt.checkpoint()
        at_checkpoint = shard_state(shard1.address)
        train(opt, 1)  # shard 1 is now ahead of its checkpoint
        shard1_keys = sorted(pl.key for pl in opt.placements if pl.shard == 1)

        # A raw push that stops after its first chunk: the shard holds half a push when it dies.
        key = next(pl for pl in opt.placements if pl.shard == 1 and pl.numel > 64)
        head = pb.PushHead(client_id="half-a-push", seq=1, wire_dtype=pb.FLOAT32, hyper=[pb.HyperParams(lr=0.1)],
                           entries=[pb.PushEntry(key=key.key, version_read=opt.versions[key.key])])
        first = pb.PushRequest(head=head, segments=[pb.Segment(entry=0, part=pb.GRAD, offset=0, count=64)])
        first_bytes = encode(first.SerializeToString(), [bytes(4 * 64)])
        release = threading.Event()

        def half_a_push() -> Iterator[bytes]:
            yield first_bytes
            release.wait(HANG_GUARD)

        bytes_in = stats(shard1.address).bytes_in
        with grpc.insecure_channel(shard1.address) as channel:
            half = channel.stream_unary("/optserve.v1.OptServe/Push").future(half_a_push(), timeout=HANG_GUARD)
            wait_for(lambda: stats(shard1.address).bytes_in >= bytes_in + len(first_bytes),
                     "shard 1 to read the first chunk of the half push")

            # Freeze shard 1, start a step (its push to shard 1 hangs in flight), then kill shard 1.
            shard1.proc.send_signal(signal.SIGSTOP)
            pushes0 = stats(shard0.address).pushes
            in_flight = pool.submit(train, opt, 1)
            wait_for(lambda: stats(shard0.address).pushes > pushes0, "the step's push to shard 0")
            kill(shard1)
            with pytest.raises(grpc.RpcError):
                half.result(timeout=HANG_GUARD)
            release.set()

        shard1 = shards.restart(shard1)
        in_flight.result(timeout=HANG_GUARD)  # retried through the restart; its gradient was "ahead"
        restored = shard_state(shard1.address)
        restored_stats = stats(shard1.address)
        worker_versions = {k: opt.versions[k] for k in shard1_keys}
        dropped = opt.dropped_pushes

        train(opt, total_steps - steps_before_checkpoint - 2)

    assert sorted(at_checkpoint) == shard1_keys
    assert checkpoint_state(paths[1]) == at_checkpoint
    assert restored == at_checkpoint
    assert restored_stats.checkpoint == paths[1]
    assert f"restored checkpoint {paths[1]}" in shard1.stderr()
    assert dropped == 1
    assert worker_versions == {k: at_checkpoint[k]["step"] for k in shard1_keys}
    served = demo.make_model(seed + 1)
    served.load_state_dict(gather(servers))
    assert demo.accuracy(served, x_test, y_test) >= demo.ACCURACY_TARGET


# --- 2. SIGTERM: a final checkpoint with every acknowledged push ---------------------------------

def test_sigterm_writes_a_final_checkpoint_holding_every_acknowledged_push(tmp_path, shards):
    ckpt = tmp_path / "ckpt"
    [shard] = shards.start(["--checkpoint-dir", ckpt])
    model = tiny_model()
    acknowledged: list[dict[str, torch.Tensor]] = []  # the parameters pulled by each acknowledged step
    enough = threading.Event()

    def work() -> ShardError:
        """Step until a push fails (no retries); return that failure."""
        with RemoteAdam(model.named_parameters(), [shard.address], lr=0.01, retry_budget=0.0) as opt:
            for step in itertools.count():
                try:
                    synthetic_step(model, opt, 0, step)
                except ShardError as exc:
                    return exc
                acknowledged.append({n: p.detach().clone() for n, p in model.named_parameters()})
                if len(acknowledged) == 20:
                    enough.set()

    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(work)
        assert enough.wait(HANG_GUARD)
        shard.proc.send_signal(signal.SIGTERM)  # while the worker keeps pushing
        exit_code = shard.proc.wait(timeout=HANG_GUARD)
        refused = worker.result(timeout=HANG_GUARD)
    written = list_checkpoints(ckpt)
    first_run_log = shard.stderr()
    shard = shards.restart(shard)
    restored = shard_state(shard.address)

    assert exit_code == 0
    assert refused.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)  # refused, not failed
    assert len(written) == 1  # the one SIGTERM wrote: none was requested
    assert f"checkpoint {written[0]}: " in first_run_log
    assert {k: s["step"] for k, s in restored.items()} == {n: len(acknowledged) for n in acknowledged[-1]}
    assert {k: s["param"] for k, s in restored.items()} == {n: _digest(t) for n, t in acknowledged[-1].items()}


def test_a_worker_with_a_retry_budget_steps_on_through_sigterm_restarts_applying_each_push_once(tmp_path, shards):
    [shard] = shards.start(["--checkpoint-dir", tmp_path / "ckpt"])
    model = tiny_model()
    acknowledged = 0
    progress = threading.Condition()
    stop = threading.Event()

    def work() -> RemoteAdam:
        nonlocal acknowledged
        try:
            with RemoteAdam(model.named_parameters(), [shard.address], lr=0.01, retry_budget=HANG_GUARD) as opt:
                while not stop.is_set():
                    synthetic_step(model, opt, 0, acknowledged)
                    with progress:
                        acknowledged += 1
                        progress.notify_all()
                return opt
        finally:  # wake the waiter also when the worker gives up
            with progress:
                progress.notify_all()

    def wait_for_steps(n: int) -> None:
        with progress:
            assert progress.wait_for(lambda: acknowledged >= n or worker.done(), HANG_GUARD)

    exit_codes = []
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(work)
        for cycle in range(3):  # a push is in flight whenever SIGTERM lands: the worker never pauses
            wait_for_steps(10 * (cycle + 1))
            shard.proc.send_signal(signal.SIGTERM)
            exit_codes.append(shard.proc.wait(timeout=HANG_GUARD))
            shard = shards.restart(shard)
        wait_for_steps(40)
        stop.set()
        opt = worker.result(timeout=HANG_GUARD)  # re-raises the worker's ShardError, if it gave up
    state = shard_state(shard.address)

    assert exit_codes == [0, 0, 0]
    assert opt.dropped_pushes == 0
    pulled = dict(model.named_parameters())
    assert {k: s["step"] for k, s in state.items()} == {n: acknowledged for n in pulled}
    assert {k: s["param"] for k, s in state.items()} == {n: _digest(p.detach()) for n, p in pulled.items()}


# --- 3. a corrupt newest checkpoint: fall back to the previous one, with a warning --------------

def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, shards):
    [shard] = shards.start(["--checkpoint-dir", tmp_path / "ckpt"])
    model = tiny_model()
    with RemoteAdam(model.named_parameters(), [shard.address], lr=0.01) as opt:
        for step in range(3):
            synthetic_step(model, opt, 0, step)
        [older] = opt.checkpoint()
        at_older = shard_state(shard.address)
        for step in range(3, 6):
            synthetic_step(model, opt, 0, step)
        [newest] = opt.checkpoint()
    kill(shard)  # no final checkpoint
    tensors = Path(newest) / TENSORS_FILE
    os.truncate(tensors, tensors.stat().st_size // 2)

    shard = shards.restart(shard)
    restored = shard_state(shard.address)

    assert restored == at_older
    assert {s["step"] for s in restored.values()} == {3}
    assert stats(shard.address).checkpoint == older
    warnings = [line for line in shard.stderr().splitlines() if " WARNING " in line]
    assert any(newest in line and "truncated" in line for line in warnings), warnings


# --- 4. retried pushes: a reply lost after the push was applied is not applied again ------------

class FailEveryNthReply(grpc.ServerInterceptor):
    """Lets every Push / PushPull run, then replaces every `every`-th successful reply with UNAVAILABLE.

    For PushPull the handler's whole reply stream is consumed (the push and the pull both happen)
    before the call is aborted, so the client sees nothing but the error.
    """

    METHODS = ("/optserve.v1.OptServe/Push", "/optserve.v1.OptServe/PushPull")

    def __init__(self, every: int = 3):
        self.every = every
        self.injected = 0
        self._succeeded = 0
        self._lock = threading.Lock()

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._succeeded += 1
            fail = self._succeeded % self.every == 0
            self.injected += fail
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the reply was lost")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.METHODS:
            return handler
        options = dict(request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
        if handler.response_streaming:
            def push_pull(request_iterator, context):
                replies = list(handler.stream_stream(request_iterator, context))
                self._maybe_fail(context)
                yield from replies
            return grpc.stream_stream_rpc_method_handler(push_pull, **options)

        def push(request_iterator, context):
            reply = handler.stream_unary(request_iterator, context)
            self._maybe_fail(context)
            return reply
        return grpc.stream_unary_rpc_method_handler(push, **options)


class _ReplyLost(ConnectionError):
    pass


class _DropReplies:
    """A connection stand-in for the shard's data channel: reads from the real socket, and swallows
    everything the handler writes (the reply is 'lost')."""

    def __init__(self, sock):
        self._sock = sock

    def recv_into(self, *args):
        return self._sock.recv_into(*args)

    def sendall(self, data):
        pass

    def sendmsg(self, buffers):
        return sum(len(memoryview(b).cast("B")) for b in buffers)


class FailEveryNthDataReply:
    """The data channel's counterpart of FailEveryNthReply: every `every`-th Push / PushPull runs
    whole on the shard, its reply is dropped and the connection closed, as when a network fails
    after the shard has applied a push."""

    def __init__(self, every: int = 3):
        self.every = every
        self.injected = 0
        self._handled = 0
        self._lock = threading.Lock()

    def install(self, data_server) -> None:
        from optserve.frames import PUSH, PUSH_PULL, SHM_PUSH, SHM_PUSH_PULL
        handle = data_server._handle

        def faulty(conn, receiver, shm, kind, meta_len, data_len):
            if kind not in (PUSH, PUSH_PULL, SHM_PUSH, SHM_PUSH_PULL):  # bytes on the socket or in shared memory
                return handle(conn, receiver, shm, kind, meta_len, data_len)
            with self._lock:
                self._handled += 1
                fail = self._handled % self.every == 0
            if not fail:
                return handle(conn, receiver, shm, kind, meta_len, data_len)
            before = data_server.core.counters.rejected
            handle(_DropReplies(conn), receiver, shm, kind, meta_len, data_len)
            with self._lock:
                self.injected += data_server.core.counters.rejected == before
            raise _ReplyLost("injected: the reply was lost")  # the shard closes the connection

        data_server._handle = faulty


@contextlib.contextmanager
def _shard_with_faults(transport: str, fault, **options) -> Iterator[str]:
    """An in-process shard; `fault` (or None) loses replies on the given transport."""
    from optserve.server.main import ServerConfig, Shard
    interceptors = [fault] if fault is not None and transport == "grpc" else []
    shard = Shard(ServerConfig(**options), interceptors)
    if fault is not None and transport == "data":
        fault.install(shard.data)
    shard.start()
    try:
        yield shard.address
    finally:
        shard.stop()


def _train_two_workers(transport: str, faults: Sequence, steps: int) -> tuple[list[dict], list[pb.StatsReply]]:
    """A PushPull worker, then an overlap (Push) worker, `steps` backward steps each, on 2 in-process shards."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(_shard_with_faults(transport, fault, shard_index=i, num_shards=2))
                   for i, fault in enumerate(faults)]
        for overlap in (False, True):
            model = tiny_model()
            with RemoteAdam(model.named_parameters(), servers, lr=0.01, overlap=overlap,
                            data_channel=transport == "data") as opt:
                for step in range(steps):
                    backward_step(model, opt, step)
        return [shard_state(s) for s in servers], [stats(s) for s in servers]


@pytest.mark.parametrize("transport", ["grpc", "data"])
def test_pushes_retried_after_a_lost_reply_are_applied_exactly_once(transport):
    steps = 30
    fault = FailEveryNthReply if transport == "grpc" else FailEveryNthDataReply
    faults = [fault(every=3), fault(every=3)]

    faulty_state, faulty_stats = _train_two_workers(transport, faults, steps)
    clean_state, clean_stats = _train_two_workers(transport, [None, None], steps)

    assert all(f.injected > 0 for f in faults)
    assert [s.duplicates for s in faulty_stats] == [f.injected for f in faults]
    assert [s.duplicates for s in clean_stats] == [0, 0]
    for state, reply in zip(faulty_state, faulty_stats):
        assert {k: s["step"] for k, s in state.items()} == {k: 2 * steps for k in state}
        assert {k.key: (k.version, k.pushes) for k in reply.keys} == {k: (2 * steps, 2 * steps) for k in state}
    assert faulty_state == clean_state


# --- 5. load: 8 worker processes x 100 pushes; the apply log replays bitwise ----------------------

LOAD_WORKERS, LOAD_PUSHES, LOAD_LR = 8, 100, 0.01


def _load_worker(worker: int, servers: list[str]) -> None:
    """One load-test worker process: LOAD_PUSHES steps of synthetic gradients through RemoteAdam."""
    torch.set_num_threads(1)
    model = tiny_model()
    with RemoteAdam(model.named_parameters(), servers, lr=LOAD_LR, client_id=f"worker-{worker}") as opt:
        for step in range(LOAD_PUSHES):
            synthetic_step(model, opt, worker, step)


def replay(apply_log: Path, keys: Sequence[str]) -> dict[str, dict]:
    """Re-apply a shard's apply log, in its order, on a fresh Store; returns its state like shard_state.

    Each push's gradients are regenerated from (client_id, seq): a worker's pushes to one shard are
    its steps in order, so the rank of seq among that client's pushes to this shard is its step.
    """
    lines = [json.loads(line) for line in apply_log.read_text().splitlines()]
    seqs: dict[str, list[int]] = {}
    for line in lines:
        seqs.setdefault(line["client_id"], []).append(line["seq"])
    step_of = {(c, seq): rank for c, ss in seqs.items() for rank, seq in enumerate(sorted(ss))}
    initial = dict(tiny_model().named_parameters())
    store = Store("cpu")
    store.create([(k, tuple(initial[k].shape), initial[k].detach().reshape(-1).clone(), {}) for k in keys])
    for line in lines:
        # the wire id is the worker's client_id, "/", and its RemoteAdam's own suffix
        worker = int(line["client_id"].split("/")[0].removeprefix("worker-"))
        step = step_of[(line["client_id"], line["seq"])]
        store.apply([GradEntry(key=store.get(k), version_read=vr, cfg=AdamConfig(lr=lr),
                               pieces=[(0, synthetic_grad(worker, step, k, initial[k].shape).reshape(-1))])
                     for k, vr, lr in zip(line["keys"], line["version_read"], line["lr"])])
    return {k: {"step": store.get(k).step, **{name: _digest(store.get(k).part(part)) for name, part in PARTS.items()}}
            for k in keys}


def _run_load_workers(n: int, servers: list[str]) -> int:
    """Fork n worker processes (torch and optserve are imported once, no channel exists yet); 0 if all succeed."""
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_load_worker, args=(w, servers), name=f"worker-{w}") for w in range(n)]
    for p in workers:
        p.start()
    for p in workers:
        p.join()
    return int(any(p.exitcode != 0 for p in workers))


def test_eight_worker_processes_give_every_key_800_steps_and_the_apply_log_replays_bitwise(tmp_path, shards):
    logs = [tmp_path / f"apply{i}.jsonl" for i in range(2)]
    servers = [s.address for s in shards.start(*(["--apply-log", log] for log in logs))]
    workers_log = tmp_path / "workers.log"

    with open(workers_log, "wb") as err:
        workers = subprocess.run([sys.executable, __file__, "workers", str(LOAD_WORKERS), *servers],
                                 stdout=subprocess.DEVNULL, stderr=err, env=ENV, timeout=HANG_GUARD)
    final = [shard_state(s) for s in servers]
    counts = [Counter(json.loads(line)["client_id"].split("/")[0] for line in log.read_text().splitlines())
              for log in logs]
    replayed = [replay(log, sorted(state)) for log, state in zip(logs, final)]

    assert workers.returncode == 0, workers_log.read_text()[-4000:]
    assert all(final)  # both shards hold keys
    assert {k: s["step"] for state in final for k, s in state.items()} == {
        n: LOAD_WORKERS * LOAD_PUSHES for n, _ in tiny_model().named_parameters()}
    assert counts == [{f"worker-{w}": LOAD_PUSHES for w in range(LOAD_WORKERS)}] * 2
    assert replayed == final


if __name__ == "__main__":  # the load test's worker processes: workers N ADDR...
    if len(sys.argv) < 4 or sys.argv[1] != "workers":
        sys.exit(f"usage: {sys.argv[0]} workers N ADDR...")
    sys.exit(_run_load_workers(int(sys.argv[2]), sys.argv[3:]))
