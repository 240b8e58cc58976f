"""The codec (optserve/serde.py): encode/decode, chunking, reassembly checks, wire dtypes, 1 GiB tensors."""
from __future__ import annotations

import pytest
import torch

from optserve import serde
from optserve.errors import RequestError, StatusCode
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import CUT_ELEMENTS, Assembler, Expected, Outgoing, chunk_stream, decode, encode

HEAD = pb.PushHead(client_id="worker", seq=7, wire_dtype=pb.FLOAT32,
                   entries=[pb.PushEntry(key="w", version_read=3)])
CHUNK = 1024  # bytes: 256 float32 elements per message (4 cuts of hyper.CUT_ELEMENTS)


def push_meta(segments, first):
    """make_meta for chunk_stream: a PushRequest with the head in the first message only."""
    msg = pb.PushRequest(head=HEAD) if first else pb.PushRequest()
    msg.segments.extend(segments)
    return msg.SerializeToString()


def stream(tensors, wire_dtype=torch.float32, chunk_bytes=CHUNK):
    items = [Outgoing(i, pb.GRAD, t) for i, t in enumerate(tensors)]
    return chunk_stream(items, wire_dtype, chunk_bytes, push_meta)


def receive(messages, numels, wire_dtype=torch.float32):
    """Decode and reassemble a stream into one float32 tensor per entry (as the shard does)."""
    expected = {(i, pb.GRAD): Expected(n, wire_dtype, f"t{i}") for i, n in enumerate(numels)}
    out = [torch.empty(n, dtype=torch.float32) for n in numels]
    assembler = Assembler(expected)
    for raw in messages:
        meta, data = decode(raw, pb.PushRequest)
        for entry, _, offset, view in assembler.pieces(meta.segments, data):
            out[entry][offset:offset + view.numel()].copy_(view)
    assembler.finish()
    return out


def segments_of(messages):
    """(entry, offset, count) of every segment, per message."""
    return [[(s.entry, s.offset, s.count) for s in pb.PushRequest.FromString(m).segments] for m in messages]


# -- encode / decode ---------------------------------------------------------------------------------


def test_encode_then_decode_gives_back_the_fields_and_the_payload():
    payload = torch.arange(10, dtype=torch.float32)
    segs = [pb.Segment(entry=0, part=pb.GRAD, offset=0, count=10)]
    meta = pb.PushRequest(head=HEAD, segments=segs).SerializeToString()

    parsed, data = decode(encode(meta, [serde.tensor_bytes(payload)]), pb.PushRequest)

    assert parsed.head == HEAD
    assert list(parsed.segments) == segs
    assert torch.equal(serde.view_tensor(data, torch.float32), payload)


def test_an_encoded_message_parses_with_plain_protobuf():
    payload = torch.linspace(-1, 1, 33)
    segs = [pb.Segment(entry=0, part=pb.GRAD, offset=0, count=33)]
    meta = pb.PushRequest(head=HEAD, segments=segs).SerializeToString()

    msg = pb.PushRequest.FromString(encode(meta, [serde.tensor_bytes(payload)]))

    assert msg.head == HEAD
    assert list(msg.segments) == segs
    assert msg.data == payload.numpy().tobytes()


def test_a_payload_given_in_several_parts_is_concatenated():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0])

    msg = pb.PushRequest.FromString(encode(b"", [serde.tensor_bytes(a), serde.tensor_bytes(b)]))

    assert msg.data == torch.tensor([1.0, 2.0, 3.0]).numpy().tobytes()


