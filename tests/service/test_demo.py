"""The demo end to end: in-process shards, worker threads, the local Adam baseline, the plot."""
from __future__ import annotations

import argparse
import sys

import pytest

from optserve import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_tiny_run_writes_png_and_counts_one_push_per_worker_step(tmp_path):
    # Arrange
    workers, steps = 2, 3

    # Act
    summary = demo.run_demo(workers=workers, shards=2, steps=steps, batch_size=16, out_dir=tmp_path / "out",
                            progress=False)

    # Assert
    png = summary["png"]
    assert png == tmp_path / "out" / "demo_loss.png"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert 0.0 <= summary["accuracy_optserve"] <= 1.0
    assert 0.0 <= summary["accuracy_local"] <= 1.0
    assert summary["seconds_optserve"] > 0 and summary["seconds_local"] > 0
    assert summary["pushes"] == workers * steps
    assert summary["steps_local"] == workers * steps
    assert summary["shard_pushes"] == [workers * steps] * 2  # every step pushes to both shards


def test_default_budget_reaches_target_accuracy(tmp_path):
    # Arrange: the defaults `optserve demo` runs with (about 10 s on a 2-core machine)
    args = _args("--out", str(tmp_path), "--no-progress")

    # Act
    summary = demo.run_demo(workers=args.workers, shards=args.shards, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, out_dir=args.out,
                            progress=False)

    # Assert
    assert summary["accuracy_optserve"] >= demo.ACCURACY_TARGET
    assert summary["accuracy_local"] >= demo.ACCURACY_TARGET
    assert summary["pushes"] == args.workers * args.steps


def test_main_returns_1_and_says_so_below_target_accuracy(tmp_path, capsys):
    # Arrange: two steps cannot train the network to 90%
    args = _args("--workers", "1", "--shards", "1", "--steps", "2", "--out", str(tmp_path), "--no-progress")

    # Act
    code = demo.main(args)

    # Assert
    out = capsys.readouterr().out
    assert code == 1
    assert "below the target" in out
    assert str(tmp_path / "demo_loss.png") in out


def test_bad_budget_is_rejected_with_the_option_and_value(tmp_path):
    # Arrange / Act / Assert
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        demo.run_demo(workers=0, out_dir=tmp_path, progress=False)


def test_missing_demo_packages_name_the_install_command(tmp_path, monkeypatch):
    # Arrange: None in sys.modules makes `import tqdm.auto` raise ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)

    # Act / Assert
    with pytest.raises(ImportError, match=r"pip install 'optserve\[demo\]'"):
        demo.run_demo(workers=1, steps=1, out_dir=tmp_path, progress=False)
