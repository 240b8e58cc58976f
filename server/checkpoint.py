"""A shard's checkpoints on disk: write one atomically, find the newest that loads, prune old ones.

A checkpoint is a directory ``ckpt-<NNNNNNNN>`` holding ``tensors.safetensors`` (every key's param,
exp_avg, exp_avg_sq and optional max_exp_avg_sq, flat float32) and ``manifest.json`` (format version,
shard index/count, policy, per-key name/shape/step/hyperparameters, and the sha256 and byte size of the
tensor file). It is built in a ``.tmp-*`` directory, fsynced, and renamed into place, so a ``ckpt-*``
name only ever appears complete; damage after that (truncation, flipped bytes, a lost or edited
manifest) is caught by the checksums on load (the tensor file's sha256, and the manifest's own digest of
its canonical JSON), reported, and the next older checkpoint is used. Shard-level state goes in `extra`
(JSON: the dedupe table, the open sync rounds) and `extra_tensors` (the rounds' summed gradients).

This module is pure file I/O. It must not take locks, know about the store or gRPC, or unpickle
anything: tensors go through safetensors and everything else through JSON. It assumes one writer per
directory (the shard serializes its own checkpoints); concurrent writers to one directory are not
supported.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import safetensors
import safetensors.torch
import torch

from optserve.hyper import MAX_STEP
from optserve.serde import PART_NAMES

FORMAT_VERSION = 2  # 2: the manifest carries its own digest, and shard-level tensors (extra_tensors)
READABLE_VERSIONS = (1, 2)  # 1: written before either; read as it is, so an upgrade keeps the state

TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
# A key's tensors in the file, named as on the wire (serde.PART_NAMES); max_exp_avg_sq once amsgrad ran.
KNOWN_TENSORS = tuple(PART_NAMES.values())
OPTIONAL_TENSORS = ("max_exp_avg_sq",)
REQUIRED_TENSORS = tuple(name for name in KNOWN_TENSORS if name not in OPTIONAL_TENSORS)

_PREFIX = "ckpt-"
_TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"ckpt-(\d+)")
_HASH_CHUNK = 1 << 20

log = logging.getLogger("optserve.server")


@dataclass
class KeyRecord:
    """One key as saved: its tensors are flat float32 CPU tensors of numel ``prod(shape)``."""
    name: str
    shape: tuple[int, ...]
    step: int
    hyper: dict | None  # AdamConfig fields (dataclasses.asdict), or None before the first step
    tensors: dict[str, torch.Tensor]  # "param", "exp_avg", "exp_avg_sq", optional "max_exp_avg_sq"
    info: dict = field(default_factory=dict)  # small JSON-serializable extras (tuples come back as lists)


@dataclass
class CheckpointData:
    shard_index: int
    num_shards: int
    policy: str
    keys: list[KeyRecord]
    extra: dict = field(default_factory=dict)  # JSON-serializable shard-level state
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # shard-level float32 tensors
    created: float = 0.0  # time.time() of the snapshot; the writer records time.time() if 0


class CheckpointError(Exception):
    """A checkpoint on disk is missing, truncated, corrupt or of another format."""


# -- writing -----------------------------------------------------------------------------------------


def write_checkpoint(directory: str | Path, data: CheckpointData, keep: int = 2) -> Path:
    """Write ``data`` atomically as ``directory/ckpt-<NNNNNNNN>`` and return its path.

    The number is one past the highest existing ``ckpt-*``. Afterwards all but the newest ``keep``
    complete-looking checkpoints are deleted (never the one just written). Stale ``.tmp-*``
    directories left by a crashed write are removed first. Raises ValueError for bad input (``keep``,
    shapes, dtypes, missing tensors, duplicate names, non-JSON extras) before touching the disk.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep: expected an int >= 1, got {keep!r}")
    tensors, manifest = _encode(data)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(directory)

    existing = _numbered(directory)
    number = existing[0][0] + 1 if existing else 1
    final = directory / f"{_PREFIX}{number:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=directory))
    try:
        tensor_path = tmp / TENSORS_FILE
        safetensors.torch.save_file(tensors, str(tensor_path))
        _fsync_file(tensor_path)
        manifest["files"] = {TENSORS_FILE: {"sha256": _sha256(tensor_path),
                                            "bytes": tensor_path.stat().st_size}}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        manifest_path = tmp / MANIFEST_FILE
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(manifest, f, separators=(",", ":"), allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        os.rename(tmp, final)  # the commit point: before it no ckpt-* exists, after it a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # best effort; a hard crash leaves it for the next write
        raise
    _fsync_dir(directory)
    _prune(directory, keep, just_written=final)
    return final


def _encode(data: CheckpointData) -> tuple[dict[str, torch.Tensor], dict]:
    """The safetensors dict and the manifest (without "files") for ``data``; validates everything."""
    if not (isinstance(data.num_shards, int) and data.num_shards >= 1):
        raise ValueError(f"num_shards: expected an int >= 1, got {data.num_shards!r}")
    if not (isinstance(data.shard_index, int) and 0 <= data.shard_index < data.num_shards):
        raise ValueError(f"shard_index: expected 0 <= shard_index < {data.num_shards}, "
                         f"got {data.shard_index!r}")
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple[torch.device, int]] = set()
    names: set[str] = set()
    keys = []
    for i, rec in enumerate(data.keys):
        if rec.name in names:
            raise ValueError(f"key {rec.name!r}: expected unique key names, got it twice")
        names.add(rec.name)
        shape = tuple(rec.shape)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"key {rec.name!r}: expected a shape of ints >= 0, got {rec.shape!r}")
        missing = [t for t in REQUIRED_TENSORS if t not in rec.tensors]
        unknown = sorted(set(rec.tensors) - set(KNOWN_TENSORS))
        if missing or unknown:
            raise ValueError(f"key {rec.name!r}: expected tensors {list(REQUIRED_TENSORS)} "
                             f"(+ optional {list(OPTIONAL_TENSORS)}), missing {missing}, unknown {unknown}")
        numel = math.prod(shape)
        saved = []
        for part in KNOWN_TENSORS:
            t = rec.tensors.get(part)
            if t is None:
                continue
            if t.dtype != torch.float32 or t.numel() != numel:
                raise ValueError(f"key {rec.name!r} {part}: expected float32 with numel {numel} "
                                 f"(shape {list(shape)}), got {t.dtype} with numel {t.numel()}")
            t = t.detach().to("cpu").reshape(-1).contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr != 0:
                # safetensors refuses tensors that share storage (views of one buffer): copy those.
                if (t.device, ptr) in seen_storage:
                    t = t.clone()
                else:
                    seen_storage.add((t.device, ptr))
            # Names are by index, not key name, so any key name works (and none collides).
            tensors[f"{i}/{part}"] = t
            saved.append(part)
        keys.append({"name": rec.name, "shape": list(shape), "step": int(rec.step),
                     "hyper": rec.hyper, "info": rec.info, "tensors": saved})
    for name, t in data.extra_tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"extra tensor {name!r}: expected float32, got {t.dtype}")
        tensors[f"extra/{name}"] = t.detach().to("cpu").reshape(-1).contiguous().clone()
    manifest = {
        "format_version": FORMAT_VERSION,
        "shard_index": data.shard_index,
        "num_shards": data.num_shards,
        "policy": data.policy,
        "created": data.created or time.time(),
        "extra": data.extra,
        "extra_tensors": sorted(data.extra_tensors),
        "keys": keys,
    }
    try:  # fail on non-JSON extras before anything is written
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint manifest: expected JSON-serializable hyper/info/extra, {e}") from e
    return tensors, manifest


