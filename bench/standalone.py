"""The anchors' minimal standalone forms, and the check that the bench's anchors still equal them.

An anchor is only worth its ratios if it runs as fast inside the bench as on its own: a bench
process hosting other threads, a helper spinning next to it, or a different send pattern makes
"raw TCP" slower than TCP, and every ratio to it flatters optserve. So every run that times an
anchor also times its minimal form here, in fresh processes while nothing else of the bench is
alive, and `compare` flags an anchor more than `TOLERANCE` away from it: its section prints a
warning and its targets read INVALID.

Minimal forms (each two processes, this file as `__main__` on both sides):
- `tcp`: the pinger listens, spawns the echo, accepts; both set TCP_NODELAY, keep the kernel's
  default buffers and blocking sockets. A round trip `sendall`s a 64 MiB tensor in 4 MiB memoryview
  slices and `recv_into`s 64 MiB into a preallocated tensor; the echo `recv_into`s all 64 MiB into
  its preallocated tensor and sends them back the same way. Written from scratch on purpose (it
  shares no code with bench/anchors.py, so a change there cannot move both).
- `rpc`: the trainer spawns the PS; TensorPipe with the anchor's options (`anchors.rpc_options`:
  the two must match); `rpc_sync("ps", ...)` with a fp32 gradient, fused torch Adam on the PS,
  the parameter returned.
Both run with OMP_WAIT_POLICY=PASSIVE unless the environment sets it, as the bench's anchors do.

    python bench/standalone.py tcp --nbytes 67108864 --reps 7 --warmup 2
    python bench/standalone.py rpc --numel 16777216 --reps 7 --warmup 2

Each prints one JSON line {"s": [round-trip seconds, one per rep]} (rpc adds "ps_step_s").
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SLICE = 4 << 20
TOLERANCE = 0.10  # an anchor may differ from its standalone form by this much (medians)


# ------------------------------------------------------------------------------------------------
# The minimal forms (run in their own processes)


def _recv_all(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("peer closed")
        got += k


def _send_all(sock: socket.socket, view: memoryview) -> None:
    for start in range(0, len(view), SLICE):
        sock.sendall(view[start:start + SLICE])


def _tensor_view(nbytes: int, fill: str):
    import torch
    t = torch.randn(nbytes // 4) if fill == "randn" else torch.zeros(nbytes // 4)  # pages faulted in
    return t, memoryview(t.numpy()).cast("B")


def tcp_echo(port: int, nbytes: int) -> None:
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _, view = _tensor_view(nbytes, "zeros")
    with sock:
        while True:
            try:
                _recv_all(sock, view)
            except ConnectionError:
                return
            _send_all(sock, view)


def tcp_pinger(nbytes: int, reps: int, warmup: int) -> dict:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(1)
    echo = subprocess.Popen([sys.executable, __file__, "tcp-echo", str(listener.getsockname()[1]), str(nbytes)])
    try:
        listener.settimeout(60)
        sock, _ = listener.accept()
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _, src = _tensor_view(nbytes, "randn")
        _, dst = _tensor_view(nbytes, "zeros")
        out = []
        with sock:
            for i in range(warmup + reps):
                t0 = time.perf_counter()
                _send_all(sock, src)
                _recv_all(sock, dst)
                if i >= warmup:
                    out.append(time.perf_counter() - t0)
        echo.wait(30)
        return {"s": out}
    finally:
        listener.close()
        if echo.poll() is None:
            echo.kill()


_PS = None  # (param, optimizer) in the PS process


def _apply_grad(grad):
    """(Runs on "ps".) As the anchor's apply_grad: one fused Adam step; the parameter and its time."""
    param, opt = _PS
    t0 = time.perf_counter()
    param.grad = grad
    opt.step()
    return param.detach(), time.perf_counter() - t0


def rpc_ps(port: int, numel: int) -> None:
    global _PS
    from bench.anchors import rpc_env, rpc_options
    rpc_env(port)
    import torch
    from torch.distributed import rpc
    param = torch.nn.Parameter(torch.randn(numel) * 0.01)
    _PS = (param, torch.optim.Adam([param], lr=1e-3, fused=True))
    rpc.init_rpc("ps", rank=0, world_size=2, rpc_backend_options=rpc_options(port))
    rpc.shutdown()  # waits for the trainer's shutdown


