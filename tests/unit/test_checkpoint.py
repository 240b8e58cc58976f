"""Tests for optserve.server.checkpoint: exact round trip, numbering and pruning, atomicity, and falling
back to the previous checkpoint when the newest is truncated, corrupt or lacks its manifest."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import safetensors
import torch

from optserve.hyper import MAX_STEP, AdamConfig
from optserve.server.checkpoint import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    CheckpointData,
    CheckpointError,
    KeyRecord,
    list_checkpoints,
    load_checkpoint,
    restore_latest,
    write_checkpoint,
)


def _record(name, shape, step=0, hyper=None, amsgrad=False, info=None, seed=0):
    numel = 1
    for d in shape:
        numel *= d
    g = torch.Generator().manual_seed(seed)
    parts = ["param", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    tensors = {p: torch.randn(numel, generator=g) for p in parts}
    if numel >= 3:  # values whose bits a lossy path would change
        tensors["param"][:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    return KeyRecord(name=name, shape=tuple(shape), step=step, hyper=hyper, tensors=tensors,
                     info=info or {})


def _data(keys=None, extra=None, policy="async"):
    keys = keys if keys is not None else [_record("w", (4, 3), step=5)]
    return CheckpointData(shard_index=1, num_shards=3, policy=policy, keys=keys, extra=extra or {})


def _bits(t):
    return t.view(torch.int32)


def _assert_same(loaded: CheckpointData, written: CheckpointData):
    assert (loaded.shard_index, loaded.num_shards, loaded.policy, loaded.extra) == (
        written.shard_index, written.num_shards, written.policy, written.extra)
    assert [k.name for k in loaded.keys] == [k.name for k in written.keys]
    for got, want in zip(loaded.keys, written.keys):
        assert (got.shape, got.step, got.hyper, got.info) == (want.shape, want.step, want.hyper, want.info)
        assert sorted(got.tensors) == sorted(want.tensors)
        for part, t in want.tensors.items():
            assert got.tensors[part].dtype == torch.float32
            assert torch.equal(_bits(got.tensors[part]), _bits(t)), (want.name, part)


def test_round_trip_of_odd_keys_is_bitwise_exact(tmp_path):
    # Arrange
    hyper = dataclasses.asdict(AdamConfig(lr=3e-4, eps=1e-8, amsgrad=True))
    keys = [
        _record("layer.0/weight[0:128]", (2, 5), step=7, hyper=hyper, amsgrad=True,
                info={"param": "layer.0/weight", "offset": 0}, seed=1),
        _record("a:b/c[d]", (), step=1, hyper=None, seed=2),
        _record("empty", (0,), step=0, seed=3),
        _record("bias", (6,), step=123456789012, hyper=hyper, seed=4),
    ]
    data = _data(keys, extra={"dedupe": {"client-1": 42}})

    # Act
    path = write_checkpoint(tmp_path, data)
    loaded = load_checkpoint(path)

    # Assert
    _assert_same(loaded, data)
    assert loaded.created > 0


def test_checkpoint_with_no_keys_round_trips(tmp_path):
    data = _data(keys=[])

    loaded = load_checkpoint(write_checkpoint(tmp_path, data))

    assert loaded.keys == [] and loaded.shard_index == 1


def test_files_are_json_and_safetensors_not_pickle(tmp_path):
    # Arrange
    path = write_checkpoint(tmp_path, _data([_record("w", (3,), amsgrad=True)]))

    # Act
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    with safetensors.safe_open(str(path / TENSORS_FILE), framework="pt") as f:
        names = sorted(f.keys())

    # Assert
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["keys"][0]["tensors"] == ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    assert set(manifest["files"][TENSORS_FILE]) == {"sha256", "bytes"}
    assert names == ["0/exp_avg", "0/exp_avg_sq", "0/max_exp_avg_sq", "0/param"]
    raw = (path / TENSORS_FILE).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 length, then a JSON header
    assert json.loads(raw[8:8 + header_len])["0/param"]["dtype"] == "F32"


def test_numbers_increment_and_only_the_newest_keep_survive(tmp_path):
    # Act
    paths = [write_checkpoint(tmp_path, _data([_record("w", (2,), step=s)]), keep=2) for s in range(4)]

    # Assert
    assert [p.name for p in paths] == [f"ckpt-{n:08d}" for n in (1, 2, 3, 4)]
    assert list_checkpoints(tmp_path) == [paths[3], paths[2]]
    assert load_checkpoint(paths[3]).keys[0].step == 3


def test_keep_below_one_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        write_checkpoint(tmp_path, _data(), keep=0)
    assert list_checkpoints(tmp_path) == []


def test_wrong_tensor_numel_is_rejected_before_writing(tmp_path):
    rec = _record("w", (2, 2))
    rec.tensors["exp_avg"] = torch.zeros(3)

    with pytest.raises(ValueError, match=r"'w' exp_avg: expected float32 with numel 4.*numel 3"):
        write_checkpoint(tmp_path, _data([rec]))
    assert list_checkpoints(tmp_path) == []


def test_tensors_sharing_storage_are_saved(tmp_path):
    # Arrange: all three parts are views of one buffer, as a pool-backed snapshot might be
    buf = torch.arange(6, dtype=torch.float32)
    rec = KeyRecord("w", (2,), 1, None, {"param": buf[0:2], "exp_avg": buf[2:4], "exp_avg_sq": buf[4:6]})

    # Act
    loaded = load_checkpoint(write_checkpoint(tmp_path, _data([rec])))

    # Assert
    assert loaded.keys[0].tensors["exp_avg_sq"].tolist() == [4.0, 5.0]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "corrupt_manifest", "delete_manifest",
                                    "delete_tensors"])
def test_damaged_newest_falls_back_to_previous_with_warning(tmp_path, caplog, damage):
    # Arrange
    older = write_checkpoint(tmp_path, _data([_record("w", (64,), step=1)]))
    newest = write_checkpoint(tmp_path, _data([_record("w", (64,), step=2)]))
    tensors, manifest = newest / TENSORS_FILE, newest / MANIFEST_FILE
    if damage == "truncate":
        os.truncate(tensors, tensors.stat().st_size // 2)
    elif damage == "flip_byte":
        raw = bytearray(tensors.read_bytes())
        raw[-10] ^= 0x01
        tensors.write_bytes(bytes(raw))
    elif damage == "corrupt_manifest":
        manifest.write_text(manifest.read_text()[:40])
    elif damage == "delete_manifest":
        manifest.unlink()
    else:
        tensors.unlink()

    # Act
    with caplog.at_level(logging.WARNING, logger="optserve.server"):
        restored = restore_latest(tmp_path)

    # Assert
    assert restored is not None
    data, path = restored
    assert path == older and data.keys[0].step == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "optserve.server"]
    assert len(warnings) == 1 and str(newest) in warnings[0].getMessage()


def test_flipped_byte_is_reported_as_checksum_mismatch(tmp_path):
    path = write_checkpoint(tmp_path, _data())
    raw = bytearray((path / TENSORS_FILE).read_bytes())
    raw[-1] ^= 0xFF
    (path / TENSORS_FILE).write_bytes(bytes(raw))

    with pytest.raises(CheckpointError, match=r"tensors\.safetensors: expected sha256 \w+, got \w+"):
        load_checkpoint(path)


def test_truncated_file_is_reported_with_expected_and_actual_size(tmp_path):
    path = write_checkpoint(tmp_path, _data())
    size = (path / TENSORS_FILE).stat().st_size
    os.truncate(path / TENSORS_FILE, 100)

    with pytest.raises(CheckpointError, match=rf"expected {size} bytes, got 100"):
        load_checkpoint(path)


def test_all_damaged_restores_nothing(tmp_path, caplog):
    path = write_checkpoint(tmp_path, _data())
    (path / MANIFEST_FILE).unlink()

    with caplog.at_level(logging.WARNING, logger="optserve.server"):
        assert restore_latest(tmp_path) is None
    assert str(path) in caplog.text


def test_format_version_mismatch_raises(tmp_path):
    # Arrange
    path = write_checkpoint(tmp_path, _data())
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))

    # Act / Assert
    with pytest.raises(CheckpointError, match=rf"expected format_version {FORMAT_VERSION}, got "
                                              rf"{FORMAT_VERSION + 1}"):
        load_checkpoint(path)


@pytest.mark.parametrize("step", [-1, MAX_STEP + 1, 2**64 - 1])
def test_a_step_out_of_range_is_refused_on_load(tmp_path, step):
    path = write_checkpoint(tmp_path, _data([_record("w", (2,), step=step)]))

    with pytest.raises(CheckpointError, match="step"):
        load_checkpoint(path)


def test_manifest_tensor_shape_mismatch_raises(tmp_path):
    """A manifest whose digest matches (written by a buggy writer) is still checked against the tensors."""
    from optserve.server.checkpoint import _manifest_digest
    path = write_checkpoint(tmp_path, _data([_record("w", (4,))]))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest.pop("manifest_sha256")
    manifest["keys"][0]["shape"] = [5]
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match=r"'w' param: expected float32 with numel 5.*numel 4"):
        load_checkpoint(path)


@pytest.mark.parametrize("edit", ["step", "hyper", "format"])
def test_a_manifest_damaged_yet_parseable_is_caught_by_its_digest(tmp_path, edit):
    path = write_checkpoint(tmp_path, _data([_record("w", (4,))]))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if edit == "step":
        manifest["keys"][0]["step"] += 5
    elif edit == "hyper":
        manifest["keys"][0]["hyper"] = {"lr": 0.5}
    else:  # the same contents, pretty-printed: still the same manifest
        (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        assert load_checkpoint(path).keys[0].step == 0
        return
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))

    with pytest.raises(CheckpointError, match="do not match its manifest_sha256"):
        load_checkpoint(path)


def test_shard_level_tensors_round_trip(tmp_path):
    data = dataclasses.replace(_data(), extra={"rounds": [1]}, extra_tensors={"round/0": torch.arange(3.0)})
    loaded = load_checkpoint(write_checkpoint(tmp_path, data))
    assert loaded.extra == {"rounds": [1]} and torch.equal(loaded.extra_tensors["round/0"], torch.arange(3.0))


def test_missing_directory_restores_none(tmp_path):
    assert restore_latest(tmp_path / "nope") is None
    assert list_checkpoints(tmp_path / "nope") == []


def test_write_creates_missing_directory(tmp_path):
    path = write_checkpoint(tmp_path / "a" / "b", _data())

    assert list_checkpoints(tmp_path / "a" / "b") == [path]


def test_leftover_tmp_is_ignored_by_restore_and_removed_by_next_write(tmp_path, caplog):
    # Arrange: a crash mid-write left a temp dir that even holds a plausible manifest
    good = write_checkpoint(tmp_path, _data([_record("w", (2,), step=1)]))
    stale = tmp_path / ".tmp-crashed"
    stale.mkdir()
    (stale / MANIFEST_FILE).write_text("{")

    # Act
    with caplog.at_level(logging.WARNING, logger="optserve.server"):
        restored = restore_latest(tmp_path)
    newer = write_checkpoint(tmp_path, _data([_record("w", (2,), step=2)]))

    # Assert
    assert restored is not None and restored[1] == good
    assert not caplog.records
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name, newer.name]


def test_crash_before_rename_leaves_no_checkpoint(tmp_path, monkeypatch):
    # Arrange
    first = write_checkpoint(tmp_path, _data([_record("w", (2,), step=1)]))

    def crash(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "rename", crash)

    # Act
    with pytest.raises(OSError, match="simulated crash"):
        write_checkpoint(tmp_path, _data([_record("w", (2,), step=2)]))

    # Assert
    assert list_checkpoints(tmp_path) == [first]
    monkeypatch.undo()
    data, path = restore_latest(tmp_path)
    assert path == first and data.keys[0].step == 1


def test_damaged_checkpoint_does_not_cost_a_good_one_its_place_when_pruning(tmp_path):
    # Arrange: ckpt 1 good, ckpt 2 loses its manifest
    first = write_checkpoint(tmp_path, _data([_record("w", (2,), step=1)]))
    second = write_checkpoint(tmp_path, _data([_record("w", (2,), step=2)]))
    (second / MANIFEST_FILE).unlink()

    # Act
    third = write_checkpoint(tmp_path, _data([_record("w", (2,), step=3)]), keep=2)

    # Assert: two complete ones kept (3 and 1); the damaged one between them is left in place
    assert list_checkpoints(tmp_path) == [third, second, first]


def test_a_format_1_checkpoint_of_the_previous_release_still_loads(tmp_path):
    """Format 1 had no manifest digest and no shard-level tensors: an upgrade must not lose it."""
    path = write_checkpoint(tmp_path, _data([_record("w", (4,), step=9)], extra={"dedupe": {"clients": {}}}))
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    for field in ("manifest_sha256", "extra_tensors"):
        del manifest[field]
    manifest["format_version"] = 1
    (path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))

    loaded = load_checkpoint(path)
    assert loaded.keys[0].step == 9 and loaded.extra_tensors == {} and loaded.extra == {"dedupe": {"clients": {}}}
