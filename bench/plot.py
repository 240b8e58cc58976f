"""The PNG of a bench run: one panel per section, medians with min–max error bars.

(a) kernel Gelem/s bars, (b) transport GB/s bars with the anchors and the target levels,
(c) step ms against parameters with the transfer lower bound, (d) aggregate steps/s against workers.
Reads only the JSON-shaped result dict that run.py writes; draws with matplotlib's Agg backend.
"""
from __future__ import annotations

from pathlib import Path


def _err(stat: dict) -> tuple[float, list[float]]:
    m = stat["median"]
    return m, [m - stat["min"], stat["max"] - m]


def _bars(ax, labels: list[str], stats: list[dict], colors=None, width=0.8, offset=0.0, label=None):
    xs = [i + offset for i in range(len(labels))]
    meds = [s["median"] for s in stats]
    errs = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
    ax.bar(xs, meds, width=width, yerr=errs, capsize=3, color=colors, label=label)


def _not_run(ax, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _kernel(ax, res: dict) -> None:
    rows = res["rows"]
    names = [n for n in rows[0]["variants"] if "copy" not in n]
    labels = [f"{r['device']}\n{r['set']}" for r in rows]
    w = 0.8 / len(names)
    for j, name in enumerate(names):
        _bars(ax, labels, [r["variants"][name]["gelem_s"] for r in rows], width=w,
              offset=(j - (len(names) - 1) / 2) * w, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("Gelem/s (higher is better)")
    ax.set_title("(a) Adam update kernel")
    ax.legend(fontsize=7)


def _transport_color(name: str) -> str:
    """Anchors in the colours of their target lines; optserve's gRPC-only row apart from the rest."""
    if "TCP" in name:
        return "tab:gray"
    if "rpc" in name:
        return "tab:orange"
    if "Adam skipped" in name:
        return "tab:cyan"
    if "shared memory" in name:
        return "tab:green"
    return "tab:purple" if "gRPC only" in name else "tab:blue"


def _transport(ax, res: dict) -> None:
    rows = res["rows"]
    names = list(rows)
    short = [n.replace("optserve ", "").replace(" (anchor)", "\n(anchor)").replace(", fused Adam", "")
             .replace(", gRPC only", "\n(gRPC only)").replace("raw TCP ping-pong", "raw TCP")
             .replace(", Adam skipped (transfer only)", "\n(Adam skipped)")
             .replace(", shared memory", "\n(shared memory)") for n in names]
    _bars(ax, short, [rows[n]["gb_s"] for n in names], colors=[_transport_color(n) for n in names])
    tcp = next((rows[n]["gb_s"]["median"] for n in names if "TCP" in n), None)
    rpc = next((rows[n]["gb_s"]["median"] for n in names if "rpc" in n), None)
    if tcp:
        ax.axhline(0.9 * tcp, ls="-.", color="tab:cyan", lw=1, label="target 0.9 x TCP (transfer only)")
        ax.axhline(0.6 * tcp, ls="--", color="tab:gray", lw=1, label="target 0.6 x TCP (step)")
        ax.axhline(2.0 * tcp, ls="--", color="tab:green", lw=1, label="target 2 x TCP (step, shared memory)")
    if rpc:
        ax.axhline(1.7 * rpc, ls=":", color="tab:orange", lw=1, label="target 1.7 x torch rpc")
    ax.set_xticks(range(len(short)))
    ax.set_xticklabels(short, fontsize=7)
    ax.set_ylabel("GB/s, 64 MiB each way, both counted")
    invalid = [c["name"] for c in res.get("anchor_checks", {}).values() if not c["valid"]]
    if invalid:
        ax.set_title("(b) transport, one shard\nINVALID anchor: " + "; ".join(invalid), color="tab:red")
    else:
        ax.set_title("(b) transport, one shard")
    ax.legend(fontsize=7)


def _e2e(ax, res: dict) -> None:
    sizes = res["sizes"]
    xs = [s["numel"] / 1e6 for s in sizes]
    for name in sizes[0]["rows"]:
        meds, errs = zip(*(_err(s["rows"][name]["cost"]) for s in sizes))
        ax.errorbar(xs, meds, yerr=list(zip(*errs)), marker="o", capsize=3, label=name)
    ax.plot(xs, [s["lower_bound_ms"] for s in sizes], "k--", label="transfer lower bound")
    ax.plot(xs, [1.5 * (s["lower_bound_ms"] + s["rows"]["local torch Adam fused"]["step"]["median"]) for s in sizes],
            "k:", label="1.5 x (bound + local fused)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("optimizer cost per iteration, ms (lower is better)")
    ax.set_title("(c) end-to-end step (overlap on: iteration minus local fwd+bwd)")
    ax.legend(fontsize=6)


def _workers(ax, res: dict) -> None:
    rows = res["rows"]
    for s in sorted({r["shards"] for r in rows}):
        pts = sorted((r["workers"], r["steps_s"]) for r in rows if r["shards"] == s)
        ks = [k for k, _ in pts]
        meds, errs = zip(*(_err(st) for _, st in pts))
        ax.errorbar(ks, meds, yerr=list(zip(*errs)), marker="o", capsize=3, label=f"{s} shard{'s' if s > 1 else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("async workers (processes)")
    ax.set_ylabel("aggregate steps/s")
    ax.set_ylim(bottom=0)
    ax.set_title("(d) aggregate throughput")
    ax.legend(fontsize=7)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    panels = [("a", _kernel, "(a) Adam update kernel"), ("b", _transport, "(b) transport"),
              ("c", _e2e, "(c) end-to-end step"), ("d", _workers, "(d) aggregate throughput")]
    for ax, (key, draw, title) in zip(axes.flat, panels):
        res = result["sections"].get(key)
        if not res or "error" in res:
            _not_run(ax, title)
        else:
            draw(ax, res)
    meta = result["meta"]
    fig.suptitle(f"optserve bench {meta['date_utc']} — {meta['nproc']} CPUs, torch {meta['torch']}, "
                 f"grpcio {meta['grpcio']}{' — QUICK' if result['settings']['quick'] else ''}; "
                 f"median, bars min–max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
