"""Training-mode policies: sync (with backup workers and a wait timeout) and ssp (reject or scale)."""
from __future__ import annotations


import grpc
import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.status import collect
from optserve.client.transport import ShardClient, ShardError
from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.serde import Outgoing
from optserve.server.adam import adam_reference
from optserve.server.main import run_server

N = 6  # elements of the one key in the raw-client tests
HYPER = pb.HyperParams(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-16, weight_decouple=True, optimized_update=True)


def raw_client(address: str, init: torch.Tensor) -> ShardClient:
    client = ShardClient(address, timeout=30)
    head = pb.RegisterHead(keys=[pb.KeySpec(name="w", shape=[N], dtype=pb.FLOAT32)], with_values=True, num_shards=1)
    client.register(head, [Outgoing(0, pb.PARAM, init)])
    return client


def push(client: ShardClient, grad: torch.Tensor, version_read: int, worker: str, seq: int = 1) -> pb.PushReply:
    head = pb.PushHead(client_id=worker, seq=seq, entries=[pb.PushEntry(key="w", version_read=version_read)],
                       hyper=[HYPER])
    return client.push(head, [Outgoing(0, pb.GRAD, grad)], torch.float32)


def pull(client: ShardClient) -> tuple[torch.Tensor, int]:
    out = torch.empty(N)
    head = client.pull(pb.PullRequest(keys=["w"]), lambda h: {(0, pb.PARAM): out})
    return out, head.entries[0].version


def model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))


def test_sync_two_workers_equal_the_seed_adam_on_averaged_gradients(run_threads):
    steps, lr = 8, 1e-2
    models = [model(), model()]
    grads: dict[int, list[list[torch.Tensor]]] = {s: [None, None] for s in range(steps)}
    with run_server(policy="sync", workers=2) as address:
        opts = [RemoteAdam(m.named_parameters(), [address], lr=lr) for m in models]
        ref = [p.detach().clone() for p in models[0].parameters()]

        def work(w):
            g = torch.Generator().manual_seed(w)
            for s in range(steps):
                loss = models[w](torch.randn(8, 12, generator=g)).pow(2).mean()
                opts[w].zero_grad()
                loss.backward()
                grads[s][w] = [p.grad.clone() for p in models[w].parameters()]
                opts[w].step()  # returns once both workers' gradients are applied

        run_threads(work, [(0,), (1,)])
        for o in opts:
            o.close()

    ms = [torch.zeros_like(p) for p in ref]
    vs = [torch.zeros_like(p) for p in ref]
    for s in range(steps):
        for p, g0, g1, m, v in zip(ref, grads[s][0], grads[s][1], ms, vs):
            adam_reference(p, (g0 + g1) / 2, m, v, None, s + 1, AdamConfig(lr=lr))
    for w in range(2):
        for p, r in zip(models[w].parameters(), ref):
            assert (p.detach() - r).abs().max().item() <= 1e-6


def test_sync_with_a_backup_steps_after_w_minus_b_and_drops_the_late_gradient():
    init = torch.zeros(N)
    with run_server(policy="sync", workers=3, backup_workers=1) as address:
        client = raw_client(address, init)
        g = [torch.full((N,), float(i + 1)) for i in range(3)]

        first = push(client, g[0], 0, "a")
        second = push(client, g[1], 0, "b")
        late = push(client, g[2], 0, "c")
        value, version = pull(client)
        stats = collect([address])[0]
        client.close()

    assert first.versions == [0] and second.versions == [1]  # the step came with the second gradient
    assert list(late.dropped) == ["w"]
    assert version == 1
    expected, m, v = init.clone(), torch.zeros(N), torch.zeros(N)
    adam_reference(expected, (g[0] + g[1]) / 2, m, v, None, 1, AdamConfig(lr=0.1))
    assert torch.allclose(value, expected, atol=1e-7)
    assert stats["dropped"] == 1 and stats["keys"][0]["dropped"] == 1


