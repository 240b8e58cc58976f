"""Hostile requests (issue 13): extreme values, oversized strings, starvation, probing.

Each test is one thing an attacker tried. Requests are built by hand and sent as raw bytes straight
through grpc; after each refusal the shard must still answer Stats, and a refused request must leave
its state (a Pull of every part of every key, plus Stats' versions and counters) as it was. No answer
may be UNKNOWN: every value a request supplies is bounded at the edge.
"""
from __future__ import annotations

import pathlib
import threading
import time
from typing import Sequence

import grpc
import pytest
import torch

from optserve.hyper import MAX_STEP
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import decode, encode
from optserve.server.main import run_server
from optserve.server.requests import MAX_CLIENT_ID_LENGTH, MAX_NAME_LENGTH
from optserve.server.store import KEY_OVERHEAD_BYTES, Store, StoreLimits, worst_case_bytes

_METHOD = "/optserve.v1.OptServe/"
_KINDS = {"Register": "stream_unary", "Push": "stream_unary", "SetState": "stream_unary",
          "PushPull": "stream_stream", "Pull": "unary_stream", "Stats": "unary_unary"}
TIMEOUT = 30.0  # a hang guard only
HYPER = pb.HyperParams(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decouple=True, optimized_update=True)
W0 = torch.arange(6, dtype=torch.float32) / 10
G = torch.linspace(-1.0, 1.0, 6)


def call(channel: grpc.Channel, method: str, request):
    kind = _KINDS[method]
    stub = getattr(channel, kind)(_METHOD + method)
    reply = stub(iter(request) if kind.startswith("stream") else request, timeout=TIMEOUT)
    return list(reply) if kind.endswith("_stream") else reply


def floats(*tensors: torch.Tensor) -> bytes:
    return b"".join(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)


def message(message_type, head, segments: Sequence[pb.Segment] = (), data: bytes = b"") -> bytes:
    meta = message_type(segments=segments)
    meta.head.CopyFrom(head)
    return encode(meta.SerializeToString(), [data])


def register(name: str = "w", value: torch.Tensor = W0) -> list[bytes]:
    head = pb.RegisterHead(keys=[pb.KeySpec(name=name, shape=list(value.shape), dtype=pb.FLOAT32)],
                           with_values=True, num_shards=1)
    return [message(pb.RegisterRequest, head, [pb.Segment(entry=0, part=pb.PARAM, count=value.numel())],
                    floats(value))]


def push(grad: torch.Tensor = G, name: str = "w", version_read: int = 0, client_id: str = "c", seq: int = 1,
         hyper: pb.HyperParams = HYPER) -> list[bytes]:
    head = pb.PushHead(client_id=client_id, seq=seq, wire_dtype=pb.FLOAT32, hyper=[hyper],
                       entries=[pb.PushEntry(key=name, version_read=version_read)])
    return [message(pb.PushRequest, head, [pb.Segment(entry=0, part=pb.GRAD, count=grad.numel())],
                    floats(grad))]


def set_state(step: int, value: torch.Tensor = W0, part: int = pb.EXP_AVG, name: str = "w") -> list[bytes]:
    head = pb.SetStateHead(entries=[pb.StateEntry(key=name, step=step)], parts=[part])
    return [message(pb.SetStateRequest, head, [pb.Segment(entry=0, part=part, count=value.numel())],
                    floats(value))]


def stats(channel: grpc.Channel) -> pb.StatsReply:
    return pb.StatsReply.FromString(call(channel, "Stats", b""))


def fingerprint(channel: grpc.Channel) -> tuple:
    s = stats(channel)
    names = sorted(k.key for k in s.keys)
    pulled = call(channel, "Pull", pb.PullRequest(
        keys=names, parts=[pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ]).SerializeToString())
    return ([(k.key, k.version, k.pushes) for k in sorted(s.keys, key=lambda k: k.key)], s.pushes,
            b"".join(pulled))


def refused(channel: grpc.Channel, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, method, request)
    return info.value


