"""`optserve replay LOG --checkpoint C`: re-apply a shard's logged pushes and find the first divergence.

What it is for: reproducing an asynchronous run exactly. The shard's apply log (server/applylog.py,
`--apply-log LOG --apply-log-max-gradient-bytes N`) holds, per applied push and in the order the
steps happened, the gradients Adam was given, the options and versions, and a sha256 of each key's
state after the step. Replay loads checkpoint C (written by that shard, before or during the logged
run) into a fresh CPU store, skips the pushes the checkpoint already holds (by version), re-applies
every later push in order, and after each compares every key's state with the logged digest. The
report names the first push (index in the log, client_id, seq) and key whose gradient bytes or
resulting state differ, or says "bitwise equal".

Kernels: `shard` (default) applies through `Store.apply`, the shard's own path (adam_fast: torch's
fused Adam on CPU), so a log written by a CPU shard replays bit for bit. `reference` applies
`adam_reference` (the seed, line for line): it differs from the fused kernel in the last bits
(about 1 ulp a step), so it reports the first push where it departs from the shard; that is the
audit of the fast kernel against the spec, on the run's own data.

What it must not do: unpickle anything (JSON lines, raw float32, safetensors checkpoints), touch a
running shard, or guess: a log and checkpoint that do not fit each other are refused with why.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optserve.hyper import AdamConfig
from optserve.server.adam import adam_reference
from optserve.server.applylog import gradient_path, state_sha256, tensors_sha256
from optserve.server.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from optserve.server.store import GradEntry, Store

KERNELS = ("shard", "reference")


@dataclass
class ReplayReport:
    pushes: int  # lines in the log
    skipped: int  # already in the checkpoint
    replayed: int  # re-applied and compared
    divergence: dict[str, Any] | None  # the first: push index, client_id, seq, key, what
    stopped: str = ""  # why replay ended before the log did (no divergence): gradients not recorded
    store: Store | None = None

    @property
    def equal(self) -> bool:
        return self.divergence is None

    def text(self) -> str:
        head = (f"{self.pushes} pushes in the log: {self.skipped} already in the checkpoint, "
                f"{self.replayed} replayed")
        if self.divergence is not None:
            d = self.divergence
            return (f"{head}\nfirst divergence: push {d['push']} (client {d['client_id']!r}, "
                    f"seq {d['seq']}), key {d['key']!r}: {d['what']}")
        upto = f" (up to push {self.skipped + self.replayed}: {self.stopped})" if self.stopped else ""
        return f"{head}\nbitwise equal{upto}"


def _checkpoint_path(path: Path) -> Path:
    """A checkpoint (ckpt-N folder), or a checkpoint directory holding exactly one."""
    found = list_checkpoints(path)
    if len(found) == 1:
        return found[0]
    if found:
        raise ValueError(f"{path} holds {len(found)} checkpoints ({', '.join(p.name for p in found)}); "
                         f"name the one the replay starts from")
    return path


def load_store(checkpoint: str | Path) -> Store:
    data = load_checkpoint(_checkpoint_path(Path(checkpoint)))
    store = Store("cpu")
    store.restore(data.keys, {})
    return store


def _apply_reference(entries: list[GradEntry]) -> None:
    for e in entries:
        k = e.key
        k.step += 1
        if e.cfg.amsgrad and k.max_exp_avg_sq is None:
            k.max_exp_avg_sq = torch.zeros_like(k.param)
        for offset, g in e.pieces:
            stop = offset + g.numel()
            adam_reference(k.param[offset:stop], g, k.exp_avg[offset:stop], k.exp_avg_sq[offset:stop],
                           k.max_exp_avg_sq[offset:stop] if e.cfg.amsgrad else None, k.step, e.cfg)


def replay(log_path: str | Path, checkpoint: str | Path, kernel: str = "shard") -> ReplayReport:
    """Replay `log_path` from `checkpoint`; the report's `store` holds the replayed state."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    log_path = Path(log_path)
    store = load_store(checkpoint)
    lines = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    grad_file = gradient_path(log_path)
    has_grads = grad_file.exists() and grad_file.stat().st_size > 0
    grads = np.memmap(grad_file, dtype="<f4", mode="r") if has_grads else None
    report = ReplayReport(len(lines), 0, 0, None, store=store)
    started = False
    for i, line in enumerate(lines):
        names, versions = line["keys"], line["versions"]
        missing = [n for n in names if n not in store.names()]
        if missing:
            raise ValueError(f"push {i}: key {missing[0]!r} is not in the checkpoint; was the checkpoint "
                             f"written by the shard that wrote {log_path}, after its keys were registered?")
        held = [store.get(n).version >= v for n, v in zip(names, versions)]
        if not started and all(held):
            report.skipped += 1  # its step is in the checkpoint already
            continue
        if not started and any(held):
            raise ValueError(f"push {i}: the checkpoint holds its step for some keys and not others; it was "
                             f"not written by this log's shard")
        started = True

        def diverged(key: str, what: str) -> ReplayReport:
            report.divergence = {"push": i, "client_id": line["client_id"], "seq": line["seq"], "key": key,
                                 "what": what}
            return report

        if "grad_at" not in line or "state_sha256" not in line:
            raise ValueError(f"push {i}: the log has no gradients or digests (written without "
                             f"--apply-log-max-gradient-bytes, or by an older optserve)")
        if line["grad_at"] is None or grads is None:
            report.stopped = (f"push {i} on was logged without its gradient (the "
                              f"--apply-log-max-gradient-bytes bound was reached)")
            return report
        at = line["grad_at"] // 4
        entries = []
        for j, name in enumerate(names):
            key = store.get(name)
            pieces = []
            for offset, numel in line["pieces"][j]:
                if at + numel > len(grads):
                    return diverged(name, f"the gradient file {grad_file} ends before this push's gradient")
                pieces.append((offset, torch.from_numpy(np.array(grads[at:at + numel]))))
                at += numel
            if tensors_sha256([g for _, g in pieces]) != line["grad_sha256"][j]:
                return diverged(name, "the gradient's bytes do not match the digest logged with them (the "
                                      "log or its gradient file was altered)")
            if key.version + 1 != versions[j] or line["version_read"][j] > key.version:
                return diverged(name, f"the key is at version {key.version} here, the log applied this push "
                                      f"to version {versions[j] - 1}")
            entries.append(GradEntry(key=key, version_read=line["version_read"][j],
                                     cfg=AdamConfig(**line["hyper"][j]), pieces=pieces))
        if kernel == "shard":
            store.apply(entries)
        else:
            _apply_reference(entries)
        report.replayed += 1
        for j, name in enumerate(names):
            if state_sha256(store.get(name)) != line["state_sha256"][j]:
                return diverged(name, f"the state after the step differs from the shard's (kernel {kernel})")
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", metavar="LOG", help="the shard's --apply-log file (LOG.grad beside it)")
    parser.add_argument("--checkpoint", required=True,
                        help="the checkpoint to start from: a ckpt-N folder, or a checkpoint directory "
                             "holding one (written by the same shard, before or during the logged run)")
    parser.add_argument("--kernel", choices=KERNELS, default="shard",
                        help="shard: the shard's own Store.apply (fused Adam; bitwise for a CPU shard's "
                             "log); reference: the seed's adam_reference, to see where it departs (default "
                             "shard)")


def main(args: argparse.Namespace) -> int:
    """Print the report; 0 when bitwise equal, 1 at a divergence."""
    try:
        report = replay(args.log, args.checkpoint, args.kernel)
    except (CheckpointError, OSError, KeyError, json.JSONDecodeError) as exc:  # the CLI prints ValueErrors
        raise ValueError(f"cannot replay {args.log} from {args.checkpoint}: {exc}") from None
    print(report.text())
    return 0 if report.equal else 1