def _remove_stale_tmp(directory: Path) -> None:
    for p in directory.glob(f"{_TMP_PREFIX}*"):
        if p.is_dir():
            log.info("removing %s: left by an interrupted checkpoint write", p)
            shutil.rmtree(p, ignore_errors=True)


def _prune(directory: Path, keep: int, just_written: Path) -> None:
    """Delete everything older than the newest ``keep`` complete-looking checkpoints.

    "Complete-looking" is the cheap check (manifest parses, tensor file has the recorded size), not
    the checksum, so pruning never rereads gigabytes; a damaged one among the newest stays until it
    falls past the kept ones, so it never costs a good checkpoint its place.
    """
    kept = 0
    for _, path in _numbered(directory):
        if kept >= keep and path != just_written:
            log.info("removing old checkpoint %s (keeping the newest %d)", path, keep)
            shutil.rmtree(path, ignore_errors=True)
        elif _looks_complete(path):
            kept += 1


def _looks_complete(path: Path) -> bool:
    try:
        manifest = _read_manifest(path)
        return (path / TENSORS_FILE).stat().st_size == manifest["files"][TENSORS_FILE]["bytes"]
    except (CheckpointError, OSError, KeyError, TypeError):
        return False


# -- finding and reading -------------------------------------------------------------------------------


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The ``ckpt-<number>`` directories in ``directory``, newest (highest number) first.

    Only the name is checked: a ckpt-* name appears by an atomic rename of a complete directory, so
    anything wrong with one afterwards is load_checkpoint's to find and report. ``.tmp-*`` are ignored.
    """
    return [path for _, path in _numbered(Path(directory))]


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    found.sort(key=lambda np: np[0], reverse=True)
    return found


def load_checkpoint(path: str | Path) -> CheckpointData:
    """Read and verify one checkpoint directory; raise CheckpointError naming what is wrong.

    Checks: the manifest is JSON of this format version; the tensor file has the recorded byte size
    and sha256; every key lists the required tensors and each exists, float32, numel == prod(shape);
    the file holds no tensor the manifest does not list.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        files = manifest["files"][TENSORS_FILE]
        expected_bytes, expected_sha = int(files["bytes"]), str(files["sha256"])
        shard_index, num_shards = int(manifest["shard_index"]), int(manifest["num_shards"])
        policy, created = str(manifest["policy"]), float(manifest["created"])
        extra, key_entries = manifest["extra"], manifest["keys"]
        extra_names = manifest["extra_tensors"] if manifest["format_version"] >= 2 else []
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / MANIFEST_FILE}: malformed manifest ({type(e).__name__}: {e})") from e
    if not isinstance(extra, dict) or not isinstance(key_entries, list) or not isinstance(extra_names, list):
        raise CheckpointError(f"{path / MANIFEST_FILE}: expected 'extra' an object, 'keys' and "
                              f"'extra_tensors' lists, got {type(extra).__name__}, "
                              f"{type(key_entries).__name__} and {type(extra_names).__name__}")

    tensor_path = path / TENSORS_FILE
    try:
        actual_bytes = tensor_path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{tensor_path}: cannot read ({e})") from e
    if actual_bytes != expected_bytes:  # cheap truncation check before hashing
        raise CheckpointError(f"{tensor_path}: expected {expected_bytes} bytes, got {actual_bytes} "
                              f"(truncated or overwritten)")
    actual_sha = _sha256(tensor_path)
    if actual_sha != expected_sha:
        raise CheckpointError(f"{tensor_path}: expected sha256 {expected_sha}, got {actual_sha} (corrupt)")
    try:
        loaded = safetensors.torch.load_file(str(tensor_path))
    except Exception as e:  # SafetensorError and friends; the checksum matched, so a writer bug
        raise CheckpointError(f"{tensor_path}: not a readable safetensors file ({e})") from e

    keys = []
    used: set[str] = set()
    names: set[str] = set()
    for i, entry in enumerate(key_entries):
        rec = _decode_key(path, i, entry, loaded)
        if rec.name in names:
            raise CheckpointError(f"{path / MANIFEST_FILE}: key {rec.name!r} appears twice")
        names.add(rec.name)
        used.update(f"{i}/{part}" for part in rec.tensors)
        keys.append(rec)
    extra_tensors = {}
    for name in extra_names:
        t = loaded.get(f"extra/{name}")
        if t is None or t.dtype != torch.float32:
            raise CheckpointError(f"{tensor_path}: expected float32 tensor 'extra/{name}', got "
                                  f"{'none' if t is None else t.dtype}")
        extra_tensors[name] = t
        used.add(f"extra/{name}")
    unlisted = sorted(set(loaded) - used)
    if unlisted:
        raise CheckpointError(f"{tensor_path}: expected only the manifest's tensors, "
                              f"got {len(unlisted)} more: {unlisted[:5]}")
    return CheckpointData(shard_index=shard_index, num_shards=num_shards, policy=policy, keys=keys,
                          extra=extra, extra_tensors=extra_tensors, created=created)


