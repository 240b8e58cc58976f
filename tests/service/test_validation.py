"""Bad input (DESIGN.md): every refused request gets its gRPC code and leaves the shard byte-identical.

Requests are built by hand (optserve/serde.py's `encode`, protobuf messages) and sent as raw bytes
straight through grpc, since a well-behaved client cannot produce most of them. The shard's state is
fingerprinted before and after each bad request: the raw bytes of a Pull of PARAM, EXP_AVG and
EXP_AVG_SQ of every key (the reply heads carry versions, steps and options), plus each key's Stats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import grpc
import pytest
import torch

from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from optserve.server.main import run_server

_METHOD = "/optserve.v1.OptServe/"
_KINDS = {"Register": "stream_unary", "Push": "stream_unary", "SetState": "stream_unary",
          "PushPull": "stream_stream", "Pull": "unary_stream", "Stats": "unary_unary"}
TIMEOUT = 10.0

HYPER = pb.HyperParams(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decouple=True,
                       optimized_update=True)
W0 = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
B0 = torch.tensor([0.5, -0.5, 1.0])
G_W = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)
G_B = torch.tensor([0.25, -2.0, 3.0])
NAN_W = G_W.clone().reshape(-1).index_fill_(0, torch.tensor([5]), math.nan).reshape(4, 3)
INF_W = G_W.clone().reshape(-1).index_fill_(0, torch.tensor([7]), math.inf).reshape(4, 3)
NAN_B = G_B.clone().index_fill_(0, torch.tensor([1]), math.nan)


# --- raw requests ------------------------------------------------------------------------------

def call(channel: grpc.Channel, method: str, request):
    """Send raw request bytes (a list of messages for client-streaming methods); return the reply bytes."""
    kind = _KINDS[method]
    stub = getattr(channel, kind)(_METHOD + method)  # no (de)serializers: bytes pass through as they are
    reply = stub(iter(request) if kind.startswith("stream") else request, timeout=TIMEOUT)
    return list(reply) if kind.endswith("_stream") else reply


def message(message_type, head=None, segments: Sequence[pb.Segment] = (), data: bytes = b"") -> bytes:
    """One tensor-carrying message in the wire layout: small fields, then `data` as field 15."""
    meta = message_type(segments=segments)
    if head is not None:
        meta.head.CopyFrom(head)
    return encode(meta.SerializeToString(), [data])


def floats(*tensors: torch.Tensor, dtype: torch.dtype = torch.float32) -> bytes:
    """The tensors' little-endian bytes as `dtype`, concatenated."""
    return b"".join(t.reshape(-1).to(dtype).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)


def seg(entry: int, part: int, offset: int, count: int) -> pb.Segment:
    return pb.Segment(entry=entry, part=part, offset=offset, count=count)


def whole(part: int, tensors: Sequence[torch.Tensor]) -> list[pb.Segment]:
    return [seg(i, part, 0, t.numel()) for i, t in enumerate(tensors)]


def push_head(*names: str, version_read: int = 0, hyper=(HYPER,), index: int = 0,
              wire: int = pb.FLOAT32, pull_keys: Sequence[str] = ()) -> pb.PushHead:
    return pb.PushHead(client_id="test", wire_dtype=wire, hyper=hyper, pull_keys=pull_keys,
                       entries=[pb.PushEntry(key=n, version_read=version_read, hyper=index) for n in names])


def push(*grads: tuple[str, torch.Tensor], **head_options) -> list[bytes]:
    """A one-message push of whole gradients, (name, gradient) per entry, in the head's wire dtype."""
    tensors = [g for _, g in grads]
    head = push_head(*(n for n, _ in grads), **head_options)
    dtype = {pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}.get(head.wire_dtype, torch.float32)
    return [message(pb.PushRequest, head, whole(pb.GRAD, tensors), floats(*tensors, dtype=dtype))]


def register(*values: tuple[str, torch.Tensor], dtype: int = pb.FLOAT32, shard_index: int = 0,
             num_shards: int = 1) -> list[bytes]:
    """A one-message Register with initial values, (name, value) per key."""
    tensors = [v for _, v in values]
    head = pb.RegisterHead(keys=[pb.KeySpec(name=n, shape=list(v.shape), dtype=dtype) for n, v in values],
                           with_values=True, shard_index=shard_index, num_shards=num_shards)
    return [message(pb.RegisterRequest, head, whole(pb.PARAM, tensors), floats(*tensors))]


