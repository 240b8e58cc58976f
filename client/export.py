"""`optserve export ADDR... --out model.safetensors`: the full parameter set, slices reassembled.

Reads every key of every shard (Stats, then Pull) and writes one safetensors file whose tensors are
named and shaped as the model's parameters, loadable with `safetensors.torch.load_file` into any
torch model. Changes nothing on the shards.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from optserve.client.transport import Security, ShardClient
from optserve.proto.optserve.v1 import optserve_pb2 as pb


def gather(addresses: Sequence[str], timeout: float = 300.0, security: Security | None = None
           ) -> dict[str, torch.Tensor]:
    """Every parameter held by these shards, reassembled from its keys, as {name: tensor}."""
    flat: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    spans: dict[str, list[tuple[int, int, str]]] = {}

    def sink(head: pb.PullHead) -> dict[tuple[int, int], torch.Tensor]:
        out = {}
        for i, info in enumerate(head.entries):
            name = info.param or info.key
            shape = tuple(info.param_shape) if info.param else tuple(info.shape)
            if name not in flat:
                flat[name] = torch.zeros(math.prod(shape), dtype=torch.float32)
                shapes[name] = shape
                spans[name] = []
            elif shapes[name] != shape:
                raise ValueError(f"parameter {name!r}: key {info.key!r} says shape {list(shape)}, another "
                                 f"key said {list(shapes[name])}")
            numel = math.prod(info.shape)
            spans[name].append((int(info.offset), int(info.offset) + numel, info.key))
            out[(i, pb.PARAM)] = flat[name][info.offset:info.offset + numel]
        return out

    seen: dict[int, str] = {}  # shard index -> address
    counts = set()
    for address in addresses:
        client = ShardClient(address, timeout=timeout, security=security)
        try:
            stats = client.stats()
            index, count = stats.shard.shard_index, stats.shard.num_shards
            if index in seen:
                raise ValueError(f"{address} and {seen[index]} are both shard {index}")
            seen[index] = address
            counts.add(count)
            keys = [k.key for k in stats.keys]
            if keys:
                client.pull(pb.PullRequest(keys=keys), sink)
        finally:
            client.close()
    # A parameter held whole by a shard not given would simply be missing: every shard must be there.
    missing = sorted(set(range(max(counts))) - set(seen)) if counts else []
    if len(counts) > 1 or missing:
        raise ValueError(f"the shards given say {sorted(counts)} shards in all and are {sorted(seen)}; "
                         f"missing {missing}: list every shard")
    for name, parts in spans.items():
        parts.sort()
        at = 0
        for start, stop, key in parts:
            if start != at:
                raise ValueError(f"parameter {name!r}: elements [{at}, {start}) are on no shard given "
                                 f"(or key {key!r} overlaps another); list every shard")
            at = stop
        if at != flat[name].numel():
            raise ValueError(f"parameter {name!r}: elements [{at}, {flat[name].numel()}) are on no shard "
                             f"given; list every shard")
    return {name: t.reshape(shapes[name]) for name, t in flat.items()}


def export_main(addresses: Sequence[str], out: str, security: Security | None = None) -> int:
    params = gather(addresses, security=security)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(params, out)
    print(f"wrote {len(params)} parameters ({sum(t.numel() for t in params.values())} elements) to {out}")
    return 0


def checkpoint_main(addresses: Sequence[str], security: Security | None = None) -> int:
    """`optserve checkpoint ADDR...`: every shard writes a checkpoint now."""
    for address in addresses:
        client = ShardClient(address, security=security)
        try:
            reply = client.checkpoint()
            print(f"{address}: {reply.path} ({reply.keys} keys, {reply.seconds:.2f} s)")
        finally:
            client.close()
    return 0
