"""`optserve demo`: asynchronous data-parallel training on scikit-learn's digits, next to plain Adam.

What it is for: showing the whole system in one process and under half a minute. It starts shards
in-process on free loopback ports, trains a small MLP with worker threads (each its own replica, its
own RemoteAdam against every shard and its own share of the training data), then trains the same
model with a local torch.optim.Adam for the same number of optimizer steps, and prints both held-out
accuracies, the wall times and the pushes; it writes both loss curves to `<out>/demo_loss.png`.

What it must not do: download anything (digits ships inside scikit-learn), pick ports (port 0), touch
process-wide state it does not restore (torch's thread count is put back; no pyplot backend
switch), or do any Adam math itself (the shards do it; the local run is torch's own Adam).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

log = logging.getLogger("optserve.demo")

ACCURACY_TARGET = 0.90
PNG_NAME = "demo_loss.png"
WIRE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
# The update rule both runs use: torch.optim.Adam's textbook form with its default eps. RemoteAdam's
# own defaults (the labml seed: eps=1e-16 applied as eps_hat, optimized_update=True) differ from it
# only in eps; setting both here makes the comparison isolate what optserve changes (asynchrony).
ADAM_OPTIONS = dict(betas=(0.9, 0.999), eps=1e-8)
REMOTE_ONLY_OPTIONS = dict(optimized_update=False)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's budget and layout, validated once here."""
    workers: int = 4
    shards: int = 2
    steps: int = 250  # optimizer steps per worker; the local run takes workers * steps
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    wire_dtype: str = "float32"  # gradients (and pulled parameters) on the wire: float32, bfloat16, float16

    def __post_init__(self):
        for name in ("workers", "shards", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"demo {name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"demo lr must be > 0 and finite, got {self.lr}")
        if self.wire_dtype not in WIRE_DTYPE_NAMES:
            raise ValueError(f"demo wire dtype must be one of {WIRE_DTYPE_NAMES}, got {self.wire_dtype!r}")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _shard_stats(servers: list[str]) -> list[Any]:
    """Each shard's StatsReply (pushes applied, staleness), read through the Stats call."""
    from optserve.client.transport import ShardClient

    out = []
    for address in servers:
        client = ShardClient(address, timeout=10.0)
        try:
            out.append(client.stats())
        finally:
            client.close()
    return out


def require_demo_packages() -> tuple[Any, Any, Any]:
    """(sklearn.datasets, matplotlib.figure.Figure, tqdm) or an ImportError saying how to get them."""
    try:
        import sklearn.datasets
        import sklearn.model_selection  # noqa: F401 - used through sklearn.model_selection below
        from matplotlib.figure import Figure
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(f"the demo needs scikit-learn, matplotlib and tqdm ({exc.name} is missing): "
                          f"pip install 'optserve[demo]'") from exc
    return sklearn, Figure, tqdm


def load_digits(sklearn, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits as float features in [0, 1]; a stratified 25% test split with a fixed seed."""
    data = sklearn.datasets.load_digits()
    x = (data.data / 16.0).astype(np.float32)  # pixel counts are 0..16
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        x, data.target, test_size=0.25, stratify=data.target, random_state=seed)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
            torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def make_model(seed: int) -> nn.Module:
    # A private generator, not torch.manual_seed: every replica gets the same weights without
    # touching the process's global RNG (the caller's, and other threads').
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            bound = 1.0 / math.sqrt(layer.in_features)  # torch's default Linear init, drawn from gen
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    return model


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int):
    """`steps` minibatches, reshuffling x at every pass; the last short batch of a pass is dropped."""
    gen = torch.Generator().manual_seed(seed)
    per_pass = max(1, len(x) // batch_size)
    done = 0
    while done < steps:
        order = torch.randperm(len(x), generator=gen)
        for b in range(min(per_pass, steps - done)):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield x[idx], y[idx]
        done += min(per_pass, steps - done)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    return loss.item()


def _run_optserve(cfg: DemoConfig, x_train, y_train, x_test, y_test, tqdm, progress: bool
                  ) -> tuple[float, float, list[float], list[Any]]:
    """Shards + worker threads; returns (accuracy, seconds, losses in push order, StatsReplies)."""
    from optserve.client.remote_adam import RemoteAdam
    from optserve.server.main import run_server

    wire = getattr(torch, cfg.wire_dtype)
    remote = dict(lr=cfg.lr, **ADAM_OPTIONS, **REMOTE_ONLY_OPTIONS, wire_dtype=wire, pull_dtype=wire)
    # Each worker trains on its own disjoint share of a seeded shuffle of the training set.
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))
    shares = order.chunk(cfg.workers)
    losses: list[float] = []
    lock = threading.Lock()
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server(shard_index=i, num_shards=cfg.shards))
                   for i in range(cfg.shards)]
        log.info("%d shards on %s", cfg.shards, ", ".join(servers))
        # Replicas and optimizers are built here, in order, so worker 0 registers the (shared) initial
        # weights; the others adopt the shards' values at construction.
        models = [make_model(cfg.seed) for _ in range(cfg.workers)]
        opts = [stack.enter_context(RemoteAdam(m.named_parameters(), servers=servers, **remote))
                for m in models]
        bar = stack.enter_context(tqdm(total=cfg.workers * cfg.steps, desc="optserve", unit="step",
                                       disable=not progress, leave=False))

        def work(w: int) -> None:
            share = shares[w]
            for xb, yb in batches(x_train[share], y_train[share], cfg.batch_size, cfg.steps,
                                  cfg.seed + 1 + w):
                loss = train_step(models[w], opts[w], xb, yb)
                with lock:  # the merged curve: every worker's losses in the order their steps returned
                    losses.append(loss)
                    bar.update()
                    if len(losses) % 20 == 0:
                        bar.set_postfix(loss=f"{loss:.3f}")

        start = time.perf_counter()
        with ThreadPoolExecutor(cfg.workers, thread_name_prefix="demo-worker") as pool:
            for f in [pool.submit(work, w) for w in range(cfg.workers)]:
                f.result()  # re-raises a worker's failure here
        seconds = time.perf_counter() - start

        # A fresh replica with different weights: RemoteAdam's construction overwrites them with the
        # shards' final values, so this reads the served model, not any worker's copy.
        final = make_model(cfg.seed + 10_000)
        RemoteAdam(final.named_parameters(), servers=servers, **remote).close()
        stats = _shard_stats(servers)
    return accuracy(final, x_test, y_test), seconds, losses, stats


def _run_local(cfg: DemoConfig, x_train, y_train, x_test, y_test, tqdm, progress: bool
               ) -> tuple[float, float, list[float]]:
    """torch.optim.Adam on the whole training set, workers * steps steps; returns (accuracy, s, losses)."""
    model = make_model(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, **ADAM_OPTIONS)
    total = cfg.workers * cfg.steps
    losses = []
    start = time.perf_counter()
    with tqdm(total=total, desc="local Adam", unit="step", disable=not progress, leave=False) as bar:
        for xb, yb in batches(x_train, y_train, cfg.batch_size, total, cfg.seed + 1):
            losses.append(train_step(model, opt, xb, yb))
            bar.update()
    return accuracy(model, x_test, y_test), time.perf_counter() - start, losses


def moving_average(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def _plot(Figure: Callable, path: Path, cfg: DemoConfig, remote: list[float], local: list[float]) -> None:
    # matplotlib.figure.Figure needs no pyplot and no backend switch: it renders with Agg on savefig.
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    window = max(1, min(25, len(local) // 10))
    for values, label, color in (
            (remote, f"optserve: {cfg.workers} async workers, {cfg.shards} shards\n"
                     f"(all workers' losses in the order their pushes finished)", "tab:blue"),
            (local, "local torch.optim.Adam, 1 process", "tab:orange")):
        ax.plot(np.arange(1, len(values) + 1), values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(np.arange(window, len(values) + 1), moving_average(values, window), color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (global)")
    ax.set_ylabel(f"training loss (cross-entropy; line: mean of {window})")
    ax.set_title(f"digits MLP 64-128-10, batch {cfg.batch_size}, lr {cfg.lr:g}")
    ax.legend()
    fig.savefig(path, dpi=110)


def run_demo(workers: int = 4, shards: int = 2, steps: int = DemoConfig.steps,
             batch_size: int = DemoConfig.batch_size, lr: float = DemoConfig.lr, seed: int = DemoConfig.seed,
             out_dir: str | Path = "demo-out", progress: bool = True, wire_dtype: str = "float32"
             ) -> dict[str, Any]:
    """Train with optserve and with local Adam; returns the summary that `main` prints.

    Keys: accuracy_optserve, accuracy_local, seconds_optserve, seconds_local (training only, no
    start-up or evaluation), pushes (RemoteAdam steps, all workers), shard_pushes (push requests each
    shard applied), staleness_mean (over all shards' keys), steps_local, png (path of the plot).
    """
    cfg = DemoConfig(workers=workers, shards=shards, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                     wire_dtype=wire_dtype)
    sklearn, Figure, tqdm = require_demo_packages()
    x_train, y_train, x_test, y_test = load_digits(sklearn, cfg.seed)
    log.info("digits: %d training and %d test images; %d workers x %d steps, batch %d, lr %g",
             len(x_train), len(x_test), cfg.workers, cfg.steps, cfg.batch_size, cfg.lr)

    # One intra-op thread: these matmuls are tiny, and on a small shared machine torch's thread pool
    # fights the worker and gRPC threads for cores (the local run was 40x slower with 2 threads here).
    with torch_threads(1):
        acc_remote, s_remote, loss_remote, stats = _run_optserve(cfg, x_train, y_train, x_test, y_test, tqdm,
                                                                 progress)
        acc_local, s_local, loss_local = _run_local(cfg, x_train, y_train, x_test, y_test, tqdm, progress)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / PNG_NAME
    _plot(Figure, png, cfg, loss_remote, loss_local)
    stale_n = sum(s.staleness.count for s in stats)
    stale_mean = sum(s.staleness.mean * s.staleness.count for s in stats) / stale_n if stale_n else 0.0
    return {
        "accuracy_optserve": acc_remote,
        "accuracy_local": acc_local,
        "seconds_optserve": s_remote,
        "seconds_local": s_local,
        "pushes": len(loss_remote),
        "shard_pushes": [int(s.pushes) for s in stats],
        "staleness_mean": stale_mean,
        "steps_local": len(loss_local),
        "png": png,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--workers", type=int, default=d.workers, help="worker threads (default "
                                                                       f"{d.workers})")
    parser.add_argument("--shards", type=int, default=d.shards, help="in-process shards (default "
                                                                     f"{d.shards})")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help="optimizer steps per worker; local Adam takes workers x steps (default "
                             f"{d.steps})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="minibatch size (default "
                                                                             f"{d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr:g})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"seed of split, weights and shuffles (default {d.seed})")
    parser.add_argument("--out", default="demo-out", help="folder for demo_loss.png (default demo-out, "
                                                          "created)")
    parser.add_argument("--wire-dtype", choices=WIRE_DTYPE_NAMES, default=d.wire_dtype,
                        help="gradients and pulled parameters on the wire (default float32; the shards "
                             "keep float32 state either way)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run the demo, print the results table; 0 if optserve reached the accuracy target, else 1."""
    r = run_demo(workers=args.workers, shards=args.shards, steps=args.steps, batch_size=args.batch_size,
                 lr=args.lr, seed=args.seed, out_dir=args.out, progress=not args.no_progress,
                 wire_dtype=args.wire_dtype)
    print(f"{'':<30}{'held-out accuracy':>18}{'train seconds':>15}{'steps':>8}")
    name = "optserve (async)" + ("" if args.wire_dtype == "float32" else ", " + args.wire_dtype)
    print(f"{name:<30}{r['accuracy_optserve']:>18.2%}{r['seconds_optserve']:>15.2f}{r['pushes']:>8}")
    print(f"{'local torch Adam':<30}{r['accuracy_local']:>18.2%}{r['seconds_local']:>15.2f}"
          f"{r['steps_local']:>8}")
    print(f"pushes: {r['pushes']} RemoteAdam steps from {args.workers} workers; push requests per shard "
          f"{r['shard_pushes']}; mean staleness {r['staleness_mean']:.2f} versions")
    print(f"loss curves: {r['png']}")
    if r["accuracy_optserve"] < ACCURACY_TARGET:
        print(f"FAILED: optserve's held-out accuracy {r['accuracy_optserve']:.2%} is below the target "
              f"{ACCURACY_TARGET:.0%}")
        return 1
    return 0
