"""(e) The cost of replication: R = 1 (one shard process) against R = 2 (a primary and its backup,
server/replication.py), interleaved round-robin in one run.

Two figures, each on one shard index:
- the 64+64 MiB step: RemoteAdam.step() of one 16M-element float32 parameter (64 MiB pushed, 64 MiB
  pulled), the step of section (b)/(c)'s size; under R = 2 the push is also forwarded to the backup
  (64 MiB more over loopback) and applied there before the primary acknowledges;
- aggregate steps/s of 8 async worker processes (4 with --quick) on section (d)'s 100,000-parameter
  model (bench/workers.py's PushWorker), where the primary's one order lock serialises pushes with
  their forwards.
Target: the R = 2 step at most 1.5x the R = 1 step.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from typing import Iterator

from bench.common import (CpuLoad, Settings, _read_listening, _shard_env, children, fmt, free_port, interleave,
                          shard_command, shard_sets, stop_shards, summary, table)
from bench.workers import RUN_LIMIT_S, PushWorker

STEP_ELEMENTS = 16 << 20  # 64 MiB of float32
TARGET = 1.5


@contextlib.contextmanager
def replica_pair(timeout: float = 90.0) -> Iterator[str]:
    """A primary and its backup of one shard index, as processes; yields the worker's "a|b" address
    once the backup is in sync."""
    from optserve.client.transport import ShardClient
    ports = [free_port(), free_port()]
    replicas = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs = []
    try:
        for i, port in enumerate(ports):
            cmd = shard_command(0, 1)
            cmd[cmd.index("--port") + 1] = str(port)
            log = tempfile.TemporaryFile()
            procs.append((subprocess.Popen(cmd + ["--replicas", replicas, "--replica-index", str(i)],
                                           stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                           env=_shard_env()), log))
        for p, log in procs:
            _read_listening(p, log, timeout)
        client = ShardClient(replicas.split(",")[0], timeout=10)
        deadline = time.monotonic() + timeout
        try:
            while True:
                r = client.hello(wait=timeout).replication
                if r.role == "primary" and r.peers and r.peers[0].in_sync:  # the first begins, cold
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("the replicas did not get in sync")
                time.sleep(0.1)
        finally:
            client.close()
        yield replicas.replace(",", "|")
    finally:
        stop_shards(procs)


class BigStep:
    """(Runs in a Child.) RemoteAdam over one 64 MiB parameter per address; `step` times one step."""

    def __init__(self):
        import torch
        self.torch = torch
        self.opts, self.params = {}, {}

    def prepare(self, address: str) -> None:
        from optserve import RemoteAdam
        torch = self.torch
        p = torch.nn.Parameter(torch.zeros(STEP_ELEMENTS))
        p.grad = torch.full((STEP_ELEMENTS,), 1e-3)
        self.params[address] = p
        self.opts[address] = RemoteAdam([("w", p)], servers=[address], timeout=120, client_id="bench-big")
        self.opts[address].step()

    def step(self, address: str) -> float:
        t0 = time.perf_counter()
        self.opts[address].step()
        return time.perf_counter() - t0

    def close(self) -> None:
        for opt in self.opts.values():
            opt.close()


def run(settings: Settings) -> dict:
    workers_n = 4 if settings.quick else 8
    steps = 60 if settings.quick else 100
    with contextlib.ExitStack() as stack:
        big = stack.enter_context(children((BigStep, (), "big-step")))[0]
        workers = stack.enter_context(children(*[(PushWorker, (i,), f"worker-{i}") for i in range(workers_n)]))
        single = stack.enter_context(shard_sets(1))[0][0]
        pair = stack.enter_context(replica_pair())
        configs = {"R=1": single, "R=2": pair}
        for address in configs.values():
            big.call("prepare", address, timeout=300)
            for w in workers:
                w.send("prepare", [address], 3)
            for w in workers:
                w.recv(timeout=120)

        def step_sample(address: str):
            return lambda: big.call("step", address, timeout=300)

        def workers_sample(address: str):
            def sample() -> float:
                start_at = time.monotonic() + 0.05
                for w in workers:
                    w.send("run", [address], steps, start_at)
                results = [w.recv(timeout=RUN_LIMIT_S + 30) for w in workers]
                return sum(n for n, _ in results) / (max(e for _, e in results) - start_at)
            return sample

        variants = {}
        for name, address in configs.items():
            variants[f"step {name}"] = step_sample(address)
            variants[f"workers {name}"] = workers_sample(address)
        with CpuLoad() as load:
            raw = interleave(variants, settings, warmup=1, label="replication")
    return {"step_s": {n: summary(raw[f"step {n}"]) for n in configs},
            "workers_steps_s": {n: summary(raw[f"workers {n}"]) for n in configs},
            "workers": workers_n, "other_cpu_pct": load.other_pct, "cpus": os.cpu_count()}


def report(res: dict) -> tuple[str, list[dict]]:
    rows = []
    for n in ("R=1", "R=2"):
        step = res["step_s"][n]
        ms = {k: v * 1e3 for k, v in step.items() if k in ("median", "min", "max")} | {"n": step["n"]}
        rows.append([n, fmt(ms, 1), fmt(res["workers_steps_s"][n], 0)])
    text = table(["replicas", "64+64 MiB step, ms", f"{res['workers']} workers, aggregate steps/s"], rows)
    r1, r2 = res["step_s"]["R=1"]["median"], res["step_s"]["R=2"]["median"]
    ratio = r2 / r1
    w1, w2 = res["workers_steps_s"]["R=1"]["median"], res["workers_steps_s"]["R=2"]["median"]
    text += f"\n  R=2 / R=1: step {ratio:.2f}x, {res['workers']}-worker throughput {w2 / w1:.2f}x"
    return text, [{"id": "e/step", "ok": ratio <= TARGET,
                   "line": f"(e) R=2 64+64 MiB step {r2 * 1e3:.0f} ms = {ratio:.2f}x R=1 {r1 * 1e3:.0f} ms "
                           f"(target <= {TARGET}x)"}]
