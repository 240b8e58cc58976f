"""DC-ASGD on the shard (server/compensate.py, DCPolicy): parity with a hand-computed float64 DC-ASGD,
staleness 0 is plain async bit for bit, the ring's bound, exactly-once, SetState and checkpoints."""
from __future__ import annotations

import math

import pytest
import torch

from optserve.errors import STALE, RequestError, StatusCode
from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.server.adam import adam_reference
from optserve.server.compensate import (ADAPTIVE_EPS, DCSpec, dc_gradient, parse_compensate)
from optserve.server.policy import AsyncPolicy, DCPolicy, Policy, parse_policy
from optserve.server.store import GradEntry, Store

N = 6
CFG = AdamConfig(lr=0.05)


def store_with(*names: str, seed: int = 0) -> Store:
    gen = torch.Generator().manual_seed(seed)
    store = Store("cpu")
    store.create([(n, (N,), torch.randn(N, generator=gen), {}) for n in names])
    return store


def grad_values(i: int) -> torch.Tensor:
    return torch.linspace(-1.5, 2.0, N) * (1 + 0.1 * i) + 0.05 * i


def entry(store: Store, name: str, version_read: int, g: torch.Tensor) -> GradEntry:
    return GradEntry(key=store.get(name), version_read=version_read, cfg=CFG, pieces=[(0, g.clone())])


def submit(policy: Policy, store: Store, client: str, seq: int, *entries: GradEntry):
    return store.dedupe.run_once(client, seq, 0, lambda origin: policy.submit(store, entries, origin))


# Pushes (version_read, gradient index): two workers interleaved, staleness 0, 1, 1, 2, 0, 2
SCHEDULE = [(0, 0), (0, 1), (1, 2), (1, 3), (4, 4), (3, 5)]


def hand_dc(spec: DCSpec, initial: torch.Tensor) -> torch.Tensor:
    """DC-ASGD then the seed's Adam, element by element in float64 (Python floats), from the paper."""
    theta = [float(x) for x in initial]
    history = [list(theta)]  # history[v]: θ at version v
    m = [0.0] * N
    v = [0.0] * N
    ms = [0.0] * N
    for t, (read, i) in enumerate(SCHEDULE, 1):
        g = [float(x) for x in grad_values(i)]
        for j in range(N):
            ms[j] = spec.momentum * ms[j] + (1 - spec.momentum) * g[j] * g[j]
        lam = [spec.lam / math.sqrt(x + ADAPTIVE_EPS) for x in ms] if spec.adaptive else [spec.lam] * N
        g = [g[j] + lam[j] * g[j] * g[j] * (theta[j] - history[read][j]) for j in range(N)]
        bc1, bc2 = 1 - CFG.beta1 ** t, 1 - CFG.beta2 ** t
        for j in range(N):
            m[j] = CFG.beta1 * m[j] + (1 - CFG.beta1) * g[j]
            v[j] = CFG.beta2 * v[j] + (1 - CFG.beta2) * g[j] * g[j]
            theta[j] -= CFG.lr * math.sqrt(bc2) / bc1 * m[j] / (math.sqrt(v[j]) + CFG.eps)
        history.append(list(theta))
    return torch.tensor(theta, dtype=torch.float64)


def run_schedule(policy: Policy) -> Store:
    store = store_with("w")
    for seq, (read, i) in enumerate(SCHEDULE, 1):
        submit(policy, store, "a", seq, entry(store, "w", read, grad_values(i)))
    return store


@pytest.mark.parametrize("spec", ["dc:0.5", "dca:0.3", "dca:0.2:0.8"])
def test_dc_asgd_on_the_shard_matches_a_hand_computed_float64_dc_asgd(spec):
    store = run_schedule(parse_policy("async", compensate=spec))
    initial = store_with("w").get("w").param

    expected = hand_dc(parse_compensate(spec), initial)

    assert store.get("w").version == len(SCHEDULE)
    torch.testing.assert_close(store.get("w").param.double(), expected, rtol=1e-5, atol=1e-6)


