"""``kvtier bench replay``: hit ratios of the policies on the Mooncake trace and synthetic traffic.

Cases (one JSON line each):

* ``sweep``: hit ratio vs. capacity for every registered policy and Belady
  (policy alone, prefix semantics), plus the infinite bound.
* ``stack``: the real TieredCache in metadata mode — host 3M tokens with each
  policy, and host 3M + disk 20M — with the wall time of the whole replay.
* ``disk-sweep``: host 3M + disk of growing size.
* ``bytes``: the first requests replayed with real bytes through host + disk
  (block size scaled down), every hit verified; its copy rate is reported
  against the native memcpy peak measured in the same run.
* ``synthetic``: every policy on each synthetic trace at 2% and 10% of its
  distinct blocks, with the default's ratio to LRU.

Hit-ratio rows carry ``bytes`` = logical KV bytes served from cache and no
peak (a hit ratio is not a throughput); ``--plot-dir`` writes the PNGs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from .common import row

SUITE = "replay"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # kvtier/bench/ -> repo
DEFAULT_TRACE = os.path.join(_REPO, os.pardir, "shared", "data", "mooncake", "conversation_trace.jsonl")
KV_BYTES_PER_TOKEN = 128 << 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=os.environ.get("KVTIER_TRACE", DEFAULT_TRACE),
                   help="Mooncake-format trace (default: $KVTIER_TRACE or the shared conversation trace)")
    p.add_argument("--host-tokens", type=int, default=3_000_000)
    p.add_argument("--disk-tokens", type=int, default=20_000_000)
    p.add_argument("--bytes-requests", type=int, default=2000, help="requests replayed with real bytes")
    p.add_argument("--plot-dir", default=None, help="write the PNG figures here")
    p.add_argument("--quick", action="store_true", help="three capacities, 300 real-bytes requests")


def _ratio_row(case: str, trace, hits: int, seconds: float, **extra) -> dict:
    """A hit-ratio row: ``bytes`` is the logical KV served from cache; no rate (it is not a transfer)."""
    n = max(trace.num_blocks, 1)
    r = row(SUITE, case, hits * trace.block_tokens * KV_BYTES_PER_TOKEN, seconds, None,
            hit_ratio=round(hits / n, 4), **extra)
    r["gbps"] = None
    return r


def run(args) -> list[dict]:
    from ..config import HostConfig
    from ..policy import policy_names
    from ..replay.belady import infinite_hits
    from ..replay.plots import capacity_sweep, disk_sweep, plot_capacity, plot_disk
    from ..replay.report import measure_host_gbps
    from ..replay.sim import ReplayConfig, replay, simulate
    from ..replay.synthetic import GENERATORS
    from ..replay.trace import load_trace

    rows: list[dict] = []
    host, disk = args.host_tokens, args.disk_tokens
    if os.path.exists(args.trace):
        trace = load_trace(args.trace)
        n = trace.num_blocks
        inf = infinite_hits(trace) / n
        caps = [1_000_000, host, 10_000_000] if args.quick else \
            [500_000, 1_000_000, 2_000_000, host, 5_000_000, 10_000_000, 20_000_000, 40_000_000]
        policies = ["lru", "prefix", "adaptive"] if args.quick else policy_names()
        sweep = capacity_sweep(trace, policies, sorted(set(caps)))
        for r in sweep:
            rows.append(_ratio_row(f"sweep {r['policy']} {r['capacity_tokens'] / 1e6:g}M", trace,
                                   round(r["hit_ratio"] * n), r["seconds"], infinite=round(inf, 4),
                                   policy=r["policy"], capacity_tokens=r["capacity_tokens"]))
        for pol in policy_names():
            res = replay(trace, ReplayConfig((host,), policy=pol, kv_bytes_per_token=KV_BYTES_PER_TOKEN))
            rows.append(_ratio_row(f"stack host {host / 1e6:g}M {pol}", trace, res.hits, res.seconds,
                                   infinite=round(inf, 4), policy=pol, requests=res.num_requests))
        res = replay(trace, ReplayConfig((host, disk), kv_bytes_per_token=KV_BYTES_PER_TOKEN))
        case = f"stack host {host / 1e6:g}M + disk {disk / 1e6:g}M {res.config.policy}"
        rows.append(_ratio_row(case, trace, res.hits,
                               res.seconds, infinite=round(inf, 4), fraction_of_infinite=round(res.hit_ratio / inf, 4),
                               host_hit_ratio=round(res.tier_hit_ratio("host"), 4),
                               disk_hit_ratio=round(res.tier_hit_ratio("disk"), 4),
                               disk_bytes_written=res.bytes_written.get("disk", 0), requests=res.num_requests))
        dsweep = disk_sweep(trace, host, [0, disk // 4, disk // 2, disk] if args.quick
                            else [0, disk // 8, disk // 4, disk // 2, disk, 2 * disk])
        for r in dsweep:
            rows.append(_ratio_row(f"disk-sweep host {host / 1e6:g}M + disk {r['disk_tokens'] / 1e6:g}M", trace,
                                   round(r["hit_ratio"] * n), r["seconds"], infinite=round(inf, 4),
                                   fraction_of_infinite=round(r["fraction_of_infinite"], 4)))
        if args.plot_dir:
            os.makedirs(args.plot_dir, exist_ok=True)
            plot_capacity(sweep, os.path.join(args.plot_dir, "hit_ratio_vs_capacity.png"))
            plot_disk(dsweep, os.path.join(args.plot_dir, "host_disk_vs_disk_capacity.png"))
        rows += _bytes_case(trace.head(min(len(trace), 300 if args.quick else args.bytes_requests)),
                            host, disk, replay, ReplayConfig, measure_host_gbps)
    default = HostConfig.policy
    for name, gen in GENERATORS.items():
        tr = gen(num_requests=1500 if args.quick else 4000)
        distinct = len({h for r in tr.requests for h in r.blocks})
        inf = infinite_hits(tr) / tr.num_blocks
        for fraction in (0.02, 0.1):
            cap = max(8, int(distinct * fraction))
            hits, case = {}, {}
            for pol in policy_names():
                t0 = time.perf_counter()
                hits[pol] = simulate(tr, pol, cap)
                case[pol] = _ratio_row(f"synthetic {name} {fraction:.0%} {pol}", tr, hits[pol],
                                       time.perf_counter() - t0, infinite=round(inf, 4), policy=pol,
                                       capacity_blocks=cap)
            case[default]["default_over_lru"] = round(hits[default] / hits["lru"], 4) if hits["lru"] else None
            rows += case.values()
    return rows


def _bytes_case(trace, host: int, disk: int, replay, ReplayConfig, measure_host_gbps) -> list[dict]:
    """Real bytes through host + disk: every hit verified; copy rate vs the memcpy peak."""
    peak = measure_host_gbps()
    block = 16 << 10
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-replay-") as d:
        res = replay(trace, ReplayConfig((host, disk), mode="bytes", disk_path=d,
                                         stored_block_bytes=block))
    moved = (res.num_blocks - res.hits + res.verified_blocks) * block     # stored + loaded
    return [row(SUITE, f"bytes host+disk {len(trace)} requests", moved, res.seconds, peak,
                hit_ratio=round(res.hit_ratio, 4), verified_blocks=res.verified_blocks,
                bad_blocks=res.bad_blocks, failed_loads=res.failed_loads, block_bytes=block)]
