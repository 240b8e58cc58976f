"""Replicated shards (issue 15): a SIGKILL loses no acknowledged update, failover keeps exactly-once,
a killed backup rejoins bitwise equal, a partition leaves at most one replica acknowledging per
epoch, and replication works with TLS, the token and the sync policy with backup workers.

Replicas run as `optserve serve` processes (tests/system/test_durability.py's launcher and state
readers) except in the partition test, which cuts the link between two in-process replicas with
`Replicator.partitioned` (the test's hook: forwards and heartbeats fail, the peer's frames are
refused, Hello to the peer fails). Waits are on Hello's replication state or on the workers, with
test_durability's hang guard only; --replica-timeout is 2 s so that failovers are quick.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from optserve import RemoteAdam
from optserve.client.transport import RetryPolicy, Security, ShardClient, ShardError
from optserve.frames import FORWARD, PROVISIONAL
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.server import replication
from optserve.server.main import ServerConfig, Shard
from test_durability import (ENV, HANG_GUARD, OPTSERVE, ShardProcess, Shards, _digest, kill, replay,
                             shard_state, synthetic_step, tiny_model, wait_for)

pytestmark = pytest.mark.system
TIMEOUT = "2.0"  # --replica-timeout: quick failovers, yet no failover of its own on a loaded machine


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class ReplicaSet:
    """Replica processes of `num_shards` shard indices x 2, each with its own apply log."""

    def __init__(self, shards: Shards, tmp_path: Path, num_shards: int, extra=(), security=None,
                 die_after: dict[tuple[int, int], int] | None = None, die_at: str = "FORWARDS"):
        """die_after[(s, r)] = K: that replica runs replica_killer.py and dies in its K-th forward
        (die_at "FORWARDS") or right after its K-th provisional reply ("PROVISIONAL")."""
        self.shards, self.security = shards, security
        self.die_after = die_after or {}
        self.die_at = die_at
        ports = free_ports(2 * num_shards)
        self.addresses = [[f"127.0.0.1:{ports[2 * s + r]}" for r in range(2)] for s in range(num_shards)]
        self.logs = [[tmp_path / f"apply{s}-{r}.jsonl" for r in range(2)] for s in range(num_shards)]
        self.procs: list[list[ShardProcess]] = [[None, None] for _ in range(num_shards)]
        for s in range(num_shards):
            for r in range(2):
                args = ("--shard-index", str(s), "--num-shards", str(num_shards),
                        "--replicas", ",".join(self.addresses[s]), "--replica-index", str(r),
                        "--replica-timeout", TIMEOUT, "--apply-log", str(self.logs[s][r]), *extra)
                log = tmp_path / f"shard{s}-{r}.log"
                self.procs[s][r] = ShardProcess(self._launch(s, r, log, args, self.die_after.get((s, r))),
                                                self.addresses[s][r], log, args)
        for s in range(num_shards):
            for r in range(2):
                assert shards._listening(self.procs[s][r].proc, self.procs[s][r].log) == self.addresses[s][r]

    @property
    def servers(self) -> list[str]:
        return ["|".join(a) for a in self.addresses]

    def hello(self, address: str) -> pb.Replication | None:
        client = ShardClient(address, timeout=10.0, retry=RetryPolicy(budget=0), security=self.security,
                             data_channel=False)
        try:
            return client.hello().replication
        except ShardError:
            return None
        finally:
            client.close()

    def primary(self, s: int) -> int:
        """The replica (0 or 1) of shard index s that is primary with its backup in sync."""
        for r in range(2):
            rep = self.hello(self.addresses[s][r])
            if rep is not None and rep.role == "primary" and rep.peers and rep.peers[0].in_sync:
                return r
        return -1

    def wait_in_sync(self, s: int) -> int:
        wait_for(lambda: self.primary(s) >= 0, f"shard {s}'s replicas in sync")
        return self.primary(s)

    def _launch(self, s: int, r: int, log: Path, args, die_after: int | None) -> subprocess.Popen:
        command, env = OPTSERVE, ENV
        if die_after is not None:
            command = [sys.executable, str(Path(__file__).with_name("replica_killer.py"))]
            env = {**ENV, f"OPTSERVE_TEST_DIE_AFTER_{self.die_at}": str(die_after)}
        port = self.addresses[s][r].rsplit(":", 1)[1]
        with open(log, "ab") as err:
            proc = subprocess.Popen([*command, "serve", "--port", port, *args], stdout=subprocess.PIPE,
                                    stderr=err, text=True, env=env)
        self.shards.procs.append(proc)  # killed at teardown
        return proc

    def restart(self, s: int, r: int) -> None:
        """The replica again (plain `optserve serve`), after its process ended; a marker line in its
        apply log separates its lives."""
        old = self.procs[s][r]
        assert old.proc.wait(HANG_GUARD) is not None
        with open(self.logs[s][r], "a") as f:
            f.write(json.dumps({"restart": True}) + "\n")
        proc = self._launch(s, r, old.log, old.args, None)
        assert self.shards._listening(proc, old.log) == old.address
        self.procs[s][r] = ShardProcess(proc, old.address, old.log, old.args)

    def state(self, s: int, r: int) -> dict:
        return shard_state(self.addresses[s][r])


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lives(path: Path) -> list[list[dict]]:
    """A replica's apply log, cut at its restarts."""
    out = [[]]
    for line in log_lines(path):
        if line.get("restart"):
            out.append([])
        else:
            out[-1].append(line)
    return out


