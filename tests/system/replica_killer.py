"""`optserve serve` that SIGKILLs itself in the middle of a forward (tests/system/test_replication.py).

Run as `python replica_killer.py serve ARGS...` with OPTSERVE_TEST_DIE_AFTER_FORWARDS=K: the K-th
FORWARD this process sends as a primary leaves completely (the backup may apply it), and the process
kills itself before it reads the backup's answer, so the worker is never acknowledged: the shard's
crash at the worst point of the replication path. Only this process is changed; nothing in optserve
knows about it.
"""
from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    from optserve import cli  # first: it sets the OpenMP policy before torch loads
    from optserve.server import replication

    die_after = int(os.environ["OPTSERVE_TEST_DIE_AFTER_FORWARDS"])
    real = replication._Link.call
    sent = [0]

    def call(self, kind, meta, items=()):
        if kind == replication.FORWARD:
            sent[0] += 1
            if sent[0] == die_after:
                replication.send_frame(self.sock, kind, meta, items, replication.torch.float32)
                os.kill(os.getpid(), signal.SIGKILL)
        return real(self, kind, meta, items)

    replication._Link.call = call
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
