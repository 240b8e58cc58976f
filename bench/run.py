"""`make bench`: optserve's benchmarks, with their anchors re-measured in the same run.

Sections (each module's docstring says exactly what it measures):
  a  update kernel, Gelem/s: optserve's adam_fast vs torch.optim.Adam foreach / fused   (bench/kernel.py)
  b  transport, GB/s: 64 MiB push + pull through one shard vs raw TCP and torch rpc     (bench/transport.py)
  c  end-to-end RemoteAdam.step() ms for 1M/10M/50M params, 1 and 2 shards, vs local
     fused Adam and the transfer lower bound                                            (bench/e2e.py)
  d  aggregate pushes/s with 1/2/4/8 async worker processes, 1 and 2 shards             (bench/workers.py)
  e  replication: 64+64 MiB step and 8-worker steps/s, R=1 vs R=2 replicas              (bench/replication.py)

Every figure is median (min–max) over the repetitions (>= 5; 3 with --quick), variants interleaved
round-robin. Sections (b) and (c) also time their anchors' minimal standalone forms
(bench/standalone.py) and mark the targets on an anchor that is off by more than 10% INVALID.
Prints tables and PASS/MISS/INVALID target lines, writes <out>/latest.json (machine facts, raw
samples, other processes' CPU load per section) and <out>/latest.png.

    python bench/run.py [--quick] [--only a,b,c,d,e] [--out bench/results] [--reps N]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

# Before torch loads, here and in every helper process the bench spawns (they inherit it): OpenMP
# threads sleep when a parallel region ends instead of spinning, as in optserve's shards
# (optserve/cli.py). With libgomp's default, the bench process's idle OpenMP thread spun for 7.3 ms
# of CPU during each 64 MiB TCP anchor round trip that followed a torch op, on a 2-core machine
# (docs/MEASUREMENTS.md). An OMP_WAIT_POLICY set by the caller is kept (and recorded in the JSON).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first; the modules import as bench.*
    sys.path.insert(0, str(ROOT))

from bench.common import Settings, verdict  # noqa: E402

SECTIONS = {"a": "kernel", "b": "transport", "c": "e2e", "d": "workers", "e": "replication"}
TITLES = {"a": "(a) update kernel", "b": "(b) transport: 64 MiB push + 64 MiB pull, one shard",
          "c": "(c) end-to-end RemoteAdam.step()", "d": "(d) aggregate pushes/s, async workers",
          "e": "(e) replication: R=1 vs R=2, one shard index"}


class _Timeout(Exception):
    pass


def _on_signal(signum, frame):
    # SIGTERM / SIGALRM unwind through every finally: helper processes and shards get stopped.
    raise _Timeout(f"stopped by signal {signal.Signals(signum).name}")


def machine_facts() -> dict:
    import grpc
    import numpy
    import torch
    facts = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
             "nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
             "torch": torch.__version__, "grpcio": grpc.__version__, "numpy": numpy.__version__,
             "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
             "env": {k: os.environ.get(k) for k in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS")}}
    try:
        import optserve
        facts["optserve"] = optserve.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/cpuinfo") as f:
            facts["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        with open("/proc/meminfo") as f:
            facts["mem_total_kib"] = int(f.readline().split()[1])
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            facts["thp"] = f.read().strip()
    except OSError:
        pass
    if facts["cuda"]:
        facts["cuda_device"] = torch.cuda.get_device_name(0)
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="reduced set in under ~2 min: 3 reps, no 50M, workers up to 4")
    ap.add_argument("--only", default="a,b,c,d,e", help="comma-separated sections to run (default a,b,c,d,e)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for latest.json/.png")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 7; 3 with --quick)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="hard wall-clock limit in seconds (default 900; 240 with --quick)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    reps = args.reps or (3 if args.quick else 7)
    if reps < 3:
        ap.error("--reps must be >= 3")
    settings = Settings(quick=args.quick, reps=reps, section_budget_s=60.0 if args.quick else 200.0)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(int(args.time_limit or (240 if args.quick else 900)))

    import importlib
    print(f"optserve bench: sections {','.join(only)}; {'QUICK mode: ' if args.quick else ''}"
          f"{reps} reps per figure{' (the full run uses >= 5)' if reps < 5 else ''}; "
          f"median (min–max); variants interleaved round-robin", flush=True)
    facts = machine_facts()
    print(f"machine: {facts['nproc']} CPUs ({facts.get('cpu')}), torch {facts['torch']} "
          f"({facts['torch_threads']} threads), grpcio {facts['grpcio']}, CUDA {facts['cuda']}, "
          f"{facts['date_utc']}", flush=True)

    out = {"meta": facts, "settings": {"quick": args.quick, "reps": reps, "sections": only},
           "sections": {}, "targets": [], "seconds": {}}
    reports = {}
    t_all = time.monotonic()
    status = 0
    try:
        for key in only:
            mod = importlib.import_module(f"bench.{SECTIONS[key]}")
            print(f"\n== {TITLES[key]} ==", flush=True)
            t0 = time.monotonic()
            try:
                res = mod.run(settings)
            except _Timeout:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
                import traceback
                traceback.print_exc()
                out["sections"][key] = {"error": f"{type(exc).__name__}: {exc}"}
                status = 1
                continue
            finally:
                out["seconds"][key] = round(time.monotonic() - t0, 1)
            settings.results[key] = res
            out["sections"][key] = res
            text, targets = mod.report(res)
            reports[key] = (text, targets)
            load = res.get("other_cpu_pct")
            print(text)
            print(f"  other-process CPU load: {'n/a' if load is None else f'{load:.0f}%'}; "
                  f"section took {out['seconds'][key]:.0f} s", flush=True)
            out["targets"].extend(targets)
    except _Timeout as exc:
        print(f"\nbench stopped: {exc} (time limit); results so far are kept", flush=True)
        status = 1
    finally:
        signal.alarm(0)
    out["seconds"]["total"] = round(time.monotonic() - t_all, 1)

    print("\n== targets (ratios from this run) ==")
    for t in out["targets"]:
        print(f"  {verdict(t['ok'], t.get('valid', True))}  {t['line']}")
    if not out["targets"]:
        print("  (none measured)")

    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latest.json").write_text(json.dumps(out, indent=1, default=float))
    try:
        from bench.plot import plot
        plot(out, folder / "latest.png")
        png = f", {folder / 'latest.png'}"
    except Exception as exc:  # noqa: BLE001 - the figures stay in the JSON
        png = f" (no PNG: {type(exc).__name__}: {exc})"
    print(f"\nwrote {folder / 'latest.json'}{png}; total {out['seconds']['total']:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