def test_sync_waiting_for_a_missing_worker_turns_into_a_clear_error():
    with run_server(policy="sync", workers=2, wait_timeout=0.3) as address:
        with RemoteAdam(model().named_parameters(), [address]) as opt:
            m = opt.param_groups[0]["params"][0]
            m.grad = torch.ones_like(m)

            with pytest.raises(ShardError) as err:
                opt.step()  # the second worker never pushes

    assert err.value.code == grpc.StatusCode.ABORTED
    assert "has 1 of 2 gradients" in err.value.details


def test_sync_with_overlap_waits_for_the_step_before_pulling(run_threads):
    steps = 4
    models = [model(), model()]
    with run_server(policy="sync", workers=2) as address:
        opts = [RemoteAdam(m.named_parameters(), [address], overlap=True) for m in models]

        def work(w):
            for _ in range(steps):
                opts[w].zero_grad()
                models[w](torch.randn(8, 12)).pow(2).mean().backward()
                opts[w].step()

        run_threads(work, [(0,), (1,)])
        versions = [dict(o.versions) for o in opts]
        for o in opts:
            o.close()

    assert versions[0] == versions[1] == {k: steps for k in versions[0]}
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_ssp_refuses_a_push_over_the_bound_and_the_worker_re_pulls():
    with run_server(policy="ssp:1") as address:
        slow_model, fast_model = model(), model()
        with RemoteAdam(slow_model.named_parameters(), [address]) as slow, \
                RemoteAdam(fast_model.named_parameters(), [address]) as fast:
            for _ in range(2):  # the fast worker moves every key two versions ahead
                fast.zero_grad()
                fast_model(torch.randn(8, 12)).pow(2).mean().backward()
                fast.step()
            slow.zero_grad()
            slow_model(torch.randn(8, 12)).pow(2).mean().backward()

            slow.step()  # staleness 2 > 1: dropped, and the fresh parameters pulled instead

            dropped = slow.dropped_pushes
            stale_versions = dict(slow.versions)
            slow.zero_grad()
            slow_model(torch.randn(8, 12)).pow(2).mean().backward()
            slow.step()  # computed on fresh parameters: applied
            stats = collect([address])[0]

    assert dropped == 1
    assert set(stale_versions.values()) == {2}
    assert {k["version"] for k in stats["keys"]} == {3}
    assert stats["dropped"] == 1


def test_ssp_scale_divides_the_learning_rate_by_staleness_plus_one():
    init = torch.linspace(-1, 1, N)
    with run_server(policy="ssp:1", stale="scale") as address:
        client = raw_client(address, init)
        g = [torch.linspace(0.5, 1.5, N) * (i + 1) for i in range(4)]
        for i in range(3):
            push(client, g[i], i, "fast", seq=i + 1)  # versions 0 -> 3, each fresh
        reply = push(client, g[3], 0, "slow")  # read at version 0, applied at version 3
        value, version = pull(client)
        client.close()

    # By hand: the seed's Adam, three fresh steps at lr 0.1, then one at lr 0.1 / (3 + 1).
    expected, m, v = init.clone(), torch.zeros(N), torch.zeros(N)
    for i in range(3):
        adam_reference(expected, g[i], m, v, None, i + 1, AdamConfig(lr=0.1))
    adam_reference(expected, g[3], m, v, None, 4, AdamConfig(lr=0.1 / 4))
    assert list(reply.staleness) == [3] and version == 4
    assert torch.allclose(value, expected, atol=1e-7)


def test_async_never_waits_and_records_staleness_histograms():
    with run_server() as address:
        client = raw_client(address, torch.zeros(N))
        for i in range(3):
            push(client, torch.ones(N), 0, "w", seq=i + 1)  # staleness 0, 1, 2
        stats = collect([address])[0]
        client.close()

    key = stats["keys"][0]["staleness"]
    assert (key["count"], key["max"], key["mean"]) == (3, 2, 1.0)
    assert key["histogram"][:4] == [1, 1, 1, 0]
    assert stats["shard"]["policy"] == "async"