def stitch(before: list[dict], after: list[dict]) -> list[dict]:
    """A shard index's history across a failover: `before`, the old primary's pushes from the start
    (it was in sync from the first push), then `after`, the pushes of the replica that joined it
    (the joined state is the old primary's up to where `after` begins: its first push, when the old
    primary forwarded or had applied it, or else the old primary's end)."""
    ids = [(x["client_id"], x["seq"]) for x in before]
    first = next((ids.index((x["client_id"], x["seq"])) for x in after if (x["client_id"], x["seq"]) in ids),
                 len(before))
    return before[:first] + after


@pytest.fixture
def shards(tmp_path):
    s = Shards(tmp_path)
    try:
        yield s
    finally:
        s.close()


def run_workers(n: int, steps: int, servers: list[str], on_step=None, until_version: int = 0,
                **options) -> list[int]:
    """n worker threads, each `steps` synthetic steps through RemoteAdam (test_durability's gradients;
    with `until_version`, until its keys reach that version instead: sync with backup workers, where a
    worker left alone at the end would wait for a round no one completes); returns each worker's
    acknowledged steps. `on_step(total)` runs after every acknowledged step."""
    done, errors, lock = [0] * n, [], threading.Lock()

    def work(w: int) -> None:
        try:
            model = tiny_model()
            with RemoteAdam(model.named_parameters(), servers, lr=0.01, client_id=f"worker-{w}",
                            retry_budget=HANG_GUARD, timeout=60.0, **options) as opt:
                step = 0
                while (min(opt.versions.values()) < until_version) if until_version else step < steps:
                    synthetic_step(model, opt, w, step)
                    step += 1
                    with lock:
                        done[w] += 1
                        total = sum(done)
                    if on_step is not None:
                        on_step(total)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
    assert not errors, errors
    return done


WORKERS, STEPS = 4, 200


