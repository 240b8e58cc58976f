"""Store.apply never makes a key non-finite (server/store.py): an ordinary step is bounded from scalars
and runs as before, with no pass over the key's memory; a step the bounds cannot clear is computed on
copies and refused, leaving the key bitwise as it was, when its result is not finite."""
from __future__ import annotations

import pytest
import torch

from optserve.errors import RequestError, StatusCode
from optserve.hyper import AdamConfig
from optserve.proto.optserve.v1 import optserve_pb2 as pb
from optserve.server import store as store_module
from optserve.server.store import GradEntry, Store

N = 8
CFG = AdamConfig(lr=0.01, eps=1e-8)


def store_with_key(name: str = "w"):
    store = Store("cpu")
    [(key, _)] = store.create([(name, (N,), torch.linspace(-1, 1, N), {})])
    return store, key


def entry(key, cfg: AdamConfig = CFG, grad: torch.Tensor | None = None, bound: bool = True) -> GradEntry:
    grad = torch.full((N,), 0.5) if grad is None else grad
    return GradEntry(key=key, version_read=key.version, cfg=cfg, pieces=[(0, grad)],
                     grad_bound=float(grad.abs().max()) if bound else float("inf"))


def state(key) -> list:
    return [key.step, key.pushes, key.max_exp_avg_sq] + [t.clone() for t in (key.param, key.exp_avg, key.exp_avg_sq)]


def same(a: list, b: list) -> bool:
    return a[:3] == b[:3] and all(torch.equal(x, y) for x, y in zip(a[3:], b[3:]))


def test_an_ordinary_step_after_the_first_is_not_checked_on_a_copy(monkeypatch):
    store, key = store_with_key()
    store.apply([entry(key)])  # a new key's bounds are unknown: its first step is checked
    assert key.bounds is not None

    def no_copy(todo, copy, give):
        assert not todo, "an ordinary step was computed on a copy"
        return []

    monkeypatch.setattr(store_module, "_checked_steps", no_copy)
    for _ in range(50):
        store.apply([entry(key)])
        store.apply([entry(key, bound=False)])  # a sync round's average: bounded from its squares
    assert key.version == 101 and torch.isfinite(key.param).all()


def test_the_checked_step_equals_the_ordinary_step():
    checked, a = store_with_key()
    plain, b = store_with_key()
    plain.apply([entry(b)])
    checked.apply([entry(a)])
    b.bounds = None  # force the copy path for the second step of one of them
    for s, k in ((checked, a), (plain, b)):
        s.apply([entry(k, grad=torch.linspace(-2, 3, N))])
    assert torch.equal(a.param, b.param) and torch.equal(a.exp_avg, b.exp_avg)
    assert torch.equal(a.exp_avg_sq, b.exp_avg_sq)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_a_refused_overflowing_step_leaves_the_key_bitwise_as_it_was(amsgrad):
    store, key = store_with_key()
    store.apply([entry(key)])
    key.exp_avg[3] = 3e38  # as SetState writes it
    key.bounds = None
    before = state(key)
    with pytest.raises(RequestError) as err:
        store.apply([entry(key, AdamConfig(lr=1.0, eps=1e-8, amsgrad=amsgrad))])
    assert err.value.code == StatusCode.INVALID_ARGUMENT and "'w'" in err.value.message
    assert "element 3" in err.value.message
    assert same(state(key), before)
    assert key.max_exp_avg_sq is None  # amsgrad's tensor was not allocated for a refused step
    assert store.pushes == 1


def test_a_push_is_refused_whole_when_one_of_its_keys_would_overflow():
    store = Store("cpu")
    (a, _), (b, _) = store.create([(n, (N,), torch.ones(N), {}) for n in ("a", "b")])
    b.exp_avg[0] = 3e38
    before = state(a), state(b)
    with pytest.raises(RequestError, match="'b'"):
        store.apply([entry(a, AdamConfig(lr=1.0)), entry(b, AdamConfig(lr=1.0))])
    assert same(state(a), before[0]) and same(state(b), before[1])


def test_a_checked_step_never_writes_the_tensor_a_pull_is_sending():
    store, key = store_with_key()
    snap = store.snapshot([key], [pb.PARAM])
    sent = snap.parts[(0, pb.PARAM)]
    was = sent.clone()
    store.apply([entry(key)])  # unknown bounds: the step is computed on copies, which the key takes
    assert torch.equal(sent, was) and key.param is not sent and key.version == 1
    store.release(snap)
    assert len(store._leases) == 0 and store.buffers._kept == N  # the leased old tensor went to the pool
