"""Exact replay (`optserve replay`, optserve/replay.py): a 4-worker asynchronous run against an in-process
shard with --apply-log and its gradients, replayed from a checkpoint, gives the shard's final state bit
for bit; an altered log reports its first divergence (push, key)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from optserve import RemoteAdam
from optserve.cli import main as cli_main
from optserve.client.transport import ShardClient
from optserve.replay import replay
from optserve.server.applylog import gradient_path
from optserve.server.checkpoint import load_checkpoint
from optserve.server.main import run_server

WORKERS, STEPS = 4, 12


def tiny_model() -> nn.Module:
    gen = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=gen)
    return model


def worker(address: str, index: int) -> int:
    """Real backward passes on the worker's own pulled parameters: genuinely asynchronous pushes.
    Returns the pushes the shard dropped (DC-ASGD: staler than its ring)."""
    model = tiny_model()
    gen = torch.Generator().manual_seed(100 + index)
    with RemoteAdam(model.named_parameters(), [address], lr=0.05, client_id=f"w{index}") as opt:
        for _ in range(STEPS):
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
            opt.zero_grad(set_to_none=True)
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return opt.dropped_pushes


def checkpoint(address: str) -> str:
    client = ShardClient(address)
    try:
        return client.checkpoint().path
    finally:
        client.close()


@pytest.fixture(scope="module", params=["async", "dca:0.5"])
def logged_run(request, tmp_path_factory):
    """A 4-worker run with the apply log; (log, first checkpoint, final checkpoint, policy, pushes
    applied)."""
    tmp = tmp_path_factory.mktemp("replay")
    log = tmp / "apply.jsonl"
    options = dict(compensate=request.param) if request.param != "async" else {}
    with run_server(apply_log=str(log), apply_log_max_gradient_bytes=1 << 24,
                    checkpoint_dir=str(tmp / "ckpt"), keep=10, **options) as address:
        RemoteAdam(tiny_model().named_parameters(), [address]).close()  # register the keys
        start = checkpoint(address)
        errors, dropped = [], []

        def guarded(i):
            try:
                dropped.append(worker(address, i))
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=guarded, args=(i,)) for i in range(WORKERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        final = checkpoint(address)
    return log, start, final, request.param, WORKERS * STEPS - sum(dropped)


def test_replay_from_the_first_checkpoint_gives_the_final_state_bit_for_bit(logged_run):
    log, start, final, policy, applied = logged_run
    lines = [json.loads(line) for line in log.read_text().splitlines()]

    report = replay(log, start)

    assert report.equal and report.text().endswith("bitwise equal")
    assert report.replayed == len(lines) == applied and report.skipped == 0
    assert max(s for line in lines for s in (v - r - 1 for v, r in zip(line["versions"], line["version_read"]))) > 0
    expected = {k.name: k for k in load_checkpoint(final).keys}
    for name, rec in expected.items():
        key = report.store.get(name)
        assert key.step == rec.step
        for part in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(key, part), rec.tensors[part].reshape(-1)), (policy, name, part)


def test_replay_from_a_later_checkpoint_skips_what_it_holds(logged_run):
    log, _, final, _, applied = logged_run

    report = replay(log, final)

    assert report.equal and report.skipped == applied and report.replayed == 0


def _tamper(log, push: int, key_index: int, fix_digest: bool):
    """Change one float of push `push`'s gradient for its key `key_index` (and, if asked, its digest)."""
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    line = lines[push]
    at = line["grad_at"] + 4 * sum(n for j in range(key_index) for _, n in line["pieces"][j])
    grads = bytearray(gradient_path(log).read_bytes())
    value = torch.frombuffer(grads[at:at + 4], dtype=torch.float32).item()
    grads[at:at + 4] = torch.tensor([value + 0.25], dtype=torch.float32).numpy().tobytes()
    if fix_digest:
        from optserve.server.applylog import tensors_sha256
        numel = sum(n for _, n in line["pieces"][key_index])
        g = torch.frombuffer(bytes(grads[at:at + 4 * numel]), dtype=torch.float32)
        line["grad_sha256"][key_index] = tensors_sha256([g])
    return lines, bytes(grads), line["keys"][key_index]


@pytest.mark.parametrize("fix_digest, what", [(False, "do not match the digest"),
                                              (True, "state after the step differs")])
def test_a_tampered_log_reports_its_first_divergence(logged_run, tmp_path, fix_digest, what):
    log, start, *_ = logged_run
    lines, grads, key = _tamper(log, push=17, key_index=1, fix_digest=fix_digest)
    copy = tmp_path / "apply.jsonl"
    copy.write_text("".join(json.dumps(line) + "\n" for line in lines))
    gradient_path(copy).write_bytes(grads)

    report = replay(copy, start)

    assert not report.equal and report.replayed == (17 if not fix_digest else 18)
    assert (report.divergence["push"], report.divergence["key"]) == (17, key)
    assert what in report.divergence["what"]


def test_the_reference_kernel_reports_where_it_departs_from_the_fused_shard(logged_run):
    log, start, *_ = logged_run

    report = replay(log, start, kernel="reference")

    # torch's fused CPU Adam rounds differently from the seed's line-for-line kernel (about 1 ulp a step)
    assert report.divergence is not None and "kernel reference" in report.divergence["what"]


def test_replay_stops_where_the_gradient_bound_was_reached(logged_run, tmp_path):
    log, start, *_ = logged_run
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for line in lines[30:]:
        line["grad_at"] = None  # as the shard writes them past --apply-log-max-gradient-bytes
    copy = tmp_path / "apply.jsonl"
    copy.write_text("".join(json.dumps(line) + "\n" for line in lines))
    gradient_path(copy).write_bytes(gradient_path(log).read_bytes())

    report = replay(copy, start)

    assert report.equal and report.replayed == 30 and "bound was reached" in report.stopped


def test_the_cli_prints_bitwise_equal_and_exits_0(logged_run, capsys):
    log, start, *_ = logged_run

    code = cli_main(["replay", str(log), "--checkpoint", start])

    assert code == 0 and capsys.readouterr().out.strip().endswith("bitwise equal")


def test_a_checkpoint_directory_holding_several_must_be_named_one(logged_run):
    log, start, *_ = logged_run
    directory = str(Path(start).parent)

    with pytest.raises(ValueError, match="holds 2 checkpoints"):
        replay(log, directory)


def test_a_log_without_gradients_is_refused_with_what_to_set(logged_run, tmp_path):
    log, start, *_ = logged_run
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for line in lines:
        del line["grad_at"]  # as a shard writes it without --apply-log-max-gradient-bytes
    copy = tmp_path / "apply.jsonl"
    copy.write_text("".join(json.dumps(line) + "\n" for line in lines))

    with pytest.raises(ValueError, match="--apply-log-max-gradient-bytes"):
        replay(copy, start)
