"""`torchrun --standalone --nproc_per_node 2` workers (tests/integration/torchrun_worker.py, the
README's recipe) on two `optserve serve` processes.

async: every push is one Adam step, so every key's step equals the pushes applied, 2 x steps.
sync --workers 2: each step averages the two ranks' gradients, so the run equals one process
training torch.optim.Adam(fused=True) on both ranks' batches with that averaged gradient, bitwise,
and both ranks end with the shards' values (which also shows rank 1 adopted rank 0's start).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn

import torchrun_worker as worker
from integration_helpers import assert_same, shard_keys, shard_values, start_shard

from optserve.client.status import collect

pytestmark = pytest.mark.system

STEPS = 10
WORKER = Path(__file__).with_name("torchrun_worker.py")


def reference_sync_run() -> dict[str, torch.Tensor]:
    """One process: rank 0's initial model, each step the mean of the two ranks' gradients (rank r
    reads samples r, r+2, ... as DistributedSampler(shuffle=False) gives them), torch's fused Adam."""
    model = worker.make_model(seed=100)
    opt = torch.optim.Adam(model.parameters(), lr=worker.LR, eps=1e-8, fused=True)
    x_all, y_all = worker.dataset(STEPS * worker.BATCH * 2).tensors
    for i in range(STEPS):
        grads = []
        for rank in range(2):
            idx = [rank + 2 * (i * worker.BATCH + j) for j in range(worker.BATCH)]
            opt.zero_grad()
            nn.functional.mse_loss(model(x_all[idx]), y_all[idx]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1).div_(2)  # the shard sums a round's gradients, then divides by their count
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["async", "sync"])
def test_torchrun_workers_on_two_shard_processes(policy, tmp_path):
    extra = ["--policy", "sync", "--workers", "2"] if policy == "sync" else []
    shards = []
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once (each imports torch)
            started = [pool.submit(start_shard, "--shard-index", str(i), "--num-shards", "2", *extra)
                       for i in range(2)]
        shards = [f.result() for f in started if f.exception() is None]  # stopped below, even if one failed
        for f in started:
            f.result()
        addresses = [address for _, address in shards]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
             "--servers", ",".join(addresses), "--steps", str(STEPS), "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=180, env=env)
        assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"

        keys = shard_keys(addresses)
        values = shard_values(addresses)
        per_shard = [len(s["keys"]) for s in collect(addresses)]
    finally:
        for proc, _ in shards:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in shards:
            proc.wait(timeout=30)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    names = {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert set(keys) == names and all(per_shard), (sorted(keys), per_shard)  # both shards hold keys
    if policy == "async":
        # every push applied once, as one step: each key's step is the pushes of both ranks
        assert {k: (v["version"], v["pushes"]) for k, v in keys.items()} == {k: (2 * STEPS, 2 * STEPS) for k in names}
        # the rank whose push came last pulled the final values
        assert any(all(torch.equal(r[k], values[k]) for k in names) for r in ranks)
    else:
        assert {k: v["version"] for k, v in keys.items()} == {k: STEPS for k in names}
        for r, rank_values in enumerate(ranks):
            assert_same(rank_values, values, what=f"rank {r} vs shards")
        assert_same(values, reference_sync_run(), what="sync shards vs one-process torch Adam(fused=True)")
