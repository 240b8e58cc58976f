"""`optserve experiment`: one training task under sync, async, ssp:S and DC-ASGD, side by side, in processes.

What it is for: seeing what the training-mode policies (DESIGN.md "Policies") do to convergence and
staleness. For each mode it runs `optserve serve` shard processes with that policy and W worker
processes, each with its own replica, its own share of the training data and its own RemoteAdam
against every shard, optionally with an artificial per-step sleep on some workers (stragglers). Each
worker logs every step (wall time since a common start, loss, the staleness its push was applied
with, pushes dropped); at the end the served model's held-out accuracy is measured. With `repeats`
N the whole comparison runs N times with seeds seed..seed+N-1 (split, weights, shuffles) and the
summary gives mean ± standard deviation over the runs. It writes `<out>/experiment.csv` (one row per
worker step), `<out>/experiment.png` (loss against wall time and against steps, staleness histogram,
final loss against measured staleness) and `<out>/summary.md` (one row per mode), and returns the
table. A mode `dc:λ` or `dca:λ0[:m]` runs shards with `--policy async --compensate` that spec.

What it must not do: download anything (digits ships inside scikit-learn, charlm reads this Python's
own standard-library sources), pick ports (shards bind
port 0 on 127.0.0.1 and print their address), leave a process behind (every process is stopped in a
`finally`), wait without a bound, or do Adam math (the shards do it). The task helpers (data, MLP,
batches, train step, accuracy) are the demo's, imported from `optserve.demo`.

Processes: all modes' shards start at once at the beginning (idle shards cost nothing) and the W
workers are started once and given one job per mode, so the start-up of ~10 Python processes is paid
once and never falls inside a mode's timed window.
"""
from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import queue
import select
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from optserve.demo import (ADAM_OPTIONS, REMOTE_ONLY_OPTIONS, accuracy, batches, load_digits, make_model,
                           require_demo_packages, moving_average, torch_threads, train_step)

CSV_NAME = "experiment.csv"
PNG_NAME = "experiment.png"
SUMMARY_NAME = "summary.md"
CSV_COLUMNS = ("mode", "repeat", "worker", "step", "wall_time", "loss", "staleness", "staleness_max",
               "dropped")
DEFAULT_MODES = ("sync", "async", "ssp:2", "dca:2")
MAX_STEPS_PER_VERSION = 100  # sync: bound on a worker's steps per model version (its pushes may be late)
BACKUP_WAIT_TIMEOUT = 10.0  # seconds, plus 10x the longest straggler delay (sync with backup workers)
START_TIMEOUT = 120.0  # seconds for a shard to print its address, or a worker to build its RemoteAdam


# -- tasks ------------------------------------------------------------------------------------------

def _make_cnn(seed: int) -> nn.Module:
    """A small CNN on the 8x8 digits: conv 16, conv 32, 2x2 max-pool, fc 64, fc 10 (38k parameters)."""
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)),
                          nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))
    # A private generator, as the demo's MLP: same weights in every process, global RNG untouched.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(layer.weight[0].numel())  # torch's default init: 1/sqrt(fan_in)
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.uniform_(-bound, bound, generator=gen)
    return model


# Character-level language model on this Python's own standard-library sources (offline, ~200 KB).
CHARLM_FILES = ("argparse.py", "difflib.py", "textwrap.py")
CHARLM_CONTEXT = 16  # characters the model sees
CHARLM_VOCAB = 97  # '\n', the 95 printable ASCII characters, and one for anything else
CHARLM_TRAIN, CHARLM_TEST = 120_000, 4_000  # windows: training (first 90% of the text), held out (last 10%)


def _encode_chars(text: str) -> torch.Tensor:
    codes = torch.tensor(list(text.encode("ascii", errors="replace")), dtype=torch.long)
    out = torch.full_like(codes, CHARLM_VOCAB - 1)
    out[codes == 10] = 0
    printable = (codes >= 32) & (codes < 127)
    out[printable] = codes[printable] - 31
    return out


