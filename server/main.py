"""Shard process lifecycle: configuration, wiring (`Shard`), checkpoints, `optserve serve`.

`run_server(...)` is a context manager yielding the bound address (port 0 picks a free one), used by
tests and the demo; `optserve serve` runs the same `Shard`. This module wires pieces together; it
does no request handling and no tensor math.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optserve.errors import StatusCode
from optserve.serde import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_MESSAGE_BYTES
from optserve.server.checkpoint import CheckpointData, list_checkpoints, restore_latest, write_checkpoint
from optserve.net import is_loopback, load_token
from optserve.server.applylog import ApplyLog
from optserve.server.auth import TokenInterceptor, server_credentials, server_ssl_context
from optserve.server.data import DataServer
from optserve.server.metrics import ShardMetrics
from optserve.server.compensate import DEFAULT_DEPTH
from optserve.server.policy import Policy, parse_policy
from optserve.server.requests import RequestCore, ShardInfo, checkpoint_failed
from optserve.server.service import DEFAULT_IDLE_TIMEOUT, SERVICE_NAME, Servicer, generic_handler
from optserve.server.store import Store, StoreLimits
from optserve.server.threads import INTRA_OP
from optserve.server.shm import DEFAULT_MAX_BYTES as SHM_MAX_BYTES
from optserve.shm import SHM_DIR

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
    compensate: str = ""  # async: DC-ASGD, dc:λ or dca:λ0[:m] (server/compensate.py)
    max_dc_versions: int = DEFAULT_DEPTH  # DC-ASGD: parameter versions kept per key
    wait_timeout: float = 60.0  # sync: longest a worker waits for a step
    checkpoint_dir: str = ""  # empty: no checkpoints
    checkpoint_every: float = 0.0  # seconds between periodic checkpoints; 0: only on request and SIGTERM
    keep: int = 2  # checkpoints kept
    apply_log: str = ""  # a file to append one JSON line per applied push to
    apply_log_max_gradient_bytes: int = 0  # > 0: the apply log keeps the gradients, up to this many bytes
    shard_index: int = 0
    num_shards: int = 1
    threads: int = 16
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds a gRPC call may wait on its peer for a message
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_keys: int = StoreLimits.max_keys
    max_tensor_elements: int = StoreLimits.max_tensor_elements
    max_shard_elements: int = StoreLimits.max_shard_elements
    dedupe_bytes: int = StoreLimits.dedupe_bytes  # the exactly-once table's memory cap
    insecure: bool = False  # allow plaintext on a non-loopback address
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # mutual TLS: clients must present a certificate this CA signed
    token_file: str = ""  # bearer token (else OPTSERVE_TOKEN); never a command-line value
    metrics_port: int = -1  # Prometheus /metrics port; -1: off, 0: any free port
    data_port: int = 0  # data channel port (server/data.py); 0: any free one, -1: none (gRPC only)
    shm_max_bytes: int = SHM_MAX_BYTES  # all shared-memory segments together (server/shm.py); 0: off
    shm_dir: str = SHM_DIR  # where segments are created (a tmpfs both sides see)
    metrics_host: str = "127.0.0.1"
    # replication (server/replication.py): every replica of this shard index's gRPC address, in order
    # ("A,B"; empty: this shard is the only copy), this one's place in it, and the failure timeout
    replicas: str = ""
    replica_index: int = 0
    replica_timeout: float = 5.0
    replica_ca: str = ""  # PEM CA the peer replica's certificate is checked against (default: own cert)

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
        for name in ("max_keys", "max_tensor_elements", "max_shard_elements", "dedupe_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.keep < 1:
            raise ValueError(f"checkpoint_every must be >= 0 and keep >= 1, got {self.checkpoint_every}, "
                             f"{self.keep}")
        if self.apply_log_max_gradient_bytes < 0:
            raise ValueError(f"--apply-log-max-gradient-bytes must be >= 0, got "
                             f"{self.apply_log_max_gradient_bytes}")
        if self.apply_log_max_gradient_bytes and not self.apply_log:
            raise ValueError("--apply-log-max-gradient-bytes needs --apply-log")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("--checkpoint-every needs --checkpoint-dir")
        if not self.idle_timeout > 0:
            raise ValueError(f"idle timeout must be > 0 seconds, got {self.idle_timeout}")
        if not self.wait_timeout > 0:
            raise ValueError(f"wait timeout must be > 0 seconds, got {self.wait_timeout}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if not self.tls_cert and not self.insecure and not is_loopback(self.host):
            raise ValueError(f"refusing plaintext on {self.host}: give --tls-cert/--tls-key, or --insecure "
                             f"to accept unencrypted traffic")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in -1..65535, got {self.metrics_port}")
        if not -1 <= self.data_port <= 65535:
            raise ValueError(f"data port must be in -1..65535, got {self.data_port}")
        if self.shm_max_bytes < 0:
            raise ValueError(f"shm max bytes must be >= 0 (0: no shared memory), got {self.shm_max_bytes}")
        resolve_device(self.device)
        self.make_policy()
        if self.replicas:
            if self.data_port < 0:
                raise ValueError("replication forwards over the data channel: --replicas needs a data port "
                                 "(not --data-port -1)")
            self.replica_config()

    def replica_config(self, token: str = ""):
        """The replication settings (ValueError when they do not make a replica set)."""
        from optserve.server.replication import ReplicaConfig

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return ReplicaConfig(tuple(a.strip() for a in self.replicas.split(",")), self.replica_index,
                             self.replica_timeout, token=token, tls=bool(self.tls_cert),
                             state_dir=self.checkpoint_dir,
                             tls_ca=read(self.replica_ca or self.tls_cert) if self.tls_cert else None,
                             tls_cert=read(self.tls_cert) if self.tls_client_ca else None,
                             tls_key=read(self.tls_key) if self.tls_client_ca else None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """The configuration `add_serve_arguments` parsed: every field from the argument of its name
        (an optional path left out, None, takes the field's default, "")."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{f.name: f.default if values[f.name] is None else values[f.name]
                      for f in dataclasses.fields(cls)})

    def make_policy(self) -> Policy:
        return parse_policy(self.policy, self.workers, self.backup_workers, self.stale, self.compensate,
                            self.max_dc_versions)


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


