"""Replication's small pieces (server/replication.py, client/transport.py): the replica set's
configuration, the replication frame's meta, a worker's replica list, and a backup's refusals."""
from __future__ import annotations

import pytest

from optserve.client.transport import ShardClient
from optserve.errors import NOT_PRIMARY, STALE_EPOCH, RequestError, StatusCode
from optserve.frames import FORWARD, HEARTBEAT
from optserve.server.main import ServerConfig
from optserve.server.replication import BACKUP, ReplicaConfig, Replicator, pack_meta, unpack_meta


def test_a_replica_set_is_two_distinct_addresses_and_an_index_among_them():
    assert ReplicaConfig(("a:1", "b:2"), 1).peer == "a:1"
    with pytest.raises(ValueError, match="exactly 2 replicas"):
        ReplicaConfig(("a:1", "b:2", "c:3"), 0)
    with pytest.raises(ValueError, match="twice"):
        ReplicaConfig(("a:1", "a:1"), 0)
    with pytest.raises(ValueError, match="replica-index"):
        ReplicaConfig(("a:1", "b:2"), 2)
    with pytest.raises(ValueError, match="data port"):
        ServerConfig(replicas="a:1,b:2", data_port=-1)


def test_replication_meta_round_trips_and_refuses_garbage():
    header, message = unpack_meta(pack_meta({"op": "push", "epoch": 3, "index": 9}, b"\x01\x02"))
    assert header == {"op": "push", "epoch": 3, "index": 9} and message == b"\x01\x02"
    for bad in (b"", b"\x05\x00\x00\x00{no", b"\x02\x00\x00\x00[]"):
        with pytest.raises(RequestError) as info:
            unpack_meta(bad)
        assert info.value.code == StatusCode.INVALID_ARGUMENT


def test_a_worker_names_a_replicated_shard_by_its_replicas_joined_with_a_bar():
    client = ShardClient("127.0.0.1:1|127.0.0.1:2", data_channel=False)
    try:
        assert client.replicas == ["127.0.0.1:1", "127.0.0.1:2"] and client.address == "127.0.0.1:1"
        client._next_replica(client._current)
        assert client.address == "127.0.0.1:2"
        client._next_replica(client._endpoints[0])  # a stale failure (another call moved on): stays
        assert client.address == "127.0.0.1:2"
    finally:
        client.close()
    with pytest.raises(ValueError, match="distinct"):
        ShardClient("127.0.0.1:1|127.0.0.1:1")


class _Core:
    class store:  # noqa: N801 - a stand-in for the store the replicator wakes
        @staticmethod
        def wake():
            pass


def test_a_backup_refuses_workers_and_forwards_of_another_epoch_without_changing_anything():
    rep = Replicator(_Core(), ReplicaConfig(("127.0.0.1:1", "127.0.0.1:2"), 1), 0, 1)
    rep.role, rep.epoch, rep.index, rep.primary = BACKUP, 4, 10, "127.0.0.1:1"
    with pytest.raises(RequestError) as info:
        rep.check_serving()
    assert (info.value.code, info.value.reason) == (StatusCode.UNAVAILABLE, NOT_PRIMARY)
    assert "127.0.0.1:1" in info.value.message
    rep.check_serving(read=True)  # a backup answers pulls
    for kind, header in ((FORWARD, {"op": "push", "epoch": 3, "index": 11}), (HEARTBEAT, {"epoch": 5})):
        with pytest.raises(RequestError) as info:
            rep.serve(None, kind, pack_meta(header), None, None)
        assert info.value.reason == STALE_EPOCH
    with pytest.raises(RequestError) as info:  # a gap: operations missing here
        rep.serve(None, FORWARD, pack_meta({"op": "push", "epoch": 4, "index": 12}), None, None)
    assert info.value.reason == STALE_EPOCH
    assert (rep.role, rep.epoch, rep.index) == (BACKUP, 4, 10)


def test_the_environment_names_replicated_shards_with_bars():
    from optserve.client.discovery import servers_from_env
    assert servers_from_env({"OPTSERVE_SERVERS": "a:1|b:2,c:3|d:4"}) == ["a:1|b:2", "c:3|d:4"]