@pytest.mark.parametrize("payload_bytes", [0, 4, 124, 128, 16380, 16384])
def test_the_payload_starts_16_byte_aligned_for_every_meta_size(payload_bytes):
    payload = bytes(range(256)) * (payload_bytes // 256) + bytes(payload_bytes % 256)
    misaligned = []
    for name_length in range(300):  # meta sizes 0..~310 bytes: every residue mod 16, 1- and 2-byte lengths
        meta = pb.PushRequest(head=pb.PushHead(client_id="c" * name_length)).SerializeToString() \
            if name_length else b""

        raw = encode(meta, [payload])

        parsed, data = decode(raw, pb.PushRequest)
        if (len(raw) - len(payload)) % 16 or bytes(data) != payload or \
                parsed.head.client_id != "c" * name_length or pb.PushRequest.FromString(raw).data != payload:
            misaligned.append(name_length)
    assert misaligned == []


@pytest.mark.parametrize("client_id", ["", "a", "ab", "abc", "abcd", "x" * 200])
def test_decode_reads_a_message_serialized_by_protobuf_without_padding(client_id):
    values = torch.linspace(-3, 3, 9)
    segs = [pb.Segment(entry=0, part=pb.GRAD, offset=0, count=9)]
    head = pb.PushHead(client_id=client_id, entries=[pb.PushEntry(key="w")])
    raw = pb.PushRequest(head=head, segments=segs, data=values.numpy().tobytes()).SerializeToString()

    (received,) = receive([raw], [9])

    assert pb.PushRequest.FromString(raw).pad == b""  # the foreign encoder wrote no padding
    assert decode(raw, pb.PushRequest)[0].head == head
    assert torch.equal(received, values)


def test_decode_of_a_message_without_data_gives_an_empty_payload():
    raw = pb.PushRequest(head=HEAD).SerializeToString()

    parsed, data = decode(raw, pb.PushRequest)

    assert parsed.head == HEAD
    assert len(data) == 0


def test_decode_refuses_a_field_that_runs_past_the_end():
    raw = encode(pb.PushRequest(head=HEAD).SerializeToString(), [bytes(64)])[:-1]

    with pytest.raises(RequestError) as err:
        decode(raw, pb.PushRequest)

    assert err.value.code == StatusCode.INVALID_ARGUMENT


def test_view_tensor_of_a_misaligned_buffer_reads_the_right_values():
    values = torch.tensor([1.5, -2.25, 3.0])
    buffer = b"\x00" + values.numpy().tobytes()

    t = serde.view_tensor(memoryview(buffer)[1:], torch.float32)

    assert torch.equal(t, values)
    assert t.data_ptr() % 4 == 0


# -- chunk_stream boundaries -------------------------------------------------------------------------


def test_an_empty_tensor_sends_one_message_with_the_head_and_no_segment():
    messages = list(stream([torch.empty(0)]))

    assert len(messages) == 1
    msg = pb.PushRequest.FromString(messages[0])
    assert msg.head == HEAD and list(msg.segments) == [] and msg.data == b""
    assert [t.numel() for t in receive(messages, [0])] == [0]


def test_no_tensors_at_all_still_send_one_message_with_the_head():
    messages = list(chunk_stream([], torch.float32, CHUNK, push_meta))

    assert [pb.PushRequest.FromString(m).head for m in messages] == [HEAD]


def test_a_tensor_of_exactly_one_chunk_is_one_message():
    t = torch.arange(256.0)

    messages = list(stream([t]))

    assert segments_of(messages) == [[(0, 0, 256)]]
    assert torch.equal(receive(messages, [256])[0], t)


def test_one_element_more_than_a_chunk_takes_a_second_message():
    t = torch.arange(257.0)

    messages = list(stream([t]))

    assert segments_of(messages) == [[(0, 0, 256)], [(0, 256, 1)]]
    assert torch.equal(receive(messages, [257])[0], t)


def test_one_element_less_than_a_chunk_is_one_message():
    t = torch.arange(255.0)

    messages = list(stream([t]))

    assert segments_of(messages) == [[(0, 0, 255)]]
    assert torch.equal(receive(messages, [255])[0], t)


def test_only_the_first_message_carries_the_head():
    messages = list(stream([torch.arange(600.0)]))

    assert [pb.PushRequest.FromString(m).HasField("head") for m in messages] == [True, False, False]


def test_many_small_tensors_are_packed_into_one_message():
    tensors = [torch.full((3,), float(i)) for i in range(5)]

    messages = list(stream(tensors))

    assert segments_of(messages) == [[(i, 0, 3) for i in range(5)]]
    assert all(torch.equal(r, t) for r, t in zip(receive(messages, [3] * 5), tensors))


def test_a_tensor_fills_the_rest_of_a_chunk_up_to_the_cut_grid_and_spills_into_the_next():
    tensors = [torch.arange(100.0), torch.arange(1000.0, 1300.0)]

    messages = list(stream(tensors))

    # 156 elements of room left: the second tensor is cut at 128, a multiple of CUT_ELEMENTS.
    assert segments_of(messages) == [[(0, 0, 100), (1, 0, 128)], [(1, 128, 172)]]
    assert all(torch.equal(r, t) for r, t in zip(receive(messages, [100, 300]), tensors))


def test_a_message_with_less_room_than_one_cut_is_closed_early():
    tensors = [torch.arange(200.0), torch.arange(1000.0, 1100.0)]

    messages = list(stream(tensors))

    assert segments_of(messages) == [[(0, 0, 200)], [(1, 0, 100)]]
    assert all(torch.equal(r, t) for r, t in zip(receive(messages, [200, 100]), tensors))


def test_chunk_bytes_below_one_cut_is_refused():
    with pytest.raises(ValueError, match="chunk_bytes"):
        list(stream([torch.arange(10.0)], chunk_bytes=CUT_ELEMENTS * 4 - 1))


def test_a_tensor_spans_many_chunks_in_order():
    t = torch.randn(256 * 5 + 3)

    messages = list(stream([t]))

    assert segments_of(messages) == [[(0, 256 * k, 256)] for k in range(5)] + [[(0, 1280, 3)]]
    assert torch.equal(receive(messages, [1283])[0], t)


def test_a_non_contiguous_tensor_is_sent_in_its_logical_order():
    t = torch.arange(24.0).reshape(4, 6).t()  # a transposed view

    (received,) = receive(stream([t]), [24])

    assert torch.equal(received, t.reshape(-1))


def test_every_message_payload_is_within_chunk_bytes():
    messages = list(stream([torch.randn(7), torch.randn(500), torch.randn(0), torch.randn(333)]))

    assert all(len(pb.PushRequest.FromString(m).data) <= CHUNK for m in messages)
    assert sum(len(pb.PushRequest.FromString(m).data) for m in messages) == 840 * 4


# -- Assembler refusals ------------------------------------------------------------------------------


def _assembler(numel=8):
    return Assembler({(0, pb.GRAD): Expected(numel, torch.float32, "w")})


def _seg(offset, count, entry=0, part=pb.GRAD):
    return pb.Segment(entry=entry, part=part, offset=offset, count=count)


def _refusal(fn) -> RequestError:
    with pytest.raises(RequestError) as err:
        fn()
    assert err.value.code == StatusCode.INVALID_ARGUMENT
    return err.value


def test_data_one_byte_short_of_the_segments_is_refused():
    assembler = _assembler()

    err = _refusal(lambda: list(assembler.pieces([_seg(0, 4)], memoryview(bytes(15)))))

    assert "holds 15 bytes but the segments describe 16" in err.message


def test_data_one_byte_longer_than_the_segments_is_refused():
    assembler = _assembler()

    err = _refusal(lambda: list(assembler.pieces([_seg(0, 4)], memoryview(bytes(17)))))

    assert "holds 17 bytes but the segments describe 16" in err.message


def test_a_gap_between_segments_is_refused():
    assembler = _assembler()
    list(assembler.pieces([_seg(0, 4)], memoryview(bytes(16))))

    err = _refusal(lambda: list(assembler.pieces([_seg(5, 3)], memoryview(bytes(12)))))

    assert "'w'" in err.message and "offset 5, expected 4" in err.message


def test_overlapping_segments_are_refused():
    assembler = _assembler()

    err = _refusal(lambda: list(assembler.pieces([_seg(0, 4), _seg(2, 4)], memoryview(bytes(32)))))

    assert "offset 2, expected 4" in err.message


def test_a_segment_beyond_the_tensor_is_refused():
    assembler = _assembler()
    list(assembler.pieces([_seg(0, 4)], memoryview(bytes(16))))

    err = _refusal(lambda: list(assembler.pieces([_seg(4, 5)], memoryview(bytes(20)))))

    assert "runs past the tensor's 8 elements" in err.message


def test_a_segment_for_an_undeclared_entry_is_refused():
    assembler = _assembler()

    err = _refusal(lambda: list(assembler.pieces([_seg(0, 4, entry=1)], memoryview(bytes(16)))))

    assert "entry 1" in err.message and "did not declare" in err.message


def test_a_segment_for_an_undeclared_part_is_refused():
    assembler = _assembler()

    err = _refusal(lambda: list(assembler.pieces([_seg(0, 4, part=pb.PARAM)], memoryview(bytes(16)))))

    assert "PARAM" in err.message and "did not declare" in err.message


def test_a_stream_that_ends_incomplete_is_refused_at_finish():
    assembler = _assembler()
    list(assembler.pieces([_seg(0, 4)], memoryview(bytes(16))))

    err = _refusal(assembler.finish)

    assert "'w'" in err.message and "after 4 of 8 elements" in err.message


def test_a_complete_stream_finishes_and_hands_out_the_values():
    values = torch.arange(8.0)
    assembler = _assembler()

    pieces = list(assembler.pieces([_seg(0, 3), _seg(3, 5)], memoryview(values.numpy().tobytes())))
    assembler.finish()

    assert [(o, v.tolist()) for _, _, o, v in pieces] == [(0, [0.0, 1.0, 2.0]),
                                                          (3, [3.0, 4.0, 5.0, 6.0, 7.0])]


# -- a tensor of more than 1 GiB ---------------------------------------------------------------------


def test_a_tensor_over_1_gib_chunks_and_reassembles_bit_exactly():
    n = 2**28 + 3  # 1 GiB + 12 bytes of float32: the last message holds 3 elements
    # Every element a distinct bit pattern (small normal and subnormal floats, no NaN), so a misplaced
    # or dropped element shows; compared as integers, bit for bit.
    bits = torch.arange(n, dtype=torch.int32)
    assembler = Assembler({(0, pb.GRAD): Expected(n, torch.float32, "huge")})
    destination = torch.empty(n, dtype=torch.float32)
    messages = 0

    # One message at a time: the generator builds the next only after this one was consumed.
    for raw in chunk_stream([Outgoing(0, pb.GRAD, bits.view(torch.float32))], torch.float32,
                            serde.DEFAULT_CHUNK_BYTES, push_meta):
        meta, data = decode(raw, pb.PushRequest)
        for _, _, offset, view in assembler.pieces(meta.segments, data):
            destination[offset:offset + view.numel()].copy_(view)
        messages += 1
        del raw, data
    assembler.finish()

    assert messages == 4 * n // serde.DEFAULT_CHUNK_BYTES + 1
    assert torch.equal(destination.view(torch.int32), bits)


# -- reduced-precision wire dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("wire_dtype, unit_roundoff",
                         [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_a_reduced_precision_wire_dtype_rounds_as_torch_does(wire_dtype, unit_roundoff):
    # Values within fp16's normal range (6.1e-5 .. 65504), over several chunks of the narrower dtype.
    t = torch.empty(1000).uniform_(0.5, 2.0) * torch.logspace(-3, 3, 1000)
    t[::3] *= -1

    (received,) = receive(stream([t], wire_dtype), [1000], wire_dtype)

    assert torch.equal(received, t.to(wire_dtype).float())
    assert not torch.equal(received, t)  # it was rounded
    # Round to nearest: relative error at most the unit roundoff (2**-p for p significant bits).
    assert ((received - t).abs() / t.abs()).max().item() <= unit_roundoff


@pytest.mark.parametrize("wire_dtype", [torch.bfloat16, torch.float16])
def test_a_reduced_precision_wire_dtype_packs_chunk_bytes_into_twice_the_elements(wire_dtype):
    messages = list(stream([torch.randn(1024)], wire_dtype))

    assert segments_of(messages) == [[(0, 0, 512)], [(0, 512, 512)]]


def test_an_unknown_wire_dtype_is_refused():
    with pytest.raises(RequestError) as err:
        serde.dtype_from_proto(99)

    assert err.value.code == StatusCode.INVALID_ARGUMENT


def test_adam_options_travel_as_hyper_params_and_back_unchanged():
    from optserve.hyper import AdamConfig

    cfg = AdamConfig(lr=0.25, beta1=0.5, beta2=0.75, eps=1e-8, weight_decay=0.125, weight_decouple=False,
                     absolute=True, optimized_update=False, amsgrad=True)

    assert serde.hyper_from_proto(serde.hyper_to_proto(cfg), "test") == cfg
    assert set(pb.HyperParams.DESCRIPTOR.fields_by_name) == set(serde._HYPER_FIELDS)


def test_options_out_of_range_on_the_wire_are_refused_naming_where():
    with pytest.raises(RequestError, match="hyper\\[0\\]: AdamConfig.lr") as err:
        serde.hyper_from_proto(pb.HyperParams(lr=-1.0, beta1=0.9, beta2=0.999), "hyper[0]")

    assert err.value.code == StatusCode.INVALID_ARGUMENT


# -- segment bounds (issue 13: empty segments were CPU bought cheaply) ---------------------------------


class _Untouchable(list):
    """Segments whose count is known but that must not be looked at one by one."""

    def __iter__(self):
        raise AssertionError("a segment was looked at before the count was bounded")

    __getitem__ = __iter__


def test_more_segments_than_declared_tensors_plus_slack_are_refused_before_any_is_looked_at():
    expected = {(0, pb.GRAD): Expected(8, torch.float32, "w")}
    segments = _Untouchable([pb.Segment(entry=0, part=pb.GRAD)] * (2 + serde.SEGMENT_SLACK))

    with pytest.raises(RequestError) as err:
        Assembler(expected).plan(segments, 0)
    assert err.value.code == StatusCode.RESOURCE_EXHAUSTED and "segments" in err.value.message


def test_the_segment_bound_holds_for_the_whole_request_not_each_message():
    expected = {(0, pb.GRAD): Expected(1000, torch.float32, "w")}
    assembler = Assembler(expected)
    empty = [pb.Segment(entry=0, part=pb.GRAD, offset=0, count=0)]
    for _ in range(serde.SEGMENT_SLACK // 2):  # each message alone is well within its bound
        assembler.plan(empty * 3, 0)  # 3 segments a message: the request's bound is 1 a message + slack

    with pytest.raises(RequestError) as err:
        assembler.plan(empty * 3, 0)
    assert err.value.code == StatusCode.RESOURCE_EXHAUSTED


def test_what_chunk_stream_sends_is_within_the_segment_bound(monkeypatch):
    monkeypatch.setattr(serde, "MAX_SEGMENTS_PER_MESSAGE", 4)
    items = [Outgoing(i, pb.GRAD, torch.ones(n)) for i, n in enumerate([1, 2, 3, 5000, 1, 1, 7, 1, 1, 1, 1])]
    messages = list(chunk_stream(items, torch.float32, 4 * CUT_ELEMENTS * 2, lambda segs, first: pb.PushRequest(
        segments=segs).SerializeToString()))
    assembler = Assembler({(i, pb.GRAD): Expected(t.tensor.numel(), torch.float32, str(i))
                           for i, t in enumerate(items)})

    for raw in messages:
        meta, data = decode(raw, pb.PushRequest)
        assert len(meta.segments) <= 4
        assembler.plan(meta.segments, len(data))
    assembler.finish()


def test_decode_refuses_a_message_of_too_many_fields_with_resource_exhausted():
    meta = pb.PushRequest(segments=[pb.Segment()] * (serde.MAX_SEGMENTS_PER_MESSAGE + 17)).SerializeToString()

    with pytest.raises(RequestError) as err:
        decode(encode(meta, [b""]), pb.PushRequest)
    assert err.value.code == StatusCode.RESOURCE_EXHAUSTED
