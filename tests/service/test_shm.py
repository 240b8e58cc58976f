"""Same-host shared memory on the data channel (optserve/shm.py, server/shm.py, client/data.py):
bitwise the numbers of the socket path, the same refusals, a clean fallback, no name left behind.

Each shard here creates its segments in the test's own directory (`shm_dir`), so a test can see
every name a shard creates and that none is left. The worker killed mid-write is in
tests/system/test_shm_kill.py.
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import grpc
import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.transport import ShardClient, ShardError
from optserve.frames import (SHM_CONFIRM, SHM_OPEN, SHM_PULL, SHM_PUSH, SHM_PUSH_PULL, read_header, read_meta,
                             send_header)
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server.main import ServerConfig, Shard
from optserve.errors import RequestError, StatusCode
from optserve.server import data as server_data
from optserve.server.shm import ShmLink
from optserve.shm import SIZE, Segment, ShmUnavailable, fill
from tests.service.test_data_channel import pull_value, push_head, raw_connection, register, reply


@contextlib.contextmanager
def running(tmp_path, **options):
    shard = Shard(ServerConfig(shm_dir=str(tmp_path), **options))
    shard.start()
    try:
        yield shard
    finally:
        shard.stop()


def model_and_batches(steps: int):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))
    batches = [torch.randn(5, 9) for _ in range(steps)]
    return model, batches


def trained(address: str, steps: int = 4, **options) -> tuple[nn.Module, dict]:
    model, batches = model_and_batches(steps)
    with RemoteAdam(model.named_parameters(), [address], lr=0.05, weight_decay=0.01, amsgrad=True,
                    slice_elements=64, **options) as opt:
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        state = {name: {k: v.clone() for k, v in s.items()} for name, s in opt.state_dict()["state"].items()}
    return model, state


def segments_used(client: ShardClient) -> list[Segment]:
    return [conn.shm for conn in client.data._idle if conn.shm is not None]


# -- used on one host ------------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [torch.float32, torch.bfloat16])
def test_steps_through_shared_memory_equal_the_socket_path_bitwise(tmp_path, monkeypatch, wire):
    filled = []
    monkeypatch.setattr(server_data, "fill", lambda *a: filled.append(a) or fill(*a))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with running(tmp_path / "a") as a, running(tmp_path / "b") as b:
        over_shm, shm_state = trained(a.address, wire_dtype=wire, pull_dtype=wire)
        over_socket, socket_state = trained(b.address, wire_dtype=wire, pull_dtype=wire, shm=False)
        moved_in = a.core.counters.bytes_in

    for (name, p), q in zip(over_shm.named_parameters(), over_socket.parameters()):
        assert torch.equal(p, q), name
    for key, parts in shm_state.items():
        for part, value in parts.items():
            assert torch.equal(value, socket_state[key][part]), (key, part)
    assert moved_in > 0 and len(filled) == 4  # every step's gradients came through the segment


def test_a_worker_on_the_shards_host_moves_bytes_through_a_segment_whose_name_is_gone(tmp_path):
    with running(tmp_path) as shard:
        client = ShardClient(shard.address)
        value = register(client, numel=64)
        pull_value(client, numel=64)  # the first pull learns the size, over the socket
        head = client.push_pull(push_head(), [Outgoing(0, pb.GRAD, torch.full((64,), 0.5))], torch.float32,
                                lambda h: {(0, pb.PARAM): value})

        (segment,) = segments_used(client)
        assert head.entries[0].version == 1
        assert segment.capacity >= 64 * 4
        assert os.listdir(tmp_path) == []  # both sides unlinked it once the nonce was echoed
        client.close()


def test_a_segment_grows_to_the_largest_call_within_the_shards_bound(tmp_path):
    with running(tmp_path, shm_max_bytes=1024) as shard:
        client = ShardClient(shard.address)
        register(client, "small", 16)
        register(client, "large", 512)
        pull_value(client, "small", 16)
        pull_value(client, "small", 16)  # 64 bytes: a segment of 64
        small = segments_used(client)[0].capacity
        value, _ = pull_value(client, "large", 512)  # 2 KiB: over the bound, on the socket
        again, _ = pull_value(client, "large", 512)

        assert small == 64
        assert segments_used(client)[0].capacity == 1024  # grown to the bound, no further
        assert torch.equal(value, torch.arange(512, dtype=torch.float32)) and torch.equal(again, value)
        client.close()


# -- refused as on the socket ----------------------------------------------------------------------


def test_refusals_through_shared_memory_are_the_data_channels_and_change_nothing(tmp_path):
    with running(tmp_path) as shard:
        client = ShardClient(shard.address)
        value = register(client)
        pull_value(client)
        grad = [Outgoing(0, pb.GRAD, torch.ones(8))]
        cases = [(push_head("nope"), grad, grpc.StatusCode.NOT_FOUND),
                 (push_head(version_read=5), grad, grpc.StatusCode.FAILED_PRECONDITION),
                 (push_head(), [Outgoing(0, pb.GRAD, torch.full((8,), float("nan")))],
                  grpc.StatusCode.INVALID_ARGUMENT)]
        for head, grads, code in cases:
            with pytest.raises(ShardError) as err:
                client.push(head, grads, torch.float32)
            assert err.value.code == code
        after, version = pull_value(client)

        assert segments_used(client)  # the refusals went through the segment
        assert version == 0 and torch.equal(after, value)
        client.close()


def shm_connection(shard) -> tuple:
    """A raw data connection with a confirmed segment of 4 KiB: (socket, segment)."""
    sock = raw_connection(shard.data.port)
    send_header(sock, SHM_OPEN, json.dumps({"bytes": 4096}).encode(), 0)
    status, meta_len, _ = read_header(sock)
    offer = json.loads(read_meta(sock, meta_len))
    assert status == 0
    segment = Segment.open(offer["path"], offer["bytes"])
    send_header(sock, SHM_CONFIRM, segment.nonce, 0)
    assert reply(sock)[0] == grpc.StatusCode.OK
    return sock, segment


def shm_push(sock, declared: int, segments, kind: int = SHM_PUSH, data_len: int = 0) -> None:
    request = pb.PushRequest(head=push_head(), segments=segments)
    send_header(sock, kind, SIZE.pack(declared) + request.SerializeToString(), data_len)
    sock.sendall(bytes(data_len))


EIGHT = [pb.Segment(entry=0, part=pb.GRAD, offset=0, count=8)]


@pytest.mark.parametrize("declared, segments, data_len, code", [
    (2**64 - 1, EIGHT, 0, grpc.StatusCode.INVALID_ARGUMENT),  # past the segment's end
    (4096 + 1, EIGHT, 0, grpc.StatusCode.INVALID_ARGUMENT),
    (16, EIGHT, 0, grpc.StatusCode.INVALID_ARGUMENT),  # fewer bytes than the segments describe
    (32, [pb.Segment(entry=0, part=pb.GRAD, offset=4, count=8)], 0, grpc.StatusCode.INVALID_ARGUMENT),
    (32, [pb.Segment(entry=3, part=pb.GRAD, offset=0, count=8)], 0, grpc.StatusCode.INVALID_ARGUMENT),
    (32, EIGHT, 32, grpc.StatusCode.INVALID_ARGUMENT),  # bytes on the socket too: read and dropped
])
def test_sizes_and_segments_a_worker_declares_are_bound_checked(tmp_path, declared, segments, data_len, code):
    with running(tmp_path) as shard:
        client = ShardClient(shard.address, shm=False)
        value = register(client)
        sock, segment = shm_connection(shard)
        segment.region[:32].view(torch.float32).fill_(1.0)

        shm_push(sock, declared, segments, data_len=data_len)
        got = reply(sock)[0]
        shm_push(sock, 32, EIGHT)  # the connection still serves
        then = reply(sock)[0]
        after, version = pull_value(client)
        sock.close()
        client.close()

    assert got == code
    assert then == grpc.StatusCode.OK and version == 1 and not torch.equal(after, value)


def test_a_shared_memory_request_without_a_confirmed_segment_is_refused(tmp_path):
    with running(tmp_path) as shard:
        client = ShardClient(shard.address, shm=False)
        register(client)
        sock = raw_connection(shard.data.port)
        shm_push(sock, 32, EIGHT, kind=SHM_PUSH_PULL)
        unconfirmed = reply(sock)[0]
        send_header(sock, SHM_OPEN, json.dumps({"bytes": 64}).encode(), 0)
        status, meta_len, _ = read_header(sock)
        read_meta(sock, meta_len)
        shm_push(sock, 32, EIGHT)  # opened, not confirmed
        opened = reply(sock)[0]
        send_header(sock, SHM_CONFIRM, b"x" * 32, 0)
        wrong_nonce = reply(sock)[0]
        left = os.listdir(tmp_path)
        send_header(sock, SHM_PULL, SIZE.pack(8) + pb.PullRequest(keys=["w"]).SerializeToString(), 0)
        pull_with_bytes = reply(sock)[0]
        _, version = pull_value(client)
        sock.close()
        client.close()

    assert (unconfirmed, status, opened) == (grpc.StatusCode.FAILED_PRECONDITION, 0,
                                             grpc.StatusCode.FAILED_PRECONDITION)
    assert wrong_nonce == grpc.StatusCode.PERMISSION_DENIED and left == []
    assert pull_with_bytes == grpc.StatusCode.FAILED_PRECONDITION  # its segment was dropped
    assert version == 0


def test_a_segment_asked_for_past_the_bound_is_granted_the_bound(tmp_path):
    with running(tmp_path, shm_max_bytes=4096) as shard:
        sock = raw_connection(shard.data.port)
        send_header(sock, SHM_OPEN, json.dumps({"bytes": 1 << 40}).encode(), 0)
        status, meta_len, _ = read_header(sock)
        offer = json.loads(read_meta(sock, meta_len))
        size = os.stat(offer["path"]).st_size
        send_header(sock, SHM_OPEN, b"not json", 0)
        bad = reply(sock)[0]
        left = os.listdir(tmp_path)  # a new SHM_OPEN drops the connection's previous segment
        sock.close()

    assert status == 0 and offer["bytes"] == 4096 and size == 4096 + 4096
    assert bad == grpc.StatusCode.INVALID_ARGUMENT and left == []


# -- falls back ------------------------------------------------------------------------------------


def test_a_shard_with_shared_memory_off_serves_over_the_socket(tmp_path):
    with running(tmp_path, shm_max_bytes=0) as shard:
        model, _ = trained(shard.address)
        pulls = shard.core.counters.data_calls

    reference = trained_over_grpc(tmp_path)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert pulls == 1 + 4 + 1  # the pull after registration, a PushPull a step, state_dict's pull


def trained_over_grpc(tmp_path):
    os.makedirs(tmp_path / "grpc", exist_ok=True)
    with running(tmp_path / "grpc") as shard:
        return trained(shard.address, data_channel=False)[0]


@pytest.mark.parametrize("errno_", [2, 13])  # ENOENT: another host; EACCES: another user
def test_a_worker_that_cannot_open_the_segment_falls_back_to_the_socket(tmp_path, monkeypatch, errno_):
    def cannot(path, capacity):
        raise ShmUnavailable(errno_, os.strerror(errno_))

    monkeypatch.setattr(Segment, "open", cannot)
    with running(tmp_path) as shard:
        model, _ = trained(shard.address)
        left = os.listdir(tmp_path)

    reference = trained_over_grpc(tmp_path)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert left == []  # the shard unlinked the segment the worker could not open


def test_shm_false_never_asks_for_a_segment(tmp_path, monkeypatch):
    created = []
    monkeypatch.setattr(Segment, "create", lambda *a: created.append(a))
    with running(tmp_path) as shard:
        trained(shard.address, shm=False)

    assert created == []


def test_a_full_tmpfs_is_refused_at_creation_and_the_worker_uses_the_socket(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with running(tmp_path) as shard:
        model, _ = trained(shard.address)
        left = os.listdir(tmp_path)

    reference = trained_over_grpc(tmp_path)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert left == []


def test_a_connection_that_ends_drops_its_segment(tmp_path):
    with running(tmp_path) as shard:
        sock = raw_connection(shard.data.port)
        send_header(sock, SHM_OPEN, json.dumps({"bytes": 64}).encode(), 0)
        read_meta(sock, read_header(sock)[1])
        named = os.listdir(tmp_path)
        sock.close()
        client = ShardClient(shard.address)
        client.hello()
        deadline = time.monotonic() + 30
        while os.listdir(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)  # the connection's thread drops it when it sees the close
        left = os.listdir(tmp_path)
        client.close()

    assert len(named) == 1 and left == []


def open_segment(sock, nbytes: int) -> tuple[grpc.StatusCode, dict]:
    send_header(sock, SHM_OPEN, json.dumps({"bytes": nbytes}).encode(), 0)
    status, meta_len, _ = read_header(sock)
    meta = read_meta(sock, meta_len)
    code = next(c for c in grpc.StatusCode if c.value[0] == status)
    return code, json.loads(meta) if status == 0 else {}


def test_all_segments_of_a_shard_together_stay_within_shm_max_bytes(tmp_path):
    with running(tmp_path, shm_max_bytes=8192) as shard:
        first, second = raw_connection(shard.data.port), raw_connection(shard.data.port)
        code_a, offer_a = open_segment(first, 6144)
        code_b, offer_b = open_segment(second, 6144)  # gets what is left
        code_c, _ = open_segment(second, 4096)  # its own 2048 are given back first, then taken again
        code_d, _ = open_segment(raw_connection(shard.data.port), 64)
        client = ShardClient(shard.address)
        register(client, numel=64)
        pull_value(client, numel=64)
        value, version = pull_value(client, numel=64)  # no segment free: over the socket
        used = segments_used(client)
        first.close()
        client.close()

    assert (code_a, offer_a["bytes"], offer_a["max_bytes"]) == (grpc.StatusCode.OK, 6144, 8192)
    assert (code_b, offer_b["bytes"], offer_b["max_bytes"]) == (grpc.StatusCode.OK, 2048, 2048)
    assert code_c == grpc.StatusCode.OK and code_d == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert used == [] and version == 0 and torch.equal(value, torch.arange(64, dtype=torch.float32))


def test_a_shard_that_does_not_know_the_shared_memory_frames_is_used_over_the_socket(tmp_path, monkeypatch):
    def older(self, meta):  # what a shard before the SHM_* kinds answers: an unknown kind
        raise RequestError(StatusCode.INVALID_ARGUMENT, "unknown request kind 16")

    monkeypatch.setattr(ShmLink, "open", older)
    with running(tmp_path) as shard:
        model, _ = trained(shard.address)
        refused = shard.core.counters.rejected

    reference = trained_over_grpc(tmp_path)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert refused == 1  # asked once, then never again on this DataChannel


def test_a_shard_going_away_during_the_handshake_does_not_turn_shared_memory_off(tmp_path, monkeypatch):
    original, calls = ShmLink.open, []

    def stopping_once(self, meta):
        calls.append(meta)
        if len(calls) == 1:
            raise RequestError(StatusCode.UNAVAILABLE, "the shard is stopping")
        return original(self, meta)

    monkeypatch.setattr(ShmLink, "open", stopping_once)
    filled = []
    monkeypatch.setattr(server_data, "fill", lambda *a: filled.append(a) or fill(*a))
    with running(tmp_path) as shard:
        trained(shard.address)

    assert len(calls) == 2 and len(filled) == 4  # retried, then every step through the segment
