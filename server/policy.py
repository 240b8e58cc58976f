"""When a shard applies a push: the training-mode policies (DESIGN.md "Policies").

A policy decides when and how a decoded, validated push reaches `Store.apply`; it never touches
tensors itself. Only `async` is built so far: `sync` and `ssp:S` are the training-modes issue.
"""
from __future__ import annotations

from typing import Sequence

from optserve.server.store import GradEntry, PushResult, Store


class AsyncPolicy:
    """Every push is applied at once: one Adam step per push, never waiting for other workers."""

    name = "async"

    def submit(self, store: Store, entries: Sequence[GradEntry]) -> PushResult:
        return store.apply(entries)


POLICIES = {"async": AsyncPolicy}


def parse_policy(spec: str):
    """The policy named by `spec` (as given to `optserve serve --policy`)."""
    try:
        return POLICIES[spec]()
    except KeyError:
        raise ValueError(f"unknown policy {spec!r}; choose one of {sorted(POLICIES)}") from None