def _load_charlm(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y) windows of CHARLM_CONTEXT characters -> the next one; training windows are drawn (seeded)
    from the first 90% of the text, held-out ones from the last 10%."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    try:
        text = "".join((stdlib / name).read_text(encoding="utf-8") for name in CHARLM_FILES)
    except OSError as exc:
        raise ValueError(f"charlm reads {', '.join(CHARLM_FILES)} from this Python's standard library "
                         f"({stdlib}): {exc}") from None
    codes = _encode_chars(text)
    cut = int(len(codes) * 0.9)
    gen = torch.Generator().manual_seed(seed)

    def windows(lo: int, hi: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(lo, hi - CHARLM_CONTEXT - 1, (n,), generator=gen)
        idx = start[:, None] + torch.arange(CHARLM_CONTEXT + 1)
        w = codes[idx]
        return w[:, :-1].contiguous(), w[:, -1].contiguous()

    return (*windows(0, cut, CHARLM_TRAIN), *windows(cut, len(codes), CHARLM_TEST))


def _make_charlm(seed: int) -> nn.Module:
    """Embedding 97x24 over 16 characters, fc 384-256, fc 256-97 (about 126k parameters)."""
    model = nn.Sequential(nn.Embedding(CHARLM_VOCAB, 24), nn.Flatten(), nn.Linear(24 * CHARLM_CONTEXT, 256),
                          nn.ReLU(), nn.Linear(256, CHARLM_VOCAB))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model[0].weight.normal_(0.0, 1.0, generator=gen)
        for layer in (model[2], model[4]):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
    return model


def _load_digits(seed: int):
    sklearn, _, _ = require_demo_packages()
    return load_digits(sklearn, seed)


@dataclass(frozen=True)
class Task:
    """A training task: data loader and model builder (module-level functions: workers look the model up
    by task name) and defaults."""
    load: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    make_model: Callable[[int], nn.Module]
    lr: float
    batch_size: int
    description: str


TASKS: dict[str, Task] = {
    "digits": Task(_load_digits, make_model, 3e-3, 32, "the demo's MLP 64-128-10 on digits"),
    "digits-cnn": Task(_load_digits, _make_cnn, 2e-3, 32, "CNN conv16-conv32-pool-fc64-fc10 on 8x8 digits"),
    "charlm": Task(_load_charlm, _make_charlm, 2e-3, 64,
                   "next-character MLP (embedding 24 x 16 characters, fc 256) on the standard library's "
                   f"{', '.join(CHARLM_FILES)}"),
}


def policy_arguments(mode: str) -> list[str]:
    """The `optserve serve` flags of an experiment mode: dc:λ / dca:λ0[:m] are async with DC-ASGD."""
    if mode.startswith(("dc:", "dca:")):
        return ["--policy", "async", "--compensate", mode]
    return ["--policy", mode]


# -- configuration ----------------------------------------------------------------------------------

def parse_delay(spec: str | Mapping[int, float] | None) -> dict[int, float]:
    """Stragglers: "WORKER:SECONDS[,WORKER:SECONDS...]" (e.g. "3:0.05") -> {3: 0.05}; None/"" -> {}.

    WORKER is a worker index; negative ones count from the end ("-1:0.05": the last worker).
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        return {int(k): float(v) for k, v in spec.items()}
    out = {}
    for item in spec.split(","):
        worker, sep, seconds = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(worker)] = float(seconds)
        except ValueError:
            raise ValueError(f"delay takes WORKER:SECONDS[,WORKER:SECONDS...], as 3:0.05; got {item!r} "
                             f"in {spec!r}") from None
    return out


@dataclass(frozen=True)
class ExperimentConfig:
    """The experiment's budget and layout, validated once here; the rest trusts it."""
    task: str = "digits"
    workers: int = 4
    shards: int = 2
    modes: tuple[str, ...] = DEFAULT_MODES
    steps: int = 600  # optimizer steps per worker and mode (sync: until the model's version is `steps`)
    batch_size: int = 0  # 0: the task's default
    lr: float = 0.0  # 0: the task's default
    seed: int = 0
    repeats: int = 1  # runs of every mode, with seeds seed, seed + 1, ...
    delay: dict[int, float] = field(default_factory=dict)  # worker index -> seconds slept per step
    backup_workers: int = 0  # sync: step after workers - backup_workers gradients
    stale: str = "reject"  # ssp: reject or scale pushes over the bound
    target_loss: float | None = None  # None: the final (smoothed) loss of the mode that ends highest
    timeout: float = 600.0  # seconds a mode may take, start to finish

    def __post_init__(self):
        from optserve.server.policy import parse_policy

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        for name in ("workers", "shards", "steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"experiment {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 0 or not 0.0 <= self.lr < math.inf:
            raise ValueError(f"batch size and lr must be >= 0 (0: the task's default), got "
                             f"{self.batch_size} and {self.lr}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be a non-empty list without repeats, got {list(self.modes)}")
        for mode in self.modes:  # each raises a clear ValueError
            if mode.startswith(("dc:", "dca:")):
                parse_policy("async", compensate=mode)
            else:
                parse_policy(mode, self.workers, self.backup_workers, self.stale)
        for worker, seconds in self.delay.items():
            if not -self.workers <= worker < self.workers or not 0.0 <= seconds < math.inf:
                raise ValueError(f"delay {worker}:{seconds}: worker must be in "
                                 f"{-self.workers}..{self.workers - 1} and seconds >= 0")
        # A negative worker index counts from the end, as in Python: -1 is the last worker.
        object.__setattr__(self, "delay", {w % self.workers: s for w, s in self.delay.items()})
        if self.target_loss is not None and not 0.0 < self.target_loss < math.inf:
            raise ValueError(f"target loss must be > 0, got {self.target_loss}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        task = TASKS[self.task]
        object.__setattr__(self, "batch_size", self.batch_size or task.batch_size)
        object.__setattr__(self, "lr", self.lr or task.lr)

    def wait_timeout(self, mode: str) -> float:
        """The shards' --wait-timeout: with backup workers short, as the last sync step may be left
        without enough gradients (see _run_job); otherwise the whole mode's timeout."""
        if mode == "sync" and self.backup_workers:
            return min(self.timeout, BACKUP_WAIT_TIMEOUT + 10 * max(self.delay.values(), default=0.0))
        return self.timeout


@dataclass(frozen=True)
class WorkerJob:
    """One mode's work for one worker process (pickled to it)."""
    mode: str
    servers: list[str]
    task: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    delay: float
    until_version: bool  # sync: train until the model's version reaches `steps`, not for `steps` steps
    end_on_wait_timeout: bool  # sync with backup workers: a sync step that timed out ends this worker's run
    timeout: float
    x: np.ndarray  # this worker's share of the training set
    y: np.ndarray


# -- worker processes -------------------------------------------------------------------------------

def _worker_main(index: int, jobs, results, go, parent_pid: int) -> None:
    """A worker process: run jobs (one per mode) until it gets None or its parent is gone."""
    torch.set_num_threads(1)  # tiny matmuls; W workers and the shards share a few cores
    while True:
        try:
            job = jobs.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if job is None:
            return
        try:
            _run_job(index, job, results, go)
        except BaseException:  # noqa: BLE001 - report any failure to the parent, which raises it
            results.put(("error", index, traceback.format_exc()))
            return


def _run_job(index: int, job: WorkerJob, results, go) -> None:
    from optserve.client.remote_adam import RemoteAdam
    from optserve.client.transport import ShardError

    model = TASKS[job.task].make_model(job.seed)
    with RemoteAdam(model.named_parameters(), servers=job.servers, lr=job.lr, **ADAM_OPTIONS,
                    **REMOTE_ONLY_OPTIONS, timeout=job.timeout, client_id=f"{job.mode}/worker{index}") as opt:
        results.put(("ready", index))
        if not go.wait(job.timeout):
            raise TimeoutError(f"worker {index}: no start signal for mode {job.mode} in {job.timeout:g} s")
        x, y = torch.from_numpy(job.x), torch.from_numpy(job.y)
        # Under sync every worker stops at the same model version, not after its own count: with backup
        # workers a straggler's count lags, and the others must not stop while it still needs W - b.
        limit = job.steps * (MAX_STEPS_PER_VERSION if job.until_version else 1)
        timed_out = False
        for step, (xb, yb) in enumerate(batches(x, y, job.batch_size, limit, job.seed + 1 + index), 1):
            if job.delay:
                time.sleep(job.delay)  # a straggler: its gradient is computed from older parameters
            opt.last_staleness.clear()  # so it holds only the keys this step's pushes were applied to
            dropped = opt.dropped_pushes
            try:
                loss = train_step(model, opt, xb, yb)
            except ShardError as exc:
                # With backup workers, a worker's view of the versions can differ between shards (it was
                # late on one); its last push can then open a step past the end, which the workers that
                # stopped never join: the shard's wait times out, and that ends this worker's run.
                if (job.end_on_wait_timeout and exc.reason == "timeout"
                        and max(opt.versions.values()) >= job.steps):
                    timed_out = True
                    break
                raise
            stale = list(opt.last_staleness.values())  # empty when every shard dropped the push
            results.put(("step", index, step, time.monotonic(), loss,
                         sum(stale) / len(stale) if stale else math.nan, max(stale, default=math.nan),
                         opt.dropped_pushes - dropped))
            if job.until_version and min(opt.versions.values()) >= job.steps:
                break
        else:
            if job.until_version:
                raise RuntimeError(f"worker {index}: {limit} steps did not bring the model to version "
                                   f"{job.steps}")
        results.put(("done", index, opt.dropped_pushes, timed_out))


class _Workers:
    """W worker processes (spawned once), fed one job per mode; their messages come back on one queue."""

    def __init__(self, count: int):
        ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold gRPC threads
        self.results = ctx.Queue()
        self.go = ctx.Event()
        self.jobs = [ctx.Queue() for _ in range(count)]
        self.procs = [ctx.Process(target=_worker_main,
                                  args=(i, self.jobs[i], self.results, self.go, os.getpid()),
                                  name=f"optserve-experiment-worker{i}", daemon=True) for i in range(count)]
        for p in self.procs:
            p.start()

    def receive(self, deadline: float) -> tuple:
        """The next message; raises if a worker failed or died, or at the deadline (time.monotonic)."""
        while True:
            try:
                msg = self.results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"experiment worker process(es) {dead} exited unexpectedly") from None
                if time.monotonic() > deadline:
                    raise TimeoutError("experiment workers did not finish in time") from None
                continue
            if msg[0] == "error":
                raise RuntimeError(f"experiment worker {msg[1]} failed:\n{msg[2]}")
            return msg

    def close(self, graceful: bool) -> None:
        """Stop the workers: idle ones are asked to exit; after a failure they are terminated at once."""
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10 if graceful else 0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        for q in (*self.jobs, self.results):
            q.close()
            q.cancel_join_thread()  # what is left unread (after a failure) must not block our exit


# -- shard processes --------------------------------------------------------------------------------

class _Shard:
    """One `optserve serve --port 0` process on 127.0.0.1; its stderr goes to a temporary file."""

    def __init__(self, mode: str, index: int, cfg: ExperimentConfig):
        self.label = f"{mode} shard {index}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "optserve.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
             "--port", "0", *policy_arguments(mode), "--workers", str(cfg.workers),
             "--backup-workers", str(cfg.backup_workers), "--stale", cfg.stale,
             "--wait-timeout", str(cfg.wait_timeout(mode)), "--shard-index", str(index),
             "--num-shards", str(cfg.shards),
             "--threads", str(max(16, cfg.workers + 8))],  # sync holds a thread per waiting worker
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._address: str | None = None

    def address(self, deadline: float) -> str:
        """host:port, once the shard printed it ("listening on HOST:PORT", its first line)."""
        if self._address is None:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stdout.readline() if ready else ""
            if not line.startswith("listening on "):
                self.log.seek(0)
                raise RuntimeError(f"{self.label} did not start (first line {line!r}, exit code "
                                   f"{self.proc.poll()}): {self.log.read().decode(errors='replace')[-2000:]}")
            self._address = line.split()[-1]
        return self._address

    def signal_stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the shard finishes calls in flight (5 s grace), exits

    def stop(self) -> None:
        self.signal_stop()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.log.close()


def _stop_all(shards: Sequence[_Shard]) -> None:
    for s in shards:
        s.signal_stop()  # all at once: their grace periods overlap
    for s in shards:
        s.stop()


# -- one mode ---------------------------------------------------------------------------------------

def _run_mode(cfg: ExperimentConfig, mode: str, repeat: int, servers: list[str], workers: _Workers, shares,
              data, tqdm, progress: bool) -> dict[str, Any]:
    """Train under one mode; returns its rows (CSV order), dropped pushes, wall time and accuracy."""
    from optserve.client.remote_adam import RemoteAdam

    x_train, y_train, x_test, y_test = data
    deadline = time.monotonic() + cfg.timeout
    workers.go.clear()  # before any job is sent: no worker can pass the start of this mode early
    for w, share in enumerate(shares):
        workers.jobs[w].put(WorkerJob(
            mode=mode, servers=servers, task=cfg.task, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
            seed=cfg.seed + repeat, delay=cfg.delay.get(w, 0.0), until_version=mode == "sync",
            end_on_wait_timeout=mode == "sync" and cfg.backup_workers > 0, timeout=cfg.timeout,
            x=x_train[share].numpy(), y=y_train[share].numpy()))
    ready = 0
    while ready < cfg.workers:
        ready += workers.receive(deadline)[0] == "ready"
    start = time.monotonic()  # the common start: CLOCK_MONOTONIC is one clock for all processes
    workers.go.set()
    rows, dropped, timed_out = [], {}, 0
    label = f"{cfg.task} {mode}" + (f" run {repeat + 1}/{cfg.repeats}" if cfg.repeats > 1 else "")
    with tqdm(total=cfg.workers * cfg.steps, desc=label, unit="step",
              disable=not progress) as bar:
        while len(dropped) < cfg.workers:
            msg = workers.receive(deadline)
            if msg[0] == "step":
                _, w, step, t, loss, stale, stale_max, n_dropped = msg
                rows.append(dict(mode=mode, repeat=repeat, worker=w, step=step, wall_time=t - start,
                                 loss=loss, staleness=stale, staleness_max=stale_max, dropped=n_dropped))
                bar.update()
                if bar.n % 25 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")
            elif msg[0] == "done":
                dropped[msg[1]] = msg[2]
                timed_out += msg[3]
    # A fresh replica with other weights: RemoteAdam's construction overwrites them with the shards'
    # final values, so this measures the served model, not any worker's copy.
    final = TASKS[cfg.task].make_model(cfg.seed + repeat + 10_000)
    RemoteAdam(final.named_parameters(), servers=servers, timeout=cfg.timeout).close()
    rows.sort(key=lambda r: (r["worker"], r["step"]))
    return {"rows": rows, "dropped": sum(dropped.values()), "wall_time": max(r["wall_time"] for r in rows),
            "accuracy": accuracy(final, x_test, y_test), "ended_on_wait_timeout": timed_out}


# -- analysis and outputs ---------------------------------------------------------------------------

def _window(n: int, workers: int) -> int:
    return max(1, min(5 * workers, n // 4))


def _loss_over_time(rows: Sequence[dict], workers: int) -> tuple[np.ndarray, np.ndarray]:
    """(wall times, moving mean of all workers' losses in the order their steps finished)."""
    ordered = sorted(rows, key=lambda r: r["wall_time"])
    window = _window(len(ordered), workers)
    return (np.array([r["wall_time"] for r in ordered])[window - 1:],
            moving_average([r["loss"] for r in ordered], window))


def _loss_by_step(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean loss over workers at each step index)."""
    steps = sorted({r["step"] for r in rows})
    by_step: dict[int, list[float]] = {s: [] for s in steps}
    for r in rows:
        by_step[r["step"]].append(r["loss"])
    return np.array(steps), np.array([np.mean(by_step[s]) for s in steps])


def _run_metrics(r: dict, workers: int, target: float) -> dict[str, Any]:
    """One run of one mode: the summary's numbers."""
    times, smooth = _loss_over_time(r["rows"], workers)
    hit = np.nonzero(smooth <= target)[0]
    stale = np.array([x["staleness"] for x in r["rows"]], dtype=np.float64)
    stale_max = np.array([x["staleness_max"] for x in r["rows"]], dtype=np.float64)
    return {
        "time_to_target": float(times[hit[0]]) if len(hit) else None,
        "final_loss": float(smooth[-1]),
        "accuracy": r["accuracy"],
        "staleness_mean": float(np.nanmean(stale)) if np.isfinite(stale).any() else math.nan,
        "staleness_max": int(np.nanmax(stale_max)) if np.isfinite(stale_max).any() else 0,
        "dropped": r["dropped"],  # per shard that refused: a step may drop one push per shard
        "steps_dropped": sum(1 for x in r["rows"] if x["dropped"]),
        "steps": len(r["rows"]),
        "wall_time": r["wall_time"],
        "ended_on_wait_timeout": r["ended_on_wait_timeout"],
        "target_loss": target,
    }


MEAN_STD = ("final_loss", "accuracy", "staleness_mean", "wall_time", "steps_per_second")


def _summarize(cfg: ExperimentConfig, results: dict[str, list[dict]]) -> tuple[float, dict[str, dict]]:
    """(target loss, per-mode metrics). Each run has its own target: given, or the final (smoothed) loss
    of the mode that ends highest in that run, so every mode has a time to it. Per mode: the runs'
    means, `<name>_std` (sample standard deviation over the runs; 0 for one run) for MEAN_STD, sums of
    the counts, the highest staleness, time to target averaged when every run reached it, and `runs`."""
    targets = []
    for i in range(cfg.repeats):
        ends = [float(_loss_over_time(runs[i]["rows"], cfg.workers)[1][-1]) for runs in results.values()]
        targets.append(cfg.target_loss if cfg.target_loss is not None else max(ends))
    summary = {}
    for mode, runs in results.items():
        per_run = [_run_metrics(r, cfg.workers, t) for r, t in zip(runs, targets)]
        for m in per_run:
            m["steps_per_second"] = m["steps"] / m["wall_time"]
        s: dict[str, Any] = {"runs": per_run}
        for name in MEAN_STD:
            values = np.array([m[name] for m in per_run], dtype=np.float64)
            s[name] = float(np.mean(values))
            s[name + "_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        for name in ("dropped", "steps_dropped", "steps", "ended_on_wait_timeout"):
            s[name] = sum(m[name] for m in per_run)
        s["staleness_max"] = max(m["staleness_max"] for m in per_run)
        hits = [m["time_to_target"] for m in per_run]
        s["time_to_target"] = None if None in hits else float(np.mean(hits))
        s["time_to_target_std"] = float(np.std(hits, ddof=1)) if None not in hits and len(hits) > 1 else 0.0
        summary[mode] = s
    return float(np.mean(targets)), summary


def _pm(s: dict, name: str, fmt: str, repeats: int) -> str:
    """`mean` or, over several runs, `mean ± std`."""
    if s[name] is None:
        return "not reached"
    text = format(s[name], fmt)
    return f"{text} ± {format(s[name + '_std'], fmt)}" if repeats > 1 else text


def _markdown(cfg: ExperimentConfig, target: float, summary: dict[str, dict]) -> str:
    delay = ", ".join(f"worker {w} +{s:g} s" for w, s in sorted(cfg.delay.items())) or "none"
    origin = "given" if cfg.target_loss is not None else "per run, the highest final loss among the modes"
    seeds = f"seed {cfg.seed}" if cfg.repeats == 1 else (f"{cfg.repeats} runs, seeds {cfg.seed}.."
                                                         f"{cfg.seed + cfg.repeats - 1}, mean ± standard "
                                                         "deviation over the runs")
    lines = [
        f"# optserve experiment: {cfg.task}",
        "",
        f"{TASKS[cfg.task].description}; {cfg.workers} worker processes x {cfg.steps} steps, {cfg.shards} "
        f"shard processes, batch {cfg.batch_size}, lr {cfg.lr:g}, {seeds}; stragglers: {delay}; "
        f"ssp over the bound: {cfg.stale}; sync backup workers: {cfg.backup_workers}.",
        f"Target loss {target:.4f} ({origin}{', mean' if cfg.repeats > 1 else ''}; losses are moving means "
        f"over {5 * cfg.workers} worker steps).",
        "",
        "| mode | time to target (s) | final loss | held-out accuracy | staleness mean | staleness max "
        "| shard pushes dropped | steps with a drop | steps | wall time (s) | steps/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    n = cfg.repeats
    for mode, s in summary.items():
        accuracy = {"accuracy": 100 * s["accuracy"], "accuracy_std": 100 * s["accuracy_std"]}
        lines.append(f"| {mode} | {_pm(s, 'time_to_target', '.2f', n)} | {_pm(s, 'final_loss', '.4f', n)} | "
                     f"{_pm(accuracy, 'accuracy', '.2f', n)}% | {_pm(s, 'staleness_mean', '.2f', n)} | "
                     f"{s['staleness_max']} | {s['dropped']} | {s['steps_dropped']} | {s['steps']} | "
                     f"{_pm(s, 'wall_time', '.2f', n)} | {_pm(s, 'steps_per_second', '.1f', n)} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, results: dict[str, list[dict]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for runs in results.values():
            for row in (row for r in runs for row in r["rows"]):
                writer.writerow({**row, "wall_time": f"{row['wall_time']:.6f}", "loss": f"{row['loss']:.6g}",
                                 "staleness": ("" if math.isnan(row["staleness"])
                                               else f"{row['staleness']:.4g}"),
                                 "staleness_max": "" if math.isnan(row["staleness_max"]) else
                                 int(row["staleness_max"])})


def _plot(Figure: Callable, path: Path, cfg: ExperimentConfig, results: dict[str, list[dict]],
          target: float, summary: dict[str, dict]) -> None:
    # matplotlib.figure.Figure needs no pyplot and no backend switch: it renders with Agg on savefig.
    fig = Figure(figsize=(21, 4.8), layout="constrained")
    ax_time, ax_step, ax_hist, ax_stale = fig.subplots(1, 4)
    colors = {m: f"C{i}" for i, m in enumerate(results)}
    for mode, runs in results.items():
        for i, r in enumerate(runs):  # every run; the legend names the mode once
            label = mode if i == 0 else None
            times, smooth = _loss_over_time(r["rows"], cfg.workers)
            ax_time.plot(times, smooth, color=colors[mode], label=label, alpha=1.0 if i == 0 else 0.5)
            steps, mean = _loss_by_step(r["rows"])
            window = max(1, min(10, len(mean) // 10))
            ax_step.plot(steps[window - 1:], moving_average(list(mean), window), color=colors[mode],
                         label=label, alpha=1.0 if i == 0 else 0.5)
    for ax in (ax_time, ax_step):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
        ax.set_yscale("log")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.legend()
    ax_time.set_xlabel("wall time since the common start (s)")
    ax_time.set_title(f"loss vs time (mean of {_window(10 ** 9, cfg.workers)} worker steps)")
    ax_step.set_xlabel("step (per worker)")
    ax_step.set_title(f"loss vs step (mean over {cfg.workers} workers, smoothed)")
    values = [np.array([x["staleness"] for r in runs for x in r["rows"]], dtype=np.float64)
              for runs in results.values()]
    values = [v[np.isfinite(v)] for v in values]
    top = max((float(v.max()) for v in values if len(v)), default=0.0)
    ax_hist.hist(values, bins=np.arange(0.0, math.ceil(top) + 1.0, 0.5) - 0.25, label=list(results),
                 color=[colors[m] for m in results])
    ax_hist.set_xlabel("staleness of a step's applied push (versions; mean over its keys)")
    ax_hist.set_ylabel("worker steps")
    ax_hist.set_title("staleness (dropped pushes not counted)")
    ax_hist.legend()
    for mode, s in summary.items():
        runs = s["runs"]
        ax_stale.scatter([m["staleness_mean"] for m in runs], [m["final_loss"] for m in runs],
                         color=colors[mode], alpha=0.5, s=18)
        ax_stale.errorbar(s["staleness_mean"], s["final_loss"], xerr=s["staleness_mean_std"],
                          yerr=s["final_loss_std"], color=colors[mode], marker="o", capsize=3, label=mode)
    ax_stale.set_xlabel("measured staleness (mean over applied pushes, versions)")
    ax_stale.set_ylabel("final training loss (smoothed)")
    ax_stale.set_title(f"final loss vs staleness ({cfg.repeats} run{'s' if cfg.repeats > 1 else ''} "
                       f"per mode; mean ± std)")
    ax_stale.legend()
    fig.suptitle(f"optserve experiment: {cfg.task}, {cfg.workers} workers, {cfg.shards} shards")
    fig.savefig(path, dpi=100)


# -- entry points -----------------------------------------------------------------------------------

def run_experiment(task: str = "digits", workers: int = 4, shards: int = 2,
                   modes: Sequence[str] = DEFAULT_MODES, steps: int = ExperimentConfig.steps,
                   batch_size: int = 0, lr: float = 0.0, seed: int = 0, repeats: int = 1,
                   delay: str | Mapping[int, float] | None = None, backup_workers: int = 0,
                   stale: str = "reject",
                   target_loss: float | None = None, out_dir: str | Path = "experiment-out",
                   progress: bool = True, timeout: float = 600.0) -> dict[str, Any]:
    """Run the task under every mode; write the CSV, PNG and summary; return what `main` prints.

    delay: stragglers, {worker index: seconds slept before each step} or "3:0.05,2:0.01".
    Keys of the result: config (ExperimentConfig), target_loss (mean over runs), modes ({mode:
    time_to_target (s or None), final_loss, accuracy, staleness_mean, wall_time, steps_per_second
    (means over the runs, each with a `_std`), staleness_max, dropped (pushes refused, one per
    shard), steps_dropped (worker steps with a drop), steps, ended_on_wait_timeout (workers whose
    last sync step timed out: backup workers only) (sums over the runs), runs (each run's)}), table
    (summary.md's text), csv, png, summary (paths).
    """
    cfg = ExperimentConfig(task=task, workers=workers, shards=shards, modes=tuple(modes), steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, repeats=repeats, delay=parse_delay(delay),
                           backup_workers=backup_workers, stale=stale, target_loss=target_loss,
                           timeout=timeout)
    _, Figure, tqdm = require_demo_packages()
    results: dict[str, list[dict]] = {mode: [] for mode in cfg.modes}
    shard_procs: dict[str, list[_Shard]] = {}
    pool, ok = None, False
    try:
        pool = _Workers(cfg.workers)
        for repeat in range(cfg.repeats):
            seed = cfg.seed + repeat
            x_train, y_train, x_test, y_test = TASKS[cfg.task].load(seed)
            # Each worker trains on its own disjoint share of a seeded shuffle of the training set (as the
            # demo).
            order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
            shares = order.chunk(cfg.workers)
            for mode in cfg.modes:  # fresh shards for every run: all modes' at once (idle ones cost nothing)
                shard_procs[mode] = [_Shard(mode, i, cfg) for i in range(cfg.shards)]
            deadline = time.monotonic() + START_TIMEOUT
            servers = {m: [s.address(deadline) for s in ss] for m, ss in shard_procs.items()}
            with torch_threads(1):  # the evaluation's replica; this process's thread count is put back
                for mode in cfg.modes:
                    results[mode].append(_run_mode(cfg, mode, repeat, servers[mode], pool, shares,
                                                   (x_train, y_train, x_test, y_test), tqdm, progress))
                    _stop_all(shard_procs.pop(mode))
        ok = True
    finally:
        if pool is not None:
            pool.close(graceful=ok)  # before the shards: no call is left in flight when they stop
        _stop_all([s for ss in shard_procs.values() for s in ss])

    target, summary = _summarize(cfg, results)
    table = _markdown(cfg, target, summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / CSV_NAME, "png": out / PNG_NAME, "summary": out / SUMMARY_NAME}
    _write_csv(paths["csv"], results)
    _plot(Figure, paths["png"], cfg, results, target, summary)
    paths["summary"].write_text(table)
    return {"config": cfg, "target_loss": target, "modes": summary, "table": table, **paths}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ExperimentConfig()
    parser.add_argument("--task", choices=sorted(TASKS), default=d.task,
                        help="; ".join(f"{k}: {t.description}" for k, t in TASKS.items()) + " (default "
                                                                                            f"{d.task})")
    parser.add_argument("--workers", type=int, default=d.workers, help="worker processes (default "
                                                                       f"{d.workers})")
    parser.add_argument("--shards", type=int, default=d.shards, help="shard processes per mode (default "
                                                                     f"{d.shards})")
    parser.add_argument("--modes", default=",".join(d.modes),
                        help="comma-separated policies to compare: sync, async, ssp:S, dc:LAMBDA, "
                             "dca:LAMBDA0[:M] (async with DC-ASGD) (default "
                             f"{','.join(d.modes)})")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help="optimizer steps per worker; sync: every worker trains until the model took "
                             "this many steps, so with backup workers a straggler takes fewer (default "
                             f"{d.steps})")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="minibatch size (default: the task's, 32; charlm 64)")
    parser.add_argument("--lr", type=float, default=0.0, help="Adam learning rate (default: the task's)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"seed of split, weights and shuffles (default {d.seed})")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help="run every mode this many times, with seeds seed, seed + 1, ...; the summary "
                             f"gives mean ± standard deviation (default {d.repeats})")
    parser.add_argument("--delay", default="", metavar="W:SEC[,W:SEC...]",
                        help="stragglers: worker W sleeps SEC seconds before each step, e.g. 3:0.05; -1 is "
                             "the last worker, written --delay=-1:0.05 (default none)")
    parser.add_argument("--backup-workers", type=int, default=d.backup_workers,
                        help="sync: step after the first workers - b gradients; later ones are dropped "
                             "(default 0)")
    parser.add_argument("--stale", choices=("reject", "scale"), default=d.stale,
                        help="ssp: refuse pushes over the bound, or apply them with lr / (staleness + 1) "
                             "(default reject)")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="loss for the time-to-target column (default: the highest final loss among the "
                             "modes)")
    parser.add_argument("--timeout", type=float, default=d.timeout,
                        help="seconds one mode may take before the experiment gives up (default "
                             f"{d.timeout:g})")
    parser.add_argument("--out", default="experiment-out",
                        help=f"folder for {CSV_NAME}, {PNG_NAME}, {SUMMARY_NAME} (default experiment-out, "
                             "created)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run the experiment, print the summary table and where the files are; 0 on success."""
    r = run_experiment(task=args.task, workers=args.workers, shards=args.shards,
                       modes=[m.strip() for m in args.modes.split(",") if m.strip()], steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, repeats=args.repeats,
                       delay=args.delay,
                       backup_workers=args.backup_workers, stale=args.stale, target_loss=args.target_loss,
                       out_dir=args.out, progress=not args.no_progress, timeout=args.timeout)
    print(r["table"])
    print(f"per-step log: {r['csv']}\nplots: {r['png']}\nsummary: {r['summary']}")
    return 0
