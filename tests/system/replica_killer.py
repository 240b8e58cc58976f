"""`optserve serve` that SIGKILLs itself at the worst points of the replication path
(tests/system/test_replication.py).

Run as `python replica_killer.py serve ARGS...` with
- OPTSERVE_TEST_DIE_AFTER_FORWARDS=K: the K-th FORWARD this process sends as a primary leaves
  completely (the backup may apply it), and the process kills itself before it reads the backup's
  answer, so the worker is never acknowledged;
- OPTSERVE_TEST_DIE_AFTER_PROVISIONAL=K: the K-th PROVISIONAL reply (a replicated push's parameters,
  sent while the backup applies it) leaves completely, and the process kills itself before it sends
  the commit: the worker holds the parameters of a push that was never acknowledged.
Only this process is changed; nothing in optserve knows about it.
"""
from __future__ import annotations

import os
import signal
import sys


def _die_after(k: int, kinds: tuple[int, ...], cls, name: str, kind_of) -> None:
    """Wrap cls.name so that its k-th call whose kind (kind_of(args)) is in `kinds` runs, then kills."""
    real = getattr(cls, name)
    count = [0]

    def wrapped(*args):
        result = real(*args)
        if kind_of(args) in kinds:
            count[0] += 1
            if count[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, name, wrapped)


def main() -> int:
    from optserve import cli  # first: it sets the OpenMP policy before torch loads
    from optserve.frames import FORWARD, PROVISIONAL
    from optserve.server import data, replication

    if "OPTSERVE_TEST_DIE_AFTER_FORWARDS" in os.environ:  # _Link.send(self, kind, meta, items)
        _die_after(int(os.environ["OPTSERVE_TEST_DIE_AFTER_FORWARDS"]), (FORWARD,), replication._Link, "send",
                   lambda args: args[1])
    if "OPTSERVE_TEST_DIE_AFTER_PROVISIONAL" in os.environ:  # _send_pull(self, conn, segment, reply, status)
        _die_after(int(os.environ["OPTSERVE_TEST_DIE_AFTER_PROVISIONAL"]), (PROVISIONAL,), data.DataServer,
                   "_send_pull", lambda args: args[4])
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
