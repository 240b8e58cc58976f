"""Shared fixtures: in-process shards bound to port 0 (tests never pick ports)."""
from __future__ import annotations

import contextlib
import os
import threading

import pytest
import torch

from optserve.server.main import run_server


@pytest.fixture
def shard():
    """One in-process shard (1 of 1); yields its address."""
    with run_server() as address:
        yield address


@pytest.fixture
def two_shards():
    """Two in-process shards (0 and 1 of 2); yields their addresses in index order."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(run_server(shard_index=i, num_shards=2)) for i in range(2)]


@pytest.fixture
def run_threads():
    """run_threads(target, [args, ...]): one thread per args tuple, all joined; the first exception
    raised in any of them is raised here, so a failing worker fails the test."""

    def run(target, arg_tuples):
        errors = []

        def guarded(*args):
            try:
                target(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=tuple(a)) for a in arg_tuples]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    return run


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: where torch has none they are skipped, with the reason shown;
    with OPTSERVE_REQUIRE_CUDA=1 (bench/device_check.sh) a missing GPU fails the run instead."""
    if torch.cuda.is_available():
        return
    if os.environ.get("OPTSERVE_REQUIRE_CUDA") == "1" and any("gpu" in item.keywords for item in items):
        raise pytest.UsageError("OPTSERVE_REQUIRE_CUDA=1 but torch.cuda.is_available() is false: "
                                "the gpu tests cannot run here")
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
