"""Exactly-once pushes, checkpoint/restore of an in-process shard, export, and re-registration."""
from __future__ import annotations

import grpc
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from optserve import RemoteAdam
from optserve.client.export import gather
from optserve.client.transport import ShardClient, ShardError
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server.main import run_server

N = 8
HYPER = pb.HyperParams(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-16, weight_decouple=True, optimized_update=True)


def register(client: ShardClient) -> None:
    head = pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[N], dtype=pb.FLOAT32)], with_values=True, num_shards=1)
    client.register(head, [Outgoing(0, pb.PARAM, torch.zeros(N))])


def push(client: ShardClient, seq: int, version_read: int, client_id: str = "worker-1") -> pb.PushReply:
    head = pb.PushHead(client_id=client_id, seq=seq, entries=[pb.PushEntry(key="w", version_read=version_read)],
                       hyper=[HYPER])
    return client.push(head, [Outgoing(0, pb.GRAD, torch.ones(N))], torch.float32)


def state(client: ShardClient) -> tuple[list[torch.Tensor], int]:
    parts = [pb.PARAM, pb.EXP_AVG, pb.EXP_AVG_SQ]
    out = {(0, p): torch.empty(N) for p in parts}
    head = client.pull(pb.PullRequest(keys=["w"], parts=parts), lambda h: out)
    return [out[(0, p)] for p in parts], head.entries[0].version


def test_a_repeated_push_is_acknowledged_with_the_original_result_and_applied_once(shard):
    client = ShardClient(shard)
    register(client)
    first = push(client, seq=1, version_read=0)
    before = state(client)

    again = push(client, seq=1, version_read=0)

    after = state(client)
    client.close()
    assert again.duplicate and not first.duplicate
    assert list(again.versions) == list(first.versions) == [1]
    assert after[1] == 1 and all(torch.equal(a, b) for a, b in zip(before[0], after[0]))


def test_another_push_under_a_used_client_id_and_seq_is_refused_not_answered_as_a_retry(shard):
    """Two clients sharing an id (a raw client restarted with its seq at 1 again): the second one's
    push is not the first one's retry; the shard says so instead of dropping it as a duplicate."""
    client = ShardClient(shard)
    register(client)
    push(client, seq=1, version_read=0)

    with pytest.raises(ShardError) as err:
        push(client, seq=1, version_read=1)  # same client id and seq, another push
    _, version = state(client)
    client.close()

    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "share the client id" in err.value.details
    assert version == 1


def test_the_dedupe_table_and_the_keys_survive_checkpoint_and_restore(tmp_path):
    with run_server(checkpoint_dir=str(tmp_path)) as address:
        client = ShardClient(address)
        register(client)
        push(client, seq=1, version_read=0)
        push(client, seq=2, version_read=1)
        client.checkpoint()
        saved = state(client)
        client.close()

    with run_server(checkpoint_dir=str(tmp_path)) as address:
        client = ShardClient(address)
        restored = state(client)
        retried = push(client, seq=2, version_read=1)  # a retry of a push the checkpoint holds
        fresh = push(client, seq=3, version_read=2)
        client.close()

    assert restored[1] == saved[1] == 2
    assert all(torch.equal(a, b) for a, b in zip(saved[0], restored[0]))
    assert retried.duplicate and list(retried.versions) == [2]
    assert not fresh.duplicate and list(fresh.versions) == [3]


def test_a_sync_push_acknowledged_before_a_restart_is_in_the_restored_round(tmp_path):
    """Under sync a Push is acknowledged once it joins its round (overlap=True pushes so). A restart
    before the round steps must keep it: the checkpoint holds the open round, and the second worker's
    gradient after the restart completes it."""
    options = dict(policy="sync", workers=2, wait_timeout=10, checkpoint_dir=str(tmp_path))
    with run_server(**options) as address:
        a = ShardClient(address)
        register(a)
        assert not push(a, seq=1, version_read=0, client_id="A").duplicate  # acknowledged; round open
        a.checkpoint()
        a.close()
    with run_server(**options) as address:
        b = ShardClient(address)
        push(b, seq=1, version_read=0, client_id="B")  # A holds its ack and does not push again
        (param, m, _), version = state(b)
        again = push(b, seq=1, version_read=0, client_id="A")  # a retry of A's, had its ack been lost
        b.close()

    assert version == 1 and again.duplicate and list(again.versions) == [0]
    assert torch.allclose(m, torch.full((N,), 0.1))  # (1 - beta1) x the mean of A's and B's ones