@pytest.fixture
def channel():
    with run_server() as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        yield ch


# --- 1. exactly-once at extreme step values ------------------------------------------------------

@pytest.mark.parametrize("step", [MAX_STEP + 1, 2**63 - 1, 2**64 - 1])
def test_set_state_refuses_a_step_past_the_bound_and_changes_nothing(channel, step):
    before = fingerprint(channel)
    error = refused(channel, "SetState", set_state(step))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'w'" in error.details() and str(MAX_STEP) in error.details()
    assert fingerprint(channel) == before  # and Stats and Pull still answer


def test_a_push_at_the_last_step_is_refused_every_time_and_never_applied(channel):
    call(channel, "SetState", set_state(MAX_STEP))
    before = fingerprint(channel)
    for _ in range(3):  # the same (client_id, seq), sent three times
        error = refused(channel, "Push", push(version_read=MAX_STEP))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'w'" in error.details() and str(MAX_STEP) in error.details()
    assert fingerprint(channel) == before
    assert stats(channel).keys[0].version == MAX_STEP


def test_a_push_one_before_the_last_step_applies_once(channel):
    call(channel, "SetState", set_state(MAX_STEP - 1))
    replies = [pb.PushReply.FromString(call(channel, "Push", push(version_read=MAX_STEP - 1)))
               for _ in range(3)]
    assert [r.versions[0] for r in replies] == [MAX_STEP] * 3
    assert [r.duplicate for r in replies] == [False, True, True]
    assert stats(channel).keys[0].pushes == 1


# --- 2. finite inputs that would poison state ----------------------------------------------------

def _round_trips(channel: grpc.Channel) -> None:
    """What the shard holds is what SetState takes back: every part of every key finite."""
    for name in (k.key for k in stats(channel).keys):
        for part in (pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ):
            messages = call(channel, "Pull", pb.PullRequest(keys=[name], parts=[part]).SerializeToString())
            values = torch.cat([torch.frombuffer(bytearray(decode(m, pb.PullReply)[1]), dtype=torch.float32)
                                for m in messages])
            assert torch.isfinite(values).all(), (name, part)


@pytest.mark.parametrize("case", ["gradient-square-overflows", "zero-eps-zero-gradient",
                                  "zero-eps-zero-gradient-amsgrad"])
def test_an_update_whose_result_would_be_non_finite_is_refused(channel, case):
    grad, hyper = G.clone(), pb.HyperParams()
    hyper.CopyFrom(HYPER)
    if case == "gradient-square-overflows":
        grad[2] = 3e38
    else:
        grad[3] = 0.0
        hyper.eps = 0.0
        hyper.amsgrad = case.endswith("amsgrad")
    before = fingerprint(channel)
    error = refused(channel, "Push", push(grad, hyper=hyper))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'w'" in error.details() and f"element {2 if case.startswith('gradient') else 3}" in error.details()
    assert fingerprint(channel) == before
    _round_trips(channel)


@pytest.mark.parametrize("part", [pb.EXP_AVG_SQ, pb.MAX_EXP_AVG_SQ])
def test_set_state_refuses_a_negative_second_moment(channel, part):
    before = fingerprint(channel)
    value = W0.clone()
    value[4] = -1.0
    error = refused(channel, "SetState", set_state(3, value, part=part))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'w'" in error.details() and "element 4" in error.details()
    assert fingerprint(channel) == before


def test_zero_eps_with_gradients_everywhere_nonzero_is_applied(channel):
    hyper = pb.HyperParams()
    hyper.CopyFrom(HYPER)
    hyper.eps = 0.0
    grad = G.clone()
    grad[grad == 0] = 0.5
    call(channel, "Push", push(grad, hyper=hyper))
    assert stats(channel).keys[0].version == 1
    _round_trips(channel)


def _hyper(**changes) -> pb.HyperParams:
    hyper = pb.HyperParams()
    hyper.CopyFrom(HYPER)
    for name, value in changes.items():
        setattr(hyper, name, value)
    return hyper


