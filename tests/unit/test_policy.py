"""The policies (server/policy.py) driven against a bare Store: no gRPC, no request core, no threads."""
from __future__ import annotations

import pytest
import torch

from optserve.errors import AHEAD, STALE, RequestError, StatusCode
from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.server.policy import AsyncPolicy, Policy, SSPPolicy, SyncPolicy
from optserve.server.store import GradEntry, PushResult, Store

N = 8
CFG = AdamConfig(lr=0.1)


def store_with(*names: str) -> Store:
    store = Store("cpu")
    store.create([(n, (N,), torch.arange(N, dtype=torch.float32), {}) for n in names])
    return store


def grad(store: Store, name: str, version_read: int, value: float = 1.0) -> GradEntry:
    return GradEntry(key=store.get(name), version_read=version_read, cfg=CFG,
                     pieces=[(0, torch.full((N,), value))])


def submit(policy: Policy, store: Store, client: str, seq: int, *entries: GradEntry) -> PushResult:
    """A push as the request core hands it on: once per (client, seq), through the exactly-once table."""
    result, duplicate = store.dedupe.run_once(client, seq, 0, lambda origin: policy.submit(store, entries, origin))
    assert not duplicate
    return result


def one_step(value: float) -> torch.Tensor:
    """The parameter after one Adam step of this gradient, applied directly."""
    reference = store_with("w")
    reference.apply([grad(reference, "w", 0, value)])
    return reference.get("w").param


def test_every_policy_is_a_policy():
    for policy in (AsyncPolicy(), SSPPolicy(2), SyncPolicy(2)):
        assert isinstance(policy, Policy)


# -- sync ------------------------------------------------------------------------------------------

def test_sync_steps_a_key_once_every_worker_sent_a_gradient_of_its_version_with_their_mean():
    store, policy = store_with("w"), SyncPolicy(workers=2)

    first = submit(policy, store, "a", 1, grad(store, "w", 0, 1.0))
    assert first.versions == [0] and store.get("w").version == 0  # the round waits for b
    second = submit(policy, store, "b", 1, grad(store, "w", 0, 3.0))

    assert second.versions == [1] and first.staleness == second.staleness == [0]
    assert torch.equal(store.get("w").param, one_step(2.0))  # one step of the mean
    assert store.pushes == 1 and store.get("w").staleness.count == 1


def test_a_sync_push_is_recorded_as_applied_when_it_joins_its_round():
    store, policy = store_with("w"), SyncPolicy(workers=2)

    first = submit(policy, store, "a", 1, grad(store, "w", 0))

    assert store.dedupe.begin("a", 1) == first  # a retry is answered, not added to the round again


def test_with_backup_workers_the_first_w_minus_b_gradients_step_and_later_ones_are_dropped():
    store, policy = store_with("w"), SyncPolicy(workers=3, backups=1)
    submit(policy, store, "a", 1, grad(store, "w", 0, 1.0))
    submit(policy, store, "b", 1, grad(store, "w", 0, 3.0))
    stepped = store.get("w").param.clone()

    late = submit(policy, store, "c", 1, grad(store, "w", 0, 100.0))

    assert late.dropped == ["w"] and late.versions == [1]
    assert store.get("w").dropped == 1 and store.dropped == 1
    assert torch.equal(store.get("w").param, stepped) and torch.equal(stepped, one_step(2.0))


def test_a_second_gradient_from_one_worker_for_one_version_is_refused_and_changes_nothing():
    store, policy = store_with("w"), SyncPolicy(workers=2)
    submit(policy, store, "a", 1, grad(store, "w", 0, 1.0))

    with pytest.raises(RequestError, match="already sent a gradient for version 0") as err:
        submit(policy, store, "a", 2, grad(store, "w", 0, 5.0))
    submit(policy, store, "b", 1, grad(store, "w", 0, 3.0))

    assert err.value.code == StatusCode.FAILED_PRECONDITION
    assert store.dedupe.begin("a", 2) is None  # the refused push counts as not applied
    assert torch.equal(store.get("w").param, one_step(2.0))  # the refused gradient never joined


