"""`optserve experiment`: one training task under sync, async and ssp:S, side by side, as real processes.

What it is for: seeing what the training-mode policies (DESIGN.md "Policies") do to convergence and
staleness. For each mode it runs `optserve serve` shard processes with that policy and W worker
processes, each with its own replica, its own share of the training data and its own RemoteAdam
against every shard, optionally with an artificial per-step sleep on some workers (stragglers). Each
worker logs every step (wall time since a common start, loss, the staleness its push was applied
with, pushes dropped); at the end the served model's held-out accuracy is measured. It writes
`<out>/experiment.csv` (one row per worker step), `<out>/experiment.png` (loss against wall time and
against steps, staleness histogram) and `<out>/summary.md` (one row per mode), and returns the table.

What it must not do: download anything (digits ships inside scikit-learn), pick ports (shards bind
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
CSV_COLUMNS = ("mode", "worker", "step", "wall_time", "loss", "staleness", "staleness_max", "dropped")
DEFAULT_MODES = ("sync", "async", "ssp:2")
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


@dataclass(frozen=True)
class Task:
    """A training task: model builder (a module-level function: workers look it up by name) and defaults."""
    make_model: Callable[[int], nn.Module]
    lr: float
    batch_size: int
    description: str


TASKS: dict[str, Task] = {
    "digits": Task(make_model, 3e-3, 32, "the demo's MLP 64-128-10 on digits"),
    "digits-cnn": Task(_make_cnn, 2e-3, 32, "CNN conv16-conv32-pool-fc64-fc10 on 8x8 digits"),
}


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
    delay: dict[int, float] = field(default_factory=dict)  # worker index -> seconds slept per step
    backup_workers: int = 0  # sync: step after workers - backup_workers gradients
    stale: str = "reject"  # ssp: reject or scale pushes over the bound
    target_loss: float | None = None  # None: the final (smoothed) loss of the mode that ends highest
    timeout: float = 600.0  # seconds a mode may take, start to finish

    def __post_init__(self):
        from optserve.server.policy import parse_policy

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {sorted(TASKS)}")
        for name in ("workers", "shards", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"experiment {name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 0 or not 0.0 <= self.lr < math.inf:
            raise ValueError(f"batch size and lr must be >= 0 (0: the task's default), got "
                             f"{self.batch_size} and {self.lr}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be a non-empty list without repeats, got {list(self.modes)}")
        for mode in self.modes:
            parse_policy(mode, self.workers, self.backup_workers, self.stale)  # raises a clear ValueError
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
             "--port", "0", "--policy", mode, "--workers", str(cfg.workers),
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

def _run_mode(cfg: ExperimentConfig, mode: str, servers: list[str], workers: _Workers, shares, data, tqdm,
              progress: bool) -> dict[str, Any]:
    """Train under one mode; returns its rows (CSV order), dropped pushes, wall time and accuracy."""
    from optserve.client.remote_adam import RemoteAdam

    x_train, y_train, x_test, y_test = data
    deadline = time.monotonic() + cfg.timeout
    workers.go.clear()  # before any job is sent: no worker can pass the start of this mode early
    for w, share in enumerate(shares):
        workers.jobs[w].put(WorkerJob(
            mode=mode, servers=servers, task=cfg.task, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
            seed=cfg.seed, delay=cfg.delay.get(w, 0.0), until_version=mode == "sync",
            end_on_wait_timeout=mode == "sync" and cfg.backup_workers > 0, timeout=cfg.timeout,
            x=x_train[share].numpy(), y=y_train[share].numpy()))
    ready = 0
    while ready < cfg.workers:
        ready += workers.receive(deadline)[0] == "ready"
    start = time.monotonic()  # the common start: CLOCK_MONOTONIC is one clock for all processes
    workers.go.set()
    rows, dropped, timed_out = [], {}, 0
    with tqdm(total=cfg.workers * cfg.steps, desc=f"{cfg.task} {mode}", unit="step",
              disable=not progress) as bar:
        while len(dropped) < cfg.workers:
            msg = workers.receive(deadline)
            if msg[0] == "step":
                _, w, step, t, loss, stale, stale_max, n_dropped = msg
                rows.append(dict(mode=mode, worker=w, step=step, wall_time=t - start, loss=loss,
                                 staleness=stale, staleness_max=stale_max, dropped=n_dropped))
                bar.update()
                if bar.n % 25 == 0:
                    bar.set_postfix(loss=f"{loss:.3f}")
            elif msg[0] == "done":
                dropped[msg[1]] = msg[2]
                timed_out += msg[3]
    # A fresh replica with other weights: RemoteAdam's construction overwrites them with the shards'
    # final values, so this measures the served model, not any worker's copy.
    final = TASKS[cfg.task].make_model(cfg.seed + 10_000)
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


def _summarize(cfg: ExperimentConfig, results: dict[str, dict]) -> tuple[float, dict[str, dict]]:
    """(target loss, per-mode metrics)."""
    curves = {m: _loss_over_time(r["rows"], cfg.workers) for m, r in results.items()}
    # Default target: the loss the worst mode ends at, so every mode has a time to it.
    target = cfg.target_loss if cfg.target_loss is not None else max(float(c[1][-1]) for c in curves.values())
    summary = {}
    for mode, r in results.items():
        times, smooth = curves[mode]
        hit = np.nonzero(smooth <= target)[0]
        stale = np.array([x["staleness"] for x in r["rows"]], dtype=np.float64)
        stale_max = np.array([x["staleness_max"] for x in r["rows"]], dtype=np.float64)
        summary[mode] = {
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
        }
    return target, summary


def _markdown(cfg: ExperimentConfig, target: float, summary: dict[str, dict]) -> str:
    delay = ", ".join(f"worker {w} +{s:g} s" for w, s in sorted(cfg.delay.items())) or "none"
    origin = "given" if cfg.target_loss is not None else "the highest final loss among the modes"
    lines = [
        f"# optserve experiment: {cfg.task}",
        "",
        f"{TASKS[cfg.task].description}; {cfg.workers} worker processes x {cfg.steps} steps, {cfg.shards} "
        f"shard processes, batch {cfg.batch_size}, lr {cfg.lr:g}, seed {cfg.seed}; stragglers: {delay}; "
        f"ssp over the bound: {cfg.stale}; sync backup workers: {cfg.backup_workers}.",
        f"Target loss {target:.4f} ({origin}; losses are moving means over {5 * cfg.workers} worker steps).",
        "",
        "| mode | time to target (s) | final loss | held-out accuracy | staleness mean | staleness max "
        "| shard pushes dropped | steps with a drop | steps | wall time (s) | steps/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, s in summary.items():
        ttt = "not reached" if s["time_to_target"] is None else f"{s['time_to_target']:.2f}"
        lines.append(f"| {mode} | {ttt} | {s['final_loss']:.4f} | {s['accuracy']:.2%} | "
                     f"{s['staleness_mean']:.2f} | {s['staleness_max']} | {s['dropped']} | "
                     f"{s['steps_dropped']} | {s['steps']} | {s['wall_time']:.2f} "
                     f"| {s['steps'] / s['wall_time']:.1f} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, results: dict[str, dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results.values():
            for row in r["rows"]:
                writer.writerow({**row, "wall_time": f"{row['wall_time']:.6f}", "loss": f"{row['loss']:.6g}",
                                 "staleness": ("" if math.isnan(row["staleness"])
                                               else f"{row['staleness']:.4g}"),
                                 "staleness_max": "" if math.isnan(row["staleness_max"]) else
                                 int(row["staleness_max"])})


def _plot(Figure: Callable, path: Path, cfg: ExperimentConfig, results: dict[str, dict],
          target: float) -> None:
    # matplotlib.figure.Figure needs no pyplot and no backend switch: it renders with Agg on savefig.
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    ax_time, ax_step, ax_hist = fig.subplots(1, 3)
    colors = {m: f"C{i}" for i, m in enumerate(results)}
    for mode, r in results.items():
        times, smooth = _loss_over_time(r["rows"], cfg.workers)
        ax_time.plot(times, smooth, color=colors[mode], label=mode)
        steps, mean = _loss_by_step(r["rows"])
        window = max(1, min(10, len(mean) // 10))
        ax_step.plot(steps, mean, color=colors[mode], alpha=0.2, linewidth=0.8)
        ax_step.plot(steps[window - 1:], moving_average(list(mean), window), color=colors[mode], label=mode)
    for ax in (ax_time, ax_step):
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.3f}")
        ax.set_yscale("log")
        ax.set_ylabel("training loss (cross-entropy)")
        ax.legend()
    ax_time.set_xlabel("wall time since the common start (s)")
    ax_time.set_title(f"loss vs time (mean of {_window(10 ** 9, cfg.workers)} worker steps)")
    ax_step.set_xlabel("step (per worker)")
    ax_step.set_title(f"loss vs step (mean over {cfg.workers} workers)")
    values = [np.array([x["staleness"] for x in r["rows"]], dtype=np.float64) for r in results.values()]
    values = [v[np.isfinite(v)] for v in values]
    top = max((float(v.max()) for v in values if len(v)), default=0.0)
    ax_hist.hist(values, bins=np.arange(0.0, math.ceil(top) + 1.0, 0.5) - 0.25, label=list(results),
                 color=[colors[m] for m in results])
    ax_hist.set_xlabel("staleness of a step's applied push (versions; mean over its keys)")
    ax_hist.set_ylabel("worker steps")
    ax_hist.set_title("staleness (dropped pushes not counted)")
    ax_hist.legend()
    fig.suptitle(f"optserve experiment: {cfg.task}, {cfg.workers} workers, {cfg.shards} shards")
    fig.savefig(path, dpi=100)


# -- entry points -----------------------------------------------------------------------------------

def run_experiment(task: str = "digits", workers: int = 4, shards: int = 2,
                   modes: Sequence[str] = DEFAULT_MODES, steps: int = ExperimentConfig.steps,
                   batch_size: int = 0, lr: float = 0.0, seed: int = 0,
                   delay: str | Mapping[int, float] | None = None, backup_workers: int = 0,
                   stale: str = "reject",
                   target_loss: float | None = None, out_dir: str | Path = "experiment-out",
                   progress: bool = True, timeout: float = 600.0) -> dict[str, Any]:
    """Run the task under every mode; write the CSV, PNG and summary; return what `main` prints.

    delay: stragglers, {worker index: seconds slept before each step} or "3:0.05,2:0.01".
    Keys of the result: config (ExperimentConfig), target_loss, modes ({mode: time_to_target (s or
    None), final_loss, accuracy, staleness_mean, staleness_max, dropped (pushes refused, one per
    shard), steps_dropped (worker steps with a drop), steps, wall_time, ended_on_wait_timeout
    (workers whose last sync step timed out: backup workers only)}), table
    (summary.md's text), csv, png, summary (paths).
    """
    cfg = ExperimentConfig(task=task, workers=workers, shards=shards, modes=tuple(modes), steps=steps,
                           batch_size=batch_size, lr=lr, seed=seed, delay=parse_delay(delay),
                           backup_workers=backup_workers, stale=stale, target_loss=target_loss,
                           timeout=timeout)
    sklearn, Figure, tqdm = require_demo_packages()
    x_train, y_train, x_test, y_test = load_digits(sklearn, cfg.seed)
    # Each worker trains on its own disjoint share of a seeded shuffle of the training set (as the demo).
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))
    shares = order.chunk(cfg.workers)
    results: dict[str, dict] = {}
    shard_procs: dict[str, list[_Shard]] = {}
    pool, ok = None, False
    try:
        for mode in cfg.modes:
            shard_procs[mode] = [_Shard(mode, i, cfg) for i in range(cfg.shards)]
        pool = _Workers(cfg.workers)
        deadline = time.monotonic() + START_TIMEOUT
        servers = {m: [s.address(deadline) for s in ss] for m, ss in shard_procs.items()}
        with torch_threads(1):  # the evaluation's replica; this process's thread count is put back
            for mode in cfg.modes:
                results[mode] = _run_mode(cfg, mode, servers[mode], pool, shares,
                                          (x_train, y_train, x_test, y_test), tqdm, progress)
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
    _plot(Figure, paths["png"], cfg, results, target)
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
                        help="comma-separated policies to compare: sync, async, ssp:S (default "
                             f"{','.join(d.modes)})")
    parser.add_argument("--steps", type=int, default=d.steps,
                        help="optimizer steps per worker; sync: every worker trains until the model took "
                             "this many steps, so with backup workers a straggler takes fewer (default "
                             f"{d.steps})")
    parser.add_argument("--batch-size", type=int, default=0, help="minibatch size (default: the task's, 32)")
    parser.add_argument("--lr", type=float, default=0.0, help="Adam learning rate (default: the task's)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"seed of split, weights and shuffles (default {d.seed})")
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
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, delay=args.delay,
                       backup_workers=args.backup_workers, stale=args.stale, target_loss=args.target_loss,
                       out_dir=args.out, progress=not args.no_progress, timeout=args.timeout)
    print(r["table"])
    print(f"per-step log: {r['csv']}\nplots: {r['png']}\nsummary: {r['summary']}")
    return 0
