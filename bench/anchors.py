"""Reference transports that optserve is compared against, re-measured in every run.

- Raw TCP loopback (../shared/ANCHORS.md item 3): `TcpEcho` is a spawned process that `recv_into`s a
  preallocated buffer and sends the same bytes back; `TcpPingPong` (in the calling process) sends
  N bytes from a tensor and `recv_into`s them into a preallocated tensor. One round trip moves 2 N
  bytes; its rate is the ceiling for any socket transport on this machine. Both sides' buffers are
  torch tensors (64-B aligned; see TcpEcho for what a bytearray cost). Both sides send in
  `SLICE_BYTES` memoryview slices, as ANCHORS.md's script did: one `sendall` of the whole 64 MiB
  (on sockets with the kernel's default buffers) made the round trip 1.3-1.7x slower than slices in
  alternating runs (docs/MEASUREMENTS.md), and every ratio to this anchor as much too kind.
  bench/standalone.py holds the minimal form each run checks this anchor against.
- torch.distributed.rpc parameter server (ANCHORS.md item 5): two spawned processes, "ps" and
  "trainer", TensorPipe with `_transports=["uv"]`, `_channels=["basic"]` (payload over TCP on
  127.0.0.1, like optserve). The trainer calls `rpc_sync("ps", apply_grad, (grad,))` with a fp32
  gradient; the PS sets `.grad` on an nn.Parameter, runs `torch.optim.Adam(fused=True).step()` and
  returns the parameter (and how long its step took, so the Adam share can be shown).

This module measures nothing on its own; sections time these round trips next to optserve's.
"""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
import warnings

from bench.common import HOST, free_port
from optserve.frames import recv_exact  # the loop optserve's data channel reads with

_HEADER = struct.Struct("<Q")
SLICE_BYTES = 4 << 20


def send_slices(sock: socket.socket, view: memoryview) -> None:
    """`sendall` of `view` in SLICE_BYTES pieces (see the module docstring for why not in one)."""
    for start in range(0, len(view), SLICE_BYTES):
        sock.sendall(view[start:start + SLICE_BYTES])


# ------------------------------------------------------------------------------------------------
# Raw TCP ping-pong


class TcpEcho:
    """(Runs in a Child.) Echo server on 127.0.0.1: receives a length-prefixed payload into a
    preallocated (touched) buffer and sends it back."""

    def __init__(self, max_bytes: int):
        import torch
        # A tensor, not a bytearray: a bytearray's bytes start 16 B past a page (malloc's header), off
        # a cache line, and the kernel's copies into and out of it made the 64 MiB round trip
        # 1.25-1.6x slower than into a 64-B aligned buffer (docs/MEASUREMENTS.md). Zero-filled: its
        # pages are faulted in now, not while timing.
        self.buf = torch.zeros(max_bytes, dtype=torch.uint8)
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        view = memoryview(self.buf.numpy())
        head = bytearray(_HEADER.size)
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    recv_exact(conn, memoryview(head))
                    (n,) = _HEADER.unpack(head)
                    recv_exact(conn, view[:n])
                    send_slices(conn, view[:n])
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self.sock.close()


class TcpPingPong:
    """Client side: `round_trip()` sends nbytes from a tensor and receives them back into a
    preallocated tensor; returns seconds."""

    def __init__(self, port: int, nbytes: int):
        import torch
        self.n = nbytes
        self.src = torch.randn(nbytes // 4)
        self.dst = torch.zeros(nbytes // 4)  # zero_: faulted in before timing
        self.src_view = memoryview(self.src.numpy()).cast("B")
        self.dst_view = memoryview(self.dst.numpy()).cast("B")
        self.sock = socket.create_connection((HOST, port), timeout=60)
        self.sock.settimeout(None)  # blocking, as the echo's and the standalone form's sockets
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(_HEADER.pack(self.n))
        send_slices(self.sock, self.src_view)
        recv_exact(self.sock, self.dst_view)
        return time.perf_counter() - t0

    def close(self) -> None:
        self.sock.close()


def tcp_echo_spec(max_bytes: int) -> tuple:
    """A `children(...)` spec for the echo server."""
    return (TcpEcho, (max_bytes,), "tcp-echo")


# ------------------------------------------------------------------------------------------------
# torch.distributed.rpc parameter server

_PS = None  # (param, optimizer) in the "ps" process


def rpc_env(port: int) -> None:
    os.environ.update(TP_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR=HOST, MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")  # torch.distributed prints deprecation warnings on init


def rpc_options(port: int):
    """TensorPipe over TCP on 127.0.0.1; bench/standalone.py's minimal form uses the same."""
    from torch.distributed import rpc
    return rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://{HOST}:{port}", num_worker_threads=8,
                                           rpc_timeout=120, _transports=["uv"], _channels=["basic"])


def apply_grad(grad):
    """(Runs on "ps" via rpc_sync.) One fused Adam step with this gradient; returns the parameter
    and the seconds the step took."""
    param, opt = _PS
    t0 = time.perf_counter()
    param.grad = grad
    opt.step()
    step_s = time.perf_counter() - t0
    return param.detach(), step_s


class RpcParameterServer:
    """(Runs in a Child.) The "ps" rank: one nn.Parameter of `numel` fp32 and fused torch Adam."""

    def __init__(self, port: int, numel: int):
        global _PS
        rpc_env(port)
        import torch
        from torch.distributed import rpc
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(numel) * 0.01)
        _PS = (param, torch.optim.Adam([param], lr=1e-3, fused=True))
        rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=rpc_options(port))

    def close(self) -> None:
        from torch.distributed import rpc
        rpc.shutdown()


class RpcTrainer:
    """(Runs in a Child.) The "trainer" rank: `round_trip()` pushes one gradient and gets the
    parameter back; returns (round-trip seconds, seconds of the PS's Adam step)."""

    def __init__(self, port: int, numel: int):
        rpc_env(port)
        import torch
        from torch.distributed import rpc
        self.grad = torch.randn(numel) * 0.01
        rpc.init_rpc("trainer", rank=1, world_size=2, rpc_backend_options=rpc_options(port))

    def round_trip(self) -> tuple[float, float]:
        from torch.distributed import rpc
        t0 = time.perf_counter()
        _, step_s = rpc.rpc_sync("ps", apply_grad, (self.grad,))
        return time.perf_counter() - t0, step_s

    def close(self) -> None:
        from torch.distributed import rpc
        rpc.shutdown()


def torch_rpc_specs(numel: int) -> tuple[tuple, tuple]:
    """`children(...)` specs for the PS and the trainer (they rendezvous on a fresh port)."""
    port = free_port()
    return (RpcParameterServer, (port, numel), "torch-rpc-ps"), (RpcTrainer, (port, numel), "torch-rpc-trainer")

