"""Shared fixtures: in-process shards bound to port 0 (tests never pick ports)."""
from __future__ import annotations

import contextlib

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA: where torch has none they are skipped, with the reason shown."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
