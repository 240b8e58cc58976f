"""examples/torchrun_train.py (the README's torchrun recipe) under `torchrun --standalone
--nproc_per_node 2` on two `optserve serve` processes, run through tests/integration/torchrun_worker.py,
which logs every push and its acknowledgement and can crash a worker.

async: every push is one Adam step, so every key's step equals the pushes applied, 2 x steps.
sync --workers 2: each step averages the two ranks' gradients, so the run equals one process
training torch.optim.Adam(fused=True) on both ranks' batches with that averaged gradient, bitwise
(which also shows rank 1 adopted rank 0's start), and rank 0 saves the shards' values.
elastic: a worker dies mid-run, torchrun restarts the group, and the new group goes on from the
shards' step to the job's end, with no push lost or applied twice.
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
from torch.utils.data import DistributedSampler

import torchrun_worker  # noqa: F401 - puts examples/ on sys.path
import torchrun_train as example
from integration_helpers import assert_same, shard_keys, shard_values, start_shard

from optserve.client.status import collect

pytestmark = pytest.mark.system

STEPS = 10
SAMPLES = 512
WORKER = Path(__file__).with_name("torchrun_worker.py")
NAMES = {"0.weight", "0.bias", "2.weight", "2.bias"}


def start_shards(*extra: str) -> list:
    """Two `optserve serve` processes, started at once (each imports torch); [(proc, address)]."""
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(start_shard, "--shard-index", str(i), "--num-shards", "2", *extra) for i in range(2)]
    shards = [f.result() for f in started if f.exception() is None]
    if len(shards) < 2:
        stop(shards)
        for f in started:
            f.result()
    return shards


def stop(shards) -> None:
    for proc, _ in shards:
        proc.send_signal(signal.SIGTERM)
    for proc, _ in shards:
        proc.wait(timeout=30)


def torchrun(addresses, tmp_path: Path, *options: str, worker_args=()) -> subprocess.CompletedProcess:
    """The example under torchrun, servers from OPTSERVE_SERVERS as a user sets them."""
    (tmp_path / "pushes").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPTSERVE_SERVERS": ",".join(addresses),
           # torch 2.13's torchrun keeps one rendezvous store across restarts, and a restarted group's
           # gloo then reads the dead group's addresses (Connection refused): a store per attempt
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *options,
         str(WORKER), "--pushes", str(tmp_path / "pushes"), *worker_args, "--",
         "--steps", str(STEPS), "--samples", str(SAMPLES), "--log-every", "5", "--save", str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def push_logs(tmp_path: Path) -> dict[str, list[str]]:
    """{"rank<R>-attempt<A>": ["push", "ack", ...]} as the workers wrote them."""
    return {f.stem: f.read_text().split() for f in sorted((tmp_path / "pushes").glob("*.log"))}


def reference_sync_run() -> dict[str, torch.Tensor]:
    """One process: rank 0's initial model, each step the mean of the two ranks' gradients (each rank
    reads the batches its DistributedSampler gives it, epoch 0), torch's fused Adam."""
    model = example.make_model(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=example.LR, eps=1e-8, fused=True)
    data = example.make_dataset(SAMPLES)
    order = [list(DistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert STEPS * example.BATCH <= len(order[0])  # one epoch
    for i in range(STEPS):
        grads = []
        for rank in range(2):
            x, y = data[order[rank][i * example.BATCH:(i + 1) * example.BATCH]]
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1).div_(2)  # the shard sums a round's gradients, then divides by their count
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["async", "sync"])
def test_torchrun_workers_on_two_shard_processes(policy, tmp_path):
    shards = start_shards(*(["--policy", "sync", "--workers", "2"] if policy == "sync" else []))
    try:
        addresses = [address for _, address in shards]
        torchrun(addresses, tmp_path)
        keys = shard_keys(addresses)
        values = shard_values(addresses)
        per_shard = [len(s["keys"]) for s in collect(addresses)]
    finally:
        stop(shards)

    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(keys) == NAMES and all(per_shard), (sorted(keys), per_shard)  # both shards hold keys
    assert push_logs(tmp_path) == {f"rank{r}-attempt0": ["push", "ack"] * STEPS for r in range(2)}
    assert_same(saved, values, what="rank 0's saved model vs shards")  # the final pull
    if policy == "async":
        # every push applied once, as one step: each key's step is the pushes of both ranks
        assert {k: (v["version"], v["pushes"]) for k, v in keys.items()} == {k: (2 * STEPS, 2 * STEPS) for k in NAMES}
    else:
        assert {k: v["version"] for k, v in keys.items()} == {k: STEPS for k in NAMES}
        assert_same(values, reference_sync_run(), what="sync shards vs one-process torch Adam(fused=True)")


def test_torchrun_restarts_a_group_that_lost_a_worker(tmp_path):
    """Rank 1 SIGKILLs itself after its 4th acknowledged push (first attempt only); torchrun
    (--max-restarts 1) stops rank 0 and starts both again; the new group reads the shards' step and
    pushes what is left of the 2 x STEPS, from the shards' values and Adam state.

    What can be asserted exactly: every key's step equals the pushes its shard applied (Stats), and
    lies between the pushes the workers saw acknowledged and that plus the pushes still in flight when
    a worker died (a log ending in "push"): rank 1 died between steps, but rank 0 was stopped by
    torchrun wherever it was, and a push of its in flight may have been applied without its reply
    arriving (or reached one shard and not the other). A restarted worker's pushes carry a new
    push_id, so none is taken for a retry of the dead one's (lost), and a retried push is applied once
    (doubled). The job ends at the 2 x STEPS steps it asked for (plus that in-flight push, if applied)."""
    shards = start_shards()
    try:
        addresses = [address for _, address in shards]
        result = torchrun(addresses, tmp_path, "--max-restarts", "1", "--monitor-interval", "0.5",
                          worker_args=["--kill-rank", "1", "--kill-after", "4"])
        keys = shard_keys(addresses)
        values = shard_values(addresses)
    finally:
        stop(shards)

    logs = push_logs(tmp_path)
    assert set(logs) == {f"rank{r}-attempt{a}" for r in range(2) for a in range(2)}, (sorted(logs), result.stderr)
    assert logs["rank1-attempt0"] == ["push", "ack"] * 4  # killed right after its 4th acknowledged push
    for name, lines in logs.items():  # each push is acknowledged before the next, and each attempt-1 one
        assert lines[::2] == ["push"] * len(lines[::2]) and set(lines[1::2]) <= {"ack"}, (name, lines)
        if name.endswith("attempt1"):
            assert len(lines) % 2 == 0 and lines, (name, lines)
    acked = sum(lines.count("ack") for lines in logs.values())
    in_flight = sum(lines[-1:] == ["push"] for lines in logs.values())  # at most rank 0's first attempt
    assert in_flight <= 1
    assert set(keys) == NAMES
    for key, k in keys.items():
        assert k["version"] == k["pushes"], (key, k)  # each applied push is one step (none applied twice)
        assert acked <= k["version"] <= acked + in_flight, (key, k["version"], acked, in_flight)  # none lost
        assert 2 * STEPS <= k["version"] <= 2 * STEPS + in_flight, (key, k["version"])  # resumed, not restarted
    # the second attempt pushed what was left, not 2 x STEPS again
    assert 2 * STEPS - in_flight <= acked <= 2 * STEPS + in_flight, acked
    assert_same(torch.load(tmp_path / "model.pt", weights_only=True), values, what="saved vs shards")
