"""`optserve serve --apply-log FILE`: the order of applied pushes, with what an exact replay needs.

What it is for: one JSON line per applied push, written by `Store.apply` under the store's lock (so
lines are in the order the steps happened), holding who pushed (client_id, seq), each key's version
read and version after, the Adam options the step used, and two sha256 digests per key: of the
gradient Adam was given (after DC-ASGD compensation, if any) and of the key's state after the step
(param, exp_avg, exp_avg_sq[, max_exp_avg_sq], in that order, float32 little-endian bytes). With
`max_gradient_bytes` > 0 the gradients themselves are appended, raw float32 little-endian, to
`FILE.grad`, and the line says where (`grad_at`, a byte offset; each key's pieces follow one another
as `pieces` [[offset, numel], ...] list them). At the bound the shard stops recording gradients
(one warning; later lines have `grad_at` null and keep their digests): `optserve replay` replays
the pushes up to there. Nothing here is pickle; `optserve/replay.py` reads it.

What it must not do: change a tensor, or be called outside the store's lock. Its cost is under that
lock: hashing every pushed key's gradient and state (about 3-5 times the key's bytes), and copying
the gradient to the file when gradients are kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger("optserve.server")

GRAD_SUFFIX = ".grad"
STATE_PARTS = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _bytes(t: torch.Tensor) -> memoryview:
    """A float32 tensor's bytes (little-endian on every platform torch runs on), host-side."""
    return memoryview(t.detach().to("cpu").contiguous().numpy()).cast("B")


def tensors_sha256(tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(_bytes(t))
    return h.hexdigest()


def state_sha256(key) -> str:
    """The digest of a key's state: its parts, in STATE_PARTS order, those it holds."""
    return tensors_sha256([getattr(key, p) for p in STATE_PARTS if getattr(key, p) is not None])


def gradient_path(log_path: str | Path) -> Path:
    return Path(str(log_path) + GRAD_SUFFIX)


class ApplyLog:
    """The apply log of one shard (and, with max_gradient_bytes > 0, its gradient file)."""

    def __init__(self, path: str | Path, max_gradient_bytes: int = 0):
        if max_gradient_bytes < 0:
            raise ValueError(f"--apply-log-max-gradient-bytes must be >= 0, got {max_gradient_bytes}")
        self.path = Path(path)
        self.max_gradient_bytes = max_gradient_bytes
        self._lines = open(self.path, "a", encoding="utf-8")
        self._grads = open(gradient_path(self.path), "ab") if max_gradient_bytes else None
        self._grad_bytes = self._grads.tell() if self._grads else 0
        self.full = False  # the gradient bound was reached: no more gradients are recorded

    def write(self, origin, entries: Sequence, configs: Sequence, result) -> None:
        """(Under the store's lock, after the step.) One line for this applied push."""
        line = {"client_id": origin.client_id, "seq": origin.seq, "keys": [e.key.name for e in entries],
                "version_read": [e.version_read for e in entries], "versions": result.versions,
                "lr": [cfg.lr for cfg in configs],
                "hyper": [dataclasses.asdict(cfg) for cfg in configs],
                "pieces": [[[offset, g.numel()] for offset, g in e.pieces] for e in entries],
                "grad_sha256": [tensors_sha256([g for _, g in e.pieces]) for e in entries],
                "state_sha256": [state_sha256(e.key) for e in entries]}
        if self._grads is not None:
            line["grad_at"] = self._write_gradients(entries)
        self._lines.write(json.dumps(line) + "\n")
        self._lines.flush()

    def _write_gradients(self, entries: Sequence) -> int | None:
        size = sum(g.numel() * 4 for e in entries for _, g in e.pieces)
        if self.full or self._grad_bytes + size > self.max_gradient_bytes:
            if not self.full:
                log.warning("apply log %s: the gradient file reached its bound (%d bytes, "
                            "--apply-log-max-gradient-bytes); later pushes are logged with digests only",
                            self.path, self.max_gradient_bytes)
            self.full = True
            return None
        at = self._grad_bytes
        for e in entries:  # written before the line that points at them
            for _, g in e.pieces:
                self._grads.write(_bytes(g))
        self._grads.flush()
        self._grad_bytes += size
        return at

    def close(self) -> None:
        self._lines.close()
        if self._grads is not None:
            self._grads.close()