def _decode_key(path: Path, i: int, entry: object, loaded: dict[str, torch.Tensor]) -> KeyRecord:
    where = f"{path / MANIFEST_FILE}: keys[{i}]"
    try:
        name, shape, step = entry["name"], entry["shape"], entry["step"]
        hyper, info, parts = entry["hyper"], entry["info"], entry["tensors"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: malformed entry ({type(e).__name__}: {e})") from e
    if not (isinstance(name, str) and isinstance(step, int) and 0 <= step <= MAX_STEP
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and (hyper is None or isinstance(hyper, dict)) and isinstance(info, dict)
            and isinstance(parts, list)):
        raise CheckpointError(f"{where}: expected name str, step int 0..{MAX_STEP}, shape list of ints >= 0, "
                              f"hyper object|null, info object, tensors list; got {entry!r:.200}")
    missing = [p for p in REQUIRED_TENSORS if p not in parts]
    unknown = [p for p in parts if p not in KNOWN_TENSORS]
    if missing or unknown:
        raise CheckpointError(f"{where} ({name!r}): expected tensors {list(REQUIRED_TENSORS)} "
                              f"(+ optional {list(OPTIONAL_TENSORS)}), missing {missing}, unknown {unknown}")
    numel = math.prod(shape)
    tensors = {}
    for part in parts:
        t = loaded.get(f"{i}/{part}")
        if t is None:
            raise CheckpointError(f"{path / TENSORS_FILE}: key {name!r} {part}: expected tensor "
                                  f"'{i}/{part}', got none")
        if t.dtype != torch.float32 or t.numel() != numel:
            raise CheckpointError(f"{path / TENSORS_FILE}: key {name!r} {part}: expected float32 with "
                                  f"numel {numel} (shape {shape}), got {t.dtype} with numel {t.numel()}")
        tensors[part] = t.reshape(-1)
    return KeyRecord(name=name, shape=tuple(shape), step=step, hyper=hyper, tensors=tensors, info=info)


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_FILE
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{manifest_path}: missing") from e
    except (OSError, ValueError) as e:  # ValueError covers JSONDecodeError and bad UTF-8
        raise CheckpointError(f"{manifest_path}: not readable JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{manifest_path}: expected format_version {FORMAT_VERSION}, got {version!r}")
    digest = manifest.pop("manifest_sha256", None)
    if version >= 2 and digest != _manifest_digest(manifest):
        raise CheckpointError(f"{manifest_path}: its contents do not match its manifest_sha256 (corrupt or "
                              "edited)")
    return manifest


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (without the digest itself): the tensor file has its
    own checksum; this one catches a damaged manifest that still parses (a step, an option)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def restore_latest(directory: str | Path, apply: Callable[[CheckpointData], None] = lambda data: None
                   ) -> tuple[CheckpointData, Path] | None:
    """The newest checkpoint that loads and that `apply` accepts, with its path; None when there is none.

    `apply` refuses a checkpoint by raising CheckpointError, ValueError, KeyError or TypeError (contents
    that verify but do not make a valid shard); it must then have changed nothing. Each one that fails
    is logged (warning, naming the path and the reason) and the next older tried.
    """
    for path in list_checkpoints(directory):
        try:
            data = load_checkpoint(path)
            apply(data)
        except (CheckpointError, ValueError, KeyError, TypeError) as e:
            log.warning("skipping checkpoint %s: %s; trying the previous one", path, e)
            continue
        log.info("restored checkpoint %s (%d keys)", path, len(data.keys))
        return data, path
    return None


# -- file helpers ------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new file, a rename) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Replace the small JSON file `path` atomically (a temporary file, fsynced, renamed; then the
    directory fsynced): a crash leaves the old contents or the new, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