def test_sigkills_of_primaries_mid_forward_and_mid_push_lose_no_acknowledged_push(shards, tmp_path):
    """4 workers x 200 steps on 2 shard indices x 2 replicas. Shard 0's first primary kills itself in
    the middle of a forward (replica_killer.py: the frame sent, the answer not read) and is restarted;
    once it has rejoined, the new primary is SIGKILLed at a random step (mid-push, most likely) and
    restarted; shard 1's primary is SIGKILLed once at a random step. Afterwards: every key's step is
    the number of acknowledged pushes, each index's history (apply logs, stitched across the
    failovers) has every (client, seq) once and replays bitwise to the final state, and both replicas
    of each index are bitwise equal."""
    rng = random.Random()
    total = WORKERS * STEPS
    rs = ReplicaSet(shards, tmp_path, 2, die_after={(0, 0): rng.randrange(total // 8, total // 4)})
    assert [rs.wait_in_sync(s) for s in range(2)] == [0, 0]  # a cold start: the first replica begins
    second_kill, shard1_kill = rng.randrange(total // 2, 3 * total // 4), rng.randrange(total // 8, total // 2)
    events: list[str] = []
    stop = threading.Event()
    progress = [0]

    def on_step(done: int) -> None:
        progress[0] = done

    def chaos() -> None:  # restarts the self-killed replica; kills at the chosen steps; restarts those
        while not stop.is_set():
            if "0/0 died" not in events and rs.procs[0][0].proc.poll() is not None:
                events.append("0/0 died")
                events.append(f"0/0 exit {rs.procs[0][0].proc.returncode}")  # its own SIGKILL: -9
                rs.restart(0, 0)
            if "1/0 killed" not in events and progress[0] >= shard1_kill:
                kill(rs.procs[1][0])
                events.append("1/0 killed")
                rs.restart(1, 0)
            if "0/1 killed" not in events and "0/0 died" in events and progress[0] >= second_kill \
                    and rs.primary(0) == 1:  # only once the first victim is back in sync
                kill(rs.procs[0][1])
                events.append("0/1 killed")
                rs.restart(0, 1)
            stop.wait(0.02)

    thread = threading.Thread(target=chaos)
    thread.start()
    try:
        done = run_workers(WORKERS, STEPS, rs.servers, on_step=on_step)
    finally:
        stop.set()
        thread.join()
    assert done == [STEPS] * WORKERS
    assert set(events) == {"0/0 died", f"0/0 exit {-signal.SIGKILL}", "1/0 killed", "0/1 killed"}, events

    names = [n for n, _ in tiny_model().named_parameters()]
    histories = {0: stitch(lives(rs.logs[0][1])[0], lives(rs.logs[0][0])[-1]),
                 1: log_lines(rs.logs[1][1])}
    final = {}
    for s in range(2):
        assert rs.wait_in_sync(s) == (0 if s == 0 else 1)
        states = [rs.state(s, r) for r in range(2)]
        assert states[0] == states[1]  # bitwise, after the rejoins
        history = histories[s]
        pushes = Counter((line["client_id"], line["seq"]) for line in history)
        assert max(pushes.values()) == 1  # no push applied twice
        assert Counter(c.split("/")[0] for c, _ in pushes) == {f"worker-{w}": STEPS for w in range(WORKERS)}
        path = tmp_path / f"history{s}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in history))
        assert replay(path, sorted(states[0])) == states[0]
        final.update(states[0])
        assert rs.hello(rs.addresses[s][0]).epoch == (3 if s == 0 else 2)
    assert {k: v["step"] for k, v in final.items()} == {n: WORKERS * STEPS for n in names}


def test_a_killed_backup_stops_the_primary_until_it_rejoins_then_both_are_bitwise_equal(shards, tmp_path):
    """The documented rule: a primary that cannot reach its backup for the timeout stops acknowledging
    (it cannot tell a crash from a partition, in which the backup takes over). The backup restarted,
    the primary takes it back (at a new epoch) after a state transfer, and training goes on."""
    rs = ReplicaSet(shards, tmp_path, 1)
    primary = rs.wait_in_sync(0)
    backup = 1 - primary
    killed = threading.Event()
    deposed = threading.Event()

    def on_step(done: int) -> None:
        if done == 60 and not killed.is_set():
            killed.set()
            kill(rs.procs[0][backup])
            wait_for(lambda: (rs.hello(rs.addresses[0][primary]) or pb.Replication()).role == "deposed",
                     "the primary to stop acknowledging")
            deposed.set()
            rs.restart(0, backup)

    done = run_workers(2, 80, rs.servers, on_step=on_step)
    assert done == [80, 80] and deposed.is_set()
    assert rs.wait_in_sync(0) == primary  # re-promoted with its state; the empty backup joined it
    rep = rs.hello(rs.addresses[0][primary])
    assert rep.epoch == 2 and rep.peers[0].lag == 0
    states = [rs.state(0, r) for r in range(2)]
    assert states[0] == states[1]
    assert {k: v["step"] for k, v in states[0].items()} == {n: 160 for n, _ in tiny_model().named_parameters()}
    lines = log_lines(rs.logs[0][primary])
    assert max(Counter((x["client_id"], x["seq"]) for x in lines).values()) == 1
    assert replay(rs.logs[0][primary], sorted(states[0])) == states[0]


def _security_module():
    path = Path(__file__).resolve().parent.parent / "service" / "test_security.py"
    spec = importlib.util.spec_from_file_location("optserve_test_security", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replication_with_tls_token_and_sync_with_a_backup_worker_survives_a_primary_sigkill(
        shards, tmp_path, monkeypatch):
    """TLS on both doors and between the replicas, a token, sync with 3 workers and 1 backup worker:
    the primary is SIGKILLed mid-run; the workers finish, and both replicas end bitwise equal."""
    ca = _security_module().CA("optserve replication CA")
    cert, key = ca.issue("shard", server=True)
    for name, data in {"ca.pem": ca.pem, "shard.pem": cert, "shard.key": key, "token": b"s3cret-token"}.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setenv("OPTSERVE_TLS_CA", str(tmp_path / "ca.pem"))  # this process's clients (from_env)
    monkeypatch.setenv("OPTSERVE_TOKEN", "s3cret-token")
    rs = ReplicaSet(shards, tmp_path, 1, security=Security.from_env(),
                    extra=("--policy", "sync", "--workers", "3", "--backup-workers", "1",
                           "--tls-cert", str(tmp_path / "shard.pem"), "--tls-key", str(tmp_path / "shard.key"),
                           "--replica-ca", str(tmp_path / "ca.pem"), "--token-file", str(tmp_path / "token")))
    primary = rs.wait_in_sync(0)
    killer = threading.Thread(target=lambda: (kill(rs.procs[0][primary]), rs.restart(0, primary)))

    def on_step(done: int) -> None:  # no worker waits for the kill: a round needs 2 of them
        if done == 30:
            killer.start()

    target = 30
    done = run_workers(3, 0, rs.servers, on_step=on_step, until_version=target)
    killer.join(HANG_GUARD)
    assert sum(done) >= 2 * target
    assert rs.wait_in_sync(0) == 1 - primary
    states = [rs.state(0, r) for r in range(2)]
    assert states[0] == states[1]
    assert {k: v["step"] for k, v in states[0].items()} == {n: target for n, _ in tiny_model().named_parameters()}


def test_a_partition_leaves_at_most_one_replica_acknowledging_per_epoch(tmp_path, monkeypatch, caplog):
    """The link between primary and backup is cut while a worker pushes: the primary stops
    acknowledging (deposed) once its forwards fail for the timeout, the backup takes over at a new
    epoch; every acknowledged push came from one replica per epoch. After the partition heals the old
    primary rejoins while the worker goes on pushing (the state transfer is held until 5 more steps
    were acknowledged; they reach the joiner after the state), and both end bitwise equal with every
    acknowledged push applied once."""
    progress = [0]
    hold, joining = threading.Event(), threading.Event()
    real_write = replication.write_checkpoint

    def slow_write(*args, **kwargs):  # the rejoin's state transfer: held while pushes go on
        if not hold.is_set():  # the first join, at the start
            return real_write(*args, **kwargs)
        joining.set()
        start = progress[0]
        wait_for(lambda: progress[0] >= start + 5, "pushes during the state transfer")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(replication, "write_checkpoint", slow_write)
    caplog.set_level(logging.INFO, logger="optserve.server")
    ports = free_ports(2)
    replicas = ",".join(f"127.0.0.1:{p}" for p in ports)
    cfgs = [ServerConfig(port=p, replicas=replicas, replica_index=i, replica_timeout=float(TIMEOUT),
                         apply_log=str(tmp_path / f"apply{i}.jsonl")) for i, p in enumerate(ports)]
    shards_ = [Shard(c) for c in cfgs]
    acks: list[tuple[int, int]] = []  # (replica, epoch) of each push a replica acknowledged
    lock = threading.Lock()
    ordered = threading.local()  # the epoch of the push this request thread ordered last
    for i, shard in enumerate(shards_):
        rep = shard.replication
        original, original_commit = rep.apply, rep.commit

        def apply(op, message, items, local, header=None, rep=rep, original=original):
            with rep._seq:  # reentrant: the epoch read is the one the push was ordered under
                result, sent = original(op, message, items, local, header)
                ordered.epoch = rep.epoch if op == "push" else None
            return result, sent

        def commit(sent, original_commit=original_commit, i=i):
            error = original_commit(sent)  # the backup's answer: acknowledged when None
            if error is None and getattr(ordered, "epoch", None) is not None:
                with lock:
                    acks.append((i, ordered.epoch))
            return error

        rep.apply, rep.commit = apply, commit
    for shard in shards_:
        shard.start()
    try:
        wait_for(lambda: any(s.replication.describe().role == "primary" and s.replication.describe().peers
                             and s.replication.describe().peers[0].in_sync for s in shards_), "in sync")
        primary = next(i for i, s in enumerate(shards_) if s.replication.role == "primary")
        cut, healed = threading.Event(), threading.Event()

        def on_step(done: int) -> None:  # the worker goes on pushing across the cut
            progress[0] = done
            if done == 20:
                for s in shards_:
                    s.replication.partitioned.set()
                cut.set()
            if done == 40:
                hold.set()
                for s in shards_:
                    s.replication.partitioned.clear()
                healed.set()
                wait_for(joining.is_set, "the old primary to begin its rejoin")

        servers = ["|".join(f"127.0.0.1:{p}" for p in ports)]
        done = run_workers(1, 60, servers, on_step=on_step)
        assert done == [60] and cut.is_set() and healed.is_set()
        wait_for(lambda: shards_[1 - primary].replication.describe().peers[0].in_sync, "the rejoin")
        epochs: dict[int, set[int]] = {}
        for replica, epoch in acks:
            epochs.setdefault(epoch, set()).add(replica)
        assert all(len(r) == 1 for r in epochs.values()), epochs
        assert epochs[1] == {primary} and epochs[2] == {1 - primary}
        assert len(acks) == 60  # one per acknowledged step (a retry answered as a duplicate is not applied)
        stores = [s.core.store for s in shards_]
        for name in stores[0].names():
            a, b = stores[0].get(name), stores[1].get(name)
            assert a.step == b.step == 60
            assert all(torch.equal(a.part(p), b.part(p)) for p in (pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ))
        lines = log_lines(tmp_path / f"apply{1 - primary}.jsonl")
        assert max(Counter((x["client_id"], x["seq"]) for x in lines).values()) == 1
        caught_up = [int(m.group(1)) for r in caplog.records
                     if (m := re.search(r"\((\d+) more forwarded after the state\)", r.getMessage()))]
        assert caught_up and caught_up[-1] >= 5  # the pushes acknowledged during the transfer
    finally:
        for shard in shards_:
            shard.stop()


def test_a_double_failure_that_loses_a_later_epoch_stops_with_an_error_instead_of_losing_pushes(tmp_path):
    """The old primary A is cut off (as if stopped) and deposed; B takes over at epoch 2 and
    acknowledges pushes alone; then B crashes and restarts empty. A holds only epoch 1's state, so it
    must not become primary again (that silently lost B's acknowledged pushes): B's state file in its
    --checkpoint-dir says it held epoch 2, and both replicas refuse with FAILED_PRECONDITION
    (reason lost_epoch) saying what to do, with A's state untouched. The operator's way on from A's
    older state (B's state file deleted, B restarted) then works."""
    ports = free_ports(2)
    replicas = ",".join(f"127.0.0.1:{p}" for p in ports)
    cfgs = [ServerConfig(port=p, replicas=replicas, replica_index=i, replica_timeout=float(TIMEOUT),
                         checkpoint_dir=str(tmp_path / f"ckpt{i}")) for i, p in enumerate(ports)]
    shards_ = [Shard(c) for c in cfgs]
    for shard in shards_:
        shard.start()
    servers = ["|".join(f"127.0.0.1:{p}" for p in ports)]
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]

    def role(i: int) -> pb.Replication:
        return shards_[i].replication.describe()

    def steps(i: int) -> set[int]:
        return {shards_[i].core.store.get(n).step for n in names}

    try:
        wait_for(lambda: role(0).role == "primary" and role(0).peers and role(0).peers[0].in_sync, "in sync")
        with RemoteAdam(model.named_parameters(), servers, lr=0.01, client_id="worker-0",
                        retry_budget=HANG_GUARD, timeout=60.0) as opt:
            acknowledged = 0
            for _ in range(5):
                synthetic_step(model, opt, 0, acknowledged)
                acknowledged += 1
            for shard in shards_:  # A (0) is cut off from B (1), as if stopped
                shard.replication.partitioned.set()
            wait_for(lambda: role(1).role == "primary" and role(1).epoch == 2 and role(0).role == "deposed",
                     "B's takeover and A's deposition")
            for _ in range(5):  # acknowledged by B alone
                synthetic_step(model, opt, 0, acknowledged)
                acknowledged += 1
            assert steps(1) == {10} and steps(0) == {5}
            assert json.loads((tmp_path / "ckpt1" / replication.STATE_FILE).read_text()) == \
                {"epoch": 2, "role": "primary"}
            shards_[1].stop()  # B crashes (no checkpoint written) and restarts empty
            shards_[1] = Shard(cfgs[1])
            shards_[1].start()
            shards_[0].replication.partitioned.clear()  # A is back
            error = None
            try:
                synthetic_step(model, opt, 0, acknowledged)
                acknowledged += 1
            except Exception as exc:  # noqa: BLE001 - asserted below
                error = exc
            # Acknowledged pushes are never lost: either this push failed, or every one counts.
            wait_for(lambda: role(0).role != "deposed" or all(s.replication._blocked for s in shards_),
                     "the replicas' decision")
            assert error is not None, (f"{acknowledged} pushes acknowledged, A went on as "
                                       f"{role(0).role} at epoch {role(0).epoch} with steps {steps(0)}")
            assert "epoch 2" in str(error) and "restart" in str(error), error
            for i in range(2):
                with pytest.raises(replication.RequestError) as refused:
                    shards_[i].replication.check_serving()
                assert refused.value.code == replication.StatusCode.FAILED_PRECONDITION
                assert refused.value.reason == "lost_epoch" and "epoch 2" in refused.value.message
            assert role(0).role == "deposed" and role(1).role == "joining" and steps(0) == {5}

        # The operator accepts the loss: B's state file deleted, B restarted; A goes on from epoch 1,
        # and so does a worker started again.
        shards_[1].stop()
        (tmp_path / "ckpt1" / replication.STATE_FILE).unlink()
        shards_[1] = Shard(cfgs[1])
        shards_[1].start()
        wait_for(lambda: role(0).role == "primary" and role(0).peers and role(0).peers[0].in_sync,
                 "A primary again, B its backup")
        model = tiny_model()
        with RemoteAdam(model.named_parameters(), servers, lr=0.01, client_id="worker-1",
                        retry_budget=HANG_GUARD, timeout=60.0) as opt:
            synthetic_step(model, opt, 1, 0)
        assert steps(0) == steps(1) == {6}
    finally:
        for shard in shards_:
            shard.stop()


def _in_process_pair(tmp_path: Path, **options) -> list[Shard]:
    """Two in-process replicas of one shard index, each with its own apply log, started."""
    ports = free_ports(2)
    replicas = ",".join(f"127.0.0.1:{p}" for p in ports)
    shards_ = [Shard(ServerConfig(port=p, replicas=replicas, replica_index=i, replica_timeout=float(TIMEOUT),
                                  apply_log=str(tmp_path / f"apply{i}.jsonl"), **options))
               for i, p in enumerate(ports)]
    for shard in shards_:
        shard.start()
    return shards_


def _in_sync(shards_: list[Shard]) -> int:
    def primary() -> int:
        for i, s in enumerate(shards_):
            rep = s.replication.describe()
            if rep.role == "primary" and rep.peers and rep.peers[0].in_sync:
                return i
        return -1
    wait_for(lambda: primary() >= 0, "the replicas in sync")
    return primary()


def _servers(shards_: list[Shard]) -> list[str]:
    return ["|".join(s.replication.cfg.replicas[i] for i, s in enumerate(shards_))]


def test_pipelined_forwards_keep_the_order_of_4_workers_and_the_replicas_end_bitwise_equal(tmp_path):
    """4 workers push at once; the backup applies slowly, so the primary has several forwards in flight
    on its link (it does not wait for one answer before it orders and applies the next push). The
    backup applies them in exactly the primary's order (the apply logs list the same pushes in the same
    order), every push once, and both replicas end bitwise equal."""
    shards_ = _in_process_pair(tmp_path)
    try:
        primary = _in_sync(shards_)
        backup = shards_[1 - primary].replication
        real_apply = backup._apply_forward

        def slow_apply(*args):  # the backup lags behind the primary
            time.sleep(0.005)
            return real_apply(*args)

        backup._apply_forward = slow_apply
        rep = shards_[primary].replication
        in_flight = [0]
        real_answer = rep._answer

        def answer(outcome):
            in_flight[0] = max(in_flight[0], len(rep._flight))
            return real_answer(outcome)

        rep._answer = answer
        steps = 40
        assert run_workers(WORKERS, steps, _servers(shards_)) == [steps] * WORKERS
        assert in_flight[0] >= 2, in_flight  # pipelined: more than one forward unanswered at once
        order = [[(x["client_id"], x["seq"]) for x in log_lines(tmp_path / f"apply{i}.jsonl")] for i in (0, 1)]
        assert order[0] == order[1] and len(order[0]) == len(set(order[0])) == WORKERS * steps
        stores = [s.core.store for s in shards_]
        for name in stores[0].names():
            a, b = stores[0].get(name), stores[1].get(name)
            assert a.step == b.step == WORKERS * steps
            assert all(torch.equal(a.part(p), b.part(p)) for p in (pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ))
        assert shards_[primary].replication.describe().peers[0].lag == 0
    finally:
        for shard in shards_:
            shard.stop()


def test_a_primary_cut_off_between_the_parameters_and_the_commit_acknowledges_nothing(tmp_path, caplog):
    """The primary sends a push's parameters (PROVISIONAL) while its backup drops the forward, then
    the link is cut: the commit that follows is a refusal, never an acknowledgement. The worker treats
    the push as not acknowledged: it retries the same (client_id, seq) on the backup, which took over
    and applies it once; the retry's reply overwrites the parameters, so the worker ends with exactly
    the new primary's parameters, and every key's step is the number of acknowledged steps."""
    caplog.set_level(logging.INFO, logger="optserve.client")
    shards_ = _in_process_pair(tmp_path)
    try:
        primary = _in_sync(shards_)
        old, new = shards_[primary], shards_[1 - primary]
        cut_at, provisional = 10, threading.Event()
        real_send = old.data._send_pull
        sent = [0]

        def send_pull(conn, segment, reply, status):
            real_send(conn, segment, reply, status)
            if status == PROVISIONAL:
                sent[0] += 1
                if sent[0] == cut_at:
                    provisional.set()

        old.data._send_pull = send_pull
        real_serve = new.replication.serve
        forwards = [0]

        def serve(conn, kind, meta, receive_with, slots):
            if kind == FORWARD and replication.unpack_meta(meta)[0]["op"] == "push":
                forwards[0] += 1
                if forwards[0] == cut_at:  # dropped, once the primary has sent the push's parameters
                    assert provisional.wait(HANG_GUARD)
                    for s in shards_:
                        s.replication.partitioned.set()
                    raise ConnectionResetError("cut (test)")
            return real_serve(conn, kind, meta, receive_with, slots)

        new.replication.serve = serve
        model = tiny_model()
        with RemoteAdam(model.named_parameters(), _servers(shards_), lr=0.01, client_id="worker-0",
                        retry_budget=HANG_GUARD, timeout=60.0) as opt:
            for step in range(2 * cut_at):
                synthetic_step(model, opt, 0, step)
        assert provisional.is_set() and sent[0] == cut_at  # no commit after the cut: no more replies
        assert old.replication.describe().role == "deposed" and new.replication.describe().role == "primary"
        assert any("PushPull" in r.getMessage() and "UNAVAILABLE" in r.getMessage() for r in caplog.records)
        pushes = [(x["client_id"], x["seq"]) for x in log_lines(tmp_path / f"apply{1 - primary}.jsonl")]
        assert len(pushes) == len(set(pushes)) == 2 * cut_at  # the cut push applied once, by the retry
        store = new.core.store
        for name, p in model.named_parameters():
            key = store.get(name)
            assert key.step == 2 * cut_at
            assert torch.equal(key.part(pb.PARAM).reshape(p.shape), p.detach())
    finally:
        for shard in shards_:
            shard.stop()


def test_a_sigkill_between_the_parameters_and_the_commit_loses_nothing_and_applies_nothing_twice(
        shards, tmp_path):
    """The primary SIGKILLs itself right after it sent a push's parameters (PROVISIONAL), before the
    commit; whether its backup applied the push depends on the race with the forward. The worker
    retries on the backup (a duplicate when it had applied it, else applied there), ends with the new
    primary's parameters, and the restarted replica rejoins: no push lost or applied twice, every
    key's step is the number of acknowledged steps, both replicas bitwise equal."""
    steps = 60
    rs = ReplicaSet(shards, tmp_path, 1, die_after={(0, 0): 20}, die_at="PROVISIONAL")
    assert rs.wait_in_sync(0) == 0
    model = tiny_model()
    with RemoteAdam(model.named_parameters(), rs.servers, lr=0.01, client_id="worker-0",
                    retry_budget=HANG_GUARD, timeout=60.0) as opt:
        for step in range(steps):
            synthetic_step(model, opt, 0, step)
    assert rs.procs[0][0].proc.wait(HANG_GUARD) == -signal.SIGKILL
    rs.restart(0, 0)
    assert rs.wait_in_sync(0) == 1
    states = [rs.state(0, r) for r in range(2)]
    assert states[0] == states[1]
    history = log_lines(rs.logs[0][1])  # the backup from the start, then the primary: every push
    pushes = Counter((x["client_id"], x["seq"]) for x in history)
    assert max(pushes.values()) == 1 and len(pushes) == steps
    assert replay(rs.logs[0][1], sorted(states[0])) == states[0]
    for name, p in model.named_parameters():
        assert states[0][name]["step"] == steps
        assert states[0][name]["param"] == _digest(p.detach())



def test_forwards_and_heartbeats_are_not_counted_as_data_calls(tmp_path):
    """Stats' data_calls counts the workers' Push, Pull and PushPull over the data channel; the
    replication frames between the replicas are none of those."""
    shards_ = _in_process_pair(tmp_path)
    try:
        primary = _in_sync(shards_)
        backup = shards_[1 - primary]
        model = tiny_model()
        with RemoteAdam(model.named_parameters(), _servers(shards_), lr=0.01, client_id="worker-0",
                        retry_budget=HANG_GUARD, timeout=60.0) as opt:
            for step in range(5):
                synthetic_step(model, opt, 0, step)
        heard = backup.replication._heard
        wait_for(lambda: backup.replication._heard > heard, "a heartbeat")  # the primary is idle now
        assert backup.core.store.get("0.weight").step == 5  # the forwards came
        assert backup.core.counters.data_calls == 0
        assert shards_[primary].core.counters.data_calls >= 5
    finally:
        for shard in shards_:
            shard.stop()


def test_a_forwarded_push_takes_the_primarys_gradient_bounds_and_refuses_malformed_ones(monkeypatch):
    """A backup does not scan a forwarded push's gradients again: the forward's header carries the
    bounds the primary's NaN/Inf check found (the overflow guard's input, so both replicas decide
    alike). Bounds that do not fit the push are refused before anything changes."""
    from optserve.server import requests
    from optserve.serde import hyper_to_proto
    from optserve.hyper import AdamConfig

    shard = Shard(ServerConfig())
    core = shard.core
    core.store.create([("w", (4,), torch.zeros(4), {"param": "w", "param_shape": [4], "offset": 0})])
    grad = torch.tensor([1.0, -2.0, 0.5, 0.0])

    def request(seq: int) -> pb.PushRequest:
        head = pb.PushHead(client_id="c", seq=seq, entries=[pb.PushEntry(key="w", version_read=0)],
                           hyper=[hyper_to_proto(AdamConfig())])
        return pb.PushRequest(head=head, segments=[pb.Segment(entry=0, part=pb.GRAD, offset=0, count=4)])

    def receive(expected, dests):
        dests[(0, pb.GRAD)].copy_(grad)

    try:
        for bad in ([], [1.0, 2.0], [-1.0], ["2"], [True]):
            with pytest.raises(replication.RequestError) as refused:
                core.push(request(1), receive, forwarded=True, bounds=bad)
            assert refused.value.code == replication.StatusCode.INVALID_ARGUMENT
        assert core.store.get("w").step == 0

        def no_scan(*args, **kwargs):
            raise AssertionError("a forwarded push with bounds was scanned again")

        monkeypatch.setattr(requests, "check_finite", no_scan)
        core.push(request(1), receive, forwarded=True, bounds=[2.0])
        assert core.store.get("w").step == 1
    finally:
        shard.stop()