def test_hello_names_the_policy():
    with run_server(policy="sync", workers=4, backup_workers=1) as a, run_server(policy="ssp:3", stale="scale") as b:
        names = [ShardClient(x).hello().policy for x in (a, b)]

    assert names == ["sync:4-1", "ssp:3/scale"]


@pytest.mark.parametrize("options, message", [
    (dict(policy="sync"), "needs --workers"),
    (dict(policy="sync", workers=2, backup_workers=2), "backup workers must be in 0..1"),
    (dict(policy="ssp:x"), "integer staleness bound"),
    (dict(policy="bsp"), "unknown policy"),
])
def test_bad_policy_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        with run_server(**options):
            pass


def test_stopping_a_shard_ends_the_waits_of_calls_in_flight_with_unavailable():
    """A pull waiting for a sync step that will not come (the other worker is gone) must not hold
    the shard's stop: the wait ends at once with UNAVAILABLE, which the client retries elsewhere."""
    import threading
    from optserve.errors import RequestError, StatusCode
    from optserve.server.main import ServerConfig, Shard

    shard = Shard(ServerConfig(policy="sync", workers=2, wait_timeout=60))
    shard.start()
    client = raw_client(shard.address, torch.zeros(N))
    outcome = []

    def waiter():
        try:
            shard.core.pull(pb.PullRequest(keys=["w"], min_versions=[1]))
        except RequestError as exc:
            outcome.append(exc.code)

    t = threading.Thread(target=waiter)
    t.start()
    client.close()
    shard.stop(grace=0.5)
    t.join(timeout=20)  # a hang guard, far below the 60 s wait it would otherwise sit out

    assert not t.is_alive() and outcome == [StatusCode.UNAVAILABLE]


def test_sync_over_grpc_serves_more_workers_than_the_threads_asked_for(run_threads):
    """Each sync worker's PushPull waits for its round in a gRPC thread; the shard raises its thread
    count so that the last worker's push is not queued behind the others' waits (which would end
    every round in the wait timeout)."""
    workers = 3
    with run_server(policy="sync", workers=workers, threads=2, data_port=-1, wait_timeout=10) as address:
        def worker(i):
            torch.manual_seed(i)
            m = model()
            with RemoteAdam(m.named_parameters(), [address], client_id=f"w{i}") as opt:
                for _ in range(3):
                    opt.zero_grad()
                    m(torch.randn(8, 12)).pow(2).mean().backward()
                    opt.step()

        run_threads(worker, [(i,) for i in range(workers)])
        stats = collect([address])[0]

    assert {k["version"] for k in stats["keys"]} == {3} and stats["dropped"] == 0


def test_set_state_during_an_open_sync_round_voids_that_round_only():
    """load_state_dict (SetState) rewrites a key while a sync round of its old version is open: that
    round's gradients are dropped (counted), and the next round at the new version steps normally."""
    with run_server(policy="sync", workers=2, wait_timeout=5) as address:
        a = raw_client(address, torch.zeros(N))
        b = ShardClient(address, timeout=30)
        assert list(push(a, -torch.ones(N), 0, "A").versions) == [0]  # round of version 0: A's gradient
        reply = b.set_state(pb.SetStateHead(entries=[pb.StateEntry(key="w", step=5, hyper=HYPER)], parts=[]), [])
        assert list(reply.versions) == [5]

        push(b, torch.ones(N), 5, "B", seq=1)
        push(a, torch.ones(N), 5, "A", seq=2)  # the second gradient of version 5: the round steps
        value, version = pull(a)
        stats = collect([address])[0]
        a.close()
        b.close()

    # the step averaged B's and A's gradients of version 5 (+1 each), not A's old -1 with B's +1
    assert version == 6 and bool((value < 0).all()) and stats["dropped"] == 1
