"""examples/torchrun_train.py as test_torchrun runs it under torchrun, plus what the test observes.

    torchrun_worker.py --pushes DIR [--kill-rank R --kill-after N] -- EXAMPLE ARGS...

Every step() that carries gradients is logged to DIR/rank<R>-attempt<A>.log (A: torchrun's
TORCHELASTIC_RESTART_COUNT) as "push" before it and "ack" once it returned, i.e. every shard applied
the push (or answered a retry of it as already applied); torch's global optimizer step hooks do it, so
the example runs unchanged. With --kill-rank, that rank SIGKILLs itself right after its N-th
acknowledged push in the first attempt only (between two steps: nothing of its own is in flight).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import torchrun_train as example  # noqa: E402


def pushes(opt) -> bool:
    return any(p.grad is not None for g in opt.param_groups for p in g["params"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pushes", required=True, help="directory for the push logs")
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-after", type=int, default=0)
    args, rest = parser.parse_known_args()
    rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    log = open(Path(args.pushes) / f"rank{rank}-attempt{attempt}.log", "w", buffering=1)  # a line at a time
    acked = 0

    def before(opt, *_):
        if pushes(opt):
            log.write("push\n")

    def after(opt, *_):
        nonlocal acked
        if pushes(opt):
            log.write("ack\n")
            acked += 1
            if rank == args.kill_rank and attempt == 0 and acked == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no goodbye to the shards

    register_optimizer_step_pre_hook(before)
    register_optimizer_step_post_hook(after)
    example.main([a for a in rest if a != "--"])


if __name__ == "__main__":
    main()