def test_a_replica_keeps_its_epoch_in_its_checkpoint_dir_and_never_goes_on_from_older_state(tmp_path):
    """The state file (atomic JSON) carries the epoch across a restart; a file that is not one stops
    the start; a deposed replica whose restarted peer held a later epoch is blocked, not promoted."""
    from optserve.proto.optserve.v1 import optserve_pb2 as pb
    from optserve.server.replication import DEPOSED, JOINING, PRIMARY, STATE_FILE

    def replica(index: int) -> Replicator:
        return Replicator(_Core(), ReplicaConfig(("127.0.0.1:1", "127.0.0.1:2"), index,
                                                 state_dir=str(tmp_path / f"r{index}")), 0, 1)

    rep = replica(1)
    assert rep.epoch == 0 and not (tmp_path / "r1" / STATE_FILE).exists()
    rep.role, rep.epoch = PRIMARY, 2
    rep._save_epoch()
    assert [p.name for p in (tmp_path / "r1").iterdir()] == [STATE_FILE]  # no temporary file left
    again = replica(1)
    assert (again.role, again.epoch) == (JOINING, 2)
    old = replica(0)
    old.role, old.epoch = DEPOSED, 1
    why = old._lost_epoch(DEPOSED, pb.Replication(role=JOINING, epoch=2))
    assert "127.0.0.1:2 held epoch 2" in why and STATE_FILE in why
    assert again._lost_epoch(JOINING, pb.Replication(role=DEPOSED, epoch=1))
    assert again._lost_epoch(JOINING, pb.Replication(role=PRIMARY, epoch=1))  # a primary unaware it was replaced
    assert not old._lost_epoch(DEPOSED, pb.Replication(role=JOINING, epoch=1))  # the backup came back
    assert not again._lost_epoch(JOINING, pb.Replication(role=PRIMARY, epoch=3))
    (tmp_path / "r1" / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a replica state file"):
        replica(1)


def test_a_takeover_whose_state_file_cannot_be_written_does_not_happen(tmp_path, monkeypatch):
    from optserve.server import replication

    def refuse(path, obj):
        raise OSError("disk full (test)")

    rep = Replicator(_Core(), ReplicaConfig(("127.0.0.1:1", "127.0.0.1:2"), 1, state_dir=str(tmp_path)), 0, 1)
    rep.role, rep.epoch, rep.primary = BACKUP, 1, "127.0.0.1:1"
    monkeypatch.setattr(replication, "write_json_atomic", refuse)
    with pytest.raises(OSError, match="disk full"):
        rep._take_over("test")
    assert (rep.role, rep.epoch, rep.solo) == (BACKUP, 1, False)  # it acknowledges nothing alone


def test_the_watcher_logs_a_failure_once_until_it_changes_or_passes(caplog):
    """A peer that stays unreachable fails every tick (every 0.2 s at most): the watcher says so once,
    then again only when the failure is another one, or comes back after a tick that passed."""
    import logging
    import threading

    rep = Replicator(_Core(), ReplicaConfig(("127.0.0.1:1", "127.0.0.1:2"), 1, timeout=0.1), 0, 1)
    outcomes = [OSError("refused")] * 8 + [OSError("reset")] * 8 + [None] + [OSError("refused")] * 8
    ticks = iter(outcomes)
    done = threading.Event()
    calls = [0]

    def counted():
        calls[0] += 1
        if calls[0] >= len(outcomes):
            done.set()
        outcome = next(ticks, None)
        if outcome is not None:
            raise outcome

    rep._tick = counted
    caplog.set_level(logging.DEBUG, logger="optserve.server")
    thread = threading.Thread(target=rep._watch)
    thread.start()
    try:
        assert done.wait(30)
    finally:
        rep._stop.set()
        thread.join()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 3, errors  # refused, reset, refused again after a tick that passed


def test_a_backup_ahead_of_its_primary_shows_no_lag():
    """With forwards pipelined the backup may answer an operation before the primary has finished
    applying it (the primary's count is one behind for a moment): Hello must not fail then."""
    from optserve.server.replication import PRIMARY

    rep = Replicator(_Core(), ReplicaConfig(("127.0.0.1:1", "127.0.0.1:2"), 0), 0, 1)
    rep.role, rep.epoch, rep.index, rep._backup_in_sync, rep._backup_index = PRIMARY, 1, 4, True, 5
    assert rep.describe().peers[0].lag == 0
    rep._backup_index = 2
    assert rep.describe().peers[0].lag == 2
