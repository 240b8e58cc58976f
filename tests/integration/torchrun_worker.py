"""One worker under `torchrun --nproc_per_node W`, as the README's recipe for several workers on
the same shards: rank 0 registers the model first, a barrier, then the other ranks build their
RemoteAdam and adopt the shards' values (init="shard"), so every rank starts from rank 0's weights;
client_id from RANK; each rank reads its own part of the data with DistributedSampler. No DDP: the
shards combine the workers' gradients (async: each push is an Adam step; sync: averaged per step).

Run by tests/integration/test_torchrun.py; writes OUT/rank<R>.pt (the rank's final parameters).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from optserve import RemoteAdam

LR, BATCH = 1e-2, 8  # BATCH per rank and step


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def make_optimizer(model: nn.Module, servers, rank: int) -> RemoteAdam:
    # torch's Adam math, so test_torchrun can compare with torch.optim.Adam(fused=True)
    return RemoteAdam(model.named_parameters(), servers, lr=LR, eps=1e-8, optimized_update=False,
                      weight_decouple=False, client_id=f"rank{rank}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", required=True, help="shard addresses, comma-separated, in shard-index order")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    servers = args.servers.split(",")
    model = make_model(seed=100 + rank)  # different on each rank: the shards' values must win
    data = dataset(args.steps * BATCH * world)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler)

    if rank == 0:
        opt = make_optimizer(model, servers, rank)  # registers rank 0's values
    dist.barrier()
    if rank != 0:
        opt = make_optimizer(model, servers, rank)  # adopts them
    try:
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        dist.barrier()
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                   os.path.join(args.out, f"rank{rank}.pt"))
    finally:
        opt.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
