"""Bench (b)'s step with the shard's tensors on each device: one RemoteAdam.step() of a 16 M-element
(64 MiB) parameter, gradient pushed and parameter pulled, against an in-process shard on the CPU and
on CUDA, interleaved round-robin. On CUDA the step includes the host->device copy of the gradient
and the device->host copy of the parameter (pinned staging) beside the kernel, which the CPU row
does not. bench/device_check.sh runs it on the GPU machine; a tiny --numel checks it anywhere.

    python bench/device_step.py [--devices cpu,cuda] [--reps 7] [--warmup 2] [--numel N] [--json F]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from optserve import RemoteAdam  # noqa: E402
from optserve.server.main import run_server  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--numel", type=int, default=16 << 20)
    p.add_argument("--json", help="write the samples here")
    args = p.parse_args(argv)
    devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        print("device_step: cuda asked for, but torch.cuda.is_available() is false", file=sys.stderr)
        return 3
    samples: dict[str, list[float]] = {d: [] for d in devices}
    with contextlib.ExitStack() as stack:
        opts = {}
        for d in devices:
            address = stack.enter_context(run_server(device=d))
            param = torch.nn.Parameter(torch.zeros(args.numel))
            param.grad = torch.randn(args.numel)
            opts[d] = stack.enter_context(RemoteAdam([(f"bench.device_step.{d}", param)], [address],
                                                     slice_elements=2 * args.numel))
        for _ in range(args.warmup):
            for opt in opts.values():
                opt.step()
        for _ in range(args.reps):
            for d, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                samples[d].append((time.perf_counter() - t0) * 1e3)
    mib = args.numel * 4 / 2**20
    for d, ms in samples.items():
        print(f"(b) step {mib:g}+{mib:g} MiB, shard on {d}: {statistics.median(ms):.2f} ms "
              f"({min(ms):.2f}-{max(ms):.2f}), n={len(ms)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"numel": args.numel, "ms": samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
