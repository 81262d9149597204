"""What a replay means: hit ratios against the bounds, bytes per tier, prefill time saved.

:func:`summarize` turns a :class:`~kvtier.replay.sim.ReplayResult` plus the
offline bounds (infinite cache, Belady and LRU at the same host capacity) into
one flat dict: the JSON line of ``kvtier replay --json`` and the source of the
text and Markdown tables.

Prefill time saved is an estimate made with the serving rule itself
(:mod:`kvtier.load_plan`): for each request, the tiers its hit blocks came
from, in order, go to a :class:`~kvtier.load_plan.LoadPlanner` whose compute
per token is ``prefill_ms_per_token`` and whose tiers load at the given
bandwidths (no latency, nothing queued: the replay serves one request at a
time).  The plan's prefix is loaded: each of its blocks saves ``block_tokens *
prefill_ms_per_token`` of compute and costs ``logical_block_bytes /
bandwidth``; the rest of the hit is recomputed and saves nothing.  So a tier
too slow to be worth loading from adds no blocks, a fast head is loaded while
a slow tail is not, and the estimate is what an engine running the rule would
save.  Per tier: hit blocks, blocks the rule loads, compute saved, load time,
net.  Bandwidths are given, or measured here: host by the native memcpy, disk by reading back a
file written with fsync after dropping it from the page cache.  A command
measures each bandwidth once (the best of several copies: on a shared machine
the median moves from run to run, the peak much less), prints it with where it
came from, and uses that one figure for every policy it compares, so a
different measurement can never reorder them; ``--host-gbps`` / ``--disk-gbps``
fix it across commands.

:func:`format_sweep` lays out a capacity sweep (every policy, Belady, the
infinite bound, at a list of capacities) as one Markdown table with the ratio
of the default policy to LRU in the last column.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from ..load_cost import TierPrior
from ..load_plan import LoadPlanConfig, LoadPlanner
from .belady import belady_hits, infinite_hits
from .sim import ReplayResult, simulate
from .trace import Trace


def bounds(trace: Trace, capacity_blocks: int, *, belady: bool = True, lru: bool = True) -> dict:
    """Offline references at ``capacity_blocks``: infinite, Belady, LRU hit ratios."""
    n = max(trace.num_blocks, 1)
    out = {"infinite": infinite_hits(trace) / n}
    if belady:
        out["belady"] = belady_hits(trace, capacity_blocks) / n
    if lru:
        out["lru"] = simulate(trace, "lru", capacity_blocks) / n
    return out


def measure_host_gbps(nbytes: int = 256 << 20, repeat: int = 7) -> float:
    """Host memory bandwidth: the fastest of ``repeat`` native memcpys of ``nbytes`` (the peak)."""
    from .. import native
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    native.memcpy(dst, src)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        native.memcpy(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def measure_disk_gbps(directory: str | None = None, nbytes: int = 256 << 20, chunk: int = 4 << 20) -> float:
    """Read bandwidth of the disk under ``directory``, page cache dropped first (best effort)."""
    buf = np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes()
    fd, path = tempfile.mkstemp(prefix="kvtier-bw-", dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            for _ in range(nbytes // chunk):
                f.write(buf)
            os.fsync(f.fileno())
        rfd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            got = 0
            while True:
                b = os.read(rfd, chunk)
                if not b:
                    break
                got += len(b)
            dt = time.perf_counter() - t0
        finally:
            os.close(rfd)
    finally:
        os.unlink(path)
    return got / dt / 1e9


def block_saving_s(block_tokens: int, block_bytes: int, prefill_ms_per_token: float, gbps: float | None,
                   margin: float = LoadPlanConfig.margin) -> float:
    """Net seconds one hit block saves under the rule: its prefill compute less its load, or 0
    where the load is not below compute / ``margin`` (with one tier and no latency, the rule
    decides every block alike)."""
    compute = block_tokens * prefill_ms_per_token / 1000.0
    load = block_bytes / (gbps * 1e9) if gbps else 0.0
    return compute - load if load * margin < compute else 0.0


_FREE = 1e12                            # GB/s standing for "load time unknown": counted as free


def prefill_saved(res: ReplayResult, prefill_ms_per_token: float, gbps: dict[str, float | None],
                  margin: float = LoadPlanConfig.margin) -> dict:
    """Per tier and in total: hit blocks, blocks the rule loads, compute saved, load time, net."""
    cfg = res.config
    names = cfg.tier_names
    loaded = dict.fromkeys(names, 0)
    load_s = dict.fromkeys(names, 0.0)
    if prefill_ms_per_token > 0:
        priors = {n: TierPrior(gbps.get(n) or _FREE, 0.0) for n in names}
        planner = LoadPlanner(LoadPlanConfig(margin=margin, priors=priors, stale_s=None,
                                             prefill_s_per_token=prefill_ms_per_token / 1000.0))
        for runs, count in res.hit_patterns.items():
            tiers = [t for t, k in runs for _ in range(k)]
            plan = planner.plan(tiers, cfg.logical_block_bytes, cfg.block_tokens)
            for t, c in plan.tiers.items():
                loaded[t] = loaded.get(t, 0) + c.blocks * count
                load_s[t] = load_s.get(t, 0.0) + c.load_s * count
    out: dict = {"margin": margin}
    total = 0.0
    for name in names:
        bw = gbps.get(name)
        compute = loaded[name] * cfg.block_tokens * prefill_ms_per_token / 1000.0
        load = load_s[name] if bw else None
        net = compute - load if load is not None else compute
        total += net
        hits = res.hit_blocks.get(name, 0)
        out[name] = {"hit_blocks": hits, "loaded_blocks": loaded[name], "compute_s": compute,
                     "load_s": load, "net_s": net, "gbps": bw,
                     "worth_loading": loaded[name] > 0 or hits == 0}
    recompute_all = res.num_blocks * cfg.block_tokens * prefill_ms_per_token / 1000.0
    out["total_net_s"] = total
    out["prefill_without_cache_s"] = recompute_all
    out["fraction_saved"] = total / recompute_all if recompute_all else 0.0
    return out


def summarize(res: ReplayResult, refs: dict | None = None, prefill: dict | None = None) -> dict:
    """One flat dict describing a replay."""
    cfg = res.config
    d = {
        "trace": res.trace, "requests": res.num_requests, "blocks": res.num_blocks,
        "mode": cfg.mode, "policy": cfg.policy, "lower_policy": cfg.lower_policy,
        "capacities_tokens": dict(zip(cfg.tier_names, cfg.capacities_tokens)),
        "kv_bytes_per_token": cfg.kv_bytes_per_token,
        "hit_ratio": res.hit_ratio,
        "tiers": {n: {"hit_ratio": res.tier_hit_ratio(n), "hit_blocks": res.hit_blocks.get(n, 0),
                      "bytes_written": res.bytes_written.get(n, 0), "bytes_read": res.bytes_read.get(n, 0)}
                  for n in cfg.tier_names},
        "failed_loads": res.failed_loads, "seconds": res.seconds,
    }
    if cfg.mode == "bytes":
        d["verified_blocks"] = res.verified_blocks
        d["bad_blocks"] = res.bad_blocks
    if refs:
        d["bounds"] = dict(refs)
        inf = refs.get("infinite")
        if inf:
            d["fraction_of_infinite"] = res.hit_ratio / inf
        if "belady" in refs:
            d["gap_to_belady"] = refs["belady"] - res.hit_ratio
    if prefill:
        d["prefill"] = prefill
    return d


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def format_text(s: dict) -> str:
    """A human-readable report of :func:`summarize`'s dict."""
    caps = ", ".join(f"{k} {v / 1e6:g}M tokens" for k, v in s["capacities_tokens"].items())
    lines = [f"{s['trace']}: {s['requests']} requests, {s['blocks']} full blocks; {caps}; "
             f"policy {s['policy']} (lower tiers {s['lower_policy']}); mode {s['mode']}; {s['seconds']:.1f} s"]
    lines.append(f"{'tier':<8}{'hit ratio':>10}{'written':>14}{'read':>14}")
    for name, t in s["tiers"].items():
        lines.append(f"{name:<8}{t['hit_ratio']:>10.4f}{_gb(t['bytes_written']):>14}{_gb(t['bytes_read']):>14}")
    lines.append(f"{'total':<8}{s['hit_ratio']:>10.4f}")
    b = s.get("bounds")
    if b:
        ref = "  ".join(f"{k} {v:.4f}" for k, v in b.items())
        lines.append(f"bounds at the host capacity: {ref}")
        if "fraction_of_infinite" in s:
            lines.append(f"fraction of the infinite bound: {s['fraction_of_infinite']:.3f}")
    if s["mode"] == "bytes":
        lines.append(f"bytes verified: {s['verified_blocks']} hit blocks, {s['bad_blocks']} wrong")
    p = s.get("prefill")
    if p:
        for name, src in p.get("gbps_source", {}).items():
            bw = p[name]["gbps"]
            lines.append(f"{name} load bandwidth: " + (f"{bw:.2f} GB/s ({src})" if bw else "unknown"))
        for name in s["tiers"]:
            t = p[name]
            bw = f"{t['gbps']:.2f} GB/s" if t["gbps"] else "unknown bandwidth"
            load = f"{t['load_s']:.1f}" if t["load_s"] is not None else "?"
            skipped = t["hit_blocks"] - t["loaded_blocks"]
            verdict = f" ({skipped} hit blocks cheaper to recompute)" if skipped else ""
            lines.append(f"prefill {name}: {t['loaded_blocks']} of {t['hit_blocks']} hit blocks loaded, "
                         f"{t['compute_s']:.1f} s of compute saved, {load} s loading at {bw}{verdict}")
        lines.append(f"prefill saved: {p['total_net_s']:.1f} s of {p['prefill_without_cache_s']:.1f} s "
                     f"({100 * p['fraction_saved']:.1f}%; load only what beats recompute by "
                     f"{p['margin']:g}x, request by request)")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
        return "-" if v is None else str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def format_sweep(rows: list[dict], default: str, baseline: str = "lru", distinct_blocks: int | None = None) -> str:
    """A capacity sweep as one Markdown table: a row per capacity, a column per policy.

    ``rows`` come from :func:`kvtier.replay.plots.capacity_sweep`; the last
    column is ``default`` / ``baseline`` (hit ratios), the check a default
    policy must pass on every trace: never below 1 by more than noise.
    """
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    caps = sorted({r["capacity_tokens"] for r in rows})
    hit = {(r["policy"], r["capacity_tokens"]): r["hit_ratio"] for r in rows}
    blocks = {r["capacity_tokens"]: r["capacity_blocks"] for r in rows}
    inf = rows[0]["infinite"] if rows else 0.0
    header = ["capacity (tokens)", "blocks"] + (["% of distinct"] if distinct_blocks else [])
    header += [f"{p} (default)" if p == default else p for p in policies] + ["infinite"]
    ratio = default in policies and baseline in policies and default != baseline
    if ratio:
        header.append(f"{default} / {baseline}")
    out = []
    for c in caps:
        row: list = [f"{c:,}", blocks[c]]
        if distinct_blocks:
            row.append(f"{100 * blocks[c] / distinct_blocks:.1f}%")
        row += [hit.get((p, c)) for p in policies] + [inf]
        if ratio:
            b = hit.get((baseline, c)) or 0.0
            row.append(f"{hit[(default, c)] / b:.3f}" if b else "-")
        out.append(row)
    return markdown_table(header, out)
