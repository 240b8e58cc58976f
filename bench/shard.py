"""A shard process for the benchmarks that can skip the Adam step: `python -m bench.shard serve ...`.

It is `optserve serve` (same arguments, same code) with one bench-only change made in this process
alone: keys whose names start with `NO_ADAM_PREFIX` skip the Adam kernel (and the overflow guard's
checked step on copies). Everything else a push
does still happens (receive, NaN/Inf scan, version and dedupe bookkeeping, copy on write, reply),
so a push + pull on such a key moves the same bytes through the same code as a real step, minus the
update: section (b) times it to split "transport" from "Adam on the shard". Other keys are updated
as usual. Nothing in optserve knows about this; a shard started by `optserve serve` never skips.
"""
from __future__ import annotations

import sys

NO_ADAM_PREFIX = "bench.no-adam."


def _skip_adam_for_prefix() -> None:
    """Wrap the store's per-option-set Adam call so that entries of NO_ADAM_PREFIX keys are dropped
    from the group before the kernel runs (the whole call is skipped when none is left)."""
    from optserve.server import store
    real = getattr(store, "_adam_step", None)
    if real is None:  # the store was refactored: fail loudly rather than time a real step as "skipped"
        raise RuntimeError("bench.shard: optserve.server.store._adam_step is gone; update the bench's "
                           "Adam-skipping hook")

    def adam_step(group, cfg):
        kept = [e for e in group if not e.key.name.startswith(NO_ADAM_PREFIX)]
        if kept:
            real(kept, cfg)

    # A step the overflow guard cannot clear from its bounds (a key's first, after Register) is
    # computed on copies by `_checked_steps` instead: the same keys skip that one too, and, their
    # bounds staying unknown, every later step of theirs comes here and is skipped again.
    real_checked = getattr(store, "_checked_steps", None)
    if real_checked is None:
        raise RuntimeError("bench.shard: optserve.server.store._checked_steps is gone; update the bench's "
                           "Adam-skipping hook")

    def checked_steps(todo, copy, give):
        return real_checked([(e, cfg) for e, cfg in todo if not e.key.name.startswith(NO_ADAM_PREFIX)],
                            copy, give)

    store._adam_step = adam_step
    store._checked_steps = checked_steps


def main() -> int:
    from optserve import cli  # first: it sets OMP_WAIT_POLICY before torch loads, as `optserve` does
    _skip_adam_for_prefix()
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
