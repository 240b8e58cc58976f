"""Shared machinery of the benchmark sections: timing, statistics, load metering, processes, tables.

Nothing here measures anything by itself. The rules every section follows are implemented once here:

- `interleave` runs competing variants round-robin (the order rotates every round), after warm-up
  calls, for a fixed number of rounds and under a wall-clock deadline; it keeps every raw sample.
- `summary` turns samples into median (min-max) over n; `fmt` prints it that way.
- `CpuLoad` measures the CPU share used by processes that are not this run or its descendants
  (from /proc/stat minus our process tree's CPU time), as ../shared/ANCHORS.md does.
- `Child` is a spawned helper process driven by commands over a pipe (bounded waits, always killed).
- `shard_sets` starts optserve shards as separate processes (`python -m optserve.cli serve --port 0`)
  listening on 127.0.0.1 and always stops them.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

MiB = 1 << 20
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------------------
# Run settings


@dataclass
class Settings:
    """What a run measures; sections read it, run.py fills it from the command line."""
    quick: bool = False
    reps: int = 7
    warmup: int = 2
    section_budget_s: float = 200.0   # one interleave stops adding rounds past this (keeping >= min_reps)
    min_reps: int = 3
    results: dict = field(default_factory=dict)  # results of sections already run (c reads b's TCP rate)


# ------------------------------------------------------------------------------------------------
# Statistics


def summary(samples: Sequence[float]) -> dict:
    """median, min, max and n of samples (and the samples themselves, for the JSON)."""
    xs = [float(x) for x in samples]
    if not xs:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0, "samples": []}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "samples": xs}


def fmt(stat: dict | None, digits: int = 2) -> str:
    """'median (min–max)' of a summary."""
    if not stat or not stat.get("n"):
        return "n/a"
    f = f"{{:.{digits}f}}"
    return f"{f.format(stat['median'])} ({f.format(stat['min'])}–{f.format(stat['max'])})"


def per_sample(samples: Sequence[Any], fn: Callable[[Any], float]) -> list[float]:
    """Derive a quantity from every raw sample (e.g. GB/s from seconds) before taking medians."""
    return [fn(s) for s in samples]


def slopes(xs: Sequence[float], ys: Sequence[float], tolerance: float = 0.25) -> dict:
    """Is y linear in x (a fixed cost allowed)? The incremental slopes (y[i+1]-y[i])/(x[i+1]-x[i])
    between consecutive points must agree within `tolerance` (max/min <= 1 + tolerance)."""
    pts = sorted(zip(xs, ys))
    s = [(y1 - y0) / (x1 - x0) for (x0, y0), (x1, y1) in zip(pts, pts[1:]) if x1 != x0]
    if len(s) < 2:
        return {"slopes": s, "linear": None}
    linear = min(s) > 0 and max(s) / min(s) <= 1 + tolerance
    return {"slopes": s, "linear": linear, "tolerance": tolerance}


# ------------------------------------------------------------------------------------------------
# Timing


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(variants: dict[str, Callable[[], Any]], settings: Settings, warmup: int | None = None,
               reps: int | None = None, label: str = "", settle: int = 0) -> dict[str, list[Any]]:
    """Run each variant once per round, round-robin, rotating the start every round.

    Each callable returns one sample (a float, or a dict of floats). `warmup` rounds are run first
    and dropped. With `settle` > 0, each timed call follows that many untimed calls of the same
    variant, so every sample is taken in the variant's steady state rather than just after another
    variant ran. Stops after `reps` rounds, or earlier once the section's budget is spent and at
    least `settings.min_reps` rounds are in (then prints a warning and the figure says n).
    """
    reps = settings.reps if reps is None else reps
    warmup = settings.warmup if warmup is None else warmup
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[Any]] = {n: [] for n in names}
    t0 = time.monotonic()
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for _ in range(settle):
                variants[name]()
            samples[name].append(variants[name]())
        if (r + 1 >= settings.min_reps and r + 1 < reps
                and time.monotonic() - t0 > settings.section_budget_s):
            print(f"  warning: {label or 'section'} stopped after {r + 1} of {reps} rounds "
                  f"(time budget {settings.section_budget_s:.0f} s)", flush=True)
            break
    return samples


# ------------------------------------------------------------------------------------------------
# Other processes' CPU load (ANCHORS.md method)


def _proc_ticks(pid: int) -> tuple[int, int]:
    """(ppid, utime+stime+cutime+cstime) of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read().decode(errors="replace")
    rest = raw[raw.rindex(")") + 2:].split()  # fields after "(comm)": state is rest[0]
    ppid = int(rest[1])
    return ppid, sum(int(x) for x in rest[11:15])


