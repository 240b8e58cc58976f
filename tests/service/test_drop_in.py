"""RemoteAdam as a drop-in for torch.optim.Adam: every workflow gives torch's numbers or a clear error.

The silent-wrong-weight cases of resuming, joining, clipping with overlap, copying and setting a
parameter by hand; torch's constructor arguments, words and state-dict format.
"""
from __future__ import annotations

import copy
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.server.main import run_server

TORCH = dict(eps=1e-8, optimized_update=False, weight_decouple=False)  # torch.optim.Adam's math
TOL = 1e-6  # shard kernel vs torch's foreach kernel: a few fp32 ulps (tests/unit/test_adam.py)


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)) for _ in range(n)]


def train(model, opt, data, clip: float | None = None):
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def roundtrip(obj):
    """torch.save then torch.load(weights_only=True), as a checkpoint file would."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def shard_state(opt: RemoteAdam) -> dict:
    """Every key's step, exp_avg, exp_avg_sq and param as the shards hold them."""
    sd = opt.state_dict()
    out = {}
    for i, name in enumerate(n for g in sd["param_groups"] for n in g["param_names"]):
        st = sd["state"].get(i, {})
        out[name] = {k: v.clone() for k, v in st.items()}
    with RemoteAdam(mlp().named_parameters(), [a.address for a in opt._shards]) as reader:  # adopts
        for name, p in reader._params_by_name.items():
            out.setdefault(name, {})["param"] = p.detach().clone()
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for part in a[name]:
            assert torch.equal(a[name][part], b[name][part]), (name, part)


@pytest.fixture
def checkpoint_at_15_then_trained_to_30(shard):
    """Train 15 steps, save model + optimizer (torch.save), train on to step 30 on the same shard."""
    model = mlp()
    with RemoteAdam(model.named_parameters(), [shard], lr=0.05, **TORCH) as opt:
        train(model, opt, batches(15))
        ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
        train(model, opt, batches(15, seed=1))
        assert set(opt.versions.values()) == {30}
    return shard, ckpt


def resume(servers, ckpt, init="shard", order="lightning"):
    """Resume as Lightning does (model weights, then the optimizer is built, then its state) or as
    an HF Trainer given a built optimizer does (optimizer, then weights, then its state)."""
    model = mlp()
    if order == "lightning":
        model.load_state_dict(ckpt["model"])
    opt = RemoteAdam(model.named_parameters(), servers, lr=0.05, init=init, **TORCH)
    if order == "hf":
        model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return model, opt


@pytest.mark.parametrize("order", ["lightning", "hf"])
def test_resume_against_running_shards_with_init_model_equals_a_resume_onto_fresh_shards(
        checkpoint_at_15_then_trained_to_30, order):
    running, ckpt = checkpoint_at_15_then_trained_to_30
    with run_server() as fresh:
        model_a, opt_a = resume([fresh], ckpt, order=order)
        model_b, opt_b = resume([running], ckpt, init="model", order=order)
        with opt_a, opt_b:
            assert_same_state(shard_state(opt_a), shard_state(opt_b))
            assert set(opt_b.versions.values()) == {15}
            train(model_a, opt_a, batches(5, seed=2))
            train(model_b, opt_b, batches(5, seed=2))
            assert_same_state(shard_state(opt_a), shard_state(opt_b))
            for pa, pb_ in zip(model_a.parameters(), model_b.parameters()):
                assert torch.equal(pa, pb_)


def test_resume_against_running_shards_by_default_is_refused_and_changes_nothing(
        checkpoint_at_15_then_trained_to_30):
    running, ckpt = checkpoint_at_15_then_trained_to_30
    with RemoteAdam(mlp().named_parameters(), [running]) as probe:
        before = shard_state(probe)
    # Lightning's order: the constructor adopted the shards' step-30 weights over the restored model.
    with pytest.raises(ValueError, match="state is of step 15, but the model holds the shards' values of "
                                         "step 30"):
        resume([running], ckpt, order="lightning")
    # HF's order: the model holds the checkpoint's weights, but the shards are 15 steps ahead.
    with pytest.raises(ValueError, match="refused: the shards hold newer state.*init='model'"):
        resume([running], ckpt, order="hf")
    with RemoteAdam(mlp().named_parameters(), [running]) as probe:
        assert_same_state(shard_state(probe), before)


