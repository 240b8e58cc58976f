"""The CUDA path: a shard with --device cuda keeps params, m, v on the GPU and trains as the reference.

Marked `gpu`: skipped where CUDA is absent (CI has none; there tests/system/test_device_check.py
proves this file installs and collects); run on a lent GPU machine by bench/device_check.sh, with
OPTSERVE_REQUIRE_CUDA=1 so that none may skip.

Bounds. Bitwise where the math allows: what a shard only stores and returns (SetState then a pull,
a checkpoint written and restored, versions and steps). Where two kernels compute (CUDA's fused
kernel against the CPU reference or a CPU shard), within the fast kernels' bound of
tests/unit/test_adam.py, |a - b| <= 1e-6 (1 + |b|): fused kernels reorder a few float32 operations,
a few ulps a step. AdamW's decoupled decay is the reference's multiply on both (server/adam.py).
"""
from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.hyper import AdamConfig
from optserve.server.adam import adam_fast, adam_reference, fused_supported
from optserve.server.main import ServerConfig, Shard, run_server

pytestmark = pytest.mark.gpu

DEVICE = "cuda"  # the shard tests' device (a debugging run may point them at "cpu")
BOUND = dict(rtol=1e-6, atol=1e-6)  # the fast kernels' bound (tests/unit/test_adam.py)
STEPS = 20

KERNEL_CASES = [
    pytest.param(AdamConfig(), id="seed"),
    pytest.param(AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, amsgrad=True), id="amsgrad"),
    pytest.param(AdamConfig(lr=1e-2, eps=1e-8, optimized_update=False, weight_decay=0.1), id="adamw"),
    pytest.param(AdamConfig(weight_decay=0.1, amsgrad=True), id="adamw-amsgrad-seed"),
    pytest.param(AdamConfig(weight_decay=0.1, weight_decouple=False), id="coupled"),
    pytest.param(AdamConfig(weight_decay=0.1, absolute=True), id="absolute"),
]


@contextlib.contextmanager
def shard_on(device: str, **options):
    shard = Shard(ServerConfig(port=0, device=device, **options))
    shard.start()
    try:
        yield shard
    finally:
        shard.stop()


@pytest.mark.parametrize("cfg", KERNEL_CASES)
def test_cuda_fast_kernel_equals_the_reference_kernel(cfg):
    torch.manual_seed(0)
    shapes = [(1000,), (37, 11), (5,)]
    params = [torch.randn(s, device="cuda") for s in shapes]
    ref = [p.cpu() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    ref_state = [[torch.zeros_like(p) for p in ref] for _ in range(3)]

    for t in range(1, 201):
        grads = [torch.randn_like(p) for p in params]
        adam_fast(params, grads, state[0], state[1], state[2] if cfg.amsgrad else None, [t] * 3, cfg)
        for i in range(3):
            adam_reference(ref[i], grads[i].cpu(), ref_state[0][i], ref_state[1][i],
                           ref_state[2][i] if cfg.amsgrad else None, t, cfg)

    assert fused_supported(torch.device("cuda"))
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.cpu(), r, **BOUND)


def test_cuda_decoupled_decay_is_the_references_multiply_bit_for_bit():
    cfg = AdamConfig(lr=1e-2, weight_decay=0.1)
    p = torch.randn(1 << 16, device="cuda")
    ref = p.cpu()
    for _ in range(200):
        torch._foreach_mul_([p], 1.0 - cfg.lr * cfg.weight_decay)  # what adam_fused does on CUDA
        ref.mul_(1.0 - cfg.lr * cfg.weight_decay)  # adam_reference's line

    assert torch.equal(p.cpu(), ref)


# -- a GPU shard against a CPU shard, RemoteAdam in front ------------------------------------------

def _model(prefix: str) -> nn.Module:
    torch.manual_seed(1)  # every worker and both shards start from the same values
    return nn.ModuleDict({prefix: nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 5))})


def _train(device: str, workers: int = 1, shared: bool = True, policy: str = "async", steps: int = STEPS,
           **opt_options) -> tuple[dict[str, torch.Tensor], dict, Shard]:
    """`workers` threads, each with its own RemoteAdam, push fixed gradients for `steps` steps at once;
    shared: every worker trains the same keys (sync averages them), else each its own. Returns the
    shard's keys' values, worker 0's state dict, and the (stopped) shard."""
    options = dict(policy=policy, wait_timeout=120)
    if policy == "sync":
        options["workers"] = workers
    results: dict[int, tuple[nn.Module, dict]] = {}
    errors: list[BaseException] = []
    with shard_on(device, **options) as shard:
        models = [_model("net" if shared else f"worker{w}") for w in range(workers)]  # one thread seeds

        def work(w: int) -> None:
            try:
                model = models[w]
                gen = torch.Generator().manual_seed(100 + w)
                with RemoteAdam(model.named_parameters(), [shard.address], slice_elements=512,
                                chunk_bytes=8192, **opt_options) as opt:
                    for _ in range(steps):
                        for p in model.parameters():
                            p.grad = torch.randn(p.shape, generator=gen)
                        opt.step()
                    results[w] = (model, opt.state_dict())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert not errors, errors
        # The shard's own float32 values (a bf16 pull rounds what the models hold)
        store = shard.core.store
        final = {n: store.get(n).param.cpu() for n in store.names()}
        return final, results[0][1], shard


