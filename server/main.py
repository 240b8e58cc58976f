"""Shard process lifecycle: build the gRPC server, run it in-process or as `optserve serve`.

`run_server(...)` is a context manager yielding the bound address (port 0 picks a free one), used by
tests, the demo and the CLI alike. This module wires pieces together; it holds no state of its own.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc
import torch

from optserve.serde import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from optserve.server.checkpoint import CheckpointData, restore_latest, write_checkpoint
from optserve.server.policy import parse_policy
from optserve.server.service import ShardInfo, Servicer, generic_handler
from optserve.server.store import Store, StoreLimits

log = logging.getLogger("optserve.server")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `optserve serve` takes, validated once here; the rest of the server trusts it."""
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "cpu"
    policy: str = "async"
    workers: int = 0  # sync: gradients per step
    backup_workers: int = 0  # sync: step after workers - backup_workers
    stale: str = "reject"  # ssp: what to do with a push over the bound (reject or scale)
    wait_timeout: float = 60.0  # sync: longest a worker waits for a step
    checkpoint_dir: str = ""  # empty: no checkpoints
    checkpoint_every: float = 0.0  # seconds between periodic checkpoints; 0: only on request and SIGTERM
    keep: int = 2  # checkpoints kept
    apply_log: str = ""  # a file to append one JSON line per applied push to
    shard_index: int = 0
    num_shards: int = 1
    threads: int = 16
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_keys: int = StoreLimits.max_keys
    max_tensor_elements: int = StoreLimits.max_tensor_elements
    max_shard_elements: int = StoreLimits.max_shard_elements

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard index must be in 0..{self.num_shards - 1} (num_shards "
                             f"{self.num_shards}), got {self.shard_index}")
        if self.threads < 2:
            raise ValueError(f"threads must be >= 2, got {self.threads}")
        if not 4096 <= self.chunk_bytes <= self.max_message_bytes - (64 << 10):
            raise ValueError(f"chunk_bytes must be in 4096..max_message_bytes - 64 KiB "
                             f"({self.max_message_bytes - (64 << 10)}), got {self.chunk_bytes}")
        for name in ("max_keys", "max_tensor_elements", "max_shard_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint_every must be >= 0 and keep >= 1, got {self.checkpoint_every}, "
                             f"{self.keep}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every needs --checkpoint-dir")
        if not self.wait_timeout > 0:
            raise ValueError(f"wait timeout must be > 0 seconds, got {self.wait_timeout}")
        resolve_device(self.device)
        self.make_policy()

    def make_policy(self):
        return parse_policy(self.policy, self.workers, self.backup_workers, self.stale)


def resolve_device(spec: str) -> torch.device:
    device = torch.device(spec)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA devices here")
    return device


class Checkpointer:
    """Writes the shard's checkpoints (one at a time) and restores the newest at start.

    A checkpoint copies every key under the store's lock (and, for sync, the policy's), then writes
    the copies without any lock: pushes wait at most for the copy.
    """

    def __init__(self, store: Store, policy, cfg: ServerConfig):
        self.store = store
        self.policy = policy
        self.cfg = cfg
        self.directory = Path(cfg.checkpoint_dir)
        self._write_lock = threading.Lock()
        self._last: tuple[str, float] = ("", 0.0)  # path, time.time() of its snapshot
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def last(self) -> tuple[str, float]:
        path, taken = self._last
        return path, (time.time() - taken) if path else 0.0

    def write(self) -> tuple[Path, int, float]:
        with self._write_lock:
            start = time.monotonic()
            taken = time.time()
            with self.policy.checkpoint_lock():
                records, dedupe = self.store.checkpoint_records(self.policy.pending_pushes())
            data = CheckpointData(self.cfg.shard_index, self.cfg.num_shards, self.policy.name, records,
                                  extra={"dedupe": dedupe}, created=taken)
            path = write_checkpoint(self.directory, data, keep=self.cfg.keep)
            self._last = (str(path), taken)
            seconds = time.monotonic() - start
            log.info("checkpoint %s: %d keys in %.2f s", path, len(records), seconds)
            return path, len(records), seconds

    def restore(self) -> Path | None:
        found = restore_latest(self.directory)
        if found is None:
            log.info("no checkpoint in %s: starting empty", self.directory)
            return None
        data, path = found
        if (data.shard_index, data.num_shards) != (self.cfg.shard_index, self.cfg.num_shards):
            raise ValueError(f"checkpoint {path} is of shard {data.shard_index} of {data.num_shards}; this "
                             f"shard is {self.cfg.shard_index} of {self.cfg.num_shards}")
        if data.policy != self.policy.name:
            log.warning("checkpoint %s was written under policy %s; continuing under %s", path, data.policy,
                        self.policy.name)
        self.store.restore(data.keys, data.extra.get("dedupe", {}))
        self._last = (str(path), data.created)
        return path

    def start(self) -> None:
        if self.cfg.checkpoint_every > 0:
            self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.checkpoint_every):
            try:
                self.write()
            except Exception:  # noqa: BLE001 - keep serving; the next period tries again
                log.exception("periodic checkpoint failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def build_server(cfg: ServerConfig, interceptors: Sequence[grpc.ServerInterceptor] = ()
                 ) -> tuple[grpc.Server, Servicer, int]:
    """A ready (not yet started) grpc.Server for one shard, its servicer, and the port it bound.

    With a checkpoint directory the newest checkpoint is restored before the port is bound.
    """
    store = Store(resolve_device(cfg.device), StoreLimits(cfg.max_keys, cfg.max_tensor_elements,
                                                          cfg.max_shard_elements),
                  apply_log=open(cfg.apply_log, "a", encoding="utf-8") if cfg.apply_log else None)
    policy = cfg.make_policy()
    checkpointer = Checkpointer(store, policy, cfg) if cfg.checkpoint_dir else None
    if checkpointer is not None:
        checkpointer.restore()
    info = ShardInfo(shard_index=cfg.shard_index, num_shards=cfg.num_shards, policy=policy.name,
                     chunk_bytes=cfg.chunk_bytes, max_message_bytes=cfg.max_message_bytes,
                     wait_timeout=cfg.wait_timeout)
    servicer = Servicer(store, policy, info, checkpointer)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix=f"shard{cfg.shard_index}"),
        interceptors=list(interceptors),
        options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                 ("grpc.max_send_message_length", cfg.max_message_bytes),
                 ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((generic_handler(servicer),))
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    return server, servicer, port


