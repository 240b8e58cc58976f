"""RemoteAdam against in-process shards: the numbers equal the seed's Adam, and the optimizer API holds."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.client.status import collect
from optserve.hyper import AdamConfig
from optserve.server.adam import adam_reference
from optserve.server.main import run_server

# the bound; fused vs reference kernels differ by a few fp32 ulps (tests/unit/test_adam.py)
TOL = 1e-6


def small_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


class SeedAdam:
    """The seed's Adam run locally, one reference kernel call per parameter."""

    def __init__(self, params, cfg: AdamConfig):
        self.params = [p.detach().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.cfg = cfg

    def step(self, grads, cfg: AdamConfig | None = None):
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            adam_reference(p, g, m, v, None, self.t, cfg or self.cfg)


def train(model, opt, steps, on_grads=None):
    for _ in range(steps):
        x = torch.randn(4, 1, 8, 8)
        y = torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if on_grads:
            on_grads([p.grad.clone() for p in model.parameters()])
        opt.step()


def max_diff(model, ref: SeedAdam) -> float:
    return max((p.detach() - r).abs().max().item() for p, r in zip(model.parameters(), ref.params))


@pytest.mark.parametrize("num_shards", [1, 2])
def test_cnn_trained_50_steps_equals_the_seed_adam_on_the_same_gradients(num_shards):
    model = small_cnn()
    cfg = AdamConfig(lr=3e-3)
    ref = SeedAdam(model.parameters(), cfg)
    with _shards(num_shards) as servers, RemoteAdam(model.named_parameters(), servers, lr=3e-3,
                                                    slice_elements=100) as opt:
        train(model, opt, 50, on_grads=ref.step)

    assert max_diff(model, ref) <= TOL


def test_textbook_update_with_weight_decay_and_amsgrad_equals_the_seed(shard):
    model = small_cnn()
    cfg = AdamConfig(lr=1e-2, eps=1e-8, weight_decay=0.1, weight_decouple=False, optimized_update=False,
                     amsgrad=True)
    ref = SeedAdam(model.parameters(), cfg)
    ref.vmax = [torch.zeros_like(p) for p in ref.params]

    def ref_step(grads):
        ref.t += 1
        for p, g, m, v, vm in zip(ref.params, grads, ref.m, ref.v, ref.vmax):
            adam_reference(p, g, m, v, vm, ref.t, cfg)

    with RemoteAdam(model.named_parameters(), [shard], lr=1e-2, eps=1e-8, weight_decay=0.1,
                    weight_decouple=False, optimized_update=False, amsgrad=True) as opt:
        train(model, opt, 20, on_grads=ref_step)

    assert max_diff(model, ref) <= TOL


def test_a_300_mb_tensor_round_trips_through_one_key(shard):
    n = 75_000_000  # 300 MB of float32, one key streamed in 4 MiB chunks
    param = nn.Parameter(torch.linspace(-1, 1, n))
    with RemoteAdam([("big", param)], [shard], lr=0.5, slice_elements=1 << 30) as opt:
        param.grad = torch.ones(n)
        param.grad[::2] = -1.0

        opt.step()

        # One Adam step with a +-1 gradient moves every element by lr (|m_hat / sqrt(v_hat)| = 1).
        expected = torch.linspace(-1, 1, n)
        expected[::2] += 0.5
        expected[1::2] -= 0.5
        assert torch.allclose(param.detach(), expected, atol=1e-6, rtol=0)
        assert opt.versions["big"] == 1


def test_a_second_worker_adopts_the_first_workers_values(shard):
    first, second = small_cnn(), small_cnn()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)  # different initial values: the server's (the first's) must win

    with RemoteAdam(first.named_parameters(), [shard]), RemoteAdam(second.named_parameters(), [shard]):
        pass

    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_two_workers_see_one_set_of_parameters(shard):
    a_model, b_model = small_cnn(), small_cnn()
    with RemoteAdam(a_model.named_parameters(), [shard]) as a, RemoteAdam(b_model.named_parameters(), [shard]) as b:
        train(a_model, a, 3)

        train(b_model, b, 1)  # b's step pulls the values that include a's three updates

    for p, q in zip(a_model.parameters(), b_model.parameters()):
        assert p.shape == q.shape
    stats = collect([shard])[0]
    assert {k["version"] for k in stats["keys"]} == {4}


