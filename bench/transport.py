"""(b) Transport: one 64 MiB parameter, gradient pushed and parameter pulled back through one shard.

GB/s counts both directions: 128 MiB (2 x 64 MiB, GB = 1e9 bytes) divided by the round-trip time.
Variants, interleaved round-robin; each timed call follows one untimed call of the same variant
(`interleave(settle=1)`), so every row, the anchors included, is timed in its steady state as the
anchors' standalone forms are (a TCP round trip timed just after the other variants ran was up to
1.3x slower than back to back in the same processes, in some runs and not others):
- `optserve RemoteAdam.step`: RemoteAdam with one 16,777,216-element parameter (one key:
  slice_elements above its size) against a shard in its own process (`python -m bench.shard serve`,
  which is `optserve serve` plus the hook of the next row), over the data channel's socket
  (shm=False); the time of opt.step(): push, Adam on the shard, pull into the parameter in place;
- `optserve RemoteAdam.step, Adam skipped`: the same on a key whose name bench/shard.py's hook makes
  the shard skip the Adam kernel for: everything else a step does (same bytes, same code), so it
  is the transfer alone; the full step minus it, round by round, is the Adam share;
- `optserve RemoteAdam.step, shared memory` and `..., shared memory, Adam skipped`: the same two
  rows with shm=True (the default): the worker is on the shard's host, so the bytes go through a
  shared-memory segment (optserve/shm.py) and only the frames' heads through the socket;
- `optserve ShardClient.push_pull`: the same round trip one layer down (no RemoteAdam bookkeeping),
  on a second key of the same shard;
- `optserve RemoteAdam.step, gRPC only`: RemoteAdam with data_channel=False on a third key: the
  tensors travel in gRPC streams (what a worker gets when the data port cannot be reached);
- `raw TCP ping-pong` (anchor): 64 MiB each way between two Python processes (bench/anchors.py);
- `torch.distributed.rpc PS` (anchor): TensorPipe over TCP, fused torch Adam on the PS (anchors.py);
  its rows also give the PS's Adam step time.
Anchor check: before the helpers start and after they stop, bench/standalone.py times both anchors'
minimal standalone forms (fresh processes, nothing else of the bench alive); an anchor whose median
differs from its standalone form's (both runs pooled) by more than 10% gets a WARNING line, and the
targets on it read INVALID.
The TCP rate is kept for section (c)'s transfer lower bound.
"""
from __future__ import annotations

import contextlib

import torch

from bench import standalone
from bench.anchors import TcpPingPong, tcp_echo_spec, torch_rpc_specs
from bench.common import (MiB, CpuLoad, Settings, children, fmt, interleave, per_sample, shard_sets,
                          summary, table, timed)
from bench.shard import NO_ADAM_PREFIX

NBYTES = 64 * MiB
NUMEL = NBYTES // 4
TARGET_TRANSFER_VS_TCP = 0.9
TARGET_VS_TCP = 0.6
TARGET_VS_RPC = 1.7
TARGET_SHM_VS_TCP = 2.0

STEP = "optserve RemoteAdam.step"
STEP_NO_ADAM = "optserve RemoteAdam.step, Adam skipped (transfer only)"
PUSH_PULL = "optserve ShardClient.push_pull"
STEP_GRPC = "optserve RemoteAdam.step, gRPC only"
STEP_SHM = "optserve RemoteAdam.step, shared memory"
STEP_SHM_NO_ADAM = "optserve RemoteAdam.step, shared memory, Adam skipped (transfer only)"
TCP = "raw TCP ping-pong (anchor)"
RPC = "torch.distributed.rpc PS, fused Adam (anchor)"


class _PushPull:
    """The round trip through ShardClient directly, on its own key (registered here)."""

    def __init__(self, address: str):
        from optserve.client.transport import ShardClient
        from optserve.proto.optserve.v1 import optserve_pb2 as pb
        from optserve.serde import Outgoing
        from optserve.server.adam import AdamConfig
        from optserve.server.service import hyper_to_proto
        self.pb, self.Outgoing = pb, Outgoing
        self.client = ShardClient(address, timeout=120, shm=False)
        self.key = "bench.transport.push_pull"
        self.param = torch.randn(NUMEL) * 0.01
        self.grad = torch.randn(NUMEL) * 1e-3
        self.hyper = [hyper_to_proto(AdamConfig())]
        self.client.register(pb.RegisterHead(keys=[pb.KeySpec(name=self.key, shape=[NUMEL], dtype=pb.FLOAT32)],
                                             shard_index=0, num_shards=1, with_values=True),
                             [Outgoing(0, pb.PARAM, self.param)])
        self.version, self.seq = 0, 0

    def round_trip(self) -> float:
        pb = self.pb
        self.seq += 1
        head = pb.PushHead(client_id="bench", seq=self.seq, wire_dtype=pb.FLOAT32, hyper=self.hyper,
                           entries=[pb.PushEntry(key=self.key, version_read=self.version, hyper=0)])
        grads = [self.Outgoing(0, pb.GRAD, self.grad)]
        reply = None

        def call():
            nonlocal reply
            reply = self.client.push_pull(head, grads, torch.float32, lambda h: {(0, pb.PARAM): self.param})
        s = timed(call)
        self.version = reply.entries[0].version
        return s

    def close(self) -> None:
        self.client.close()