def set_state(*entries: tuple[str, torch.Tensor], part: int = pb.EXP_AVG, step: int = 7) -> list[bytes]:
    """A one-message SetState overwriting one part and the step of each (name, value) entry."""
    tensors = [v for _, v in entries]
    head = pb.SetStateHead(entries=[pb.StateEntry(key=n, step=step) for n, _ in entries], parts=[part])
    return [message(pb.SetStateRequest, head, whole(part, tensors), floats(*tensors))]


def pull(names: Sequence[str], parts: Sequence[int] = (), dtype: int = pb.DTYPE_UNSPECIFIED) -> bytes:
    return pb.PullRequest(keys=names, parts=parts, dtype=dtype).SerializeToString()


# --- the shard's state -------------------------------------------------------------------------

def stats(channel: grpc.Channel) -> pb.StatsReply:
    return pb.StatsReply.FromString(call(channel, "Stats", b""))


def fingerprint(channel: grpc.Channel) -> dict:
    """Everything a request could change, except the counters of requests themselves (pulls, bytes, rejected)."""
    s = stats(channel)
    keys = sorted(s.keys, key=lambda k: k.key)
    names = [k.key for k in keys]
    pulled = call(channel, "Pull", pull(names, [pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ]))
    return {
        "keys": [(k.key, list(k.shape), k.version, k.pushes, k.staleness.SerializeToString()) for k in keys],
        "num_keys": s.shard.num_keys,
        "pushes": s.pushes,
        "staleness": s.staleness.SerializeToString(),
        "tensors": b"".join(pulled),
    }