def _with(value: float, at: int) -> torch.Tensor:
    t = W0.clone()
    t[at] = value
    return t


# (SetState before the push: (part, values) or None; the push's options; the part and element named)
OVERFLOWS = {
    # param 3.4e38 at element 0, whose gradient is negative: the step adds lr to it, past float32's max
    "param-near-max": ((pb.PARAM, _with(3.4e38, 0)), _hyper(lr=1e36), "param", 0),
    # lr 1 times exp_avg 3e38 over sqrt(v) ~ 0.02 is an update of ~4e39
    "huge-exp-avg": ((pb.EXP_AVG, _with(3e38, 1)), _hyper(lr=1.0), "param", 1),
    "huge-exp-avg-amsgrad": ((pb.EXP_AVG, _with(3e38, 1)), _hyper(lr=1.0, amsgrad=True), "param", 1),
    # L2 decay: g + 1e30 theta squared overflows exp_avg_sq at the first nonzero theta
    "coupled-weight-decay": (None, _hyper(weight_decay=1e30, weight_decouple=False), "exp_avg_sq", 1),
    # AdamW: theta (1 - lr lambda) = 1e38 x (1 - 10)
    "decoupled-weight-decay": ((pb.PARAM, _with(1e38, 1)), _hyper(lr=1.0, weight_decay=10.0), "param", 1),
}


@pytest.mark.parametrize("case", sorted(OVERFLOWS))
def test_a_step_whose_finite_inputs_would_overflow_is_refused_and_changes_nothing(channel, case):
    state, hyper, part, element = OVERFLOWS[case]
    if state is not None:
        call(channel, "SetState", set_state(0, state[1], part=state[0]))
    before = fingerprint(channel)
    for _ in range(2):  # and again: a refused push is not half-applied
        error = refused(channel, "Push", push(hyper=hyper))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'w'" in error.details() and f"make {part} non-finite" in error.details()
        assert f"element {element}" in error.details()
        assert fingerprint(channel) == before
    _round_trips(channel)
    call(channel, "Push", push(seq=2))  # the key still trains with ordinary options
    _round_trips(channel)


def test_pushes_with_lr_1e38_are_applied_until_the_one_that_would_overflow_is_refused(channel):
    # Each step moves every element by ~1e38, so a few pass float32's max; the fused kernel's
    # lr / (1 - beta1^t) (1e39 at t = 1) overflows already: then the first step is the one refused.
    hyper = _hyper(lr=1e38)
    version = 0
    while True:
        assert version < 5, "five steps of 1e38 cannot all stay finite"
        before = fingerprint(channel)
        try:
            call(channel, "Push", push(version_read=version, seq=version + 1, hyper=hyper))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "'w'" in error.details() and "non-finite" in error.details()
            break
        version += 1
        _round_trips(channel)
    assert fingerprint(channel) == before
    _round_trips(channel)


def test_an_ordinary_step_from_a_param_near_float_max_is_applied(channel):
    call(channel, "SetState", set_state(0, _with(3.4e38, 0), part=pb.PARAM))
    call(channel, "Push", push())  # its result is finite: no refusal for being near the edge
    assert stats(channel).keys[0].version == 1
    _round_trips(channel)


def test_a_push_of_several_keys_is_refused_whole_when_one_would_overflow(channel):
    call(channel, "Register", register("u"))
    call(channel, "SetState", set_state(0, _with(3e38, 1), part=pb.EXP_AVG, name="u"))
    head = pb.PushHead(client_id="c", seq=1, wire_dtype=pb.FLOAT32, hyper=[_hyper(lr=1.0)],
                       entries=[pb.PushEntry(key="w"), pb.PushEntry(key="u")])
    segments = [pb.Segment(entry=i, part=pb.GRAD, count=G.numel()) for i in (0, 1)]
    before = fingerprint(channel)
    error = refused(channel, "Push", [message(pb.PushRequest, head, segments, floats(G, G))])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'u'" in error.details()
    assert fingerprint(channel) == before  # "w", which alone would have stepped, did not either


