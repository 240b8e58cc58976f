"""(d) Aggregate throughput of asynchronous workers: optimizer steps per second over all workers.

Each worker is its own process (spawned once, reused for every configuration) holding a RemoteAdam
on a small model: 3 weights [256 x 128] and a bias [1696], 100,000 parameters; all workers share the
same keys (the async parameter-server case), torch uses 1 thread per worker. One step = one PushPull
to each shard holding the model's keys. For each configuration (1, 2, 4, 8 workers x 1, 2 shards;
no 8 with --quick) every worker does STEPS steps in a loop, all starting at one instant (a barrier
in time: the parent hands out a start time on the shared monotonic clock); throughput = total steps /
(last worker's end - start). Configurations are interleaved round-robin. Target: the aggregate does
not fall as workers are added (each median >= 90% of the best median with fewer workers; the 10%
margin absorbs noise on a shared 2-core machine).
"""
from __future__ import annotations

import contextlib
import time

from bench.common import CpuLoad, Settings, children, fmt, interleave, shard_sets, summary, table

SHAPES = {"w0": (256, 128), "w1": (256, 128), "w2": (256, 128), "b": (1696,)}
TOLERANCE = 0.9
RUN_LIMIT_S = 30.0


class PushWorker:
    """(Runs in a Child.) One worker: a RemoteAdam per shard set, stepping on command."""

    def __init__(self, index: int):
        import torch
        torch.set_num_threads(1)
        self.index = index
        self.opts = {}

    def prepare(self, addrs: list[str], warm: int) -> None:
        import torch
        from optserve import RemoteAdam
        key = tuple(addrs)
        if key not in self.opts:
            gen = torch.Generator().manual_seed(0)  # every worker starts from the same values
            params = {n: torch.nn.Parameter(torch.randn(s, generator=gen) * 0.01) for n, s in SHAPES.items()}
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            self.opts[key] = RemoteAdam(list(params.items()), servers=list(addrs), timeout=60,
                                        client_id=f"bench-worker-{self.index}")
        for _ in range(warm):
            self.opts[key].step()

    def run(self, addrs: list[str], steps: int, start_at: float) -> tuple[int, float]:
        """`steps` steps from `start_at` (time.monotonic(), same clock in every process) or until
        RUN_LIMIT_S passed; returns (steps done, end time)."""
        opt = self.opts[tuple(addrs)]
        time.sleep(min(5.0, max(0.0, start_at - time.monotonic())))
        done = 0
        while done < steps and time.monotonic() - start_at < RUN_LIMIT_S:
            opt.step()
            done += 1
        return done, time.monotonic()

    def close(self) -> None:
        for opt in self.opts.values():
            opt.close()


def worker_counts(quick: bool) -> list[int]:
    return [1, 2, 4] if quick else [1, 2, 4, 8]


def run(settings: Settings) -> dict:
    counts = worker_counts(settings.quick)
    steps = 100 if settings.quick else 150
    with contextlib.ExitStack() as stack:
        workers = stack.enter_context(children(*[(PushWorker, (i,), f"worker-{i}") for i in range(max(counts))]))
        sets = stack.enter_context(shard_sets(1, 2))
        for addrs in sets:  # register (first worker) and warm every channel, outside the timing
            for w in workers:
                w.send("prepare", addrs, 3)
            for w in workers:
                w.recv(timeout=120)

        def config(addrs: list[str], k: int):
            def sample() -> dict:
                start_at = time.monotonic() + 0.05
                for w in workers[:k]:
                    w.send("run", addrs, steps, start_at)
                results = [w.recv(timeout=RUN_LIMIT_S + 30) for w in workers[:k]]
                total = sum(n for n, _ in results)
                end = max(e for _, e in results)
                return {"steps": total, "seconds": end - start_at, "per_worker": [n for n, _ in results]}
            return sample

        variants = {(len(addrs), k): config(addrs, k) for addrs in sets for k in counts}
        with CpuLoad() as load:
            raw = interleave({f"{s}x{k}": fn for (s, k), fn in variants.items()}, settings, warmup=1,
                             label="workers")
    rows = []
    for (s, k) in variants:
        samples = raw[f"{s}x{k}"]
        rows.append({"shards": s, "workers": k, "steps_per_worker": steps,
                     "steps_s": summary([x["steps"] / x["seconds"] for x in samples]), "raw": samples})
    return {"rows": rows, "params_per_worker": sum(_numel(s) for s in SHAPES.values()),
            "other_cpu_pct": load.other_pct}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def report(res: dict) -> tuple[str, list[dict]]:
    body = [[r["shards"], r["workers"], fmt(r["steps_s"], 0)] for r in res["rows"]]
    text = table(["shards", "workers", "aggregate steps/s (1 step = 1 push+pull per shard)"], body)
    text += f"\n  model: {res['params_per_worker']:,} params per worker, all workers on the same keys"
    targets = []
    for s in sorted({r["shards"] for r in res["rows"]}):
        series = [(r["workers"], r["steps_s"]["median"]) for r in res["rows"] if r["shards"] == s]
        series.sort()
        ok, best = True, 0.0
        for _, v in series:
            if best and v < TOLERANCE * best:
                ok = False
            best = max(best, v)
        shown = ", ".join(f"{k}: {v:.0f}" for k, v in series)
        upto = series[-1][0]
        targets.append({"id": f"d/{s}", "ok": ok,
                        "line": f"(d) {s} shard{'s' if s > 1 else ''}: steps/s by workers {shown} (target: up to "
                                f"8 workers no fall below {TOLERANCE:.0%} of the best with fewer workers"
                                f"{'' if upto >= 8 else f'; measured up to {upto} here'})"})
    return text, targets
