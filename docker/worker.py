"""A compose worker: trains `optserve demo`'s task (scikit-learn digits, MLP 64-128-10) through
RemoteAdam against every shard, by service name, asynchronously next to the other workers.

Each worker takes its own share of the training set (the demo's split: a seeded shuffle cut into
NUM_WORKERS parts), runs STEPS optimizer steps, then pulls the served model into a fresh replica and
checks its held-out accuracy. Exit 0 when it reaches the demo's target (optserve.demo.ACCURACY_TARGET).

Environment:
  OPTSERVE_SERVERS     shard addresses in shard-index order, comma-separated (shard0:50051,shard1:50051),
                       or a template (optserve-{i}.optserve:50051) with OPTSERVE_NUM_SHARDS, or
                       OPTSERVE_SERVERS_FILE (client/discovery.py)
  WORKER_INDEX         this worker's index, 0-based; NUM_WORKERS: how many (default 2)
  STEPS                optimizer steps of this worker (default: the demo's)
  PROGRESS_EVERY       print a progress line every N steps (default 25)
  LOG_LEVEL            logging level on stderr (default WARNING; INFO shows every retry)
  CONNECT_TIMEOUT      seconds to wait for the shards at start (default 30): RemoteAdam's connect_timeout
  Read by RemoteAdam itself (client/security.py):
  OPTSERVE_TOKEN_FILE  file holding the bearer token (a compose or Swarm secret); or OPTSERVE_TOKEN
  OPTSERVE_TLS_CA      PEM CA file: TLS to the shards
  OPTSERVE_TLS_CERT, OPTSERVE_TLS_KEY   mutual TLS: this worker's certificate and key (PEM files)
"""
from __future__ import annotations

import logging
import os
import sys
import time

import torch

from optserve import RemoteAdam, demo
from optserve.client.discovery import servers_from_env


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        servers = servers_from_env()  # a list, a template with OPTSERVE_NUM_SHARDS, or a file
    except ValueError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    index = int(os.environ.get("WORKER_INDEX", "0"))
    cfg = demo.DemoConfig(workers=int(os.environ.get("NUM_WORKERS", "2")), shards=len(servers),
                          steps=int(os.environ.get("STEPS", demo.DemoConfig.steps)))
    if not 0 <= index < cfg.workers:
        print(f"worker: WORKER_INDEX must be in 0..{cfg.workers - 1}, got {index}", file=sys.stderr)
        return 2
    every = max(1, int(os.environ.get("PROGRESS_EVERY", "25")))
    connect_timeout = float(os.environ.get("CONNECT_TIMEOUT", "30"))
    name = f"worker {index}"

    torch.set_num_threads(1)  # tiny matmuls: as the demo, one intra-op thread
    sklearn, _, _ = demo.require_demo_packages()
    x_train, y_train, x_test, y_test = demo.load_digits(sklearn, cfg.seed)
    # The demo's split: every worker computes the same shuffle and takes its own part.
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))
    share = order.chunk(cfg.workers)[index]
    remote = dict(lr=cfg.lr, **demo.ADAM_OPTIONS, **demo.REMOTE_ONLY_OPTIONS, connect_timeout=connect_timeout)
    print(f"{name}: {len(share)} training images, {cfg.steps} steps of batch {cfg.batch_size} against "
          f"{', '.join(servers)}", flush=True)

    model = demo.make_model(cfg.seed)  # same initial weights everywhere; the first to register sets them
    start = time.perf_counter()
    loss = float("nan")
    with RemoteAdam(model.named_parameters(), servers=servers, **remote) as opt:
        batches = demo.batches(x_train[share], y_train[share], cfg.batch_size, cfg.steps,
                               cfg.seed + 1 + index)
        for step, (xb, yb) in enumerate(batches, 1):
            loss = demo.train_step(model, opt, xb, yb)
            if step % every == 0 or step == cfg.steps:
                print(f"{name}: step {step}/{cfg.steps} loss {loss:.4f}", flush=True)
        dropped = opt.dropped_pushes
    seconds = time.perf_counter() - start
    # Every step pushes every key once: a test compares the shards' key versions with these counts.
    print(f"{name}: pushed every key {cfg.steps} times, {dropped} dropped by the policy", flush=True)

    # A replica with other weights: RemoteAdam's construction overwrites them with the shards' values,
    # so this measures the served model, not this worker's copy.
    served = demo.make_model(cfg.seed + 10_000)
    RemoteAdam(served.named_parameters(), servers=servers, **remote).close()
    accuracy = demo.accuracy(served, x_test, y_test)
    ok = accuracy >= demo.ACCURACY_TARGET
    print(f"{name}: {'OK' if ok else 'FAILED'}: {cfg.steps} steps in {seconds:.1f} s, last loss {loss:.4f}; "
          f"served model's held-out accuracy {accuracy:.2%} (target {demo.ACCURACY_TARGET:.0%})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