def _standalone(settings: Settings) -> dict:
    """Both anchors' minimal forms, one after the other (nothing else of this section alive)."""
    with CpuLoad() as load:
        tcp = standalone.run("tcp", NBYTES, settings.reps, settings.warmup)
        rpc = standalone.run("rpc", NUMEL, settings.reps, settings.warmup)
    return {TCP: tcp, RPC: rpc, "other_cpu_pct": load.other_pct}


def _remote_adam(name: str, addrs: list[str], **kwargs):
    """RemoteAdam on one 16 M-element parameter (one key) with a gradient set; (optimizer, parameter)."""
    from optserve import RemoteAdam
    param = torch.nn.Parameter(torch.randn(NUMEL) * 0.01)
    param.grad = torch.randn(NUMEL) * 1e-3
    return RemoteAdam([(name, param)], servers=addrs, slice_elements=2 * NUMEL, timeout=120, **kwargs), param


def run(settings: Settings) -> dict:
    before = _standalone(settings)
    ps_spec, trainer_spec = torch_rpc_specs(NUMEL)
    with contextlib.ExitStack() as stack:
        # Everything starts at once: the helper processes come up while the shard does.
        echo, _, trainer = stack.enter_context(children(tcp_echo_spec(NBYTES), ps_spec, trainer_spec))
        (addrs,) = stack.enter_context(shard_sets(1, module="bench.shard"))
        tcp = TcpPingPong(echo.call("port"), NBYTES)
        stack.callback(tcp.close)
        opt, _ = _remote_adam("bench.transport.step", addrs, shm=False)
        stack.callback(opt.close)
        opt_no_adam, no_adam_param = _remote_adam(NO_ADAM_PREFIX + "transport.step", addrs, shm=False)
        no_adam_initial = no_adam_param.detach().clone()
        stack.callback(opt_no_adam.close)
        opt_grpc, _ = _remote_adam("bench.transport.step_grpc", addrs, data_channel=False)
        stack.callback(opt_grpc.close)
        opt_shm, _ = _remote_adam("bench.transport.step_shm", addrs, shm=True)
        stack.callback(opt_shm.close)
        opt_shm_no_adam, shm_no_adam_param = _remote_adam(NO_ADAM_PREFIX + "transport.step_shm", addrs, shm=True)
        shm_no_adam_initial = shm_no_adam_param.detach().clone()
        stack.callback(opt_shm_no_adam.close)
        pp = _PushPull(addrs[0])
        stack.callback(pp.close)
        trainer.wait_ready()

        def rpc_sample() -> dict:
            rt, step = trainer.call("round_trip", timeout=120)
            return {"s": rt, "ps_step_s": step}

        variants = {STEP: lambda: {"s": timed(opt.step)},
                    STEP_NO_ADAM: lambda: {"s": timed(opt_no_adam.step)},
                    PUSH_PULL: lambda: {"s": pp.round_trip()},
                    STEP_GRPC: lambda: {"s": timed(opt_grpc.step)},
                    STEP_SHM: lambda: {"s": timed(opt_shm.step)},
                    STEP_SHM_NO_ADAM: lambda: {"s": timed(opt_shm_no_adam.step)},
                    TCP: lambda: {"s": tcp.round_trip()},
                    RPC: rpc_sample}
        with CpuLoad() as load:
            raw = interleave(variants, settings, label="transport", settle=1)
        if not (torch.equal(no_adam_param.detach(), no_adam_initial)  # each step pulled it back
                and torch.equal(shm_no_adam_param.detach(), shm_no_adam_initial)):
            raise RuntimeError("the shard applied Adam to the 'Adam skipped' key: bench/shard.py's hook "
                               "no longer reaches the store's update; the transfer-only row would be wrong")
    after = _standalone(settings)

    rows = {}
    for name, samples in raw.items():
        secs = [s["s"] for s in samples]
        rows[name] = {"ms": summary(per_sample(secs, lambda s: s * 1e3)),
                      "gb_s": summary(per_sample(secs, lambda s: 2 * NBYTES / s / 1e9)),
                      "raw": samples}
    rpc_step = [s["ps_step_s"] for s in raw[RPC]]
    rows[RPC]["ps_step_ms"] = summary(per_sample(rpc_step, lambda s: s * 1e3))
    # The Adam share, round by round: the full step minus the transfer-only step of the same round.
    adam_ms = summary([1e3 * (a["s"] - b["s"]) for a, b in zip(raw[STEP], raw[STEP_NO_ADAM])])
    shm_adam_ms = summary([1e3 * (a["s"] - b["s"]) for a, b in zip(raw[STEP_SHM], raw[STEP_SHM_NO_ADAM])])
    med = {n: r["gb_s"]["median"] for n, r in rows.items()}
    checks = {name: standalone.compare(name, [s["s"] for s in raw[name]], before[name]["s"] + after[name]["s"])
              for name in (TCP, RPC)}
    checks[RPC]["standalone_ps_step_ms"] = summary(
        [1e3 * s for s in before[RPC]["ps_step_s"] + after[RPC]["ps_step_s"]])
    return {"bytes_each_way": NBYTES, "rows": rows, "adam_share_ms": adam_ms, "shm_adam_share_ms": shm_adam_ms,
            "ratios": {"step_vs_tcp": med[STEP] / med[TCP], "transfer_vs_tcp": med[STEP_NO_ADAM] / med[TCP],
                       "shm_step_vs_tcp": med[STEP_SHM] / med[TCP],
                       "shm_transfer_vs_tcp": med[STEP_SHM_NO_ADAM] / med[TCP],
                       "step_vs_rpc": med[STEP] / med[RPC],
                       "push_pull_vs_tcp": med[PUSH_PULL] / med[TCP],
                       "grpc_step_vs_tcp": med[STEP_GRPC] / med[TCP]},
            "tcp_gb_s": med[TCP], "anchor_checks": checks,
            "standalone": {"before": before, "after": after},
            "other_cpu_pct": load.other_pct,
            "standalone_other_cpu_pct": [before["other_cpu_pct"], after["other_cpu_pct"]]}


