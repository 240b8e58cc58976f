"""(a) Update kernel throughput: elements per second of one Adam step, no network.

Variants, interleaved round-robin on the same parameters and gradients (each with its own Adam state):
- `optserve adam_fast`: server.adam.adam_fast with the seed's defaults (AdamConfig(), i.e.
  optimized_update=True), given flat 1-D views as the shard's store does;
- `torch Adam foreach` / `torch Adam fused`: torch.optim.Adam(foreach=True) / (fused=True);
- `copy_ (anchor)`: dst.copy_(src) over as many elements, counted as 8 B/element (read + write): the
  memory-bandwidth reference of the same moment (2-thread bandwidth drifts up to 2x between runs).

Parameter sets: flat 10M, flat 50M (full run only) and "model100" (ANCHORS.md: 50 weights [d x 340],
d cycling over 256/512/768/1024/384, plus 50 biases [d]; 10.04M elements). On CPU, and on CUDA too
when torch.cuda.is_available(). A sample is the mean of `inner` back-to-back steps (inner chosen so a
sample lasts ~40 ms), so sub-10 ms kernels are not dominated by timer and scheduler noise.
"""
from __future__ import annotations

import gc
import time
from typing import Callable

import torch

from bench.common import CpuLoad, Settings, fmt, interleave, per_sample, summary, table

TARGET_VS_FUSED = 0.9
_D_CYCLE = (256, 512, 768, 1024, 384)


def model100_shapes() -> list[tuple[int, ...]]:
    weights = [(_D_CYCLE[i % 5], 340) for i in range(50)]
    biases = [(_D_CYCLE[i % 5],) for i in range(50)]
    return weights + biases


def shape_sets(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    sets = {"flat10M": [(10_000_000,)], "flat50M": [(50_000_000,)], "model100": model100_shapes()}
    if quick:
        del sets["flat50M"]
    return sets


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _sampler(fn: Callable[[], None], sync: Callable[[], None], warmup: int) -> Callable[[], float]:
    """Warm fn up, pick `inner` from its time, and return a sampler of seconds per call."""
    for _ in range(max(1, warmup)):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    inner = max(1, min(10, int(0.04 / max(one, 1e-6))))

    def sample() -> float:
        sync()
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        return (time.perf_counter() - t) / inner
    sample.inner = inner  # type: ignore[attr-defined]
    return sample


def _measure(device: torch.device, label: str, shapes: list[tuple[int, ...]], settings: Settings) -> dict:
    from optserve.server.adam import AdamConfig, adam_fast

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.01).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    numel = sum(p.numel() for p in params)

    # optserve: flat views, as the shard's store hands them to the kernel; its own m and v.
    flat_p = [p.detach().view(-1) for p in params]
    flat_g = [p.grad.view(-1) for p in params]
    exp_avgs = [torch.zeros_like(x) for x in flat_p]
    exp_avg_sqs = [torch.zeros_like(x) for x in flat_p]
    cfg = AdamConfig()
    t = [0]

    def optserve_fast() -> None:
        t[0] += 1
        adam_fast(flat_p, flat_g, exp_avgs, exp_avg_sqs, None, [t[0]] * len(flat_p), cfg)

    foreach = torch.optim.Adam(params, lr=1e-3, foreach=True)
    fused = torch.optim.Adam(params, lr=1e-3, fused=True)
    src = torch.randn(numel, generator=gen).to(device)
    dst = torch.zeros_like(src)

    sync = _sync_for(device)
    fns = {"optserve adam_fast": optserve_fast, "torch Adam foreach": foreach.step,
           "torch Adam fused": fused.step, "copy_ (anchor)": lambda: dst.copy_(src)}
    samplers = {name: _sampler(fn, sync, settings.warmup) for name, fn in fns.items()}
    raw = interleave(samplers, settings, warmup=0, label=f"kernel {label}")

    variants = {}
    for name, secs in raw.items():
        variants[name] = {"ms": summary(per_sample(secs, lambda s: s * 1e3)),
                          "gelem_s": summary(per_sample(secs, lambda s: numel / s / 1e9)),
                          "inner": samplers[name].inner}
    variants["copy_ (anchor)"]["gb_s"] = summary(per_sample(raw["copy_ (anchor)"], lambda s: 8 * numel / s / 1e9))
    ratio = variants["optserve adam_fast"]["gelem_s"]["median"] / variants["torch Adam fused"]["gelem_s"]["median"]
    del params, flat_p, flat_g, exp_avgs, exp_avg_sqs, foreach, fused, src, dst
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"device": str(device), "set": label, "numel": numel, "tensors": len(shapes),
            "variants": variants, "fast_vs_fused": ratio}


def run(settings: Settings) -> dict:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    with CpuLoad() as load:
        for device in devices:
            for label, shapes in shape_sets(settings.quick).items():
                rows.append(_measure(device, label, shapes, settings))
    return {"rows": rows, "torch_threads": torch.get_num_threads(), "other_cpu_pct": load.other_pct}


def report(res: dict) -> tuple[str, list[dict]]:
    """The section's table and its target lines."""
    out, targets = [], []
    body = []
    for row in res["rows"]:
        for name, v in row["variants"].items():
            extra = f"copy {fmt(v['gb_s'], 1)} GB/s" if "gb_s" in v else ""
            body.append([f"{row['device']} {row['set']} ({row['numel'] / 1e6:.2f}M, {row['tensors']} t)",
                         name, fmt(v["ms"], 2), fmt(v["gelem_s"], 3), v["inner"], extra])
    out.append(table(["device / set", "variant", "ms per step", "Gelem/s", "inner", ""], body))
    for row in res["rows"]:
        ok = row["fast_vs_fused"] >= TARGET_VS_FUSED
        line = (f"(a) {row['device']} {row['set']}: optserve fast kernel = {row['fast_vs_fused']:.2f}x torch "
                f"fused Adam (target >= {TARGET_VS_FUSED}x)")
        targets.append({"id": f"a/{row['device']}/{row['set']}", "ok": ok, "line": line})
    return "\n".join(out), targets
