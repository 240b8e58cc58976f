"""The data channel (server/data.py, client/data.py): used when announced, refused like gRPC, robust
to broken frames, authenticated, and replaced by gRPC when it cannot be reached.

Numbers over both paths are compared bitwise in test_slices_and_wire.py.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time

import grpc
import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.transport import RetryPolicy, Security, ShardClient, ShardError
from optserve.frames import (AUTH, HEADER, MAGIC, PULL, PUSH, parse_error, read_header, read_meta,
                             send_header)
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server.main import ServerConfig, Shard

TOKEN = "data-channel-secret"


@contextlib.contextmanager
def running(**options):
    shard = Shard(ServerConfig(**options))
    shard.start()
    try:
        yield shard
    finally:
        shard.stop()


def train(address: str, steps: int = 3, **options) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Linear(5, 3)
    with RemoteAdam(model.named_parameters(), [address], lr=0.01, **options) as opt:
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 5)).square().sum().backward()
            opt.step()
    return model


def register(client: ShardClient, name: str = "w", numel: int = 8) -> torch.Tensor:
    value = torch.arange(numel, dtype=torch.float32)
    client.register(pb.RegisterHead(keys=[pb.KeySpec(name=name, shape=[numel], dtype=pb.FLOAT32)],
                                    num_shards=1, with_values=True), [Outgoing(0, pb.PARAM, value)])
    return value


def push_head(name: str = "w", seq: int = 1, version_read: int = 0) -> pb.PushHead:
    return pb.PushHead(client_id="test", seq=seq, wire_dtype=pb.FLOAT32, hyper=[pb.HyperParams(lr=0.1, beta1=0.9,
                       beta2=0.999, eps=1e-8)], entries=[pb.PushEntry(key=name, version_read=version_read, hyper=0)])


def pull_value(client: ShardClient, name: str = "w", numel: int = 8) -> tuple[torch.Tensor, int]:
    out = torch.empty(numel)
    head = client.pull(pb.PullRequest(keys=[name]), lambda h: {(0, pb.PARAM): out})
    return out, head.entries[0].version


def raw_connection(port: int, token: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    send_header(sock, AUTH, token, 0)
    status, meta_len, _ = read_header(sock)
    read_meta(sock, meta_len)
    assert status == 0
    return sock


def send_push_of_8(sock: socket.socket, declared: int, sent: int) -> None:
    """A PUSH frame whose one segment is key "w"'s 8 gradients, declaring `declared` bytes of data
    and sending `sent` zero bytes."""
    request = pb.PushRequest(head=push_head(), segments=[pb.Segment(entry=0, part=pb.GRAD, offset=0, count=8)])
    send_header(sock, PUSH, request.SerializeToString(), declared)
    sock.sendall(bytes(sent))


def reply(sock: socket.socket) -> tuple[grpc.StatusCode, str]:
    status, meta_len, data_len = read_header(sock)
    meta = read_meta(sock, meta_len)
    sock.recv(data_len, socket.MSG_WAITALL) if data_len else None
    code = next(c for c in grpc.StatusCode if c.value[0] == status)
    return code, (parse_error(meta)[0] if status else "")


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# -- used when announced -----------------------------------------------------------------------


def test_a_shard_announces_its_data_port_and_steps_travel_over_it():
    with running() as shard:
        client = ShardClient(shard.address)
        assert client.hello().data_port == shard.data.port != 0
        client.close()

        train(shard.address, steps=3)

        # the pull that follows registration (values another worker may have set), then one PushPull a step
        assert shard.core.counters.data_calls == 1 + 3
        assert shard.core.store.pushes == 3


def test_without_a_data_port_everything_travels_over_grpc():
    with running(data_port=-1) as shard:
        client = ShardClient(shard.address)
        assert client.hello().data_port == 0
        client.close()

        train(shard.address, steps=3)

        assert shard.data is None
        assert shard.core.counters.data_calls == 0
        assert shard.core.store.pushes == 3


def test_a_client_can_keep_to_grpc_with_data_channel_false():
    with running() as shard:
        train(shard.address, steps=2, data_channel=False)

        assert shard.core.counters.data_calls == 0
        assert shard.core.store.pushes == 2


def test_an_unreachable_data_port_falls_back_to_grpc_with_a_warning(caplog):
    with running() as shard:
        shard.data.stop()  # still announced, no longer listening: connections are refused

        with caplog.at_level(logging.WARNING, logger="optserve.client"):
            model = train(shard.address, steps=2)

        assert shard.core.store.pushes == 2
        assert shard.core.counters.data_calls == 0
        assert any("unreachable" in r.getMessage() and "gRPC" in r.getMessage() for r in caplog.records)
        assert torch.isfinite(model.weight).all()


# -- refusals: the same codes as gRPC, nothing changed, the connection kept ---------------------


def test_refusals_over_the_data_channel_change_nothing_and_keep_the_connection():
    with running() as shard:
        client = ShardClient(shard.address)
        before = register(client)

        with pytest.raises(ShardError) as unknown:
            client.push(push_head("nope"), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
        with pytest.raises(ShardError) as nan:
            client.push(push_head(), [Outgoing(0, pb.GRAD, torch.tensor([1.0] * 7 + [float("nan")]))],
                        torch.float32)
        with pytest.raises(ShardError) as short:
            client.push(push_head(), [Outgoing(0, pb.GRAD, torch.ones(7))], torch.float32)
        value, version = pull_value(client)
        connections = len(shard.data._conns)
        client.close()

    assert (unknown.value.code, nan.value.code, short.value.code) == (
        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT)
    assert "NaN" in nan.value.details
    assert "stream ended after 7 of 8" in short.value.details
    assert version == 0 and torch.equal(value, before)
    assert shard.core.counters.data_calls == 4
    assert connections == 1  # every refusal left the connection usable


def test_a_push_over_the_data_channel_is_applied_once_per_seq():
    with running() as shard:
        client = ShardClient(shard.address)
        register(client)
        grads = [Outgoing(0, pb.GRAD, torch.ones(8))]

        first = client.push(push_head(seq=1), grads, torch.float32)
        again = client.push(push_head(seq=1), grads, torch.float32)
        _, version = pull_value(client)
        client.close()

    assert (first.duplicate, again.duplicate) == (False, True)
    assert list(first.versions) == list(again.versions) == [1]
    assert version == 1


# -- broken frames ----------------------------------------------------------------------------


def test_a_frame_declaring_more_data_than_its_segments_is_refused_and_drained():
    with running() as shard:
        client = ShardClient(shard.address)
        register(client)
        sock = raw_connection(shard.data.port)
        send_push_of_8(sock, declared=8 * 4 + 100, sent=8 * 4 + 100)

        code, message = reply(sock)
        send_header(sock, PULL, pb.PullRequest(keys=["w"]).SerializeToString(), 0)
        after, _ = reply(sock)
        _, version = pull_value(client)
        sock.close()
        client.close()

    assert code == grpc.StatusCode.INVALID_ARGUMENT and "132 bytes" in message
    assert after == grpc.StatusCode.OK  # the 132 bytes were read and dropped: framing intact
    assert version == 0


def test_a_frame_cut_one_byte_short_applies_nothing():
    with running() as shard:
        client = ShardClient(shard.address)
        register(client)
        sock = raw_connection(shard.data.port)
        send_push_of_8(sock, declared=32, sent=31)
        sock.shutdown(socket.SHUT_WR)

        assert closed_by_peer(sock)
        value, version = pull_value(client)
        sock.close()
        client.close()

    assert version == 0 and shard.core.store.pushes == 0


@pytest.mark.parametrize("opening", [
    HEADER.pack(b"GET ", 0, 0, 0),  # not our protocol at all
    HEADER.pack(MAGIC, PUSH, 0, 0),  # a request before AUTH
    HEADER.pack(MAGIC, AUTH, 0xFFFFFFFF, 0),  # an absurd meta length
])
def test_a_connection_that_breaks_the_framing_is_closed_and_the_shard_serves_on(opening):
    with running() as shard:
        sock = socket.create_connection(("127.0.0.1", shard.data.port), timeout=10)
        sock.sendall(opening)

        assert closed_by_peer(sock)
        sock.close()
        train(shard.address, steps=1)
        assert shard.core.store.pushes == 1


def test_a_pull_frame_carrying_data_is_refused():
    with running() as shard:
        sock = raw_connection(shard.data.port)
        send_header(sock, PULL, pb.PullRequest(keys=["w"]).SerializeToString(), 4)
        sock.sendall(bytes(4))

        code, message = reply(sock)
        sock.close()

    assert code == grpc.StatusCode.INVALID_ARGUMENT and "carries no data" in message


# -- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("given", [b"", b"wrong"])
def test_the_data_channel_needs_the_shards_token(tmp_path, given):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running(token_file=str(token_file)) as shard:
        sock = socket.create_connection(("127.0.0.1", shard.data.port), timeout=10)
        send_header(sock, AUTH, given, 0)

        code, message = reply(sock)
        refused_then_closed = closed_by_peer(sock)
        sock.close()
        raw_connection(shard.data.port, TOKEN.encode()).close()  # the right one is let in
        train(shard.address, steps=1, token=TOKEN)
        calls = shard.core.counters.data_calls

    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert message == ("missing bearer token" if not given else "wrong bearer token")
    assert refused_then_closed
    assert calls == 2  # the pull after registration and one PushPull


def test_a_shard_client_without_the_token_is_unauthenticated_on_the_data_channel(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running(token_file=str(token_file)) as shard:
        good = ShardClient(shard.address, security=Security(token=TOKEN))
        register(good)
        # The data port is known (as if learnt before the token changed): only the data channel
        # can refuse this client.
        bad = ShardClient(shard.address, security=Security(token="stolen?"))
        bad.data._port = shard.data.port

        with pytest.raises(ShardError) as err:
            bad.push(push_head(), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
        _, version = pull_value(good)
        good.close()
        bad.close()

    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert version == 0


def test_a_port_that_does_not_speak_the_protocol_falls_back_to_grpc(caplog):
    imposter = socket.create_server(("127.0.0.1", 0))  # accepts, then says something else entirely

    def answer():
        conn, _ = imposter.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(HEADER.size))
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with running() as shard:
        client = ShardClient(shard.address)
        register(client)
        client.data._hello = lambda: pb.HelloReply(data_port=imposter.getsockname()[1])  # announced

        with caplog.at_level(logging.WARNING, logger="optserve.client"):
            client.push(push_head(), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
        _, version = pull_value(client)
        client.close()
    imposter.close()

    assert version == 1
    assert shard.core.counters.data_calls == 0
    assert any("not an optserve data frame" in r.getMessage() for r in caplog.records)


def test_a_connection_that_never_authenticates_is_dropped(monkeypatch):
    from optserve.server import data
    monkeypatch.setattr(data, "AUTH_SECONDS", 0.2)
    with running() as shard:
        sock = socket.create_connection(("127.0.0.1", shard.data.port), timeout=10)

        assert closed_by_peer(sock)  # after AUTH_SECONDS of silence
        sock.close()


# -- limits on peers, and stopping -------------------------------------------------------------


def test_a_request_head_over_max_message_bytes_is_resource_exhausted_and_drained():
    with running(max_message_bytes=256 << 10, chunk_bytes=128 << 10) as shard:
        sock = raw_connection(shard.data.port)
        send_header(sock, PULL, bytes(300 << 10), 0)

        code, message = reply(sock)
        send_header(sock, PULL, pb.PullRequest(keys=[]).SerializeToString(), 0)
        after, _ = reply(sock)
        sock.close()

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_message_bytes" in message
    assert after == grpc.StatusCode.OK


def test_authentication_has_a_deadline_that_trickling_bytes_does_not_extend(monkeypatch):
    from optserve.server import data
    monkeypatch.setattr(data, "AUTH_SECONDS", 0.5)
    with running() as shard:
        sock = socket.create_connection(("127.0.0.1", shard.data.port), timeout=10)
        header = HEADER.pack(MAGIC, AUTH, 100, 0)
        closed = False
        for i in range(40):  # one byte every 0.05 s for 2 s: each read is quick, the whole too slow
            try:
                sock.sendall(header[i:i + 1] if i < len(header) else b"x")
            except OSError:
                closed = True  # a per-read timeout (0.5 s) would never have fired while bytes flowed
                break
            time.sleep(0.05)
        sock.close()

    assert closed


def authenticates(sock: socket.socket, token: bytes = b"") -> bool:
    """Send AUTH on a connection the shard accepted; True when the shard answers OK."""
    try:
        send_header(sock, AUTH, token, 0)
        return read_header(sock)[0] == 0
    except OSError:
        return False


def wait_pending(shard, n: int) -> None:
    deadline = time.monotonic() + 30
    while len(shard.data._pending) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(shard.data._pending) == n


@pytest.mark.parametrize("per_address", [None, 64])  # the defaults; one address may fill MAX_PENDING
def test_idle_unauthenticated_connections_cannot_lock_out_a_worker_with_the_token(tmp_path, monkeypatch,
                                                                                  per_address):
    from optserve.server import data
    if per_address:
        monkeypatch.setattr(data, "MAX_PENDING_PER_ADDRESS", per_address)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running(token_file=str(token_file)) as shard:
        idle = [socket.create_connection(("127.0.0.1", shard.data.port), timeout=30) for _ in range(64)]
        if per_address:
            wait_pending(shard, 64)  # as many as the shard lets wait for their AUTH
        # (with the defaults, the worker is accepted after the 64 all the same: the backlog is FIFO)
        worker = socket.create_connection(("127.0.0.1", shard.data.port), timeout=30)

        assert authenticates(worker, TOKEN.encode())  # used to be reset at once, for up to 10 s
        assert closed_by_peer(idle[0])  # the oldest idle one made room
        for sock in idle + [worker]:
            sock.close()


def test_unauthenticated_connections_are_capped_per_address_oldest_first(monkeypatch):
    from optserve.server import data
    monkeypatch.setattr(data, "MAX_PENDING_PER_ADDRESS", 2)
    with running() as shard:
        other = socket.create_connection(("127.0.0.1", shard.data.port), timeout=30)
        wait_pending(shard, 1)
        crowd = []
        for i in range(3):  # from another address: the third pushes out that address's first
            sock = socket.create_connection(("127.0.0.1", shard.data.port), timeout=30,
                                            source_address=("127.0.0.2", 0))
            crowd.append(sock)
            wait_pending(shard, 2 + min(i, 1))

        assert closed_by_peer(crowd[0])
        assert authenticates(crowd[1]) and authenticates(crowd[2])
        assert authenticates(other)  # another address's connection was never touched
        for sock in crowd + [other]:
            sock.close()


def test_under_pressure_new_connections_get_the_shorter_auth_deadline(monkeypatch):
    from optserve.server import data
    monkeypatch.setattr(data, "MAX_PENDING", 4)
    monkeypatch.setattr(data, "PRESSED_AUTH_SECONDS", 0.2)
    monkeypatch.setattr(data, "AUTH_SECONDS", 60.0)  # so only the shorter deadline can close it in 30 s
    with running() as shard:
        calm = [socket.create_connection(("127.0.0.1", shard.data.port), timeout=30) for _ in range(2)]
        wait_pending(shard, 2)
        pressed = socket.create_connection(("127.0.0.1", shard.data.port), timeout=30)

        assert closed_by_peer(pressed)  # after 0.2 s; AUTH_SECONDS would take 60 s, the socket's timeout 30 s
        assert all(authenticates(sock) for sock in calm)
        for sock in calm + [pressed]:
            sock.close()


def test_the_accept_loop_survives_an_accept_error():
    from optserve.server.data import DataServer

    class FailsOnce:
        def __init__(self, sock):
            self.sock, self.failed = sock, False

        def accept(self):
            if not self.failed:
                self.failed = True
                raise OSError(24, "Too many open files")
            return self.sock.accept()

        def __getattr__(self, name):
            return getattr(self.sock, name)

    with running(data_port=-1) as shard:
        server = DataServer(shard.core, "127.0.0.1", 0)
        server.bind()
        server._sock = FailsOnce(server._sock)
        server.start()
        try:
            raw_connection(server.port).close()  # served after the failed accept
        finally:
            server.stop()

    assert server._sock.failed


@pytest.mark.parametrize("broken", [ssl.SSLEOFError(8, "EOF occurred in violation of protocol (_ssl.c:2427)"),
                                    BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")])
def test_a_connection_broken_after_the_handshake_is_retried_not_called_a_tls_failure(broken):
    from optserve.client.data import DataChannel
    from optserve.client.transport import RETRYABLE, _TLS_FAILURE
    channel = DataChannel("127.0.0.1:1", hello=lambda: None, timeout=5, token=None, ssl_context=None)
    channel._port = 1234

    err = channel._failure(broken)

    assert err.code() in RETRYABLE
    assert not any(word in err.details().lower() for word in _TLS_FAILURE)
    assert channel._port is None  # asked again: a restarted shard may listen elsewhere


@pytest.mark.parametrize("data_channel", [True, False])
def test_pulls_racing_pushes_always_see_one_whole_version(data_channel, run_threads):
    """A pusher applies 60 known gradients in order while a puller pulls as fast as it can: every
    pulled value must be, bit for bit, the parameter after exactly the version it is labelled with
    (copy on write must never let a push change a tensor that is being sent)."""
    from optserve.hyper import AdamConfig
    from optserve.server.adam import adam_fast
    from optserve.serde import hyper_to_proto
    numel, pushes, cfg = 1 << 20, 60, AdamConfig(lr=0.01)
    grads = [torch.randn(numel, generator=torch.Generator().manual_seed(t)) for t in range(pushes)]
    start = torch.randn(numel, generator=torch.Generator().manual_seed(99))
    trajectory = [start.clone()]
    p, m, v = start.clone(), torch.zeros(numel), torch.zeros(numel)
    for t, g in enumerate(grads, 1):
        adam_fast([p], [g], [m], [v], None, [t], cfg)
        trajectory.append(p.clone())
    seen = []

    with running() as shard:
        setup = ShardClient(shard.address, data_channel=data_channel)
        setup.register(pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[numel], dtype=pb.FLOAT32)],
                                       num_shards=1, with_values=True), [Outgoing(0, pb.PARAM, start)])
        setup.close()
        done = threading.Event()

        def pusher():
            client = ShardClient(shard.address, data_channel=data_channel)
            for t, g in enumerate(grads):
                head = pb.PushHead(client_id="pusher", seq=t + 1, wire_dtype=pb.FLOAT32, hyper=[hyper_to_proto(cfg)],
                                   entries=[pb.PushEntry(key="w", version_read=t)])
                client.push(head, [Outgoing(0, pb.GRAD, g)], torch.float32)
            client.close()
            done.set()

        def puller():
            client = ShardClient(shard.address, data_channel=data_channel)
            while not done.is_set():
                out = torch.empty(numel)
                head = client.pull(pb.PullRequest(keys=["w"]), lambda h: {(0, pb.PARAM): out})
                seen.append((head.entries[0].version, out))
            client.close()

        run_threads(lambda role: role(), [(pusher,), (puller,)])

    assert len({version for version, _ in seen}) > 5  # the pulls did race the pushes
    for version, value in seen:
        assert torch.equal(value, trajectory[version]), f"pulled version {version} is not whole"


def test_request_slots_are_lent_while_a_request_waits_on_others():
    from optserve.server.requests import RequestSlots
    slots = RequestSlots(1)
    order = []
    inside = threading.Event()

    def waiter():
        with slots.held():
            with slots.lent():  # as while waiting for a sync round
                inside.set()
                time.sleep(0.2)
                order.append("waiter woke")
            order.append("waiter holds again")

    t = threading.Thread(target=waiter)
    t.start()
    inside.wait()
    with slots.held():  # the only slot is free while the waiter waits
        order.append("other served")
    t.join()
    with slots.lent():  # a thread that holds none (a gRPC handler) passes through
        order.append("no slot")

    assert order == ["other served", "waiter woke", "waiter holds again", "no slot"]


def test_sync_rounds_over_the_data_channel_need_no_more_slots_than_one(run_threads):
    """Three sync workers, one request slot: each push waits for the round holding no slot."""
    from optserve.server.requests import RequestSlots
    with running(policy="sync", workers=3, wait_timeout=20) as shard:
        shard.core.slots = RequestSlots(1)

        def worker(i):
            torch.manual_seed(i)
            model = nn.Linear(5, 3)
            with RemoteAdam(model.named_parameters(), [shard.address], lr=0.01, client_id=f"w{i}") as opt:
                for _ in range(4):
                    opt.zero_grad()
                    model(torch.randn(4, 5)).square().sum().backward()
                    opt.step()

        run_threads(worker, [(i,) for i in range(3)])
        versions = {shard.core.store.get(n).version for n in shard.core.store.names()}

    assert versions == {4}  # four rounds of three gradients each, none timed out


@pytest.mark.parametrize("stalls_in", ["head", "payload", "reply"])
def test_a_peer_that_stalls_mid_request_keeps_no_slot_from_the_others(stalls_in):
    """One request slot; a peer stops mid-request (a stopped or paused worker): in its request's
    head, in its payload, or without reading a reply larger than the socket buffers. Another
    worker's push and pull are served all the same."""
    from optserve.server.requests import RequestSlots
    with running() as shard:
        shard.core.slots = RequestSlots(1)
        client = ShardClient(shard.address, timeout=5, retry=RetryPolicy(budget=0))
        register(client)
        big = 1 << 22  # 16 MiB of float32: far more than the loopback buffers hold
        register(client, "big", big)
        stalled = raw_connection(shard.data.port)
        if stalls_in == "head":
            stalled.sendall(HEADER.pack(MAGIC, PULL, 100, 0))  # announces 100 bytes of head; none come
        elif stalls_in == "payload":
            send_push_of_8(stalled, declared=32, sent=16)
        else:
            request = pb.PullRequest(keys=["big"]).SerializeToString()
            send_header(stalled, PULL, request, 0)
        time.sleep(0.3)  # the shard is now blocked on the stalled peer

        client.push(push_head(seq=7), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
        value, version = pull_value(client)
        client.close()
        stalled.close()

    assert version == 1 and not torch.equal(value, torch.arange(8, dtype=torch.float32))


def test_a_peer_that_trickles_its_payload_keeps_no_slot_from_the_others():
    """One request slot; a peer sends its push's payload a few bytes every 10 ms (a slow link: it
    never stalls for long). Once it has kept the shard waiting 50 ms in all it waits without the
    slot, so another worker's push and pull are served while it trickles."""
    from optserve.server.requests import RequestSlots
    with running() as shard:
        shard.core.slots = RequestSlots(1)
        client = ShardClient(shard.address, timeout=5, retry=RetryPolicy(budget=0))
        register(client)
        big = 1 << 16
        register(client, "big", big)
        slow = raw_connection(shard.data.port)
        request = pb.PushRequest(head=push_head("big"), segments=[pb.Segment(entry=0, part=pb.GRAD, count=big)])
        send_header(slow, PUSH, request.SerializeToString(), big * 4)
        done = threading.Event()

        def trickle():
            while not done.wait(0.01):
                slow.sendall(bytes(16))

        t = threading.Thread(target=trickle)
        t.start()
        time.sleep(0.3)  # the shard is now reading the trickle
        try:
            client.push(push_head(seq=7), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
            value, version = pull_value(client)
        finally:
            done.set()
            t.join()
            client.close()
            slow.close()

    assert version == 1 and not torch.equal(value, torch.arange(8, dtype=torch.float32))


def test_a_worker_follows_a_restarted_shard_to_its_new_data_port(tmp_path):
    """The shard restarts (same gRPC port, another data port) while the worker holds the old port
    and no open connection: the refused connection makes it ask Hello again, not give up on the
    data channel."""
    first = Shard(ServerConfig(checkpoint_dir=str(tmp_path)))
    first.start()
    client = ShardClient(first.address, retry=RetryPolicy(budget=20))
    register(client)
    client.push(push_head(seq=1), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
    for conn in client.data._idle:  # as after the shard refused a call while shutting down
        conn.close()
    client.data._idle.clear()
    old_port = client.data._port
    first.stop(grace=1, final_checkpoint=True)
    second = Shard(ServerConfig(checkpoint_dir=str(tmp_path), port=first.port))
    second.start()
    try:
        reply = client.push(push_head(seq=2, version_read=1), [Outgoing(0, pb.GRAD, torch.ones(8))], torch.float32)
        new_port = client.data._port
    finally:
        client.close()
        second.stop()

    assert list(reply.versions) == [2]
    assert new_port == second.data.port != old_port
    assert second.core.counters.data_calls == 1  # over the data channel, not a fallback to gRPC


def test_the_client_timeout_bounds_the_whole_call_not_each_read():
    """A peer that trickles its reply a byte every 50 ms never lets one read wait 0.5 s, yet the
    call must end at its 0.5 s deadline, as a gRPC call would."""
    fake = socket.create_server(("127.0.0.1", 0))
    head = pb.PullHead(entries=[pb.KeyInfo(key="w", shape=[8], version=1)])
    meta = pb.PullReply(head=head, segments=[pb.Segment(entry=0, part=pb.PARAM, offset=0, count=8)]).SerializeToString()

    def trickle():
        conn, _ = fake.accept()
        with conn:
            kind, meta_len, _ = read_header(conn)
            read_meta(conn, meta_len)
            send_header(conn, 0, b"", 0)  # AUTH accepted
            kind, meta_len, _ = read_header(conn)
            read_meta(conn, meta_len)
            send_header(conn, 0, meta, 32)
            try:
                for _ in range(32):
                    time.sleep(0.05)
                    conn.sendall(b"\0")
            except OSError:
                pass  # the client gave up

    threading.Thread(target=trickle, daemon=True).start()
    client = ShardClient("127.0.0.1:1", timeout=0.5, retry=RetryPolicy(budget=0))
    client.data._hello = lambda: pb.HelloReply(data_port=fake.getsockname()[1])

    with pytest.raises(ShardError) as err:
        client.pull(pb.PullRequest(keys=["w"]), lambda h: {(0, pb.PARAM): torch.empty(8)})

    client.close()
    fake.close()
    # With a timeout per read the trickle (a byte every 50 ms) would have been read whole.
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_bytes_in_counts_bytes_received_not_bytes_declared():
    with running() as shard:
        client = ShardClient(shard.address)
        sock = raw_connection(shard.data.port)
        meta = pb.PullRequest(keys=["w"]).SerializeToString()
        send_header(sock, PULL, meta, 2**64 - 1)  # declares more than any shard could ever receive
        sock.sendall(bytes(10))
        sock.close()
        client.hello()  # a gRPC round trip: the shard has had time to read what was sent
        deadline = time.monotonic() + 30
        while shard.core.counters.bytes_in < HEADER.size + len(meta) + 10 and time.monotonic() < deadline:
            time.sleep(0.01)  # the connection's thread counts once it sees the close

        stats = client.stats()  # used to fail for the life of the process (bytes_in over uint64)
        client.close()

    assert stats.bytes_in < 1 << 20


@pytest.mark.parametrize("over", ["data", "grpc"])
def test_a_push_of_many_empty_segments_is_refused_as_resource_exhausted(over):
    with running() as shard:
        client = ShardClient(shard.address)
        register(client)
        segments = [pb.Segment(entry=0, part=pb.GRAD, offset=0, count=0)] * 200_000
        request = pb.PushRequest(head=push_head(), segments=segments)
        if over == "data":
            sock = raw_connection(shard.data.port)
            send_header(sock, PUSH, request.SerializeToString(), 0)
            code, message = reply(sock)
            send_header(sock, PULL, pb.PullRequest(keys=["w"]).SerializeToString(), 0)
            after, _ = reply(sock)
            sock.close()
        else:
            from optserve.serde import encode
            stub = client.channel.stream_unary("/optserve.v1.OptServe/Push")
            with pytest.raises(grpc.RpcError) as err:
                stub(iter([encode(request.SerializeToString(), [b""])]), timeout=60)
            code, message, after = err.value.code(), err.value.details(), grpc.StatusCode.OK
        _, version = pull_value(client)
        client.close()

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "segments" in message
    assert after == grpc.StatusCode.OK and version == 0


def test_a_puller_that_never_reads_its_reply_loses_its_lease_after_the_send_timeout(monkeypatch):
    from optserve.server import data
    monkeypatch.setattr(data, "SEND_SECONDS", 0.5)
    monkeypatch.setattr(data, "SEND_BYTES_PER_SECOND", 1 << 40)  # no more time for the bytes it took
    numel = 4 << 20  # 16 MiB: far more than the kernel buffers between the two ends hold
    with running() as shard:
        client = ShardClient(shard.address, data_channel=False)
        register(client, numel=numel)
        sock = raw_connection(shard.data.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        send_header(sock, PULL, pb.PullRequest(keys=["w"]).SerializeToString(), 0)  # and never read
        store = shard.core.store
        deadline = time.monotonic() + 60
        while not len(store._leases) and time.monotonic() < deadline:
            time.sleep(0.01)  # the reply has started
        leased = len(store._leases)
        while len(store._leases) and time.monotonic() < deadline:
            time.sleep(0.05)

        assert leased and not len(store._leases)  # used to stay leased for as long as the peer kept still
        client.push(push_head(), [Outgoing(0, pb.GRAD, torch.ones(numel))], torch.float32)  # the shard serves on
        sock.close()
        client.close()


def test_a_grpc_puller_that_never_reads_its_reply_loses_its_lease_after_the_idle_timeout():
    numel = 4 << 20  # 16 MiB in 4 MiB messages: more than gRPC's flow-control windows let through unread
    with running(idle_timeout=0.5) as shard:
        client = ShardClient(shard.address, data_channel=False)
        register(client, numel=numel)
        stub = client.channel.unary_stream("/optserve.v1.OptServe/Pull")
        replies = stub(pb.PullRequest(keys=["w"]).SerializeToString())  # no deadline; never read
        store = shard.core.store
        deadline = time.monotonic() + 60
        while not len(store._leases) and time.monotonic() < deadline:
            time.sleep(0.01)
        leased = len(store._leases)
        while len(store._leases) and time.monotonic() < deadline:
            time.sleep(0.05)

        assert leased and not len(store._leases)
        replies.cancel()
        client.close()


def test_headers_declaring_large_heads_allocate_nothing_until_their_bytes_arrive():
    import tracemalloc
    with running() as shard:  # --max-message-bytes 16 MiB: each head declared is within it
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            socks = [raw_connection(shard.data.port) for _ in range(8)]
            for sock in socks:
                sock.sendall(HEADER.pack(MAGIC, PUSH, 16 << 20, 0))  # and not one byte of the head
            deadline = time.monotonic() + 30
            while shard.data._in_flight < 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # each is now reading its head (before the fix: into 16 MiB it allocated)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        for sock in socks:
            sock.close()

    assert grown < 8 << 20  # 8 connections: 64 KiB each at most, not 128 MiB