def refuse(channel: grpc.Channel, method: str, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(channel, method, request)
    return info.value


@pytest.fixture
def channel(shard):
    """A channel to a shard holding "w" [4, 3] (version 3) and "b" [3] (version 2), both trained."""
    with grpc.insecure_channel(shard) as ch:
        call(ch, "Register", register(("w", W0), ("b", B0)))
        call(ch, "Push", push(("w", G_W), ("b", G_B)))
        call(ch, "Push", push(("w", -G_W), version_read=1))
        call(ch, "Push", push(("b", G_B * 3), ("w", G_W / 2), version_read=1))
        yield ch


# --- the bad requests --------------------------------------------------------------------------

@dataclass(frozen=True)
class Bad:
    method: str
    request: Callable[[], object]  # raw bytes, or a list of messages; built when the test runs
    code: grpc.StatusCode
    key: str | None = None  # the key the details must name, where one is involved


def provenance(**fields) -> list[bytes]:
    """A Register of key "c" (2 elements) with these provenance fields (param, param_shape, offset)."""
    head = pb.RegisterHead(keys=[pb.KeySpec(name="c", shape=[2], dtype=pb.FLOAT32, **fields)], with_values=True,
                           num_shards=1)
    return [message(pb.RegisterRequest, head, whole(pb.PARAM, [torch.ones(2)]), floats(torch.ones(2)))]


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
W_HEAD = push_head("w")

BAD = {
    # Push: keys and entries
    "push-unknown-key": Bad("Push", lambda: push(("nope", G_B)), NOT_FOUND, "nope"),
    "push-key-named-twice": Bad("Push", lambda: push(("w", G_W), ("w", G_W)), INVALID, "w"),
    "push-no-entries": Bad("Push", lambda: [message(pb.PushRequest, push_head())], INVALID),
    "push-version-read-ahead": Bad("Push", lambda: push(("w", G_W), version_read=4), PRECONDITION, "w"),
    "push-second-key-version-read-ahead": Bad(
        "Push", lambda: [message(pb.PushRequest, pb.PushHead(
            wire_dtype=pb.FLOAT32, hyper=[HYPER],
            entries=[pb.PushEntry(key="w", version_read=3), pb.PushEntry(key="b", version_read=3)]),
            whole(pb.GRAD, [G_W, G_B]), floats(G_W, G_B))], PRECONDITION, "b"),
    # Push: bytes and segments
    "push-data-shorter-than-segments": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 12)], floats(G_W)[:-4])],
        INVALID, "w"),
    "push-data-longer-than-segments": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 12)], floats(G_W) + bytes(4))],
        INVALID, "w"),
    "push-segment-larger-than-key": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 13)], floats(G_W, G_B[:1]))],
        INVALID, "w"),
    "push-gap-between-segments": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 4), seg(0, pb.GRAD, 6, 6)],
                                 floats(G_W.reshape(-1)[:10]))], INVALID, "w"),
    "push-segments-out-of-order": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 6, 6), seg(0, pb.GRAD, 0, 6)],
                                 floats(G_W))], INVALID, "w"),
    "push-overlapping-segments": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 6), seg(0, pb.GRAD, 3, 6)],
                                 floats(G_W))], INVALID, "w"),
    "push-stream-ends-early": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 8)],
                                 floats(G_W.reshape(-1)[:8]))], INVALID, "w"),
    "push-second-chunk-short-of-bytes": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 6)], floats(G_W.reshape(-1)[:6])),
                         message(pb.PushRequest, None, [seg(0, pb.GRAD, 6, 6)], floats(G_W.reshape(-1)[6:11]))],
        INVALID, "w"),
    "push-segment-names-undeclared-entry": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 12), seg(5, pb.GRAD, 0, 3)],
                                 floats(G_W, G_B))], INVALID),
    "push-segment-names-undeclared-part": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 12), seg(0, pb.PARAM, 0, 12)],
                                 floats(G_W, G_W))], INVALID),
    # Push: values, dtypes and options
    "push-nan-gradient": Bad("Push", lambda: push(("w", NAN_W)), INVALID, "w"),
    "push-inf-gradient": Bad("Push", lambda: push(("w", INF_W)), INVALID, "w"),
    "push-nan-in-one-of-two-keys": Bad("Push", lambda: push(("w", G_W), ("b", NAN_B)), INVALID, "b"),
    "push-nan-in-second-chunk": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 6)], floats(NAN_W.reshape(-1)[:6])),
                         message(pb.PushRequest, None, [seg(0, pb.GRAD, 6, 6)], floats(NAN_W.reshape(-1)[6:]))],
        INVALID, "w"),
    "push-nan-bfloat16-gradient": Bad("Push", lambda: push(("w", NAN_W), wire=pb.BFLOAT16), INVALID, "w"),
    "push-inf-float16-gradient": Bad("Push", lambda: push(("w", INF_W), wire=pb.FLOAT16), INVALID, "w"),
    "push-unknown-wire-dtype": Bad("Push", lambda: push(("w", G_W), wire=99), INVALID),
    "push-hyper-index-out-of-range": Bad("Push", lambda: push(("w", G_W), index=1), INVALID, "w"),
    "push-negative-lr": Bad("Push", lambda: push(("w", G_W), hyper=[pb.HyperParams(lr=-0.1, beta1=0.9,
                                                                                   beta2=0.999)]), INVALID),
    "push-beta1-one": Bad("Push", lambda: push(("w", G_W), hyper=[pb.HyperParams(lr=0.1, beta1=1.0,
                                                                                 beta2=0.999)]), INVALID),
    "push-nan-eps": Bad("Push", lambda: push(("w", G_W), hyper=[pb.HyperParams(lr=0.1, beta1=0.9, beta2=0.999,
                                                                               eps=math.nan)]), INVALID),
    # Push: the stream's shape
    "push-head-missing-in-first-message": Bad(
        "Push", lambda: [message(pb.PushRequest, None, [seg(0, pb.GRAD, 0, 12)], floats(G_W))], INVALID),
    "push-head-repeated": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 6)], floats(G_W.reshape(-1)[:6])),
                         message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 6, 6)], floats(G_W.reshape(-1)[6:]))],
        INVALID),
    "push-empty-stream": Bad("Push", lambda: [], INVALID),
    "push-garbage-bytes": Bad("Push", lambda: [b"this is not a protobuf message"], INVALID),
    "push-truncated-varint": Bad("Push", lambda: [b"\xff" * 9], INVALID),
    "push-field-runs-past-end": Bad("Push", lambda: [b"\x0a\x7f\x00"], INVALID),
    "push-data-field-twice": Bad("Push", lambda: [push(("w", G_W))[0] + b"\x7a\x04" + bytes(4)], INVALID),
    "push-message-over-max-size": Bad(
        "Push", lambda: [message(pb.PushRequest, W_HEAD, [seg(0, pb.GRAD, 0, 12)],
                                 bytes(DEFAULT_MAX_MESSAGE_BYTES + 1))], grpc.StatusCode.RESOURCE_EXHAUSTED),
    # PushPull shares the push's checks, and checks its pull keys before applying anything
    "pushpull-unknown-pull-key": Bad("PushPull", lambda: push(("w", G_W), pull_keys=["nope"]), NOT_FOUND, "nope"),
    "pushpull-nan-gradient": Bad("PushPull", lambda: push(("w", NAN_W)), INVALID, "w"),
    "pushpull-unknown-pull-dtype": Bad(
        "PushPull", lambda: [message(pb.PushRequest, pb.PushHead(
            wire_dtype=pb.FLOAT32, hyper=[HYPER], entries=[pb.PushEntry(key="w")], pull_dtype=99),
            [seg(0, pb.GRAD, 0, 12)], floats(G_W))], INVALID),
    # Register
    "register-other-shape": Bad("Register", lambda: register(("w", torch.zeros(3, 4))), PRECONDITION, "w"),
    "register-other-shape-without-values": Bad(
        "Register", lambda: [message(pb.RegisterRequest, pb.RegisterHead(
            keys=[pb.KeySpec(name="b", shape=[4], dtype=pb.FLOAT32)], num_shards=1))], PRECONDITION, "b"),
    "register-bfloat16-key": Bad("Register", lambda: register(("c", torch.zeros(2)), dtype=pb.BFLOAT16),
                                 INVALID, "c"),
    "register-unspecified-dtype": Bad("Register", lambda: register(("c", torch.zeros(2)), dtype=pb.DTYPE_UNSPECIFIED),
                                      INVALID, "c"),
    "register-wrong-shard-index": Bad("Register", lambda: register(("c", torch.zeros(2)), shard_index=1, num_shards=2),
                                      PRECONDITION),
    "register-wrong-num-shards": Bad("Register", lambda: register(("c", torch.zeros(2)), num_shards=3),
                                     PRECONDITION),
    "register-empty-name": Bad("Register", lambda: register(("", torch.zeros(2))), INVALID),
    "register-name-twice": Bad("Register", lambda: register(("c", torch.zeros(2)), ("c", torch.zeros(2))),
                               INVALID, "c"),
    "register-nan-initial-value": Bad("Register", lambda: register(("c", torch.tensor([1.0, math.nan]))),
                                      INVALID, "c"),
    "register-inf-in-second-key": Bad(
        "Register", lambda: register(("c", torch.ones(2)), ("d", torch.tensor([math.inf, 0.0]))), INVALID, "d"),
    "register-values-end-early": Bad(
        "Register", lambda: [message(pb.RegisterRequest, pb.RegisterHead(
            keys=[pb.KeySpec(name="c", shape=[4], dtype=pb.FLOAT32)], with_values=True, num_shards=1),
            [seg(0, pb.PARAM, 0, 3)], floats(torch.ones(3)))], INVALID, "c"),
    "register-garbage-bytes": Bad("Register", lambda: [b"this is not a protobuf message"], INVALID),
    "register-param-name-too-long": Bad("Register", lambda: provenance(param="p" * 1025, param_shape=[2]),
                                        INVALID, "c"),
    "register-param-shape-too-many-dims": Bad("Register", lambda: provenance(param="p", param_shape=[1] * 65),
                                              INVALID, "c"),
    "register-slice-outside-its-param": Bad("Register", lambda: provenance(param="p", param_shape=[3], offset=2),
                                            INVALID, "c"),
    # Pull
    "pull-unknown-key": Bad("Pull", lambda: pull(["w", "nope"]), NOT_FOUND, "nope"),
    "pull-grad-part": Bad("Pull", lambda: pull(["w"], [pb.GRAD]), INVALID),
    "pull-undefined-part": Bad("Pull", lambda: pull(["w"], [99]), INVALID),
    "pull-part-twice": Bad("Pull", lambda: pull(["w"], [pb.PARAM, pb.PARAM]), INVALID),
    "pull-state-as-bfloat16": Bad("Pull", lambda: pull(["w"], [pb.PARAM, pb.EXP_AVG], pb.BFLOAT16), INVALID),
    "pull-unknown-dtype": Bad("Pull", lambda: pull(["w"], [pb.PARAM], 99), INVALID),
    "pull-garbage-bytes": Bad("Pull", lambda: b"this is not a protobuf message", INVALID),
    # SetState
    "setstate-unknown-key": Bad("SetState", lambda: set_state(("nope", torch.zeros(3))), NOT_FOUND, "nope"),
    "setstate-nan-in-part": Bad("SetState", lambda: set_state(("w", NAN_W)), INVALID, "w"),
    "setstate-nan-in-second-key": Bad("SetState", lambda: set_state(("w", G_W), ("b", NAN_B)), INVALID, "b"),
    "setstate-grad-part": Bad("SetState", lambda: set_state(("w", G_W), part=pb.GRAD), INVALID),
    "setstate-wrong-length": Bad(
        "SetState", lambda: [message(pb.SetStateRequest, pb.SetStateHead(
            entries=[pb.StateEntry(key="w", step=1)], parts=[pb.EXP_AVG]),
            [seg(0, pb.EXP_AVG, 0, 12)], floats(G_W)[:-8])], INVALID, "w"),
    "setstate-invalid-hyper": Bad(
        "SetState", lambda: [message(pb.SetStateRequest, pb.SetStateHead(
            entries=[pb.StateEntry(key="w", step=1, hyper=pb.HyperParams(lr=-1.0))], parts=[pb.EXP_AVG]),
            [seg(0, pb.EXP_AVG, 0, 12)], floats(G_W))], INVALID, "w"),
}
NAMING = {case_id: case for case_id, case in BAD.items() if case.key is not None}