class BindError(OSError):
    """A port of the shard's could not be bound (in use, or an address not this host's)."""


@contextlib.contextmanager
def _binding(what: str, undo: Callable[[], None] = lambda: None):
    """Turn a failure to bind `what` into BindError (after `undo()`): a message, not a traceback."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # grpc's add_*_port raises RuntimeError("Failed to bind ...")
        undo()
        raise BindError(f"could not bind {what}: {getattr(exc, 'strerror', None) or exc}") from None


def _bracketed(host: str) -> str:
    """An IPv6 host as it goes before ":port" ([::1]); others as they are."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class ShardMismatch(Exception):
    """The checkpoint directory belongs to another shard: not a damaged checkpoint, a wrong setup."""


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
            with self.policy.checkpoint_lock():  # the keys and the open sync rounds at one instant
                records, dedupe = self.store.checkpoint_records()
                rounds, round_tensors = self.policy.checkpoint_state()
            data = CheckpointData(self.cfg.shard_index, self.cfg.num_shards, self.policy.name, records,
                                  extra={"dedupe": dedupe, "sync_rounds": rounds},
                                  extra_tensors=round_tensors, created=taken)
            path = write_checkpoint(self.directory, data, keep=self.cfg.keep)
            self._last = (str(path), taken)
            seconds = time.monotonic() - start
            log.info("checkpoint %s: %d keys in %.2f s", path, len(records), seconds)
            return path, len(records), seconds

    def restore(self) -> Path | None:
        """Restore the newest checkpoint whose contents make a valid shard (older ones are tried)."""
        def apply(data: CheckpointData) -> None:
            if (data.shard_index, data.num_shards) != (self.cfg.shard_index, self.cfg.num_shards):
                raise ShardMismatch(f"a checkpoint in {self.directory} is of shard {data.shard_index} of "
                                    f"{data.num_shards}; this shard is {self.cfg.shard_index} of "
                                    f"{self.cfg.num_shards}")
            self.store.restore(data.keys, data.extra.get("dedupe", {}))
            try:
                self.policy.restore_state(data.extra.get("sync_rounds", []), data.extra_tensors, self.store)
            except BaseException:
                self.store.clear()
                raise

        try:
            found = restore_latest(self.directory, apply)
        except ShardMismatch as exc:
            raise ValueError(str(exc)) from None
        if found is None:
            unusable = list_checkpoints(self.directory)
            if unusable:  # starting empty would soon prune them: the state would be gone for good
                raise ValueError(f"none of the {len(unusable)} checkpoints in {self.directory} can be "
                                 "restored (the warnings above say why); move them away to start this "
                                 "shard empty")
            log.info("no checkpoint in %s: starting empty", self.directory)
            return None
        data, path = found
        if data.policy != self.policy.name:
            log.warning("checkpoint %s was written under policy %s; continuing under %s", path, data.policy,
                        self.policy.name)
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