def report(res: dict) -> tuple[str, list[dict]]:
    body = []
    for name, r in res["rows"].items():
        note = f"PS Adam step {fmt(r['ps_step_ms'], 1)} ms" if "ps_step_ms" in r else ""
        body.append([name, fmt(r["ms"], 1), fmt(r["gb_s"], 2), note])
    text = table(["64 MiB push + 64 MiB pull", "round trip ms", "GB/s (both ways)", ""], body)
    ra = res["ratios"]
    step_ms = res["rows"][STEP]["ms"]["median"]
    adam = res["adam_share_ms"]
    text += (f"\n  ratios (medians): RemoteAdam.step / TCP = {ra['step_vs_tcp']:.2f}, "
             f"transfer only (Adam skipped) / TCP = {ra['transfer_vs_tcp']:.2f}, "
             f"RemoteAdam.step / torch rpc = {ra['step_vs_rpc']:.2f}, "
             f"ShardClient.push_pull / TCP = {ra['push_pull_vs_tcp']:.2f}, "
             f"RemoteAdam.step over gRPC only / TCP = {ra['grpc_step_vs_tcp']:.2f}, "
             f"RemoteAdam.step through shared memory / TCP = {ra['shm_step_vs_tcp']:.2f} "
             f"(Adam skipped: {ra['shm_transfer_vs_tcp']:.2f})"
             f"\n  step split: Adam on the shard = step - transfer only, per round: {fmt(adam, 1)} ms "
             f"({adam['median'] / step_ms:.0%} of the step's median)")
    checks = res["anchor_checks"]
    text += "\n" + standalone.check_lines(list(checks.values()), res.get("standalone_other_cpu_pct", ()))
    tcp_ok, rpc_ok = checks[TCP]["valid"], checks[RPC]["valid"]
    targets = [
        {"id": "b/transfer", "ok": ra["transfer_vs_tcp"] >= TARGET_TRANSFER_VS_TCP, "valid": tcp_ok,
         "line": f"(b) transfer only (RemoteAdam.step, Adam skipped) 64+64 MiB = {ra['transfer_vs_tcp']:.2f}x "
                 f"raw TCP (target >= {TARGET_TRANSFER_VS_TCP}x)"},
        {"id": "b/tcp", "ok": ra["step_vs_tcp"] >= TARGET_VS_TCP, "valid": tcp_ok,
         "line": f"(b) RemoteAdam.step 64+64 MiB = {ra['step_vs_tcp']:.2f}x raw TCP (target >= {TARGET_VS_TCP}x; "
                 f"of its {step_ms:.1f} ms, Adam on the shard {adam['median']:.1f} ms)"},
        {"id": "b/rpc", "ok": ra["step_vs_rpc"] >= TARGET_VS_RPC, "valid": rpc_ok,
         "line": f"(b) RemoteAdam.step 64+64 MiB = {ra['step_vs_rpc']:.2f}x torch.distributed.rpc "
                 f"(target >= {TARGET_VS_RPC}x)"},
        {"id": "b/shm", "ok": ra["shm_step_vs_tcp"] >= TARGET_SHM_VS_TCP, "valid": tcp_ok,
         "line": f"(b) RemoteAdam.step through shared memory 64+64 MiB = {ra['shm_step_vs_tcp']:.2f}x raw TCP "
                 f"(target >= {TARGET_SHM_VS_TCP}x; of its {res['rows'][STEP_SHM]['ms']['median']:.1f} ms, Adam "
                 f"on the shard {res['shm_adam_share_ms']['median']:.1f} ms; transfer only "
                 f"{ra['shm_transfer_vs_tcp']:.2f}x)"},
    ]
    return text, targets
