"""RemoteAdam and ShardClient at their edges: reused client ids, foreign state dicts, partial failures,
retries of down shards, odd parameter lists, float16's range, and what overlap cannot take back."""
from __future__ import annotations

import contextlib
import copy
import logging

import grpc
import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.data import DataCallError
from optserve.client.status import collect
from optserve.client.transport import RetryPolicy, ShardClient, ShardError
from optserve.server.main import run_server


def train_step(model: nn.Module, opt: RemoteAdam, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def shard_versions(servers) -> dict[str, int]:
    return {k["key"]: k["version"] for s in collect(servers) for k in s["keys"]}


def test_a_rebuilt_worker_with_the_same_client_id_has_its_pushes_applied(shard):
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    opts = []
    for _ in range(2):  # a worker restarted: seq starts at 1 again under the same client_id
        with RemoteAdam(model.named_parameters(), [shard], lr=0.1, client_id="worker0") as opt:
            train_step(model, opt, x)
            train_step(model, opt, x)
        opts.append(opt)

    assert shard_versions([shard]) == {"weight": 4, "bias": 4}
    first, second = opts
    assert first.client_id == second.client_id == "worker0"
    assert first.push_id.startswith("worker0/") and second.push_id.startswith("worker0/")
    assert first.push_id != second.push_id


def test_a_torch_adam_state_dict_loads_and_training_continues_from_it(shard):
    model = nn.Linear(4, 3)
    batches = [torch.randn(8, 4) for _ in range(5)]
    local = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    for x in batches[:3]:
        train_step(model, local, x)
    remote = copy.deepcopy(model)
    # lr and eps come from torch's groups; optimized_update (which torch's groups lack) from here:
    # the textbook form is torch's Adam.
    with RemoteAdam(remote.named_parameters(), [shard], lr=0.5, optimized_update=False) as opt:
        opt.load_state_dict(local.state_dict())
        for x in batches[3:]:
            train_step(model, local, x)
            train_step(remote, opt, x)
        state = opt.state_dict()["state"]

    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["optimized_update"] is False
    for p, q in zip(model.parameters(), remote.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0)
    expected = local.state_dict()["state"]
    for i in range(2):
        assert state[i]["step"].item() == 5
        for part in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(state[i][part], expected[i][part], atol=1e-7, rtol=1e-5)


def test_a_refused_state_dict_leaves_the_optimizer_as_it_was(shard):
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    with RemoteAdam(model.named_parameters(), [shard], lr=0.1) as opt:
        saved = opt.state_dict()
        saved["param_groups"][0]["betas"] = (1.0, 0.999)

        with pytest.raises(ValueError, match="beta1"):
            opt.load_state_dict(saved)
        train_step(model, opt, x)

        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
        assert opt.versions == {"weight": 1, "bias": 1}


@pytest.mark.parametrize("overlap", [False, True])
def test_a_step_refused_by_one_shard_keeps_the_versions_of_the_others(overlap):
    model, x = nn.Linear(4, 4), torch.randn(8, 4)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(run_server(policy="ssp:0", shard_index=i, num_shards=2))
                   for i in range(2)]
        opt = stack.enter_context(RemoteAdam(model.named_parameters(), servers, lr=0.1, overlap=overlap))
        on_shard_1 = next(pl.param for pl in opt.placements if pl.shard == 1)
        train_step(model, opt, x)
        poisoned = dict(model.named_parameters())[on_shard_1]
        nan = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
        with pytest.raises(ShardError, match="NaN"):
            train_step(model, opt, x)  # shard 0 applies its push, shard 1 refuses
        nan.remove()

        assert opt.versions == shard_versions(servers)
        train_step(model, opt, x)  # would be refused as stale under ssp:0 with shard 0's old versions
        assert opt.dropped_pushes == 0
        assert opt.versions == shard_versions(servers)