# --- tests -------------------------------------------------------------------------------------

def test_arranged_shard_has_nontrivial_state(channel):
    keys = {k.key: (k.version, k.pushes) for k in stats(channel).keys}
    [reply] = call(channel, "Pull", pull(["w", "b"], [pb.EXP_AVG, pb.EXP_AVG_SQ]))
    _, data = decode(reply, pb.PullReply)
    moments = torch.frombuffer(bytearray(data), dtype=torch.float32)

    assert keys == {"w": (3, 3), "b": (2, 2)}
    assert moments.numel() == 2 * (12 + 3) and bool((moments != 0).all())


def test_fingerprint_sees_a_valid_push_and_a_valid_set_state(channel):
    before = fingerprint(channel)
    call(channel, "Push", push(("b", G_B), version_read=2))
    after_push = fingerprint(channel)

    call(channel, "SetState", set_state(("b", G_B), step=3))

    assert before != after_push != fingerprint(channel)


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_request_is_refused_with_its_code_and_changes_nothing(channel, case):
    before = fingerprint(channel)

    error = refuse(channel, case.method, case.request())

    assert error.code() == case.code, error.details()
    assert fingerprint(channel) == before


@pytest.mark.parametrize("case", NAMING.values(), ids=NAMING.keys())
def test_refusal_details_name_the_key(channel, case):
    error = refuse(channel, case.method, case.request())

    assert repr(case.key) in error.details()