def test_accelerate_round_trip_of_a_joining_worker_keeps_the_other_workers_steps(shard):
    a_model, b_model = mlp(), mlp()
    with RemoteAdam(a_model.named_parameters(), [shard], lr=0.05) as a:
        train(a_model, a, batches(10))
        a_at_10 = roundtrip(a.state_dict())
        with RemoteAdam(b_model.named_parameters(), [shard], lr=0.05) as b:  # adopts step 10
            train(a_model, a, batches(20, seed=1))
            b.load_state_dict(b.state_dict())  # AcceleratedOptimizer.__init__
            assert set(b.versions.values()) == {10}  # b's model is still its step-10 copy
            state = shard_state(a)
            assert {s["step"].item() for s in state.values()} == {30.0}
            for name, p in a_model.named_parameters():
                assert torch.equal(state[name]["param"], p.detach())
            # A real rollback: another worker's step-10 state, which b's step-10 weights match.
            with pytest.raises(ValueError, match="refused: the shards hold newer state"):
                b.load_state_dict(a_at_10)
            assert_same_state(shard_state(a), state)


def test_a_round_trip_after_training_is_a_no_op_and_a_later_state_of_this_run_loads(shard):
    model = mlp()
    with RemoteAdam(model.named_parameters(), [shard], lr=0.05) as opt:
        train(model, opt, batches(4))
        before = shard_state(opt)
        opt.load_state_dict(roundtrip(opt.state_dict()))  # through a file: not this object, same step
        assert_same_state(shard_state(opt), before)


def test_overlap_with_gradient_clipping_is_refused_with_the_cause_and_the_fix(shard):
    model = mlp()
    with RemoteAdam(model.named_parameters(), [shard], overlap=True) as opt:
        train(model, opt, batches(1))  # no clipping: fine
        with pytest.raises(RuntimeError, match="changed after backward.*clip_grad_norm_.*overlap=False"):
            train(model, opt, batches(1), clip=1.0)
        # the step still finished: the model equals the shards, and training can go on
        assert_same_state({n: {"param": p.detach()} for n, p in model.named_parameters()},
                          {n: {"param": s["param"]} for n, s in shard_state(opt).items()})
        train(model, opt, batches(1))


def test_overlap_refuses_a_gradient_scaled_in_place_after_backward(shard):
    model = mlp()
    with RemoteAdam(model.named_parameters(), [shard], overlap=True) as opt:
        x, y = batches(1)[0]
        nn.functional.mse_loss(model(x), y).backward()
        model[0].weight.grad.mul_(0.5)  # what GradScaler.unscale_ does
        with pytest.raises(RuntimeError, match=r"\['0.weight'\] changed after backward"):
            opt.step()


@pytest.mark.parametrize("how", [copy.deepcopy, copy.copy, pickle.dumps])
def test_copying_or_pickling_is_refused_and_points_to_state_dict(shard, how):
    with RemoteAdam(mlp().named_parameters(), [shard]) as opt:
        with pytest.raises(TypeError, match="state_dict"):
            how(opt)