def test_a_shard_whose_name_mentions_tls_is_waited_for_while_down():
    # grpc's details as they read (the address in them): the shard is down, or its certificate is bad.
    down = ("failed to connect to all addresses; last error: UNAVAILABLE: ps-tls-0.invalid:50051: "
            "Connection refused")
    bad_cert = ("failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.7:50051: Tls handshake "
                "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED")
    client = ShardClient("ps-tls-0.invalid:50051", retry=RetryPolicy(budget=10, initial=0.001, maximum=0.001),
                         data_channel=False)
    attempts = []

    def down_twice():
        attempts.append(1)
        if len(attempts) < 3:
            raise DataCallError(grpc.StatusCode.UNAVAILABLE, down)
        return "up"

    def bad_certificate():
        attempts.append(1)
        raise DataCallError(grpc.StatusCode.UNAVAILABLE, bad_cert)

    try:
        assert client._call("Hello", down_twice) == "up"
        assert len(attempts) == 3
        attempts.clear()
        with pytest.raises(ShardError, match="handshake"):
            client._call("Hello", bad_certificate)
        assert len(attempts) == 1  # a handshake failure does not heal by waiting
    finally:
        client.close()


@pytest.mark.parametrize("details", [
    "errors resolving shard-1:50051: [field:hostname lookup error:address lookup failed for shard-1:50051: "
    "Domain name not found]",
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.1.5:50051: Failed to connect to "
    "remote host: Connection refused"])
def test_a_shard_that_could_not_be_reached_is_looked_up_afresh_on_the_next_attempt(shard, details):
    # A Swarm service between its old task and the new one: the old address refuses, the name stops
    # resolving, and gRPC's resolver backs off on its own for up to 120 s (the worker then found the
    # new task 5-7 s after it turned healthy). Each such failure opens a fresh channel.

    class Unresolved(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return details

    client = ShardClient(shard, retry=RetryPolicy(budget=10, initial=0.001, maximum=0.001), data_channel=False)
    channels = []

    def unreachable_twice():
        channels.append(client.channel)
        if len(channels) < 3:
            raise Unresolved()
        return client.hello()

    try:
        assert client._call("Hello", unreachable_twice).num_shards == 1  # the fresh channel works
        assert len(set(map(id, channels))) == 3  # a new channel after each failure
        for old in channels[:2]:
            with pytest.raises(ValueError, match="closed"):  # and the old ones are closed
                old.unary_unary("/optserve.v1.OptServe/Hello")(b"", timeout=1)
    finally:
        client.close()


def test_with_overlap_a_group_added_later_is_pushed_during_backward(shard):
    frozen, head = nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 1)
    with RemoteAdam(frozen.named_parameters(), [shard], overlap=True) as opt:
        opt.add_param_group({"params": list(head.named_parameters(prefix="head"))})
        assert len(opt.param_groups) == 2
        head(frozen(torch.randn(8, 4))).pow(2).mean().backward()
        assert len(opt._inflight) == 1  # the new parameters' bucket left during backward
        opt.step()
        assert opt.versions == {"weight": 0, "bias": 0, "head.weight": 1, "head.bias": 1}


def test_a_parameter_given_twice_is_refused_by_name(shard):
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="'param.1' is the same tensor as 'param.0'"):
        RemoteAdam([p, p], [shard])


@pytest.mark.parametrize("overlap", [False, True])
def test_a_finite_gradient_beyond_float16_is_refused_before_anything_is_sent(shard, overlap):
    model = nn.Linear(2, 1)
    with RemoteAdam(model.named_parameters(), [shard], wire_dtype=torch.float16, overlap=overlap) as opt:
        with pytest.raises(ValueError, match="'weight'.*float16"):
            model(torch.tensor([[1e5, 1.0]])).sum().backward()  # overlap pushes from backward
            opt.step()

    assert shard_versions([shard]) == {"weight": 0, "bias": 0}
    assert collect([shard])[0]["rejected"] == 0


def test_an_option_changed_between_backward_and_step_is_logged_with_overlap(shard, caplog):
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    with RemoteAdam(model.named_parameters(), [shard], lr=0.1, overlap=True) as opt, \
            caplog.at_level(logging.WARNING, logger="optserve.client"):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.param_groups[0]["lr"] = 0.01  # too late: the bucket went with lr=0.1
        opt.step()
        changed = [r.getMessage() for r in caplog.records]
        caplog.clear()
        train_step(model, opt, x)

    assert len(changed) == 1 and "next step" in changed[0]
    assert not caplog.records


def test_a_backward_after_a_skipped_step_says_step_must_follow_every_backward(shard):
    model, x = nn.Linear(4, 2), torch.randn(8, 4)
    with RemoteAdam(model.named_parameters(), [shard], overlap=True) as opt:
        model(x).sum().backward()  # the loop skips step() here (GradScaler found inf, say)
        opt.zero_grad()

        with pytest.raises(RuntimeError, match="skip"):
            model(x).sum().backward()
