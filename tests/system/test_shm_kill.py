"""A worker killed while it writes a gradient into its shared-memory segment (optserve/shm.py): the
shard never applies the half-written gradient, drops the segment, and serves the next worker.

The worker is a separate process that negotiates a segment over a raw data connection, writes half
of a gradient into it, says so, and is SIGKILLed by the test before it could send the frame that
would announce the gradient (the frame is only ever sent after every byte is written)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from optserve.client.transport import ShardClient
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server.main import ServerConfig, Shard

NUMEL = 1 << 16

WORKER = textwrap.dedent("""
    import json, socket, sys, time
    import torch
    from optserve.frames import AUTH, SHM_CONFIRM, SHM_OPEN, read_header, read_meta, send_header
    from optserve.shm import Segment

    port, numel = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    send_header(sock, AUTH, b"", 0)
    read_meta(sock, read_header(sock)[1])
    send_header(sock, SHM_OPEN, json.dumps({"bytes": numel * 4}).encode(), 0)
    offer = json.loads(read_meta(sock, read_header(sock)[1]))
    segment = Segment.open(offer["path"], offer["bytes"])
    send_header(sock, SHM_CONFIRM, segment.nonce, 0)
    assert read_header(sock)[0] == 0
    grad = segment.region[:numel * 4].view(torch.float32)
    grad[: numel // 2].fill_(1e6)  # half of a (huge) gradient; the SHM_PUSH would follow the rest
    print("half", flush=True)
    time.sleep(600)
""")


def test_a_worker_killed_mid_write_never_gets_its_half_gradient_applied(tmp_path):
    shard = Shard(ServerConfig(shm_dir=str(tmp_path)))
    shard.start()
    client = ShardClient(shard.address, shm=False)
    try:
        value = torch.randn(NUMEL)
        client.register(pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[NUMEL], dtype=pb.FLOAT32)],
                                        num_shards=1, with_values=True), [Outgoing(0, pb.PARAM, value)])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(shard.data.port), str(NUMEL)],
                                  stdout=subprocess.PIPE, text=True, env=env)
        try:
            said = worker.stdout.readline()  # blocks until the worker has written half
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
        deadline = time.monotonic() + 60
        while os.listdir(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = os.listdir(tmp_path)

        out = torch.empty(NUMEL)
        head = client.pull(pb.PullRequest(keys=["w"]), lambda h: {(0, pb.PARAM): out})
        stats = client.stats()
        after = next_worker_steps(shard.address)
    finally:
        client.close()
        shard.stop()

    assert said.strip() == "half"
    assert left == []
    assert head.entries[0].version == 0 and torch.equal(out, value)
    assert stats.pushes == 0 and stats.rejected == 0
    assert after == 1  # the next worker's push, through its own segment, is applied


def next_worker_steps(address: str) -> int:
    """A push_pull of a small gradient by a new worker over shared memory; the key's version after."""
    worker = ShardClient(address)
    try:
        param = torch.empty(NUMEL)
        head = pb.PushHead(client_id="next", seq=1, wire_dtype=pb.FLOAT32,
                           hyper=[pb.HyperParams(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)],
                           entries=[pb.PushEntry(key="w", version_read=0, hyper=0)])
        worker.pull(pb.PullRequest(keys=["w"]), lambda h: {(0, pb.PARAM): param})  # learns the size
        reply = worker.push_pull(head, [Outgoing(0, pb.GRAD, torch.full((NUMEL,), 1e-3))], torch.float32,
                                 lambda h: {(0, pb.PARAM): param})
        assert any(conn.shm is not None for conn in worker.data._idle)
        return reply.entries[0].version
    finally:
        worker.close()