def rpc_trainer(numel: int, reps: int, warmup: int) -> dict:
    from bench.anchors import rpc_env, rpc_options
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    rpc_env(port)
    import torch
    from torch.distributed import rpc
    ps = subprocess.Popen([sys.executable, __file__, "rpc-ps", str(port), str(numel)], env=_env())
    try:
        grad = torch.randn(numel) * 0.01
        rpc.init_rpc("trainer", rank=1, world_size=2, rpc_backend_options=rpc_options(port))
        out, steps = [], []
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            _, step_s = rpc.rpc_sync("ps", _apply_grad, (grad,))
            if i >= warmup:
                out.append(time.perf_counter() - t0)
                steps.append(step_s)
        rpc.shutdown()
        ps.wait(60)
        return {"s": out, "ps_step_s": steps}
    finally:
        if ps.poll() is None:
            ps.kill()


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def main(argv: Sequence[str]) -> int:
    import argparse
    # As bench/run.py sets it for the anchors (before torch loads): OpenMP threads sleep, not spin,
    # after a parallel region; the PS's fused Adam step would otherwise leave a thread spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if argv and argv[0] == "tcp-echo":
        tcp_echo(int(argv[1]), int(argv[2]))
        return 0
    if argv and argv[0] == "rpc-ps":
        rpc_ps(int(argv[1]), int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description="an anchor's minimal standalone form")
    ap.add_argument("kind", choices=["tcp", "rpc"])
    ap.add_argument("--nbytes", type=int, default=64 << 20, help="tcp: bytes each way")
    ap.add_argument("--numel", type=int, default=16 << 20, help="rpc: fp32 elements each way")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    if args.kind == "tcp":
        res = tcp_pinger(args.nbytes, args.reps, args.warmup)
    else:
        res = rpc_trainer(args.numel, args.reps, args.warmup)
    print(json.dumps(res), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Bench side: run a minimal form, compare an anchor with it


def run(kind: str, size: int, reps: int, warmup: int, timeout: float = 180.0) -> dict:
    """Run the minimal form `kind` ("tcp": size = bytes each way; "rpc": size = elements) in fresh
    processes; returns its JSON ({"s": [...], ...}). Call it while no helper of the bench is alive."""
    flag = "--nbytes" if kind == "tcp" else "--numel"
    proc = subprocess.run([sys.executable, __file__, kind, flag, str(size), "--reps", str(reps),
                           "--warmup", str(warmup)], capture_output=True, text=True, timeout=timeout,
                          env=_env(), stdin=subprocess.DEVNULL)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"standalone {kind} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def compare(name: str, anchor_s: Sequence[float], standalone_s: Sequence[float],
            tolerance: float = TOLERANCE) -> dict:
    """An anchor's round-trip times against its standalone form's: ratio of medians (anchor /
    standalone, > 1: the anchor is slower) and whether it is within `tolerance` either way."""
    a, s = statistics.median(anchor_s), statistics.median(standalone_s)
    ratio = a / s
    valid = abs(ratio - 1.0) <= tolerance
    line = (f"{name}: {a * 1e3:.1f} ms in the bench vs {s * 1e3:.1f} ms standalone "
            f"({ratio:.2f}x; {'within' if valid else 'beyond'} {tolerance:.0%})")
    return {"name": name, "anchor_ms": a * 1e3, "standalone_ms": s * 1e3, "ratio": ratio,
            "tolerance": tolerance, "valid": valid, "line": line}


def check_lines(checks: Sequence[dict], loads: Sequence[float | None] = ()) -> str:
    """The report's lines for a section's anchor checks: one per anchor, WARNING when off; then the
    other processes' CPU load while the standalone forms ran (before, after)."""
    out = []
    for c in checks:
        if c["valid"]:
            out.append(f"  anchor check: {c['line']}")
        else:
            out.append(f"  WARNING: anchor check failed: {c['line']}; targets on this anchor are INVALID")
    known = [x for x in loads if x is not None]
    if known:
        out.append(f"  other-process CPU load while the standalone forms ran: {', '.join(f'{x:.0f}%' for x in known)}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