def test_lr_scheduler_changes_take_effect_on_the_next_step(shard):
    model = small_cnn()
    ref = SeedAdam(model.parameters(), AdamConfig(lr=1e-2))
    with RemoteAdam(model.named_parameters(), [shard], lr=1e-2) as opt:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
        lrs = []
        for _ in range(5):
            lrs.append(opt.param_groups[0]["lr"])
            train(model, opt, 1, on_grads=lambda g: ref.step(g, AdamConfig(lr=lrs[-1])))
            sched.step()

    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3, 1e-4])
    assert max_diff(model, ref) <= TOL


def test_param_groups_keep_their_own_lr(shard):
    model = small_cnn()
    params = list(model.parameters())
    ref_fast = SeedAdam(params[:2], AdamConfig(lr=1e-1))
    ref_slow = SeedAdam(params[2:], AdamConfig(lr=1e-4))
    groups = [{"params": params[:2], "lr": 1e-1}, {"params": params[2:]}]
    with RemoteAdam(groups, [shard], lr=1e-4) as opt:
        train(model, opt, 5, on_grads=lambda g: (ref_fast.step(g[:2]), ref_slow.step(g[2:])))

    assert max_diff(nn.ParameterList(params[:2]), ref_fast) <= TOL
    assert max_diff(nn.ParameterList(params[2:]), ref_slow) <= TOL
    assert [p.key for p in opt.placements][:2] == ["param.0", "param.1"]  # unnamed params get stable names


def test_state_dict_is_torch_format_and_round_trips_to_a_fresh_shard():
    model = small_cnn()
    with run_server() as first:
        with RemoteAdam(model.named_parameters(), [first], lr=1e-2) as opt:
            train(model, opt, 3)
            saved_model = {k: v.clone() for k, v in model.state_dict().items()}
            saved = opt.state_dict()
            torch.manual_seed(7)
            train(model, opt, 2)  # the uninterrupted run
            expected = [p.detach().clone() for p in model.parameters()]

    assert saved["state"][0]["step"].item() == 3.0
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert saved["state"][0]["exp_avg"].shape == model[0].weight.shape
    assert saved["param_groups"][0]["params"] == list(range(6))

    model.load_state_dict(saved_model)
    with run_server() as second:
        with RemoteAdam(model.named_parameters(), [second], lr=1e-2) as opt:
            opt.load_state_dict(saved)
            torch.manual_seed(7)
            train(model, opt, 2)  # resumed on a fresh shard from the saved state

            assert opt.state_dict()["state"][0]["step"].item() == 5.0
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p.detach(), e)


def test_eight_threads_of_fifty_pushes_give_every_key_exactly_400_steps(two_shards, run_threads):
    models = [small_cnn() for _ in range(8)]
    opts = [RemoteAdam(m.named_parameters(), two_shards, slice_elements=200) for m in models]

    run_threads(lambda model, opt: train(model, opt, 50), zip(models, opts))
    for o in opts:
        o.close()

    keys = [k for shard in collect(two_shards) for k in shard["keys"]]
    assert len(keys) == len(opts[0].placements)
    assert {(k["version"], k["pushes"]) for k in keys} == {(400, 400)}


def test_servers_out_of_index_order_are_refused(two_shards):
    with pytest.raises(ValueError, match="shard-index order"):
        RemoteAdam(small_cnn().named_parameters(), list(reversed(two_shards)))


def test_a_group_of_other_names_cannot_join_a_named_optimizer(shard):
    with RemoteAdam(small_cnn().named_parameters(), [shard]) as opt:
        with pytest.raises(ValueError, match="with/without names"):  # torch's own rule and words
            opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_bad_options_are_refused_before_connecting():
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0: 1.0"):
        RemoteAdam(small_cnn().named_parameters(), ["127.0.0.1:1"], betas=(1.0, 0.999))


def test_a_parameter_without_gradient_is_pulled_but_not_stepped(shard):
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    with RemoteAdam(model.named_parameters(), [shard]) as opt:
        train(model, opt, 2)

        assert opt.versions["0.weight"] == 0
        assert opt.versions["0.bias"] == 2


@contextlib.contextmanager
def _shards(n):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(run_server(shard_index=i, num_shards=n)) for i in range(n)]