@pytest.mark.parametrize("policy", [AsyncPolicy(), SSPPolicy(1), SyncPolicy(2)], ids=lambda p: p.name)
def test_a_gradient_from_a_version_the_key_has_not_reached_is_refused_with_reason_ahead(policy):
    store = store_with("w")
    before = store.get("w").param.clone()

    with pytest.raises(RequestError) as err:
        submit(policy, store, "a", 1, grad(store, "w", 1))

    assert (err.value.code, err.value.reason) == (StatusCode.FAILED_PRECONDITION, AHEAD)
    assert store.get("w").version == 0 and torch.equal(store.get("w").param, before)
    assert policy.checkpoint_state() == ([], {})


def test_set_state_voids_the_open_round_of_the_keys_it_rewrites():
    store, policy = store_with("w", "u"), SyncPolicy(workers=2)
    submit(policy, store, "a", 1, grad(store, "w", 0), grad(store, "u", 0))

    versions = policy.set_state(store, [(store.get("w"), 5, None, {pb.PARAM: torch.full((N,), 7.0)})])

    assert versions == [5] and store.get("w").version == 5
    assert store.get("w").dropped == 1 and store.get("u").dropped == 0  # only w's round was void
    state, _ = policy.checkpoint_state()
    assert [r["key"] for r in state] == ["u"]
    assert "has 0 of 2 gradients" in policy.describe_wait(store.get("w"))
    assert "has 1 of 2 gradients" in policy.describe_wait(store.get("u"))


def test_a_conditional_set_state_that_would_roll_a_key_back_leaves_the_round_open():
    store, policy = store_with("w"), SyncPolicy(workers=2)
    submit(policy, store, "a", 1, grad(store, "w", 0))
    submit(policy, store, "b", 1, grad(store, "w", 0))
    submit(policy, store, "a", 2, grad(store, "w", 1))

    with pytest.raises(RequestError, match="undo 1 applied step"):
        policy.set_state(store, [(store.get("w"), 0, None, {})], max_versions=[0])

    assert "has 1 of 2 gradients" in policy.describe_wait(store.get("w"))
    assert store.get("w").version == 1


def test_a_restore_under_a_smaller_quorum_steps_the_rounds_that_already_have_it():
    store, policy = store_with("w"), SyncPolicy(workers=3)
    submit(policy, store, "a", 1, grad(store, "w", 0, 1.0))
    submit(policy, store, "b", 1, grad(store, "w", 0, 3.0))
    with policy.checkpoint_lock():
        records, dedupe = store.checkpoint_records()
        state, tensors = policy.checkpoint_state()

    restored, smaller = Store("cpu"), SyncPolicy(workers=2)
    restored.restore(records, dedupe)
    smaller.restore_state(state, tensors, restored)

    assert restored.get("w").version == 1
    assert torch.equal(restored.get("w").param, one_step(2.0))
    assert restored.dedupe.begin("b", 1) is not None  # b's push stays applied: a retry is a duplicate
    assert smaller.checkpoint_state() == ([], {})


def test_a_restore_keeps_rounds_short_of_the_quorum_open():
    store, policy = store_with("w"), SyncPolicy(workers=3)
    submit(policy, store, "a", 1, grad(store, "w", 0, 1.0))
    state, tensors = policy.checkpoint_state()
    records, dedupe = store.checkpoint_records()

    restored, same = Store("cpu"), SyncPolicy(workers=3)
    restored.restore(records, dedupe)
    same.restore_state(state, tensors, restored)
    submit(same, restored, "b", 1, grad(restored, "w", 0, 3.0))
    submit(same, restored, "c", 1, grad(restored, "w", 0, 5.0))

    assert torch.equal(restored.get("w").param, one_step(3.0))  # a's gradient survived the restart