def _assert_within_bound(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **BOUND, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("options", [
    pytest.param(dict(lr=3e-3), id="adam"),
    pytest.param(dict(lr=3e-3, weight_decay=0.1), id="adamw"),
    pytest.param(dict(lr=3e-3, weight_decay=0.1, amsgrad=True), id="adamw-amsgrad"),
    pytest.param(dict(lr=3e-3, amsgrad=True, optimized_update=False, eps=1e-8), id="amsgrad"),
    pytest.param(dict(lr=3e-3, weight_decay=0.01, weight_decouple=False), id="coupled"),
    pytest.param(dict(lr=3e-3, data_channel=False), id="grpc"),
    pytest.param(dict(lr=3e-3, wire_dtype=torch.float16), id="fp16-wire"),
    pytest.param(dict(lr=3e-3, wire_dtype=torch.bfloat16, pull_dtype=torch.bfloat16), id="bf16-wire"),
])
def test_a_cuda_shard_trains_as_a_cpu_shard(options):
    gpu, gpu_state, _ = _train(DEVICE, **options)
    cpu, cpu_state, _ = _train("cpu", **options)

    _assert_within_bound(gpu, cpu)
    for i, s in cpu_state["state"].items():
        assert gpu_state["state"][i]["step"].item() == s["step"].item() == STEPS
        assert gpu_state["state"][i]["exp_avg"].device.type == "cpu"
        for part in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if part in s:
                torch.testing.assert_close(gpu_state["state"][i][part], s[part], **BOUND)


@pytest.mark.parametrize("policy,shared", [("async", False), ("ssp:1", False), ("sync", True)])
def test_four_workers_push_and_pull_at_once_on_a_cuda_shard(policy, shared):
    gpu, _, gpu_shard = _train(DEVICE, workers=4, shared=shared, policy=policy, lr=3e-3)
    cpu, _, _ = _train("cpu", workers=4, shared=shared, policy=policy, lr=3e-3)

    _assert_within_bound(gpu, cpu)
    store = gpu_shard.core.store
    assert all(store.get(n).step == STEPS for n in store.names())
    assert store.buffers.pinned_elements <= store.buffers._pinned_budget()


def test_set_state_into_a_cuda_shard_round_trips_bit_for_bit():
    torch.manual_seed(2)
    _, state, _ = _train("cpu", steps=3, lr=3e-3, amsgrad=True)
    model = _model("net")
    with run_server(device=DEVICE) as address:
        with RemoteAdam(model.named_parameters(), [address], lr=3e-3, amsgrad=True) as opt:
            opt.load_state_dict(state)
        with RemoteAdam(_model("net").named_parameters(), [address], lr=3e-3, amsgrad=True) as again:
            back = again.state_dict()

    for i, s in state["state"].items():
        for part, value in s.items():
            assert torch.equal(back["state"][i][part], value), (i, part)


def test_a_cuda_shards_checkpoint_restores_bit_for_bit(tmp_path):
    model = _model("net")
    gen = torch.Generator().manual_seed(5)
    with shard_on(DEVICE, checkpoint_dir=str(tmp_path)) as shard:
        with RemoteAdam(model.named_parameters(), [shard.address], lr=3e-3, amsgrad=True,
                        weight_decay=0.1) as opt:
            for _ in range(5):
                for p in model.parameters():
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            before = opt.state_dict()
            shard.core.checkpoint()
    with shard_on(DEVICE, checkpoint_dir=str(tmp_path)) as shard:
        assert shard.core.store.get(shard.core.store.names()[0]).param.device.type == torch.device(DEVICE).type
        restored = _model("net")
        with RemoteAdam(restored.named_parameters(), [shard.address], lr=3e-3, amsgrad=True,
                        weight_decay=0.1) as opt:
            after = opt.state_dict()

    for p, q in zip(model.parameters(), restored.parameters()):
        assert torch.equal(p, q)
    for i, s in before["state"].items():
        for part, value in s.items():
            assert torch.equal(after["state"][i][part], value), (i, part)


def test_a_cuda_shards_pinned_memory_stays_within_its_budget():
    with shard_on(DEVICE) as shard:
        shard.core.store.buffers._pinned_budget = lambda: 1_000  # elements: less than one push (2,309)
        model = _model("net")
        with RemoteAdam(model.named_parameters(), [shard.address], lr=3e-3) as opt:
            for _ in range(3):
                for p in model.parameters():
                    p.grad = torch.ones_like(p)
                opt.step()
        assert 0 < shard.core.store.buffers.pinned_elements <= 1_000


@pytest.mark.parametrize("spec", ["dc:0.5", "dca:0.5"])
def test_dc_asgd_on_a_cuda_store_matches_the_cpu_store(spec):
    """DC-ASGD's ring, MeanSquare and compensation on the device: the same schedule of stale pushes as
    a CPU store, within the fast kernels' bound; staleness 0 leaves the gradient as pushed."""
    from optserve.server.policy import parse_policy
    from optserve.server.store import GradEntry, Store

    n, gen = 4096, torch.Generator().manual_seed(3)
    initial = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(8)]
    schedule = [(0, 0), (0, 1), (1, 2), (1, 3), (4, 4), (3, 5), (6, 6), (5, 7)]  # (version read, grad)
    params = {}
    for device in ("cpu", DEVICE):
        store, policy = Store(device), parse_policy("async", compensate=spec)
        store.create([("w", (n,), initial.to(device), {})])
        for seq, (read, i) in enumerate(schedule, 1):
            entry = GradEntry(key=store.get("w"), version_read=read, cfg=AdamConfig(lr=0.05),
                              pieces=[(0, grads[i].to(device))])
            store.dedupe.run_once("a", seq, 0, lambda origin: policy.submit(store, [entry], origin))
        assert policy.compensator.compensated == 5
        params[device] = store.get("w").param.to("cpu")

    torch.testing.assert_close(params[DEVICE], params["cpu"], **BOUND)
