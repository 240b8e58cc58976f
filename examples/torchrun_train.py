"""Train one model with several workers under torchrun, Adam on optserve shards.

    optserve serve --port 50051 --shard-index 0 --num-shards 2 &       # or anywhere the workers reach
    optserve serve --port 50052 --shard-index 1 --num-shards 2 &
    export OPTSERVE_SERVERS=localhost:50051,localhost:50052         # in shard-index order
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1    # for --max-restarts with torch 2.13: see below
    torchrun --standalone --nproc_per_node 2 --max-restarts 3 examples/torchrun_train.py --steps 200

No DDP: each rank pushes its own gradient and the shards combine them (`--policy async`, the default:
every push is one Adam step; `--policy sync --workers W`: one step on the mean of the W gradients).
What this script does, in order:
  * rank 0 builds RemoteAdam first, which registers its model's values on the shards; the other ranks
    build theirs after it and adopt those values, so every rank starts from the same weights;
  * each rank reads its own part of the data (DistributedSampler);
  * the job's length is counted on the shards (each key's version is its Adam step): a group that
    torchrun restarts after a worker died (--max-restarts) reads how far the shards got and trains
    only what is left, from the shards' values and Adam state. Nothing is checkpointed here: the
    shards keep the optimizer (with --checkpoint-dir, across their own restarts too);
  * at the end every rank pulls the final values; rank 0 saves them (--save).
torchrun (torch 2.13) keeps one rendezvous store across restarts unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
and a restarted group's init_process_group then reads the dead group's addresses and fails with
"Connection refused"; with the variable set, each attempt gets a store of its own.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from optserve import RemoteAdam
from optserve.client.discovery import servers_from_env
from optserve.client.security import Security
from optserve.client.status import collect

LR, BATCH = 1e-2, 8  # BATCH: samples per rank and step


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def make_dataset(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)  # the same data on every rank: the sampler splits it
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True).sin())


def make_optimizer(model: nn.Module) -> RemoteAdam:
    # servers from OPTSERVE_SERVERS, client_id "rank<RANK>" from torchrun's environment; torch.optim.Adam's
    # numbers (eps after the bias correction, L2 weight decay), so a run can be checked against torch
    return RemoteAdam(model.named_parameters(), lr=LR, eps=1e-8, optimized_update=False,
                      weight_decouple=False)


def shards_sync() -> bool:
    """Whether the shards run `--policy sync` (a step is one round of every rank's push) rather than
    async or ssp (every push is a step), as `optserve status` reads it."""
    shard = collect(servers_from_env(), security=Security.from_env())[0]
    if "error" in shard:
        raise RuntimeError(f"shard {shard['address']}: {shard['error']}")
    return shard["shard"]["policy"].startswith("sync")


def my_share(steps: int, world: int, rank: int, done: int, sync: bool) -> int:
    """How many pushes this rank makes for the job to end at `steps` batches per rank, given the
    shards' step `done`. sync: every rank pushes once per step, `steps` steps in all. async: every
    push is a step, `steps * world` in all, and the ranks split what is left (the first take one more)."""
    if sync:
        return max(steps - done, 0)
    left = max(steps * world - done, 0)
    return left // world + (1 if rank < left % world else 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=100, help="steps (batches) per rank for the whole job")
    parser.add_argument("--samples", type=int, default=4096, help="size of the toy data set")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--save", default="", help="directory where rank 0 writes model.pt at the end")
    args = parser.parse_args(argv)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # 0, then 1 after a restart, ...
    dist.init_process_group("gloo")  # only to order the ranks; the gradients go to the shards
    model = make_model(seed=rank)  # each rank initialises its own way: rank 0's values win below
    sync = shards_sync()

    # Rank 0 registers (or, after a restart, adopts the shards' values), reads how far the job got
    # (the smallest key version: a push cut short by a crash may have reached some shards only) and
    # tells the others; the broadcast is also the barrier that holds them until the keys exist.
    done = torch.zeros(1, dtype=torch.int64)
    if rank == 0:
        opt = make_optimizer(model)
        done[0] = min(opt.versions.values())
    dist.broadcast(done, src=0)
    if rank != 0:
        opt = make_optimizer(model)  # init="shard": adopts the shards' values and Adam state
    done = int(done)
    todo = my_share(args.steps, world, rank, done, sync)
    print(f"[rank {rank}] attempt {attempt}: the shards are at step {done}; {todo} steps to go", flush=True)

    data = make_dataset(args.samples)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank)  # shuffles with seed 0, per epoch
    loader = DataLoader(data, batch_size=BATCH, sampler=sampler, drop_last=True)
    # Go on with the data where this rank left off (about where, under async: the ranks' shares differ).
    epoch, skip = divmod(done if sync else done // world, len(loader))
    try:
        step = 0
        while step < todo:
            sampler.set_epoch(epoch)
            for i, (x, y) in enumerate(loader):
                if i < skip:
                    continue
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()  # push this gradient, the shards step, pull the fresh values into the model
                step += 1
                if step % args.log_every == 0 or step == todo:
                    print(f"[rank {rank}] step {step}/{todo} loss {loss.item():.4f} "
                          f"shard step {min(opt.versions.values())}", flush=True)
                if step == todo:
                    break
            epoch, skip = epoch + 1, 0

        dist.barrier()  # every rank's pushes are applied
        opt.zero_grad(set_to_none=True)
        opt.step()  # with no gradient, step() only pulls: the final values into the model
        if rank == 0 and args.save:
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                       os.path.join(args.save, "model.pt"))
    finally:
        opt.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
