"""A shard that comes back at a new address under the same name (a rescheduled pod, a Swarm task) is
followed: the worker and both shard processes run in a network namespace of their own, whose hosts
file (`ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts) maps the shard's name first to
127.0.0.2, then to 127.0.0.3. Needs root and iproute2, as CI has."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

WORKER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from optserve import RemoteAdam
    server, steps = sys.argv[1], int(sys.argv[2])
    model = nn.Linear(4, 2)
    # 25 s to find the moved shard: with gRPC's defaults (re-resolve at most every 30 s) it did not
    with RemoteAdam(model.named_parameters(), [server], retry_budget=25, connect_timeout=60) as opt:
        for i in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            print("step", i, flush=True)
""")


@pytest.fixture
def netns(tmp_path):
    name = f"optserve-mv-{os.getpid()}"
    hosts = Path("/etc/netns") / name / "hosts"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        hosts.parent.mkdir(parents=True, exist_ok=True)
        yield name, hosts
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
        hosts.unlink(missing_ok=True)
        hosts.parent.rmdir()


def _in(ns: str, *argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def _shard(ns: str, host: str, ckpt: Path) -> subprocess.Popen:
    proc = _in(ns, sys.executable, "-m", "optserve", "serve", "--host", host, "--port", "50051",
               "--checkpoint-dir", str(ckpt))
    line = proc.stdout.readline()
    assert line.startswith("listening on "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_a_worker_follows_a_shard_restarted_at_a_new_address_under_its_name(netns, tmp_path):
    ns, hosts = netns
    steps = 40
    hosts.write_text("127.0.0.2 shard0.test\n")
    first = _shard(ns, "127.0.0.2", tmp_path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    worker = _in(ns, sys.executable, str(script), "shard0.test:50051", str(steps))
    second = None
    try:
        for _ in range(5):  # a few steps against the first address
            assert worker.stdout.readline().startswith("step"), worker.stderr.read()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0  # its final checkpoint holds every acknowledged push
        with hosts.open("r+") as f:  # in place: the file mounted over /etc/hosts is this inode
            f.write("127.0.0.3 shard0.test\n")
        second = _shard(ns, "127.0.0.3", tmp_path)
        out, err = worker.communicate(timeout=180)
        assert worker.returncode == 0, err[-3000:]
        status = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "optserve", "status", "--json",
                                 "shard0.test:50051"], capture_output=True, text=True, timeout=60)
        keys = {k["key"]: k["version"] for k in json.loads(status.stdout)[0]["keys"]}
        assert keys == {"weight": steps, "bias": steps}  # every step applied once, across the move
    finally:
        for proc in (worker, first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
