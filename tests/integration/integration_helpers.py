"""Shared by tests/integration: read what the shards hold, independently of RemoteAdam, and start
`optserve serve` processes."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import torch

from optserve.client.export import gather
from optserve.client.status import collect

# No test here may reach the Hub: tiny models are built from configs.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)


def shard_keys(addresses: Sequence[str]) -> dict[str, dict]:
    """{key: {"key", "shape", "version", "pushes", ...}} over every shard (Stats, read-only)."""
    shards = collect(list(addresses))
    for s in shards:
        assert "error" not in s, s
    return {k["key"]: k for s in shards for k in s["keys"]}


def shard_steps(addresses: Sequence[str]) -> dict[str, int]:
    """Every key's step (its version) on the shards."""
    return {key: int(k["version"]) for key, k in shard_keys(addresses).items()}


def shard_values(addresses: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every parameter the shards hold, slices reassembled, as {name: tensor}."""
    return gather(list(addresses))


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A model's parameters (named as named_parameters() names them), detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0, what: str = ""):
    """Equal within atol (0: bitwise), naming the worst parameter when not."""
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())}"
    worst = max(a, key=lambda k: (a[k].float() - b[k].float()).abs().max().item())
    diff = (a[worst].float() - b[worst].float()).abs().max().item()
    if atol == 0.0:
        assert all(torch.equal(a[k], b[k]) for k in a), f"{what}: not bitwise equal, {worst!r} differs by {diff:.3g}"
    else:
        assert diff <= atol, f"{what}: {worst!r} differs by {diff:.3g} > {atol:g}"


def start_shard(*args: str) -> tuple[subprocess.Popen, str]:
    """`optserve serve --port 0 ARGS` as a process; returns it and the address it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "optserve.cli", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until the shard is bound (or the process died)
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"shard did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[-1]