def test_state_dict_round_trips_after_a_refused_overflowing_step():
    from optserve import RemoteAdam
    from optserve.client.transport import ShardError
    with run_server() as address:
        param = torch.nn.Parameter(W0.clone())
        with RemoteAdam([("w", param)], [address], lr=1e38) as opt:
            with pytest.raises(ShardError, match="non-finite"):
                for _ in range(5):
                    param.grad = G.clone()
                    opt.step()
            saved = opt.state_dict()
            opt.load_state_dict(saved)
            assert torch.isfinite(param).all()
            assert all(torch.isfinite(t).all() for s in opt.state_dict()["state"].values()
                       for t in s.values() if torch.is_tensor(t))


# --- 3. no call can starve the others ------------------------------------------------------------

def _health(channel: grpc.Channel) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status


class _Stalled:
    """Client-streaming calls that send `messages` and then stop, until released."""

    def __init__(self, channel: grpc.Channel, count: int, messages: Sequence[bytes] = ()):
        self.release = threading.Event()

        def stream():
            yield from messages
            self.release.wait()

        stub = channel.stream_unary(_METHOD + "Push")
        self.futures = [stub.future(stream(), timeout=600) for _ in range(count)]

    def close(self) -> list:
        self.release.set()
        return [f.exception() for f in self.futures]


def test_health_and_stats_answer_while_idle_streams_hold_every_thread():
    with run_server(threads=4, idle_timeout=600) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        stalled = _Stalled(ch, 8, push()[:1])  # twice the shard's threads, each sent its first message
        try:
            for _ in range(3):
                assert stats(ch).shard.num_keys == 1
                assert _health(ch) == 1  # SERVING
            error = refused(ch, "Push", push(seq=2))  # no thread left for tensors: said at once
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "busy" in error.details()
        finally:
            stalled.close()


def test_an_idle_stream_is_ended_after_the_idle_timeout():
    with run_server(threads=8, idle_timeout=0.5) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        stalled = _Stalled(ch, 2, push()[:1])
        errors = [f.exception(timeout=TIMEOUT) for f in stalled.futures]  # ended by the shard
        stalled.close()
        assert [e.code() for e in errors] == [grpc.StatusCode.CANCELLED] * 2
        assert stats(ch).keys[0].pushes == 0


@pytest.mark.parametrize("ahead", [2, 2**40, 2**64 - 1])
def test_a_pull_for_an_unreachable_version_is_refused_at_once(ahead):
    with run_server(wait_timeout=600) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        error = refused(ch, "Pull", pb.PullRequest(keys=["w"], min_versions=[ahead]).SerializeToString())
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "'w'" in error.details()


def _pull_future(channel: grpc.Channel, min_version: int, timeout: float = 600):
    request = pb.PullRequest(keys=["w"], min_versions=[min_version]).SerializeToString()
    return channel.unary_stream(_METHOD + "Pull")(request, timeout=timeout)