@pytest.mark.parametrize("frozen, set_by_hand", [
    (True, lambda m: m[0].weight.fill_(0.25)),  # a frozen layer set by hand after construction
    (False, lambda m: m[2].weight.clamp_(-0.1, 0.1)),  # WGAN-style weight clipping between steps
], ids=["frozen-set", "trained-clamped"])
@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_a_parameter_set_by_hand_behaves_as_with_torch(shard, frozen, set_by_hand, overlap):
    remote, local = mlp(), mlp()
    for m in (remote, local):
        m[0].requires_grad_(not frozen)
    ref = torch.optim.Adam(local.parameters(), lr=0.05)
    with RemoteAdam(remote.named_parameters(), [shard], lr=0.05, overlap=overlap, **TORCH) as opt:
        train(remote, opt, batches(2))
        train(local, ref, batches(2))
        with torch.no_grad():
            for m in (remote, local):
                set_by_hand(m)
        train(remote, opt, batches(3, seed=1))
        train(local, ref, batches(3, seed=1))
        for p, q in zip(remote.parameters(), local.parameters()):
            torch.testing.assert_close(p, q, atol=TOL, rtol=0)
        if frozen:  # torch's Adam leaves it: so do the model and the shards
            assert remote[0].weight.eq(0.25).all()
            assert shard_state(opt)["0.weight"]["param"].eq(0.25).all()


# -- torch's constructor, words and format -----------------------------------------------------

@pytest.mark.parametrize("options, torch_cls, torch_options", [
    (dict(maximize=True), torch.optim.Adam, dict(maximize=True)),
    (dict(weight_decay=0.1, maximize=True), torch.optim.Adam, dict(weight_decay=0.1, maximize=True)),
    (dict(weight_decay=0.1, decoupled_weight_decay=True), torch.optim.AdamW, dict(weight_decay=0.1)),
    (dict(amsgrad=True, foreach=True, fused=False, capturable=False, differentiable=False),
     torch.optim.Adam, dict(amsgrad=True, foreach=True)),
])
def test_torch_options_give_torch_numbers(shard, options, torch_cls, torch_options):
    remote, local = mlp(), mlp()
    ref = torch_cls(local.parameters(), lr=0.02, **torch_options)
    with RemoteAdam(remote.named_parameters(), [shard], lr=0.02, **(TORCH | options)) as opt:
        train(remote, opt, batches(6))
        train(local, ref, batches(6))
        for p, q in zip(remote.parameters(), local.parameters()):
            torch.testing.assert_close(p, q, atol=TOL, rtol=0)
        # opt.state reads the shards' state as torch keeps it
        for p, q in zip(remote.parameters(), local.parameters()):
            mine, theirs = opt.state[p], ref.state[q]
            assert set(mine) == set(theirs) - {"max_exp_avg_sq"} | ({"max_exp_avg_sq"} if "amsgrad" in options else set())
            assert mine["step"].item() == theirs["step"].item() == 6
            torch.testing.assert_close(mine["exp_avg"], theirs["exp_avg"], atol=TOL, rtol=0)
            torch.testing.assert_close(mine["exp_avg_sq"], theirs["exp_avg_sq"], atol=TOL, rtol=0)


