"""The shard's table of applied pushes (server/store.py Dedupe): each (client_id, seq) once, a window."""
from __future__ import annotations

import grpc
import pytest

from optserve.serde import RequestError
from optserve.server.store import Dedupe, PushResult


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
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


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
