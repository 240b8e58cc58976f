"""The shard's table of applied pushes (server/dedupe.py): each (client_id, seq) once, a window."""
from __future__ import annotations

import tracemalloc

import pytest

from optserve.errors import RequestError, StatusCode
from optserve.server.dedupe import BYTES_PER_KEY, CLIENT_BYTES, RECORD_BYTES, Dedupe, PushResult


def result(seq: int) -> PushResult:
    return PushResult(versions=[seq], staleness=[0])


def applied(table: Dedupe, client: str, seqs) -> None:
    for seq in seqs:
        assert table.begin(client, seq) is None
        table.finish(client, seq, result(seq))


def test_a_retry_gets_the_original_result():
    table = Dedupe(window=8)
    applied(table, "a", [1, 2])

    assert table.begin("a", 2) == result(2)
    assert table.begin("b", 2) is None  # another client's seq 2 is another push


def test_results_beyond_the_window_are_forgotten_and_their_retries_refused():
    table = Dedupe(window=3)
    applied(table, "a", [1, 2, 3, 4, 5])

    assert [table.begin("a", s) for s in (3, 4, 5)] == [result(3), result(4), result(5)]
    for old in (1, 2):
        with pytest.raises(RequestError) as err:
            table.begin("a", old)
        assert err.value.code == StatusCode.FAILED_PRECONDITION


def test_the_window_keeps_the_newest_seqs_when_pushes_finish_out_of_order():
    table = Dedupe(window=3)
    for seq in (1, 2, 3, 4, 5):
        assert table.begin("a", seq) is None
    for seq in (5, 2, 4, 1, 3):
        table.finish("a", seq, result(seq))

    assert [table.begin("a", s) for s in (3, 4, 5)] == [result(3), result(4), result(5)]
    with pytest.raises(RequestError):
        table.begin("a", 2)


def test_an_aborted_push_is_applied_anew_on_retry():
    table = Dedupe(window=3)
    assert table.begin("a", 1) is None
    table.abort("a", 1)

    assert table.begin("a", 1) is None


def test_the_window_survives_a_checkpoint_round_trip():
    table = Dedupe(window=3)
    applied(table, "a", [1, 2, 3])
    restored = Dedupe(window=3)
    restored.load_json(table.to_json())

    applied(restored, "a", [4])

    assert restored.begin("a", 4) == result(4) and restored.begin("a", 2) == result(2)
    with pytest.raises(RequestError):
        restored.begin("a", 1)


def test_a_retry_that_is_another_push_under_the_same_seq_is_refused():
    table = Dedupe()
    assert table.begin("a", 1, fingerprint=11) is None
    table.finish("a", 1, result(1))

    assert table.begin("a", 1, fingerprint=11) == result(1)
    with pytest.raises(RequestError, match="share the client id") as err:
        table.begin("a", 1, fingerprint=12)
    assert err.value.code == StatusCode.FAILED_PRECONDITION


def test_idle_clients_are_forgotten_but_not_while_a_push_of_theirs_is_in_flight():
    now = [0.0]
    table = Dedupe(idle_seconds=100, clock=lambda: now[0])
    applied(table, "idle", [1])
    assert table.begin("busy", 1) is None  # in flight across the sweep
    now[0] = 150.0
    applied(table, "active", [1])  # a finish sweeps

    assert len(table) == 2 and table.begin("idle", 1) is None  # forgotten: seq 1 is new to it
    table.finish("busy", 1, result(1))
    assert table.begin("busy", 1) == result(1)


def test_a_checkpoint_keeps_the_newest_results_and_the_floor_below_them():
    table = Dedupe(window=100, kept=2)
    applied(table, "a", [1, 2, 3, 4])
    assert table.begin("refused-only", 1) is None
    table.abort("refused-only", 1)
    saved = table.to_json()
    restored = Dedupe(window=100, kept=2)
    restored.load_json(saved)

    assert set(saved["clients"]) == {"a"}
    assert restored.begin("a", 3) == result(3) and restored.begin("a", 4) == result(4)
    with pytest.raises(RequestError):
        restored.begin("a", 2)  # below the saved floor: refused, never applied twice


def test_records_without_a_fingerprint_from_a_format_1_checkpoint_answer_any_retry():
    table = Dedupe()
    table.load_json({"floor": {}, "clients": {"a": {"1": {"versions": [1], "staleness": [0], "dropped": []}}}})

    assert table.begin("a", 1, fingerprint=1234) == result(1)