def _outcome(c) -> grpc.StatusCode:
    try:
        list(c)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _retrying(fn):
    """fn(), retried while the shard says it is busy (UNAVAILABLE), as clients do; a hang guard ends it."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise


def test_waiting_pulls_are_bounded_so_a_push_still_gets_a_thread():
    with run_server(threads=6, wait_timeout=600) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        calls = [_pull_future(ch, 1) for _ in range(20)]  # each would wait for the next push
        assert pb.PushReply.FromString(_retrying(lambda: call(ch, "Push", push()))).versions == [1]
        outcomes = [_outcome(c) for c in calls]
        assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
        assert grpc.StatusCode.UNAVAILABLE in outcomes


def test_a_wait_whose_caller_went_away_gives_its_place_back():
    with run_server(threads=6, wait_timeout=600) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        calls = [_pull_future(ch, 1) for _ in range(20)]
        # The shard keeps 2 of these waiting (half of its 4 threads for tensors) and refuses the rest.
        # A hang guard bounds the polling, not an assertion.
        deadline = time.monotonic() + TIMEOUT
        while sum(not c.done() for c in calls) > 2:
            assert time.monotonic() < deadline, "waiting calls were never bounded"
            time.sleep(0.05)
        for c in calls:
            c.cancel()
        # Every place is free again: a pull now waits (until its own short deadline) instead of
        # being told the shard is busy.
        while _outcome(_pull_future(ch, 1, timeout=1.0)) != grpc.StatusCode.DEADLINE_EXCEEDED:
            assert time.monotonic() < deadline, "cancelled waits never gave their place back"
        assert stats(ch).shard.num_keys == 1


def _own_connection(address: str) -> grpc.Channel:
    """A channel with a connection of its own (grpc shares one between a process's channels otherwise),
    and no flow-control window growth, so that what the shard sends waits for what the client reads."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1),
                                                   ("grpc.http2.bdp_probe", 0)])