class Shard:
    """One shard's process-level pieces, wired: store, policy, request core, its two doors (gRPC
    servicer, data channel), health, reflection, checkpoints and metrics. Named phases: the
    constructor wires and binds nothing; `start()` binds every port, restores, serves; `stop()` drains."""

    def __init__(self, cfg: ServerConfig, interceptors: Sequence[grpc.ServerInterceptor] = ()):
        self.cfg = cfg
        store = Store(resolve_device(cfg.device), StoreLimits(cfg.max_keys, cfg.max_tensor_elements,
                                                              cfg.max_shard_elements, cfg.dedupe_bytes),
                      apply_log=(ApplyLog(cfg.apply_log, cfg.apply_log_max_gradient_bytes) if cfg.apply_log
                                 else None))
        policy = cfg.make_policy()
        self.checkpointer = Checkpointer(store, policy, cfg) if cfg.checkpoint_dir else None
        self.metrics = ShardMetrics()
        info = ShardInfo(shard_index=cfg.shard_index, num_shards=cfg.num_shards, policy=policy.name,
                         chunk_bytes=cfg.chunk_bytes, max_message_bytes=cfg.max_message_bytes,
                         wait_timeout=cfg.wait_timeout)
        self.core = RequestCore(store, policy, info, self.checkpointer, self.metrics)
        self.metrics.watch(self.core)
        token = load_token(cfg.token_file)
        chain = list(interceptors)
        if token:
            chain.insert(0, TokenInterceptor(token, lambda method: self.core.counters.refused(
                StatusCode.UNAUTHENTICATED)))
        threads = cfg.threads
        if policy.waits and threads < 2 * cfg.workers + 4:
            # Under sync every worker may have a call waiting for its round in a gRPC thread (and one
            # more on its way): with fewer threads the last worker's push queues behind the waits and
            # the round can only end by timing out.
            threads = 2 * cfg.workers + 4
            log.info("gRPC threads raised from %d to %d: %d sync workers may each wait in one",
                     cfg.threads, threads, cfg.workers)
        # the gRPC door (the data channel is the other); it keeps threads for Hello, Stats and health
        self.servicer = Servicer(self.core, threads, cfg.idle_timeout)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"shard{cfg.shard_index}"),
            interceptors=chain,
            options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                     ("grpc.max_send_message_length", cfg.max_message_bytes),
                     ("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca or None) \
            if cfg.tls_cert else None
        self.data = None
        if cfg.data_port >= 0:
            ssl_context = server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca or None) \
                if cfg.tls_cert else None
            self.data = DataServer(self.core, cfg.host, cfg.data_port, token, ssl_context,
                                   max_meta_bytes=cfg.max_message_bytes, shm_max_bytes=cfg.shm_max_bytes,
                                   shm_dir=cfg.shm_dir)
        self.token = bool(token)
        self.replication = None
        if cfg.replicas:
            from optserve.server.replication import Replicator
            self.replication = Replicator(self.core, cfg.replica_config(token), cfg.shard_index,
                                          cfg.num_shards)
            self.core.replication = self.replication
        self.port = 0  # the gRPC port, once start() bound it
        self.metrics_port = None

    @property
    def address(self) -> str:
        return f"{_bracketed(self.cfg.host)}:{self.port}"

    def _set_health(self, serving: bool) -> None:
        response = health_pb2.HealthCheckResponse
        status = response.SERVING if serving else response.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _bind(self) -> None:
        """Bind the gRPC port, then the data channel's (BindError naming the port; then nothing stays
        bound)."""
        address = f"{_bracketed(self.cfg.host)}:{self.cfg.port}"
        with _binding(address):
            self.port = self.server.add_secure_port(address, self._credentials) if self._credentials \
                else self.server.add_insecure_port(address)
        if self.port == 0:
            raise BindError(f"could not bind {address}")
        if self.data is not None:
            # on failure, the gRPC port bound above is released
            with _binding(f"the data channel on {_bracketed(self.cfg.host)}:{self.cfg.data_port}",
                          lambda: self.server.stop(None)):
                self.data.bind()
            self.core.data_port = self.data.port

    def start(self) -> None:
        """Bind, then serve: health says NOT_SERVING (and calls get UNAVAILABLE) until a checkpoint is
        restored."""
        self._bind()
        self._set_health(False)
        self.core.ready.clear()
        self.server.start()
        if self.data is not None:
            self.data.start()
        try:
            if self.cfg.metrics_port >= 0:
                with _binding(f"the metrics port {self.cfg.metrics_host}:{self.cfg.metrics_port}"):
                    self.metrics_port = self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
            if self.checkpointer is not None:
                self.checkpointer.restore()
                self.checkpointer.start()
        except BaseException:  # no port stays bound by a shard that did not start
            self.stop(grace=0)
            raise
        self.core.ready.set()
        self._set_health(True)
        if self.replication is not None:
            self.replication.start()  # joins its peer, or begins as primary (server/replication.py)
        cfg = self.cfg
        log.info("shard %d/%d serving on %s%s (policy %s, device %s, %s, %s%s)",
                 cfg.shard_index, cfg.num_shards, self.address,
                 f", data channel on port {self.data.port}" if self.data else "",
                 self.core.policy.name, cfg.device,
                 ("mutual TLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "PLAINTEXT (no TLS)",
                 "token required" if self.token else "no token",
                 f", metrics on {cfg.metrics_host}:{self.metrics_port}" if self.metrics_port else "")

    def stop(self, grace: float | None = None, final_checkpoint: bool = False) -> None:
        """Stop serving (finishing calls in flight for `grace` seconds); optionally checkpoint last.

        New calls are refused with UNAVAILABLE from here on (clients retry them against the restarted
        shard) rather than being cancelled by grpc's shutdown."""
        self.core.stop_serving("the shard is shutting down")
        if self.replication is not None:
            self.replication.stop()
        self.health.enter_graceful_shutdown()
        stopped = self.server.stop(grace)
        if self.data is not None:
            self.data.stop(grace)
        stopped.wait()
        self.servicer.idle.close()
        self.metrics.stop()
        if self.checkpointer is not None:
            self.checkpointer.stop()
            if final_checkpoint:
                self.checkpointer.write()  # after the last call: everything acknowledged is in it


@contextlib.contextmanager
def run_server(port: int = 0, host: str = "127.0.0.1", interceptors: Sequence[grpc.ServerInterceptor] = (),
               **options) -> Iterator[str]:
    """Run one shard in this process; yields its address ("host:port"); stops it on exit."""
    shard = Shard(ServerConfig(host=host, port=port, **options), interceptors)
    shard.start()
    try:
        yield shard.address
    finally:
        shard.stop()


def serve_main(args: argparse.Namespace) -> int:
    """`optserve serve`: run a shard until SIGTERM or SIGINT (then write a final checkpoint)."""
    cfg = ServerConfig.from_args(args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    # A shard process: small tensors on one thread, large ones on torch's count (server/threads.py).
    INTRA_OP.manage(torch.get_num_threads())
    shard = Shard(cfg)
    shard.start()
    # The bound port is printed on stdout for whoever started us with --port 0 (once every port is
    # bound and the checkpoint restored: the shard serves); logs go to stderr.
    print(f"listening on {shard.address}", flush=True)
    stop.wait()
    log.info("stopping: finishing calls in flight (grace 5 s)")
    return stop_with_final_checkpoint(shard)


# `optserve serve`'s exit codes (README: Command line): 0 stopped (final checkpoint written, when
# checkpointing), 1 an unexpected error, 2 a configuration error or a port in use, and:
EXIT_FINAL_CHECKPOINT_FAILED = 3  # stopped, but the final checkpoint could not be written


def stop_with_final_checkpoint(shard: Shard, grace: float = 5) -> int:
    """Stop `shard` and write its final checkpoint; the exit code (a disk that refuses the checkpoint
    is said in one line, not a traceback: the previous checkpoints are kept)."""
    try:
        shard.stop(grace=grace, final_checkpoint=True)
    except OSError as exc:
        log.error("stopped, but %s", checkpoint_failed(exc, shard.cfg.checkpoint_dir).message)
        return EXIT_FINAL_CHECKPOINT_FAILED
    log.info("stopped")
    return 0


def _shard_index(value: str) -> int:
    if value == "auto":
        from optserve.client.discovery import shard_index_from_env
        try:
            return shard_index_from_env()
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {value!r}") from None


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
    p.add_argument("--compensate", default="",
                   help="async: delay-compensate stale gradients (DC-ASGD): dc:LAMBDA (constant, e.g. "
                        "dc:0.04) or dca:LAMBDA0[:M] (adaptive, M default 0.95); README: Training modes")
    p.add_argument("--max-dc-versions", type=int, default=DEFAULT_DEPTH,
                   help=f"DC-ASGD: parameter versions kept per key (default {DEFAULT_DEPTH}; costs that many "
                        "copies of the shard's parameters); a push staler than this is refused as stale")
    p.add_argument("--wait-timeout", type=float, default=60.0,
                   help="sync: seconds a worker waits for the other workers' gradients (default 60)")
    p.add_argument("--checkpoint-dir", help="write checkpoints here, and restore the newest at start")
    p.add_argument("--checkpoint-every", type=float, default=0.0,
                   help="seconds between periodic checkpoints (default 0: only on request and SIGTERM)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    p.add_argument("--apply-log", help="append one JSON line per applied push (its order, options, digests "
                                        "of its gradient and of the state after it) to this file")
    p.add_argument("--apply-log-max-gradient-bytes", type=int, default=0,
                   help="also keep the applied gradients in APPLY_LOG.grad (raw float32), up to this many "
                        "bytes, for `optserve replay`; at the bound later pushes are logged with digests "
                        "only (default 0: digests only)")
    p.add_argument("--shard-index", type=_shard_index, default=0,
                   help="this shard's index, 0-based; auto: OPTSERVE_SHARD_INDEX, else the ordinal "
                        "ending the host name (a StatefulSet pod optserve-2 is shard 2)")
    p.add_argument("--num-shards", type=int, default=1, help="how many shards hold the model")
    p.add_argument("--threads", type=int, default=16,
                   help="gRPC worker threads (default 16; under sync at least 2 x workers + 4); 2 are kept "
                        "for Hello, Stats and health, and waiting calls hold at most half of the rest")
    p.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT,
                   help=f"seconds a gRPC call may wait on its peer for the next message, sent or taken, "
                        f"before the shard ends it (default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback address (loopback is plaintext by default)")
    p.add_argument("--tls-cert", help="PEM certificate chain of this shard (with --tls-key: TLS)")
    p.add_argument("--tls-key", help="PEM private key of this shard")
    p.add_argument("--tls-client-ca", help="PEM CA: mutual TLS, clients need a certificate it signed")
    p.add_argument("--token-file", help="file holding the bearer token clients must send (else the "
                                         "OPTSERVE_TOKEN environment variable, else the file "
                                         "OPTSERVE_TOKEN_FILE names; none: no token)")
    p.add_argument("--metrics-port", type=int, default=-1,
                   help="serve Prometheus metrics on this port (0: any free port; default off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default "
                                                               "127.0.0.1)")
    p.add_argument("--data-port", type=int, default=0,
                   help="port of the data channel, which carries Push/Pull/PushPull as raw frames over TCP "
                        "(TLS and token as for gRPC); announced in Hello (default 0: any free port; "
                        "-1: none, tensors travel over gRPC)")
    p.add_argument("--replicas", default="",
                   help="replicate this shard index: the gRPC addresses of its 2 replicas, in order "
                        "(A,B), the same on both; the primary forwards every change to the backup before "
                        "it acknowledges (README: Replicated shards)")
    p.add_argument("--replica-index", type=int, default=0,
                   help="this replica's place in --replicas (0-based)")
    p.add_argument("--replica-timeout", type=float, default=5.0,
                   help="seconds of silence after which a backup takes over from its primary, and after "
                        "which a primary that cannot reach its backup stops acknowledging (default 5)")
    p.add_argument("--replica-ca", help="PEM CA to check the other replica's certificate with (default: "
                                        "this shard's own --tls-cert)")
    p.add_argument("--shm-max-bytes", type=int, default=SHM_MAX_BYTES,
                   help="bytes that the shared-memory segments of all data connections may hold together "
                        "(default 2 GiB; 0: off): workers on this host move tensor bytes through them")
    p.add_argument("--shm-dir", default=SHM_DIR,
                   help=f"tmpfs where those segments are created (default {SHM_DIR}; workers must see it)")
    p.add_argument("--max-keys", type=int, default=StoreLimits.max_keys,
                   help="keys per shard (default 65536, up to 6 KiB each before tensors; RESOURCE_EXHAUSTED "
                        "beyond)")
    p.add_argument("--max-tensor-elements", type=int, default=StoreLimits.max_tensor_elements,
                   help="elements per key (default 2**29)")
    p.add_argument("--max-shard-elements", type=int, default=StoreLimits.max_shard_elements,
                   help="elements per shard (default 2**29; up to 24 bytes each with Adam state and buffers)")
    p.add_argument("--dedupe-bytes", type=int, default=StoreLimits.dedupe_bytes,
                   help="memory cap of the exactly-once table (default 256 MiB); at the cap results older "
                        "than 120 s are forgotten, and beyond that new pushes get RESOURCE_EXHAUSTED")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES,
                   help="payload bytes per streamed message sent by the shard (default 4 MiB)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest message accepted or sent (default 16 MiB)")