def test_torch_errors_in_torch_words():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="should be an iterable of Tensors or dicts"):
        RemoteAdam(p, ["127.0.0.1:1"])
    for options, words in [(dict(lr=-1.0), "Invalid learning rate: -1.0"),
                           (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
                           (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0"),
                           (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
                           (dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
                           (dict(differentiable=True), "differentiable=True"),
                           (dict(init="both"), "init must be one of")]:
        with pytest.raises(ValueError, match=words):
            RemoteAdam([p], ["127.0.0.1:1"], **options)


def test_state_dict_carries_param_names_and_loads_into_torch_adam_and_back(shard):
    remote, local = mlp(), mlp()
    with RemoteAdam(remote.named_parameters(), [shard], lr=0.05, **TORCH) as opt:
        train(remote, opt, batches(3))
        sd = roundtrip(opt.state_dict())
        assert sd["param_groups"][0]["param_names"] == [n for n, _ in remote.named_parameters()]
        local.load_state_dict(remote.state_dict())
        ref = torch.optim.Adam(local.named_parameters(), lr=0.05)
        ref.load_state_dict(sd)
        train(remote, opt, batches(3, seed=1))
        train(local, ref, batches(3, seed=1))
        for p, q in zip(remote.parameters(), local.parameters()):
            torch.testing.assert_close(p, q, atol=TOL, rtol=0)


def test_load_state_dict_keeps_what_post_hooks_wrote_and_adds_no_options(shard):
    model = mlp()
    with RemoteAdam(model.named_parameters(), [shard], lr=0.05, **TORCH) as opt:
        train(model, opt, batches(2))
        sd = opt.state_dict()

        def hook(optimizer):
            optimizer.param_groups[0]["lr"] = 0.5
        opt.register_load_state_dict_post_hook(hook)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.5
        assert set(opt.param_groups[0]) == set(sd["param_groups"][0]) | {"params"}
        assert len(opt.state) == 4 and opt.state[model[0].weight]["step"].item() == 2


def test_add_param_group_steps_the_new_group_as_torch_does(two_shards):
    remote, local = mlp(), mlp()
    for m in (remote, local):
        m[0].requires_grad_(False)
    ref = torch.optim.Adam(local[2].parameters(), lr=0.05)
    with RemoteAdam(remote[2].named_parameters(prefix="2"), two_shards, lr=0.05, **TORCH) as opt:
        train(remote, opt, batches(2))
        train(local, ref, batches(2))
        for m, o in ((remote, opt), (local, ref)):  # Lightning's BackboneFinetuning unfreezes a layer
            m[0].requires_grad_(True)
        opt.add_param_group({"params": list(remote[0].named_parameters(prefix="0")), "lr": 0.01})
        ref.add_param_group({"params": list(local[0].parameters()), "lr": 0.01})
        train(remote, opt, batches(3, seed=1))
        train(local, ref, batches(3, seed=1))
        for p, q in zip(remote.parameters(), local.parameters()):
            torch.testing.assert_close(p, q, atol=TOL, rtol=0)
        assert {k: v for k, v in opt.versions.items() if k.startswith("0.")} == {"0.weight": 3, "0.bias": 3}


def test_a_channels_last_cnn_trains_as_with_torch(two_shards):
    def cnn():
        torch.manual_seed(5)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(),
                             nn.Linear(2 * 4 * 4, 2)).to(memory_format=torch.channels_last)
    remote, local = cnn(), cnn()
    assert not remote[0].weight.is_contiguous()
    ref = torch.optim.Adam(local.parameters(), lr=0.02)
    with RemoteAdam(remote.named_parameters(), two_shards, lr=0.02, slice_elements=64, **TORCH) as opt:
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randn(2, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
            for m, o in ((remote, opt), (local, ref)):
                o.zero_grad()
                m(x).pow(2).mean().backward()
                o.step()
        assert remote[0].weight.is_contiguous(memory_format=torch.channels_last)
        for p, q in zip(remote.parameters(), local.parameters()):
            torch.testing.assert_close(p, q, atol=TOL, rtol=0)


def test_python_dash_m_optserve_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "optserve", "--version"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "optserve" in (out.stdout + out.stderr)


def test_servers_and_client_id_come_from_the_environment(two_shards, monkeypatch):
    monkeypatch.setenv("OPTSERVE_SERVERS", ",".join(two_shards))
    monkeypatch.setenv("RANK", "1")
    model = mlp()
    with RemoteAdam(model.named_parameters()) as opt:
        train(model, opt, batches(1))
        assert [s.address for s in opt._shards] == two_shards
        assert opt.client_id == "rank1" and opt.push_id.startswith("rank1/")
        assert set(opt.versions.values()) == {1}
    out = subprocess.run([sys.executable, "-m", "optserve", "status", "--json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OPTSERVE_SERVERS": ",".join(two_shards)})
    assert out.returncode == 0, out.stderr
    assert '"pushes": 1' in out.stdout
