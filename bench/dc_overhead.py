"""DC-ASGD's cost on the shard: `Store.apply` through each policy, in-process, one thread, every push
`--staleness` versions behind, on the charlm model's key sizes (126k elements in 5 keys); prints the
mean time per push. docs/MEASUREMENTS.md ("DC-ASGD's compensation") quotes it.

    flock /tmp/bench.lock python bench/dc_overhead.py [--pushes 400] [--staleness 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from optserve.hyper import AdamConfig
from optserve.server.policy import parse_policy
from optserve.server.store import GradEntry, Store

SIZES = (97 * 24, 384 * 256, 256, 256 * 97, 97)  # optserve.experiment's charlm model


def per_push_ms(compensate: str, pushes: int, staleness: int) -> float:
    store = Store("cpu")
    store.create([(f"k{i}", (n,), torch.randn(n), {}) for i, n in enumerate(SIZES)])
    policy = parse_policy("async", compensate=compensate)
    grads = [torch.randn(n) * 0.03 for n in SIZES]
    cfg = AdamConfig(lr=2e-3)
    start = time.perf_counter()
    for seq in range(1, pushes + 1):
        entries = [GradEntry(key=store.get(f"k{j}"), version_read=max(0, store.get(f"k{j}").version - staleness),
                             cfg=cfg, pieces=[(0, g)]) for j, g in enumerate(grads)]
        store.dedupe.run_once("bench", seq, 0, lambda origin: policy.submit(store, entries, origin))
    return (time.perf_counter() - start) / pushes * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pushes", type=int, default=400)
    p.add_argument("--staleness", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    for spec in ("", "dc:0.04", "dca:2"):
        print(f"{spec or 'async':8s} {per_push_ms(spec, args.pushes, args.staleness):.2f} ms/push")


if __name__ == "__main__":
    main()