def test_a_checkpoint_floor_stays_below_a_push_still_in_flight():
    """Seq 1 is in flight while 2..5 finish: a checkpoint then must let seq 1's retry through after
    a restart (it was never applied), and still know 2..5."""
    table = Dedupe(kept=2)
    assert table.begin("a", 1) is None
    applied(table, "a", [2, 3, 4, 5])
    restored = Dedupe(kept=2)
    restored.load_json(table.to_json())

    assert restored.begin("a", 1) is None
    assert [restored.begin("a", s) for s in (2, 3, 4, 5)] == [result(s) for s in (2, 3, 4, 5)]


# --- the memory cap (issue 13): what the table holds is bounded, retries within the window answered --

def _pushes(table: Dedupe, client: str, seqs, keys: int = 1) -> None:
    for seq in seqs:
        assert table.begin(client, seq, keys=keys) is None
        table.finish(client, seq, PushResult([seq] * keys, [0] * keys))


def _room_for(records: int, keys: int = 1, clients: int = 1, name: str = "a") -> int:
    return clients * (CLIENT_BYTES + len(name)) + records * (RECORD_BYTES + BYTES_PER_KEY * keys)


def test_one_client_pushing_many_keys_and_seqs_stays_under_the_cap():
    now = [0.0]
    table = Dedupe(max_bytes=_room_for(10, keys=4096), retry_seconds=60, clock=lambda: now[0])
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    for seq in range(1, 201):  # 200 results of 4,096 keys: ~19 MiB without the cap
        now[0] += 10.0
        _pushes(table, "a", [seq], keys=4096)
        assert table.bytes <= table.max_bytes
    held = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    assert held <= table.max_bytes  # what it counts covers what it holds
    assert table.begin("a", 200, keys=4096).versions == [200] * 4096  # the newest: answered


def test_at_the_cap_results_past_the_retry_window_are_forgotten_and_their_retries_refused():
    now = [0.0]
    table = Dedupe(max_bytes=_room_for(3), retry_seconds=60, clock=lambda: now[0])
    _pushes(table, "a", [1, 2, 3])
    now[0] = 61.0
    _pushes(table, "a", [4])  # makes room by forgetting seq 1, recorded 61 s ago

    assert table.begin("a", 4) == result(4) and table.begin("a", 2) == result(2)
    with pytest.raises(RequestError) as err:
        table.begin("a", 1)  # forgotten: refused, never applied a second time
    assert err.value.code == StatusCode.FAILED_PRECONDITION


def test_at_the_cap_with_every_result_recent_a_new_push_is_refused_and_retries_still_answered():
    now = [0.0]
    table = Dedupe(max_bytes=_room_for(3), retry_seconds=60, clock=lambda: now[0])
    _pushes(table, "a", [1, 2, 3])
    now[0] = 59.0

    with pytest.raises(RequestError) as err:
        table.begin("a", 4)
    assert err.value.code == StatusCode.RESOURCE_EXHAUSTED and "exactly-once table is full" in err.value.message
    with pytest.raises(RequestError) as err:
        table.begin("new-client", 1)
    assert err.value.code == StatusCode.RESOURCE_EXHAUSTED
    assert [table.begin("a", s) for s in (1, 2, 3)] == [result(1), result(2), result(3)]  # every retry answered
    now[0] = 61.0
    _pushes(table, "a", [4])  # the oldest aged out of the window: room again


def test_clients_forgotten_at_the_cap_make_room_for_new_clients():
    now = [0.0]
    table = Dedupe(max_bytes=_room_for(1, clients=5, name="client-0") + _room_for(4, clients=0),
                   retry_seconds=60, clock=lambda: now[0])
    for c in range(5):
        _pushes(table, f"client-{c}", [1])
    for c in range(5, 20):  # each new client makes room by forgetting old ones, results and all
        now[0] += 100.0
        _pushes(table, f"client-{c}", [1])
        assert table.bytes <= table.max_bytes
    assert len(table) <= 5


def test_a_refused_push_of_a_new_client_leaves_nothing_behind():
    table = Dedupe()
    empty = table.bytes
    assert table.begin("once", 1, keys=10) is None
    table.abort("once", 1)
    assert table.bytes == empty and len(table) == 0


def test_the_count_returns_to_empty_when_every_client_is_forgotten_after_a_restore():
    now = [0.0]
    restored = Dedupe(idle_seconds=100, clock=lambda: now[0])
    restored.load_json({"floor": {"a": 3}, "clients": {}})  # a client remembered by its floor alone
    _pushes(restored, "a", [4], keys=5)
    now[0] = 500.0
    _pushes(restored, "b", [1])  # a finish sweeps: "a" is forgotten
    assert restored.bytes == _room_for(1, name="b")