def _our_ticks() -> int:
    """CPU ticks used by this process and all its live descendants (reaped ones are in cutime)."""
    me = os.getpid()
    info: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                info[int(entry)] = _proc_ticks(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in info.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [me]
    while stack:
        pid = stack.pop()
        total += info.get(pid, (0, 0))[1]
        stack.extend(children.get(pid, []))
    return total


def _system_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class CpuLoad:
    """`with CpuLoad() as load: ...`; then load.other_pct is the machine's CPU share (0-100 %) used by
    processes outside this run's process tree during the block (None where /proc is unreadable)."""

    def __enter__(self) -> "CpuLoad":
        self.other_pct = None
        try:
            self._start = (_system_ticks(), _our_ticks())
        except OSError:
            self._start = None
        return self

    def stop(self) -> None:
        """Take the reading now (call before the block's helper processes are stopped)."""
        if self._start is None or self.other_pct is not None:
            return
        (busy0, total0), ours0 = self._start
        (busy1, total1), ours1 = _system_ticks(), _our_ticks()
        dt = total1 - total0
        if dt > 0:
            self.other_pct = max(0.0, min(100.0, 100.0 * ((busy1 - busy0) - (ours1 - ours0)) / dt))

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------
# Helper processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torch.distributed's init_method)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _child_main(factory: Callable[..., Any], conn, args: tuple) -> None:
    """The loop of a Child: build the object, then run its methods on command until 'stop' or EOF."""
    obj = None
    try:
        obj = factory(*args)
        conn.send(("ok", None))
        while True:
            try:
                cmd, cargs = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                break
            if cmd == "stop":
                break
            try:
                conn.send(("ok", getattr(obj, cmd)(*cargs)))
            except Exception:  # noqa: BLE001 - report to the parent, keep serving
                conn.send(("err", traceback.format_exc()))
    except Exception:  # noqa: BLE001
        with contextlib.suppress(Exception):
            conn.send(("err", traceback.format_exc()))
    finally:
        close = getattr(obj, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


class ChildError(RuntimeError):
    pass


class Child:
    """A spawned helper process holding `factory(*args)`; `call("method", ...)` runs a method there.

    Every wait is bounded; `close()` asks it to stop, then terminates and kills it.
    """

    def __init__(self, factory: Callable[..., Any], *args, name: str = "bench-child"):
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(factory, child_conn, args), name=name, daemon=True)
        self.proc.start()
        child_conn.close()
        self._ready = False
        self._stop_sent = False

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self._ready:
            self._recv(timeout)
            self._ready = True

    def send(self, cmd: str, *args) -> None:
        self.wait_ready()
        self._conn.send((cmd, args))

    def _recv(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise ChildError(f"{self.name}: no answer within {timeout:.0f} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise ChildError(f"{self.name}: exited (code {self.proc.exitcode})") from None
        if status != "ok":
            raise ChildError(f"{self.name} failed:\n{value}")
        return value

    def recv(self, timeout: float = 120.0) -> Any:
        return self._recv(timeout)

    def call(self, cmd: str, *args, timeout: float = 120.0) -> Any:
        self.send(cmd, *args)
        return self._recv(timeout)

    def request_stop(self) -> None:
        """Ask the child to stop without waiting (for collective shutdowns: ask all, then close)."""
        if not self._stop_sent and self.proc.is_alive():
            self._stop_sent = True
            with contextlib.suppress(Exception):
                self._conn.send(("stop", ()))

    def close(self, grace: float = 10.0) -> None:
        self.request_stop()
        self.proc.join(grace)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(3)
        self._conn.close()


@contextlib.contextmanager
def children(*specs: tuple) -> Iterator[list[Child]]:
    """Start several Childs at once (specs: (factory, args, name)) and close them all on exit.

    Does not wait for them to be built (so other start-up work can overlap); the first `call` does.
    """
    started: list[Child] = []
    try:
        for factory, args, name in specs:
            started.append(Child(factory, *args, name=name))
        yield started
    finally:
        for c in started:  # ask all first: some shutdowns are collective (torch.distributed.rpc)
            c.request_stop()
        for c in started:
            c.close()


# ------------------------------------------------------------------------------------------------
# optserve shards as separate processes


# Stops the shard when the bench process dies, even by SIGKILL (PR_SET_PDEATHSIG survives execv), then
# becomes `python -m optserve.cli ...` itself. argv[1] is the bench's pid (it may have died already).
_LAUNCH = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
           "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def _read_listening(proc: subprocess.Popen, log, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = proc.stdout.readline().decode().strip()
                if line.startswith("listening on "):
                    return line[len("listening on "):]
                if not line and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
    finally:
        sel.close()
    log.seek(0)
    tail = log.read().decode(errors="replace")[-2000:]
    raise RuntimeError(f"shard did not start (exit code {proc.poll()}); its stderr:\n{tail}")


def shard_command(index: int, num: int, module: str = "optserve.cli") -> list[str]:
    """The command line of one shard; `module` "bench.shard" is the bench's shard that can skip Adam."""
    return [sys.executable, "-c", _LAUNCH, str(os.getpid()), "-m", module, "--log-level", "WARNING",
            "serve", "--host", HOST, "--port", "0", "--shard-index", str(index), "--num-shards", str(num)]


def _shard_env() -> dict[str, str]:
    """The bench's environment, with the repository root importable (for `-m bench.shard`)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


@contextlib.contextmanager
def shard_sets(*sizes: int, timeout: float = 90.0, module: str = "optserve.cli") -> Iterator[list[list[str]]]:
    """Start shard sets of the given sizes at once (all processes in parallel); yields each set's
    addresses in shard-index order; stops every shard on exit (SIGTERM, then SIGKILL)."""
    procs: list[tuple[subprocess.Popen, Any]] = []
    try:
        for n in sizes:
            for i in range(n):
                log = tempfile.TemporaryFile()
                procs.append((subprocess.Popen(shard_command(i, n, module), stdout=subprocess.PIPE, stderr=log,
                                               stdin=subprocess.DEVNULL, env=_shard_env()), log))
        addrs = [_read_listening(p, log, timeout) for p, log in procs]
        out, k = [], 0
        for n in sizes:
            out.append(addrs[k:k + n])
            k += n
        yield out
    finally:
        stop_shards(procs)


def stop_shards(procs: list[tuple[subprocess.Popen, Any]]) -> None:
    """Stop shard processes started with a log file each: SIGTERM to all, then SIGKILL what is left
    after 8 s; closes their pipes and logs."""
    for p, _ in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p, log in procs:
        try:
            p.wait(8)
        except subprocess.TimeoutExpired:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(3)
        if p.stdout:
            p.stdout.close()
        log.close()


# ------------------------------------------------------------------------------------------------
# Output


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append(indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                        for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            lines.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(ok: bool, valid: bool = True) -> str:
    """PASS / MISS; INVALID when the target's anchor failed its standalone check (bench/standalone.py)."""
    if not valid:
        return "INVALID"
    return "PASS" if ok else "MISS"