@contextlib.contextmanager
def run_server(port: int = 0, host: str = "127.0.0.1", interceptors: Sequence[grpc.ServerInterceptor] = (),
               **options) -> Iterator[str]:
    """Run one shard in this process; yields its address ("host:port"); stops it on exit."""
    cfg = ServerConfig(host=host, port=port, **options)
    server, servicer, bound = build_server(cfg, interceptors)
    server.start()
    if servicer.checkpointer is not None:
        servicer.checkpointer.start()
    try:
        yield f"{host}:{bound}"
    finally:
        server.stop(grace=None).wait()
        if servicer.checkpointer is not None:
            servicer.checkpointer.stop()


def serve_main(args: argparse.Namespace) -> int:
    """`optserve serve`: run a shard until SIGTERM or SIGINT (then write a final checkpoint)."""
    cfg = ServerConfig(host=args.host, port=args.port, device=args.device, policy=args.policy,
                       workers=args.workers, backup_workers=args.backup_workers, stale=args.stale,
                       wait_timeout=args.wait_timeout, checkpoint_dir=args.checkpoint_dir or "",
                       checkpoint_every=args.checkpoint_every, keep=args.keep, apply_log=args.apply_log or "",
                       shard_index=args.shard_index, num_shards=args.num_shards, threads=args.threads,
                       chunk_bytes=args.chunk_bytes, max_message_bytes=args.max_message_bytes)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server, servicer, bound = build_server(cfg)
    server.start()
    checkpointer = servicer.checkpointer
    if checkpointer is not None:
        checkpointer.start()
    # The bound port is printed on stdout for whoever started us with --port 0; logs go to stderr.
    print(f"listening on {cfg.host}:{bound}", flush=True)
    log.info("shard %d/%d listening on %s:%d (policy %s, device %s, plaintext)", cfg.shard_index,
             cfg.num_shards, cfg.host, bound, servicer.policy.name, cfg.device)
    stop.wait()
    log.info("stopping: finishing calls in flight (grace 5 s)")
    server.stop(grace=5).wait()
    if checkpointer is not None:
        checkpointer.stop()
        checkpointer.write()  # after the last call: everything acknowledged is in it
    log.info("stopped")
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="port (0: any free one, printed at start)")
    p.add_argument("--device", default="cpu", help="where params and Adam state live: cpu, cuda, cuda:N")
    p.add_argument("--policy", default="async",
                   help="when pushes are applied: async (default: at once), sync (average --workers "
                        "gradients per step), ssp:S (refuse or scale pushes more than S versions behind)")
    p.add_argument("--workers", type=int, default=0, help="sync: gradients averaged into each step")
    p.add_argument("--backup-workers", type=int, default=0,
                   help="sync: step after the first workers - b gradients; later ones are dropped")
    p.add_argument("--stale", choices=("reject", "scale"), default="reject",
                   help="ssp: refuse a push over the bound (FAILED_PRECONDITION, the client re-pulls) or "
                        "apply it with lr / (staleness + 1)")
    p.add_argument("--wait-timeout", type=float, default=60.0,
                   help="sync: seconds a worker waits for the other workers' gradients (default 60)")
    p.add_argument("--checkpoint-dir", help="write checkpoints here, and restore the newest at start")
    p.add_argument("--checkpoint-every", type=float, default=0.0,
                   help="seconds between periodic checkpoints (default 0: only on request and SIGTERM)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--apply-log", help="append one JSON line per applied push (its order) to this file")
    p.add_argument("--shard-index", type=int, default=0, help="this shard's index, 0-based")
    p.add_argument("--num-shards", type=int, default=1, help="how many shards hold the model")
    p.add_argument("--threads", type=int, default=16, help="gRPC worker threads (default 16)")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help="payload bytes per streamed message sent by the shard (default 4 MiB)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest message accepted or sent (default 16 MiB)")
