"""CPU time per RemoteAdam.step(), worker and shard, through shared memory and through the socket.

Wall time on a shared 2-core machine moves with other processes' load; the CPU time the two
processes spend per step moves much less, so it compares the two data paths when `make bench`'s
wall-clock figures are noisy (docs/MEASUREMENTS.md quotes both). One shard (`python -m bench.shard
serve`, a child of this process), one key of N elements, the two variants alternating in rounds:

    python bench/cpu_per_step.py [--numel 16777216] [--steps 5] [--rounds 5] [--skip-adam]

--skip-adam uses a key bench/shard.py's hook makes the shard skip Adam for: the transfer alone.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench/run.py
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import shard_sets  # noqa: E402
from bench.shard import NO_ADAM_PREFIX  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's children (the shard), from /proc."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=16 << 20)
    ap.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-adam", action="store_true")
    args = ap.parse_args()
    from optserve import RemoteAdam
    with contextlib.ExitStack() as stack:
        (addrs,) = stack.enter_context(shard_sets(1, module="bench.shard"))
        opts = {}
        for shm in (False, True):
            param = torch.nn.Parameter(torch.randn(args.numel) * 0.01)
            param.grad = torch.randn(args.numel) * 1e-3
            name = (NO_ADAM_PREFIX if args.skip_adam else "bench.cpu.") + ("shm" if shm else "socket")
            opts[shm] = RemoteAdam([(name, param)], servers=addrs, slice_elements=2 * args.numel, timeout=300,
                                   shm=shm)
            stack.callback(opts[shm].close)
            for _ in range(3):
                opts[shm].step()
        rounds: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        for _ in range(args.rounds):
            for shm, opt in opts.items():
                shard0, worker0, wall0 = children_cpu_seconds(), time.process_time(), time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                shard1, worker1, wall1 = children_cpu_seconds(), time.process_time(), time.perf_counter()
                rounds[shm].append(tuple(1e3 * (b - a) / args.steps for a, b in
                                         ((worker0, worker1), (shard0, shard1), (wall0, wall1))))
    what = "Adam skipped" if args.skip_adam else "with Adam"
    for shm, rows in rounds.items():
        worker, shard, wall = (statistics.median(r[i] for r in rows) for i in range(3))
        print(f"{'shared memory' if shm else 'socket       '} {args.numel:,} elements, {what}: worker CPU "
              f"{worker:.2f} ms, shard CPU {shard:.2f} ms, wall {wall:.2f} ms per step (medians of "
              f"{args.rounds} rounds of {args.steps})")


if __name__ == "__main__":
    main()