def test_a_checkpoint_that_verifies_but_is_no_valid_shard_gives_way_to_the_previous_one(tmp_path):
    """Contents that pass the checksums yet cannot be restored (an option out of range, a dedupe
    record short of a field, from a writer bug) are skipped like a damaged checkpoint."""
    import json
    from optserve.server.checkpoint import MANIFEST_FILE, _manifest_digest
    with run_server(checkpoint_dir=str(tmp_path)) as address:
        client = ShardClient(address)
        register(client)
        push(client, seq=1, version_read=0)
        client.checkpoint()
        push(client, seq=2, version_read=1)
        newest = client.checkpoint()
        client.close()
    manifest = json.loads((tmp_path / newest.path.rsplit("/", 1)[1] / MANIFEST_FILE).read_text())
    manifest.pop("manifest_sha256")
    manifest["keys"][0]["hyper"]["beta1"] = 1.5
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (tmp_path / newest.path.rsplit("/", 1)[1] / MANIFEST_FILE).write_text(json.dumps(manifest))

    with run_server(checkpoint_dir=str(tmp_path)) as address:
        client = ShardClient(address)
        _, version = state(client)
        client.close()

    assert version == 1


def test_a_shard_that_cannot_start_releases_its_port(tmp_path):
    """A checkpoint directory of another shard is a setup error: start() raises, and leaves nothing
    bound, so the same port can be used at once."""
    import socket
    from optserve.server.main import ServerConfig, Shard
    with run_server(checkpoint_dir=str(tmp_path)) as address:
        client = ShardClient(address)
        register(client)
        client.checkpoint()
        client.close()
    shard = Shard(ServerConfig(checkpoint_dir=str(tmp_path), shard_index=1, num_shards=2))
    port = shard.port
    with pytest.raises(ValueError, match="is of shard 0 of 1; this shard is 1 of 2"):
        shard.start()

    with socket.create_server(("127.0.0.1", port)):  # free again
        pass


def test_set_state_during_an_open_sync_round_leaves_checkpoints_restorable(tmp_path):
    """SetState voids the open round of a key it rewrites at once (under the policy's lock), so no
    checkpoint holds a round of a version its key no longer has."""
    options = dict(policy="sync", workers=2, wait_timeout=5, checkpoint_dir=str(tmp_path))
    with run_server(**options) as address:
        a = ShardClient(address)
        register(a)
        push(a, seq=1, version_read=0, client_id="A")  # round of version 0 open
        a.set_state(pb.SetStateHead(entries=[pb.StateEntry(key="w", step=7, hyper=HYPER)], parts=[]), [])
        a.checkpoint()
        a.close()
    with run_server(**options) as address:
        b = ShardClient(address)
        _, version = state(b)
        b.close()

    assert version == 7


def test_a_sync_checkpoint_restored_under_async_applies_the_retries_of_its_open_rounds(tmp_path):
    """Async has no rounds: the open round's gradient is dropped with its record, so the worker's
    retry (its acknowledgement lost) is applied, not answered as a duplicate of nothing."""
    with run_server(policy="sync", workers=2, checkpoint_dir=str(tmp_path)) as address:
        a = ShardClient(address)
        register(a)
        push(a, seq=1, version_read=0, client_id="A")
        a.close()  # the shard's stop writes nothing: take the checkpoint explicitly
        ShardClient(address).checkpoint()
    with run_server(policy="async", checkpoint_dir=str(tmp_path)) as address:
        b = ShardClient(address)
        again = push(b, seq=1, version_read=0, client_id="A")
        _, version = state(b)
        b.close()

    assert not again.duplicate and version == 1


