"""(c) End-to-end RemoteAdam.step() time against model size, shard count and overlap.

Model: nn.Linear(1024, 1024) layers (weight 1,048,576 + bias 1,024 elements each) side by side,
their outputs summed: 1 layer (1.05M params), 10 layers (10.5M), 48 layers (50.4M, full run only);
batch 8, loss = mean(out^2). Side by side, not stacked: in a 48-deep ReLU stack the first layers'
gradients vanish to ~1e-24, Adam's v then underflows into subnormal floats, and subnormal arithmetic
made the local fused Adam step itself 2.2x slower per parameter at 50M than at 10M (74 ms against
the 33 ms of the same tensors with normal gradients) -- a property of that model, not of any
optimizer. Summed branches give every layer a gradient of the same scale. Shards are separate
processes (1-shard and 2-shard sets, restarted per size so their memory is freed). Variants,
interleaved round-robin, each doing forward + backward + step per sample (forward, backward and step
timed separately):
- `RemoteAdam, N shard(s)`, overlap off; and overlap on when RemoteAdam has an `overlap` option
  (then backward may already push, and `iter` = fwd + bwd + step is the figure to compare);
- `local torch Adam fused`: torch.optim.Adam(fused=True).step() on the same parameters;
- `raw TCP 64 MiB ping-pong` (anchor): the TCP round-trip rate of this moment (bench/anchors.py),
  checked against its minimal standalone form (bench/standalone.py, timed before the section's
  helpers start and after they stop): more than 10% off, a WARNING and the targets read INVALID.
Transfer lower bound = bytes pushed + pulled (2 x 4 B x params) / that TCP rate. The targets compare
the 10M step (1 shard, overlap off) with 1.5 x (lower bound + local fused Adam step), and the 1M step
(1 shard, overlap off: the fixed costs per step) with 1.5 x the lower bound alone. The shards run on
this host, so RemoteAdam moves the bytes through shared memory (its default, shm=True).
Linearity: ms per M params at each size, and the incremental ms per extra M between consecutive sizes;
the cost is called linear (a fixed per-step cost allowed) when those slopes agree within 25% (needs 3
sizes: the full run; --quick shows the ms/M figures only).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import inspect
import time

import torch

from bench import standalone
from bench.anchors import TcpPingPong, tcp_echo_spec
from bench.common import (MiB, CpuLoad, Settings, children, fmt, interleave, slopes, per_sample,
                          shard_sets, summary, table)

WIDTH = 1024
BATCH = 8
TCP_BYTES = 64 * MiB
TARGET_FACTOR = 1.5
TARGET_SIZE = "10M"
SMALL_SIZE = "1M"
LINEAR_TOLERANCE = 0.25
LOCAL = "local torch Adam fused"
TCP = "raw TCP 64 MiB (anchor)"


def sizes(quick: bool) -> dict[str, int]:
    """label -> number of Linear(1024, 1024) layers."""
    out = {"1M": 1, "10M": 10, "50M": 48}
    if quick:
        del out["50M"]
    return out


def overlap_available() -> bool:
    from optserve import RemoteAdam
    return "overlap" in inspect.signature(RemoteAdam).parameters


class _Branches(torch.nn.Module):
    """`layers` Linear(WIDTH, WIDTH) applied to the same input, outputs summed."""

    def __init__(self, layers: int):
        super().__init__()
        self.branches = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def _model(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return _Branches(layers)


def _train_sample(model: torch.nn.Module, x: torch.Tensor, step) -> dict:
    """One forward + backward + step; seconds of each part."""
    model.zero_grad(set_to_none=False)  # grads stay allocated: no page faults inside the timed parts
    t0 = time.perf_counter()
    loss = model(x).square().mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    step()
    t3 = time.perf_counter()
    return {"fwd": t1 - t0, "bwd": t2 - t1, "step": t3 - t2}


def _measure_size(label: str, layers: int, tcp: TcpPingPong, overlap: bool, settings: Settings) -> dict:
    from optserve import RemoteAdam

    base = _model(layers)
    numel = sum(p.numel() for p in base.parameters())
    x = torch.randn(BATCH, WIDTH)
    variants = {}
    with contextlib.ExitStack() as stack:
        one, two = stack.enter_context(shard_sets(1, 2))
        for on in (False, True) if overlap else (False,):
            for addrs in (one, two):
                # overlap on: a model of its own per optimizer, whose gradient hooks fire for it alone
                model = copy.deepcopy(base) if on else base
                name = f"RemoteAdam, {len(addrs)} shard{'s' if len(addrs) > 1 else ''}, overlap {'on' if on else 'off'}"
                prefix = f"{'on' if on else 'off'}."
                kwargs = {"overlap": True} if on else {}
                opt = RemoteAdam([(prefix + n, p) for n, p in model.named_parameters()], servers=addrs,
                                 timeout=300, **kwargs)
                stack.callback(opt.close)
                variants[name] = (lambda m=model, o=opt: _train_sample(m, x, o.step))
        local = torch.optim.Adam(base.parameters(), lr=1e-3, fused=True)
        variants[LOCAL] = lambda: _train_sample(base, x, local.step)
        # The anchor in its steady state, as its standalone form times it: one untimed round trip first.
        variants[TCP] = lambda: (tcp.round_trip(), {"s": tcp.round_trip()})[1]
        raw = interleave(variants, settings, label=f"e2e {label}")
        del local
    rows = {}
    for name, samples in raw.items():
        if name == TCP:
            continue
        row = {k: summary(per_sample(samples, lambda s, k=k: s[k] * 1e3)) for k in ("fwd", "bwd", "step")}
        row["iter"] = summary(per_sample(samples, lambda s: (s["fwd"] + s["bwd"] + s["step"]) * 1e3))
        row["raw"] = samples
        rows[name] = row
    # What the optimizer costs an iteration: the step with overlap off; with overlap on (traffic
    # inside backward) the iteration minus local forward + backward of the same round.
    for name, row in rows.items():
        row["cost"] = summary([1e3 * (v["step"] if "overlap on" not in name
                                      else v["fwd"] + v["bwd"] + v["step"] - loc["fwd"] - loc["bwd"])
                               for v, loc in zip(raw[name], raw[LOCAL])])
    tcp_gb_s = summary(per_sample([s["s"] for s in raw[TCP]], lambda s: 2 * TCP_BYTES / s / 1e9))
    bound_ms = 2 * 4 * numel / (tcp_gb_s["median"] * 1e9) * 1e3
    del base
    gc.collect()
    return {"label": label, "layers": layers, "numel": numel, "rows": rows, "tcp_gb_s": tcp_gb_s,
            "tcp_s": [s["s"] for s in raw[TCP]], "lower_bound_ms": bound_ms}


def run(settings: Settings) -> dict:
    overlap = overlap_available()
    if not overlap:
        print("  overlap: not available (RemoteAdam has no `overlap` option): overlap off only", flush=True)
    out = []
    with CpuLoad() as before_load:
        before = standalone.run("tcp", TCP_BYTES, settings.reps, settings.warmup)
    with contextlib.ExitStack() as stack:
        (echo,) = stack.enter_context(children(tcp_echo_spec(TCP_BYTES)))
        tcp = TcpPingPong(echo.call("port"), TCP_BYTES)
        stack.callback(tcp.close)
        with CpuLoad() as load:
            for label, layers in sizes(settings.quick).items():
                out.append(_measure_size(label, layers, tcp, overlap, settings))
    with CpuLoad() as after_load:
        after = standalone.run("tcp", TCP_BYTES, settings.reps, settings.warmup)
    check = standalone.compare(TCP, [t for s in out for t in s["tcp_s"]], before["s"] + after["s"])
    names = list(out[0]["rows"])
    linearity = {}
    for name in names:
        ms = [s["rows"][name]["cost"]["median"] for s in out]
        m = [s["numel"] / 1e6 for s in out]
        linearity[name] = {"ms_per_M": [a / b for a, b in zip(ms, m)], **slopes(m, ms, LINEAR_TOLERANCE)}
    b_tcp = settings.results.get("b", {}).get("tcp_gb_s")
    return {"sizes": out, "overlap_available": overlap, "linearity": linearity, "tcp_gb_s_from_b": b_tcp,
            "anchor_checks": {TCP: check}, "standalone": {"before": before, "after": after},
            "other_cpu_pct": load.other_pct, "standalone_other_cpu_pct": [before_load.other_pct, after_load.other_pct]}


def report(res: dict) -> tuple[str, list[dict]]:
    body = []
    for s in res["sizes"]:
        for name, r in s["rows"].items():
            body.append([f"{s['label']} ({s['numel'] / 1e6:.2f}M)", name, fmt(r["step"], 1), fmt(r["bwd"], 1),
                         fmt(r["iter"], 1), fmt(r["cost"], 1)])
        body.append([f"{s['label']} ({s['numel'] / 1e6:.2f}M)", "transfer lower bound", f"{s['lower_bound_ms']:.1f}",
                     "", f"TCP {fmt(s['tcp_gb_s'], 2)} GB/s", f"{s['lower_bound_ms']:.1f}"])
    text = table(["params", "variant", "step ms", "bwd ms", "fwd+bwd+step ms", "cost ms"], body)
    text += ("\n  cost = step with overlap off; with overlap on, fwd+bwd+step minus the local variant's fwd+bwd "
             "of the same round (pushes run inside backward)")
    if not res["overlap_available"]:
        text += "\n  overlap: not available"
    if res.get("tcp_gb_s_from_b"):
        text += (f"\n  lower bound uses the TCP rate interleaved in this section; section (b) measured "
                 f"{res['tcp_gb_s_from_b']:.2f} GB/s")
    text += ("\n  linearity of cost in size: ms per M params at " + ", ".join(s["label"] for s in res["sizes"])
             + "; incremental ms per extra M between consecutive sizes (a fixed cost per step is allowed):")
    for name, lin in res["linearity"].items():
        per = ", ".join(f"{v:.2f}" for v in lin["ms_per_M"])
        inc = ", ".join(f"{v:.2f}" for v in lin["slopes"])
        if lin["linear"] is None:
            verdict_text = "2 sizes: linearity not testable (the full run has 3)"
        else:
            verdict_text = (f"{'linear' if lin['linear'] else 'NOT linear'} (incremental slopes within "
                            f"{lin['tolerance']:.0%}: {'yes' if lin['linear'] else 'no'})")
        text += f"\n    {name}: {per} ms/M; incremental {inc} ms/M -> {verdict_text}"

    checks = res.get("anchor_checks", {})
    text += "\n" + standalone.check_lines(list(checks.values()), res.get("standalone_other_cpu_pct", ()))
    valid = all(c["valid"] for c in checks.values())
    targets = []
    for s in res["sizes"]:
        if s["label"] == SMALL_SIZE:
            ms = s["rows"]["RemoteAdam, 1 shard, overlap off"]["cost"]["median"]
            bound = TARGET_FACTOR * s["lower_bound_ms"]
            targets.append({"id": "c/1M", "ok": ms <= bound, "valid": valid,
                            "line": f"(c) {s['label']}, RemoteAdam, 1 shard, overlap off: step {ms:.1f} ms vs 1.5 x "
                                    f"its transfer lower bound {s['lower_bound_ms']:.1f} = {bound:.1f} ms [target]"})
        if s["label"] != TARGET_SIZE:
            continue
        local = s["rows"][LOCAL]
        budget = TARGET_FACTOR * (s["lower_bound_ms"] + local["step"]["median"])
        for name, r in s["rows"].items():
            if name == LOCAL:
                continue
            ms = r["cost"]["median"]
            headline = name == "RemoteAdam, 1 shard, overlap off"
            targets.append({"id": f"c/{name}", "ok": ms <= budget, "headline": headline, "valid": valid,
                            "line": f"(c) {s['label']}, {name}: cost {ms:.1f} ms vs 1.5 x (lower bound "
                                    f"{s['lower_bound_ms']:.1f} + local fused step {local['step']['median']:.1f})"
                                    f" = {budget:.1f} ms{' [target]' if headline else ' [info]'}"})
    return text, targets
