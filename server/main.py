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
from concurrent import futures
from dataclasses import dataclass
from typing import Iterator

import grpc
import torch

from optserve.serde import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES
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


def build_server(cfg: ServerConfig) -> tuple[grpc.Server, Servicer, int]:
    """A started-ready (not yet started) grpc.Server for one shard, and the port it bound."""
    store = Store(resolve_device(cfg.device), StoreLimits(cfg.max_keys, cfg.max_tensor_elements,
                                                          cfg.max_shard_elements))
    policy = cfg.make_policy()
    info = ShardInfo(shard_index=cfg.shard_index, num_shards=cfg.num_shards, policy=policy.name,
                     chunk_bytes=cfg.chunk_bytes, max_message_bytes=cfg.max_message_bytes,
                     wait_timeout=cfg.wait_timeout)
    servicer = Servicer(store, policy, info)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix=f"shard{cfg.shard_index}"),
        options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                 ("grpc.max_send_message_length", cfg.max_message_bytes),
                 ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((generic_handler(servicer),))
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    return server, servicer, port


@contextlib.contextmanager
def run_server(port: int = 0, host: str = "127.0.0.1", **options) -> Iterator[str]:
    """Run one shard in this process; yields its address ("host:port"); stops it on exit."""
    cfg = ServerConfig(host=host, port=port, **options)
    server, _, bound = build_server(cfg)
    server.start()
    try:
        yield f"{host}:{bound}"
    finally:
        server.stop(grace=None).wait()


def serve_main(args: argparse.Namespace) -> int:
    """`optserve serve`: run a shard until SIGTERM or SIGINT."""
    cfg = ServerConfig(host=args.host, port=args.port, device=args.device, policy=args.policy,
                       workers=args.workers, backup_workers=args.backup_workers, stale=args.stale,
                       wait_timeout=args.wait_timeout,
                       shard_index=args.shard_index, num_shards=args.num_shards, threads=args.threads,
                       chunk_bytes=args.chunk_bytes, max_message_bytes=args.max_message_bytes)
    server, _, bound = build_server(cfg)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    # The bound port is printed on stdout for whoever started us with --port 0; logs go to stderr.
    print(f"listening on {cfg.host}:{bound}", flush=True)
    log.info("shard %d/%d listening on %s:%d (policy %s, device %s, plaintext)", cfg.shard_index,
             cfg.num_shards, cfg.host, bound, cfg.make_policy().name, cfg.device)
    stop.wait()
    log.info("stopping: finishing calls in flight (grace 5 s)")
    server.stop(grace=5).wait()
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
    p.add_argument("--shard-index", type=int, default=0, help="this shard's index, 0-based")
    p.add_argument("--num-shards", type=int, default=1, help="how many shards hold the model")
    p.add_argument("--threads", type=int, default=16, help="gRPC worker threads (default 16)")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help="payload bytes per streamed message sent by the shard (default 4 MiB)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest message accepted or sent (default 16 MiB)")