def test_nan_in_one_key_of_a_push_leaves_both_keys_unchanged(channel):
    before = call(channel, "Pull", pull(["w", "b"], [pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ]))

    refuse(channel, "Push", push(("w", G_W), ("b", NAN_B)))

    assert call(channel, "Pull", pull(["w", "b"], [pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ])) == before


def test_register_of_another_shape_names_both_shapes(channel):
    error = refuse(channel, "Register", register(("w", torch.zeros(3, 4))))

    assert error.code() == PRECONDITION
    assert "[4, 3]" in error.details() and "[3, 4]" in error.details()


def test_register_with_nan_initial_value_does_not_create_the_key(channel):
    refuse(channel, "Register", register(("c", torch.tensor([1.0, math.nan]))))

    assert "c" not in {k.key for k in stats(channel).keys}
    assert refuse(channel, "Pull", pull(["c"])).code() == NOT_FOUND


def test_register_over_the_tensor_element_limit_is_resource_exhausted_and_creates_nothing():
    with run_server(max_tensor_elements=100) as address, grpc.insecure_channel(address) as ch:
        call(ch, "Register", register(("small", torch.ones(100))))
        before = fingerprint(ch)

        error = refuse(ch, "Register", register(("big", torch.ones(101))))

        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'big'" in error.details()
        assert fingerprint(ch) == before


def test_shard_serves_a_valid_push_after_every_bad_request(channel):
    for case in BAD.values():
        refuse(channel, case.method, case.request())

    reply = pb.PushReply.FromString(call(channel, "Push", push(("w", G_W), ("b", G_B), version_read=2)))

    assert list(reply.versions) == [4, 3]
    assert {k.key: k.version for k in stats(channel).keys} == {"w": 4, "b": 3}
