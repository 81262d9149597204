"""Capacity studies and their figures (matplotlib, PNG).

* :func:`capacity_sweep` — hit ratio vs. cache capacity for each policy, with
  Belady and the infinite bound (the shape of Figure 9 of the Mooncake paper).
* :func:`disk_sweep` — hit ratio of a host + disk stack (real TieredCache,
  metadata mode) vs. disk capacity at a fixed host capacity.

The sweeps return plain rows (dicts) so they can be written as JSON lines and
tables; the plot functions draw those rows.  matplotlib is imported only here
and only when drawing; without it a MissingDependencyError names the extra.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from ..extras import require
from .belady import belady_hits, infinite_hits
from .sim import ReplayConfig, replay, simulate
from .trace import Trace


def capacity_sweep(trace: Trace, policies: Sequence[str], capacities_tokens: Sequence[int],
                   belady: bool = True, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per (policy, capacity): hit ratio of a single cache of that size."""
    n = max(trace.num_blocks, 1)
    inf = infinite_hits(trace) / n
    rows = []
    names = list(policies) + (["belady"] if belady else [])
    for cap in capacities_tokens:
        blocks = max(1, cap // trace.block_tokens)
        for p in names:
            t0 = time.perf_counter()
            hits = belady_hits(trace, blocks) if p == "belady" else simulate(trace, p, blocks)
            row = {"trace": trace.name, "policy": p, "capacity_tokens": int(cap), "capacity_blocks": blocks,
                   "hit_ratio": hits / n, "infinite": inf, "seconds": time.perf_counter() - t0}
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def disk_sweep(trace: Trace, host_tokens: int, disk_tokens: Sequence[int], policy: str = "adaptive",
               lower_policy: str = "lru", on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per disk capacity (0: host only): hit ratio of the host + disk stack."""
    n = max(trace.num_blocks, 1)
    inf = infinite_hits(trace) / n
    rows = []
    for disk in disk_tokens:
        caps = (host_tokens,) if not disk else (host_tokens, int(disk))
        res = replay(trace, ReplayConfig(caps, policy=policy, lower_policy=lower_policy, mode="meta",
                                         block_tokens=trace.block_tokens))
        row = {"trace": trace.name, "policy": policy, "host_tokens": host_tokens, "disk_tokens": int(disk),
               "hit_ratio": res.hit_ratio, "host_hit_ratio": res.tier_hit_ratio("host"),
               "disk_hit_ratio": res.tier_hit_ratio("disk") if disk else 0.0,
               "infinite": inf, "fraction_of_infinite": res.hit_ratio / inf if inf else 0.0,
               "seconds": res.seconds}
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


def _pyplot():
    require("matplotlib", "plotting").use("Agg")
    return require("matplotlib.pyplot", "plotting")

def plot_capacity(rows: list[dict], path: str, title: str | None = None) -> str:
    """Hit ratio vs. capacity (log x), one line per policy, the infinite bound dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    styles = {"belady": dict(color="black", linestyle=":", marker="x"),
              "lru": dict(color="tab:blue", marker="o"), "s3fifo": dict(color="tab:orange", marker="s"),
              "prefix": dict(color="tab:red", marker="^"), "adaptive": dict(color="tab:green", marker="D")}
    for p in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["capacity_tokens"], r["hit_ratio"]) for r in rows if r["policy"] == p)
        ax.plot([x / 1e6 for x, _ in pts], [y for _, y in pts], label=p, **styles.get(p, {"marker": "."}))
    if rows:
        ax.axhline(rows[0]["infinite"], color="gray", linestyle="--", label="infinite cache")
        ax.set_title(title or f"{rows[0]['trace']}: hit ratio vs. capacity")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({r["capacity_tokens"] / 1e6 for r in rows}))
    ax.set_xlabel("cache capacity (million tokens)")
    ax.set_ylabel("prefix hit ratio (full blocks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_disk(rows: list[dict], path: str, title: str | None = None) -> str:
    """Host + disk hit ratio (and the host's share) vs. disk capacity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    pts = sorted(rows, key=lambda r: r["disk_tokens"])
    xs = [r["disk_tokens"] / 1e6 for r in pts]
    ax.plot(xs, [r["hit_ratio"] for r in pts], marker="o", color="tab:red", label="host + disk")
    ax.plot(xs, [r["host_hit_ratio"] for r in pts], marker=".", color="tab:blue", label="served by host")
    if pts:
        inf = pts[0]["infinite"]
        ax.axhline(inf, color="gray", linestyle="--", label="infinite cache")
        ax.axhline(0.95 * inf, color="gray", linestyle=":", label="0.95 x infinite")
        ax.set_title(title or f"{pts[0]['trace']}: host {pts[0]['host_tokens'] / 1e6:g}M tokens + disk")
    ax.set_xlabel("disk capacity (million tokens)")
    ax.set_ylabel("prefix hit ratio (full blocks)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