def test_open_rounds_that_meet_a_smaller_quorum_step_at_restore(tmp_path):
    with run_server(policy="sync", workers=3, checkpoint_dir=str(tmp_path)) as address:
        a = ShardClient(address)
        register(a)
        push(a, seq=1, version_read=0, client_id="A")
        push(a, seq=1, version_read=0, client_id="B")  # 2 of 3
        a.checkpoint()
        a.close()
    with run_server(policy="sync", workers=2, checkpoint_dir=str(tmp_path)) as address:
        b = ShardClient(address)
        _, version = state(b)
        b.close()

    assert version == 1


def test_a_shard_refuses_to_start_empty_when_none_of_its_checkpoints_restores(tmp_path):
    """Starting empty would prune them after `keep` new checkpoints: the state would be lost for good."""
    from optserve.server.checkpoint import MANIFEST_FILE
    with run_server(checkpoint_dir=str(tmp_path)) as address:
        client = ShardClient(address)
        register(client)
        path = client.checkpoint().path
        client.close()
    (tmp_path / path.rsplit("/", 1)[1] / MANIFEST_FILE).write_text("{")

    with pytest.raises(ValueError, match="none of the 1 checkpoints .* can be restored"):
        with run_server(checkpoint_dir=str(tmp_path)):
            pass


def test_checkpoint_without_a_directory_is_refused(shard):
    client = ShardClient(shard)

    with pytest.raises(ShardError) as err:
        client.checkpoint()

    client.close()
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--checkpoint-dir" in err.value.details


def test_export_reassembles_sliced_parameters_from_every_shard(two_shards, tmp_path):
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 3))
    with RemoteAdam(model.named_parameters(), two_shards, slice_elements=256) as opt:
        opt.zero_grad()
        model(torch.randn(5, 30)).sum().backward()
        opt.step()

    params = gather(two_shards)

    assert params.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(params[name], value)


def test_export_cli_writes_a_safetensors_file(two_shards, tmp_path):
    from optserve.cli import main

    model = nn.Linear(300, 5)
    with RemoteAdam(model.named_parameters(), two_shards, slice_elements=512):
        pass
    out = tmp_path / "model.safetensors"

    code = main(["export", *two_shards, "--out", str(out)])

    loaded = load_file(str(out))
    assert code == 0
    assert torch.equal(loaded["weight"], model.weight.detach()) and torch.equal(loaded["bias"], model.bias.detach())


def test_export_of_a_subset_of_shards_says_which_elements_are_missing(two_shards):
    model = nn.Linear(300, 5)
    with RemoteAdam(model.named_parameters(), two_shards, slice_elements=512):
        pass

    with pytest.raises(ValueError, match=r"missing \[1\]: list every shard"):
        gather(two_shards[:1])


def test_export_refuses_a_subset_of_shards_even_when_no_parameter_is_sliced(two_shards):
    """A parameter held whole by the shard left out would silently be missing from the file."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with RemoteAdam(model.named_parameters(), two_shards):
        pass

    assert len(gather(two_shards)) == 4
    for given in (two_shards[:1], two_shards[1:]):
        with pytest.raises(ValueError, match="list every shard"):
            gather(given)


def test_a_worker_re_registers_when_its_shard_restarts_empty():
    model = nn.Linear(6, 2)
    with run_server() as address:
        port = int(address.rsplit(":", 1)[1])
        opt = RemoteAdam(model.named_parameters(), [address], retry_budget=10)
        opt.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]

    with run_server(port=port):  # the same address, no checkpoint: the keys are gone
        opt.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        opt.step()  # NOT_FOUND -> registers the keys again with this worker's values, drops this gradient
        versions = dict(opt.versions)
        opt.close()

    assert opt.dropped_pushes == 1
    assert versions == {"weight": 0, "bias": 0}
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