def test_a_sync_checkpoint_restored_under_async_drops_its_rounds_and_their_records():
    store, policy = store_with("w"), SyncPolicy(workers=2)
    submit(policy, store, "a", 1, grad(store, "w", 0))
    state, tensors = policy.checkpoint_state()
    records, dedupe = store.checkpoint_records()

    restored = Store("cpu")
    restored.restore(records, dedupe)
    AsyncPolicy().restore_state(state, tensors, restored)

    assert restored.dedupe.begin("a", 1) is None  # the worker's retry will be applied, once
    assert restored.get("w").version == 0


# -- ssp and async ---------------------------------------------------------------------------------

def advance(store: Store, versions: int) -> None:
    for seq in range(versions):
        submit(AsyncPolicy(), store, "fast", seq + 1, grad(store, "w", seq))


def test_ssp_applies_a_push_within_the_bound_at_the_options_sent():
    store, policy = store_with("w"), SSPPolicy(2)
    advance(store, 2)

    result = submit(policy, store, "slow", 1, grad(store, "w", 0))

    assert result.versions == [3] and result.staleness == [2]
    assert store.get("w").hyper == CFG


def test_ssp_refuses_a_push_over_the_bound_with_reason_stale_and_counts_it_dropped():
    store, policy = store_with("w"), SSPPolicy(1)
    advance(store, 2)
    before = store.get("w").param.clone()

    with pytest.raises(RequestError) as err:
        submit(policy, store, "slow", 1, grad(store, "w", 0))

    assert (err.value.code, err.value.reason) == (StatusCode.FAILED_PRECONDITION, STALE)
    assert store.get("w").version == 2 and torch.equal(store.get("w").param, before)
    assert store.get("w").dropped == 1 and store.dropped == 1
    assert store.dedupe.begin("slow", 1) is None  # not recorded: the client drops it and re-pulls


def test_ssp_scale_applies_a_stale_push_with_lr_divided_by_staleness_plus_one():
    store, policy = store_with("w"), SSPPolicy(1, on_stale="scale")
    advance(store, 2)

    submit(policy, store, "slow", 1, grad(store, "w", 0))

    assert store.get("w").version == 3
    assert store.get("w").hyper.lr == pytest.approx(CFG.lr / 3)


def test_async_applies_every_push_at_once_and_records_its_staleness():
    store, policy = store_with("w"), AsyncPolicy()
    advance(store, 1)

    result = submit(policy, store, "other", 1, grad(store, "w", 0))

    assert result.versions == [2] and result.staleness == [1]
    assert store.get("w").staleness.max == 1 and store.staleness.count == 2


def test_sync_a_round_whose_step_is_refused_is_void_and_counted_as_dropped_and_the_version_trains_on():
    """The round's mean, stepped with the round's options (its first push's), would make the key
    non-finite: the push that completed it is refused, and the round's acknowledged gradients are
    counted as dropped (as when SetState voids a round), not lost uncounted; the same version then
    opens a fresh round."""
    store, policy = store_with("w"), SyncPolicy(workers=2)
    before = store.get("w").param.clone()
    huge = GradEntry(key=store.get("w"), version_read=0, cfg=AdamConfig(lr=1e38),
                     pieces=[(0, torch.full((N,), 1.0))])
    submit(policy, store, "a", 1, huge)
    with pytest.raises(RequestError) as refused:
        submit(policy, store, "b", 1, grad(store, "w", 0, 3.0))
    assert refused.value.code == StatusCode.INVALID_ARGUMENT and "'w'" in refused.value.message
    key = store.get("w")
    assert torch.equal(key.param, before) and key.version == 0
    assert key.dropped == 1 and store.dropped == 1  # a's acknowledged gradient: counted, not silent

    submit(policy, store, "a", 2, grad(store, "w", 0, 1.0))
    assert submit(policy, store, "b", 2, grad(store, "w", 0, 3.0)).versions == [1]
    assert torch.equal(store.get("w").param, one_step(2.0))