def test_compensation_changes_the_result_against_plain_async():
    dc = run_schedule(parse_policy("async", compensate="dc:0.5")).get("w").param
    plain = run_schedule(AsyncPolicy()).get("w").param

    assert not torch.equal(dc, plain)


def test_the_kernel_is_the_papers_formula_in_float64():
    gen = torch.Generator().manual_seed(1)
    g, now, read = (torch.randn(100, generator=gen, dtype=torch.float64) for _ in range(3))
    lam = torch.rand(100, generator=gen, dtype=torch.float64)

    out = dc_gradient(g, now, read, lam)

    assert torch.equal(g, g.clone()) and out is not g
    torch.testing.assert_close(out, torch.tensor([g[j] + lam[j] * g[j] * g[j] * (now[j] - read[j])
                                                  for j in range(100)], dtype=torch.float64))


@pytest.mark.parametrize("spec", ["dc:0.5", "dca:2"])
def test_staleness_zero_is_plain_async_bit_for_bit(spec):
    dc_store, plain_store = store_with("w", "b"), store_with("w", "b")
    dc, plain = parse_policy("async", compensate=spec), AsyncPolicy()
    for seq in range(1, 8):
        for policy, store in ((dc, dc_store), (plain, plain_store)):
            v = store.get("w").version
            submit(policy, store, "a", seq, entry(store, "w", v, grad_values(seq)),
                   entry(store, "b", v, -grad_values(seq)))

    for name in ("w", "b"):
        for part in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(dc_store.get(name), part), getattr(plain_store.get(name), part))
    assert dc.compensator.compensated == 0


def test_a_push_older_than_the_ring_is_refused_as_stale_and_changes_nothing():
    policy, store = DCPolicy(parse_compensate("dc:0.5"), depth=2), store_with("w")
    for seq in range(1, 5):
        submit(policy, store, "a", seq, entry(store, "w", store.get("w").version, grad_values(seq)))
    before = store.get("w").param.clone()

    with pytest.raises(RequestError) as refused:
        submit(policy, store, "b", 1, entry(store, "w", 1, grad_values(0)))  # staleness 3 > depth 2
    accepted, _ = submit(policy, store, "b", 2, entry(store, "w", 2, grad_values(0)))  # staleness 2

    assert refused.value.code == StatusCode.FAILED_PRECONDITION and refused.value.reason == STALE
    assert "--max-dc-versions 2" in refused.value.message
    assert store.dropped == 1 and accepted.staleness == [2]
    assert not torch.equal(store.get("w").param, before) and store.get("w").version == 5
    assert policy.compensator.rings["w"].versions() == [3, 4]


def test_a_retried_push_is_compensated_once():
    policy, store = parse_policy("async", compensate="dca:0.5"), store_with("w")
    submit(policy, store, "a", 1, entry(store, "w", 0, grad_values(1)))
    stale = entry(store, "w", 0, grad_values(2))
    first, duplicate_first = submit(policy, store, "b", 1, stale)
    state = (store.get("w").param.clone(), policy.compensator.mean_square["w"].clone())

    again, duplicate = submit(policy, store, "b", 1, stale)

    assert (duplicate_first, duplicate) == (False, True) and again == first
    assert torch.equal(store.get("w").param, state[0])
    assert torch.equal(policy.compensator.mean_square["w"], state[1])
    assert policy.compensator.compensated == 1 and store.get("w").version == 2


def test_a_non_finite_compensated_gradient_is_refused_and_changes_nothing():
    policy, store = parse_policy("async", compensate="dc:1e30"), store_with("w")
    submit(policy, store, "a", 1, entry(store, "w", 0, grad_values(1)))
    before = store.get("w").param.clone()

    with pytest.raises(RequestError, match="not finite"):
        submit(policy, store, "b", 1, entry(store, "w", 0, grad_values(2) * 1e10))

    assert torch.equal(store.get("w").param, before) and store.get("w").version == 1
    assert policy.compensator.rings["w"].versions() == [0]


def test_set_state_empties_the_ring_of_the_keys_it_writes():
    policy, store = parse_policy("async", compensate="dc:0.5"), store_with("w")
    submit(policy, store, "a", 1, entry(store, "w", 0, grad_values(1)))

    policy.set_state(store, [(store.get("w"), 0, None, {pb.PARAM: torch.zeros(N)})])

    assert "w" not in policy.compensator.rings


