"""The 64+64 MiB shared-memory step pass by pass, against the raw TCP anchor timed in the same run.

Section (b)'s b/shm target asks RemoteAdam.step through shared memory to take at most half of the
raw TCP round trip. This times, interleaved round-robin with that anchor (bench/anchors.py, a
64 MiB ping-pong with a child process), each pass over the bytes the step makes, with the code
the step runs, on buffers faulted in beforehand (as the worker's and the shard's are):

- worker: gradient -> segment (optserve/shm.py `place`);
- shard: segment -> staging buffer (`fill`);
- shard: the gradient's NaN/Inf and overflow check (server/requests.py `check_finite`);
- shard: Adam on 16,777,216 fp32 elements (server/adam.py `adam_fast`: torch's fused kernel);
- shard: parameter -> segment (`place`);
- worker: segment -> parameter (`fill`);

and, to compare the ways to copy: the same copies on one thread, torch's `copy_`, and a pipelined
form (one thread writes the gradient into the segment in 4 MiB chunks while another copies each
finished chunk out: what overlapping the worker's and the shard's copies would do). The sum of the
six passes is a floor for the step in this design (no Python, no socket, no wake-ups, no waiting
for the other side); b/shm needs the whole step under TCP / 2.

    python bench/shm_budget.py [--reps 9]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the shard (optserve/cli.py) and bench/run.py
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.anchors import TcpPingPong, tcp_echo_spec  # noqa: E402
from bench.common import MiB, CpuLoad, Settings, children, fmt, interleave, summary, table, timed  # noqa: E402

NBYTES = 64 * MiB
NUMEL = NBYTES // 4
CHUNK = 4 * MiB

W_IN = "worker: gradient -> segment (place)"
S_IN = "shard: segment -> staging (fill)"
CHECK = "shard: NaN/Inf + overflow check (check_finite)"
ADAM = "shard: Adam, fused, 16.8 M elements (adam_fast)"
S_OUT = "shard: parameter -> segment (place)"
W_OUT = "worker: segment -> parameter (fill)"
PASSES = [W_IN, S_IN, CHECK, ADAM, S_OUT, W_OUT]
ONE_THREAD = "gradient -> segment -> staging, one memmove thread each"
COPY_ = "gradient -> segment -> staging, torch copy_"
PIPELINED = "gradient -> segment -> staging, pipelined by 4 MiB chunks (2 threads)"
SPLIT = "gradient -> segment -> staging, as place + fill"
TCP = "raw TCP ping-pong 64+64 MiB (anchor)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    from optserve import shm
    from optserve.frames import whole_segments
    from optserve.proto.optserve.v1 import optserve_pb2 as pb
    from optserve.serde import Expected, Outgoing
    from optserve.server.adam import AdamConfig, adam_fast
    from optserve.server.requests import check_finite

    grad, model = torch.randn(NUMEL) * 1e-3, torch.randn(NUMEL)
    staging, param = torch.zeros(NUMEL), torch.randn(NUMEL)
    exp_avg, exp_avg_sq = torch.zeros(NUMEL), torch.zeros(NUMEL)
    cfg, step = AdamConfig(), [0]
    expected = {(0, pb.GRAD): Expected(NUMEL, torch.float32, "g")}
    segments = whole_segments([Outgoing(0, pb.GRAD, grad)])
    with tempfile.TemporaryDirectory(dir=shm.SHM_DIR) as d, contextlib.ExitStack() as stack:
        segment = shm.Segment.create(d, NBYTES)
        stack.callback(segment.close)
        segment.region.fill_(0)  # faulted in, as a segment is after its first step
        region = segment.region.view(torch.float32)

        def place(t):
            return lambda: shm.place([Outgoing(0, pb.GRAD, t)], torch.float32, segment)

        def fill(dest):
            return lambda: shm.fill(expected, segments, segment.data(NBYTES), {(0, pb.GRAD): dest})

        def adam():
            step[0] += 1
            adam_fast([param], [staging], [exp_avg], [exp_avg_sq], None, [step[0]], cfg)

        def one_thread():
            saved, shm.SPLIT_BYTES = shm.SPLIT_BYTES, 1 << 62
            try:
                place(grad)()
                fill(staging)()
            finally:
                shm.SPLIT_BYTES = saved

        def copy_():
            region.copy_(grad)
            staging.copy_(region)

        def pipelined():
            ready = threading.Semaphore(0)

            def produce():
                for at in range(0, NBYTES, CHUNK):
                    ctypes.memmove(region.data_ptr() + at, grad.data_ptr() + at, CHUNK)
                    ready.release()
            producer = threading.Thread(target=produce)
            producer.start()
            for at in range(0, NBYTES, CHUNK):
                ready.acquire()
                ctypes.memmove(staging.data_ptr() + at, region.data_ptr() + at, CHUNK)
            producer.join()

        (echo,) = stack.enter_context(children(tcp_echo_spec(NBYTES)))
        tcp = TcpPingPong(echo.call("port"), NBYTES)
        stack.callback(tcp.close)
        variants = {W_IN: place(grad), S_IN: fill(staging), CHECK: lambda: check_finite("g", "gradient", staging,
                                                                                          squares=True),
                    ADAM: adam, S_OUT: place(param), W_OUT: fill(model), ONE_THREAD: one_thread, COPY_: copy_,
                    PIPELINED: pipelined, SPLIT: lambda: (place(grad)(), fill(staging)())}
        with CpuLoad() as load:
            raw = interleave({name: (lambda fn=fn: timed(fn)) for name, fn in variants.items()} |
                             {TCP: tcp.round_trip}, Settings(reps=args.reps, min_reps=args.reps), warmup=2)
            load.stop()
    ms = {name: summary([1e3 * s for s in samples]) for name, samples in raw.items()}
    floor = sum(ms[p]["median"] for p in PASSES)
    tcp_ms = ms[TCP]["median"]
    print(f"64 MiB each way; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
          f"{os.cpu_count()} CPUs; medians (min-max) of {args.reps} interleaved rounds")
    print(table(["pass", "ms"], [[name, fmt(ms[name])] for name in PASSES + [ONE_THREAD, COPY_, PIPELINED, SPLIT, TCP]]))
    print(f"sum of the six passes {floor:.1f} ms = {tcp_ms / floor:.2f}x raw TCP ({tcp_ms:.1f} ms); b/shm "
          f"needs the step <= {tcp_ms / 2:.1f} ms; without the copy into staging (Adam reading the segment) "
          f"{floor - ms[S_IN]['median']:.1f} ms = {tcp_ms / (floor - ms[S_IN]['median']):.2f}x")
    print(f"other-process CPU load: {load.other_pct if load.other_pct is not None else float('nan'):.0f}%")


if __name__ == "__main__":
    main()