def test_one_caller_cannot_take_every_wait_so_another_still_gets_one():
    # threads 10: 8 for tensors, of which 4 may wait, at most 2 of them for one connection
    with run_server(threads=10, wait_timeout=600) as address, _own_connection(address) as hog, \
            _own_connection(address) as other:
        call(hog, "Register", register())
        calls = [_pull_future(hog, 1) for _ in range(6)]
        deadline = time.monotonic() + TIMEOUT  # a hang guard, not an assertion on time
        while sum(not c.done() for c in calls) > 2:
            assert time.monotonic() < deadline, "one caller kept more than its share of waits"
            time.sleep(0.05)
        refusals = [c for c in calls if c.done()]
        assert all(c.code() == grpc.StatusCode.UNAVAILABLE and "per caller" in c.details() for c in refusals)
        # another connection still waits (until its own short deadline) instead of hearing "busy"
        assert _outcome(_pull_future(other, 1, timeout=1.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
        for c in calls:
            c.cancel()


def test_a_slow_reader_loses_its_pull_and_lease_at_the_reply_deadline(monkeypatch):
    from optserve.server import service
    from optserve.server.main import ServerConfig, Shard
    monkeypatch.setattr(service, "PULL_SECONDS", 1.0)
    monkeypatch.setattr(service, "PULL_SECONDS_PER_MIB", 0.0)
    shard = Shard(ServerConfig(idle_timeout=600, data_port=-1))
    shard.start()
    try:
        with _own_connection(shard.address) as ch:
            call(ch, "Register", register("big", torch.zeros(2 << 20)))  # 8 MiB: 2,048 messages of 4 KiB
            stream = ch.unary_stream(_METHOD + "Pull")(
                pb.PullRequest(keys=["big"], chunk_bytes=4096).SerializeToString(), timeout=TIMEOUT)
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    time.sleep(0.01)  # each message taken well within the idle timeout, the whole far past 1 s
            assert info.value.code() == grpc.StatusCode.CANCELLED
            deadline = time.monotonic() + TIMEOUT  # a hang guard: the lease ends as the call does
            while len(shard.core.store._leases):
                assert time.monotonic() < deadline, "the cancelled pull kept its snapshot leased"
                time.sleep(0.05)
            assert stats(ch).pulls == 1
    finally:
        shard.stop()


def test_the_exactly_once_table_is_capped_and_still_answers_retries():
    from optserve.server.dedupe import BYTES_PER_KEY, CLIENT_BYTES, RECORD_BYTES
    cap = CLIENT_BYTES + 1 + 3 * (RECORD_BYTES + BYTES_PER_KEY)  # client "c" and three results
    with run_server(dedupe_bytes=cap) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        for seq in (1, 2, 3):
            call(ch, "Push", push(version_read=seq - 1, seq=seq))
        error = refused(ch, "Push", push(version_read=3, seq=4))  # every result is within its retry window
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exactly-once" in error.details()
        assert stats(ch).keys[0].version == 3
        retry = pb.PushReply.FromString(call(ch, "Push", push(version_read=2, seq=3)))
        assert retry.duplicate and list(retry.versions) == [3]


# --- 7. every string a request supplies is bounded -----------------------------------------------

def _push_pull(pull_keys: Sequence[str]) -> list[bytes]:
    head = pb.PushHead(client_id="c", seq=9, wire_dtype=pb.FLOAT32, pull_keys=pull_keys)
    return [message(pb.PushRequest, head)]


LONG = "x" * (MAX_NAME_LENGTH + 1)


@pytest.mark.parametrize("method, request_", [
    ("Push", lambda: push(client_id="c" * (MAX_CLIENT_ID_LENGTH + 1))),
    ("Push", lambda: push(name=LONG)),
    ("Pull", lambda: pb.PullRequest(keys=["w", LONG]).SerializeToString()),
    ("PushPull", lambda: _push_pull(["w", LONG])),
    ("SetState", lambda: set_state(3, name=LONG)),
    ("Register", lambda: [message(pb.RegisterRequest, pb.RegisterHead(
        keys=[pb.KeySpec(name=LONG * 8, shape=[1], dtype=pb.FLOAT32)] * 2, num_shards=1))]),
], ids=["client-id", "push-key", "pull-key", "push-pull-key", "set-state-key", "register-key-twice"])
def test_an_overlong_string_is_refused_without_being_kept_or_echoed(channel, method, request_):
    before = fingerprint(channel)
    error = refused(channel, method, request_())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(error.details()) < 400  # says how long, not what
    assert fingerprint(channel) == before


def test_a_client_id_at_the_bound_is_taken(channel):
    reply = pb.PushReply.FromString(call(channel, "Push", push(client_id="c" * MAX_CLIENT_ID_LENGTH)))
    assert reply.versions == [1]


# --- 9. a read allocates nothing the key keeps ---------------------------------------------------

def test_reading_max_exp_avg_sq_of_a_key_without_amsgrad_gives_it_no_tensor(tmp_path):
    import json
    with run_server(checkpoint_dir=str(tmp_path)) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        call(ch, "Push", push())
        for _ in range(2):
            messages = call(ch, "Pull", pb.PullRequest(keys=["w"], parts=[pb.MAX_EXP_AVG_SQ]).SerializeToString())
            values = torch.cat([torch.frombuffer(bytearray(decode(m, pb.PullReply)[1]), dtype=torch.float32)
                                for m in messages])
            assert values.tolist() == [0.0] * W0.numel()  # what torch's Adam reports: none kept yet
        path = pb.CheckpointReply.FromString(ch.unary_unary(_METHOD + "Checkpoint")(b"", timeout=TIMEOUT)).path
    manifest = json.loads(next(p for p in pathlib.Path(path).iterdir()
                               if p.suffix == ".json").read_text())
    assert [sorted(k["tensors"]) for k in manifest["keys"]] == [["exp_avg", "exp_avg_sq", "param"]]


# --- 10. default limits a modest machine survives ------------------------------------------------

def test_the_default_limits_fit_a_24_gib_machine():
    assert worst_case_bytes(StoreLimits()) <= 16 * 2**30  # the rest is the process, torch and the OS


def test_a_key_costs_no_more_than_the_stated_overhead():
    """KEY_OVERHEAD_BYTES is what the README's worst case counts per key: measured, with the longest
    names a request may give."""
    import gc
    import os

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    store, count = Store(), 4000
    gc.collect()
    before = rss()
    for start in range(0, count, 500):
        store.create([(f"{i:08d}".ljust(MAX_NAME_LENGTH, "k"), (1,), torch.zeros(1),
                       {"param": f"{i:08d}".ljust(MAX_NAME_LENGTH, "p"), "param_shape": [1], "offset": 0})
                      for i in range(start, start + 500)])
    gc.collect()
    assert (rss() - before) / count <= KEY_OVERHEAD_BYTES


# --- 12. Stats always fits -----------------------------------------------------------------------

def test_stats_fits_its_message_whatever_the_keys():
    limit = 1 << 20
    with run_server(max_message_bytes=limit, chunk_bytes=4096) as address, \
            grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        names = [f"{i:05d}".ljust(1000, "k") for i in range(1500)]  # ~1.5 MB of names
        for start in range(0, len(names), 250):
            head = pb.RegisterHead(keys=[pb.KeySpec(name=n, shape=[1], dtype=pb.FLOAT32)
                                         for n in names[start:start + 250]], with_values=True, num_shards=1)
            call(ch, "Register", [message(pb.RegisterRequest, head,
                                          [pb.Segment(entry=i, part=pb.PARAM, count=1) for i in range(250)],
                                          bytes(4 * 250))])
        raw = call(ch, "Stats", b"")
        reply = pb.StatsReply.FromString(raw)
        assert len(raw) <= limit
        assert reply.shard.num_keys == 1500  # the total is always there
        assert 0 < len(reply.keys) < 1500 and [k.key for k in reply.keys] == names[:len(reply.keys)]


# --- 13. a full disk during a checkpoint ---------------------------------------------------------

@pytest.mark.parametrize("errno_, code", [(28, grpc.StatusCode.RESOURCE_EXHAUSTED),  # ENOSPC
                                          (5, grpc.StatusCode.INTERNAL)])  # EIO
def test_a_checkpoint_that_cannot_be_written_answers_a_typed_code(tmp_path, monkeypatch, errno_, code):
    import os

    from optserve.server import main
    with run_server(checkpoint_dir=str(tmp_path)) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register())
        checkpoint = ch.unary_unary(_METHOD + "Checkpoint")
        first = pb.CheckpointReply.FromString(checkpoint(b"", timeout=TIMEOUT)).path

        def full(*args, **kwargs):
            raise OSError(errno_, os.strerror(errno_))

        monkeypatch.setattr(main, "write_checkpoint", full)
        with pytest.raises(grpc.RpcError) as info:
            checkpoint(b"", timeout=TIMEOUT)
        assert info.value.code() == code
        assert os.strerror(errno_) in info.value.details() and "kept" in info.value.details()
        assert stats(ch).checkpoint == first  # the last good one is still the one reported
    assert pathlib.Path(first).exists()


def test_a_final_checkpoint_that_cannot_be_written_exits_with_its_own_code(tmp_path, monkeypatch):
    from optserve.server import main
    shard = main.Shard(main.ServerConfig(checkpoint_dir=str(tmp_path)))
    shard.start()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(main, "write_checkpoint", full)
    assert main.stop_with_final_checkpoint(shard) == main.EXIT_FINAL_CHECKPOINT_FAILED == 3


# --- 14. without the token nothing can be probed -------------------------------------------------

@pytest.mark.parametrize("method", ["/optserve.v1.OptServe/Nope", "/some.Other/Method",
                                    "/grpc.reflection.v1alpha.ServerReflection/Nope"])
def test_an_unknown_method_needs_the_token_before_it_is_unimplemented(tmp_path, method):
    token = tmp_path / "token"
    token.write_text("s3cret")
    with run_server(token_file=str(token)) as address, grpc.insecure_channel(address) as ch:
        for metadata, code in [((), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
                               ((("authorization", "Bearer s3cret"),), grpc.StatusCode.UNIMPLEMENTED)]:
            for kind in ("unary_unary", "stream_stream"):
                stub = getattr(ch, kind)(method)
                with pytest.raises(grpc.RpcError) as info:
                    reply = stub(b"" if kind == "unary_unary" else iter([b""]), timeout=TIMEOUT,
                                 metadata=metadata)
                    list(reply) if kind == "stream_stream" else reply
                assert info.value.code() == code, (kind, metadata)
        assert _health(ch) == 1  # health stays open