def test_checkpoint_keeps_mean_square_not_the_ring_and_a_restored_shard_continues_identically():
    policy, store = parse_policy("async", compensate="dca:0.5"), store_with("w")
    for seq in range(1, 4):
        submit(policy, store, "a", seq, entry(store, "w", store.get("w").version, grad_values(seq)))
    with policy.checkpoint_lock():
        records, dedupe = store.checkpoint_records()
        state, tensors = policy.checkpoint_state()
    restored_store, restored = Store("cpu"), parse_policy("async", compensate="dca:0.5")
    restored_store.restore(records, dedupe)
    restored.restore_state(state, tensors, restored_store)

    assert state == [] and set(tensors) == {"dc_mean_square/w"}
    assert restored.compensator.rings == {}
    with pytest.raises(RequestError) as refused:  # computed before the "restart": θ_read is gone
        submit(restored, restored_store, "b", 1, entry(restored_store, "w", 2, grad_values(0)))
    assert refused.value.reason == STALE
    for s, p in ((store, policy), (restored_store, restored)):  # the same pushes from here on
        v = s.get("w").version
        submit(p, s, "c", 1, entry(s, "w", v, grad_values(5)))
        submit(p, s, "c", 2, entry(s, "w", v, grad_values(6)))  # staleness 1, compensated
    assert torch.equal(store.get("w").param, restored_store.get("w").param)
    assert torch.equal(policy.compensator.mean_square["w"], restored.compensator.mean_square["w"])


@pytest.mark.parametrize("spec, message", [
    ("dc", "dc:LAMBDA"), ("dc:x", "dc:LAMBDA"), ("dc:-1", "λ must be"), ("dca:1:1.5", "momentum"),
    ("adam:1", "dc:LAMBDA"),
])
def test_bad_compensate_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_compensate(spec)


def test_compensate_needs_async():
    with pytest.raises(ValueError, match="needs --policy async"):
        parse_policy("ssp:2", compensate="dc:0.1")


def test_reference_adam_after_hand_dc_equals_the_store_in_float32_bit_for_bit():
    """The shard's path (compensate, then Adam) against dc_gradient and adam_reference on the side."""
    policy, store = parse_policy("async", compensate="dc:0.5"), store_with("w")
    theta0 = store.get("w").param.clone()
    submit(policy, store, "a", 1, entry(store, "w", 0, grad_values(1)))
    theta1 = store.get("w").param.clone()
    m, v = store.get("w").exp_avg.clone(), store.get("w").exp_avg_sq.clone()

    submit(policy, store, "b", 1, entry(store, "w", 0, grad_values(2)))
    g = dc_gradient(grad_values(2), theta1, theta0, 0.5)
    adam_reference(theta1, g, m, v, None, 2, CFG)

    torch.testing.assert_close(store.get("w").param, theta1, rtol=0, atol=1e-7)


def test_the_shards_checkpointer_writes_mean_square_to_disk_and_restores_it(tmp_path):
    from optserve.server.main import Checkpointer, ServerConfig

    cfg = ServerConfig(compensate="dca:0.5", checkpoint_dir=str(tmp_path))
    policy, store = cfg.make_policy(), store_with("w", "odd name/with:slash")
    for seq in range(1, 4):
        submit(policy, store, "a", seq, entry(store, "w", 0 if seq < 3 else 2, grad_values(seq)),
               entry(store, "odd name/with:slash", store.get("odd name/with:slash").version, grad_values(9)))
    Checkpointer(store, policy, cfg).write()
    restored_store, restored = Store("cpu"), cfg.make_policy()

    Checkpointer(restored_store, restored, cfg).restore()

    assert restored.name == policy.name == "async+dca:0.5:0.95"
    assert set(restored.compensator.mean_square) == {"w", "odd name/with:slash"}
    for name, ms in policy.compensator.mean_square.items():
        assert torch.equal(restored.compensator.mean_square[name], ms)
    assert torch.equal(restored_store.get("w").param, store.get("w").param)
