"""``kvtier replay TRACE``: a Mooncake-format trace through a TieredCache.

    kvtier replay conversation_trace.jsonl --host-tokens 3M --disk-tokens 20M
    kvtier replay trace.jsonl --mode bytes --limit 2000 --disk-tokens 20M
    kvtier replay synthetic:rag --policy lru --json out.jsonl --plot figs/
    kvtier replay trace.jsonl --sweep                  # every policy at 1%..50% of the trace
    kvtier replay trace.jsonl --sweep 1%,5%,3M,20M

Prints per-tier hit ratios and bytes, the infinite bound, Belady and LRU at the
host capacity, and the estimated prefill time saved; ``--json`` appends the
summary as one JSON line, ``--plot DIR`` adds a capacity sweep (and, with a
disk tier, a disk-capacity sweep) as PNGs.  ``--sweep`` prints every
registered policy's hit ratio at a list of capacities (percentages of the
trace's distinct blocks, or token counts) next to Belady and the infinite
bound, with the default policy's ratio to LRU: the check of a policy choice on
one's own traffic, in one command (policy alone, metadata only).

The load bandwidth behind the prefill estimate is measured once per command
and printed, or taken from ``--host-gbps`` / ``--disk-gbps``; every policy the
command compares is costed with that one figure.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile

from ..errors import ConfigError
from ..policy import policy_names
from ..progress import add_flags as add_progress_flags, wanted

DEFAULT_SWEEP = "1%,2%,5%,10%,25%,50%"
_TOKENS = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]?)\s*$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}


def parse_tokens(key: str, value: str | int) -> int:
    """Token counts such as 3000000, '3M', '512k', '1.5M'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _TOKENS.match(str(value))
    if not m:
        raise ConfigError(key, value, "a token count such as 3000000, '3M' or '512k'")
    return int(float(m.group(1)) * _SCALE[m.group(2).lower()])


def parse_sweep(value: str, distinct_blocks: int, block_tokens: int) -> list[int]:
    """Sweep capacities in tokens: 'N%' of the trace's distinct blocks, or token counts ('3M')."""
    caps = set()
    for item in str(value).split(","):
        item = item.strip()
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                pct = -1.0
            if not 0 < pct <= 100:
                raise ConfigError("--sweep", item, "a percentage in (0, 100] of the trace's distinct blocks")
            caps.add(max(1, round(distinct_blocks * pct / 100)) * block_tokens)
        else:
            tokens = parse_tokens("--sweep", item)
            if tokens < block_tokens:
                raise ConfigError("--sweep", item, f"at least one block ({block_tokens} tokens)")
            caps.add(tokens // block_tokens * block_tokens)
    return sorted(caps)


def parse_bytes(key: str, value: str) -> int:
    from ..config import parse_size
    return parse_size(key, value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..config import DiskConfig, HostConfig
    from ..replay.synthetic import GENERATORS
    p.add_argument("trace", help="a Mooncake-format JSON-lines file, or synthetic:NAME "
                                 f"({', '.join(GENERATORS)})")
    p.add_argument("--host-tokens", default="3M", help="host tier capacity in tokens (default 3M)")
    p.add_argument("--disk-tokens", default=None, help="disk tier capacity in tokens (default: no disk tier)")
    p.add_argument("--kv-bytes-per-token", default="128KiB",
                   help="KV bytes per token, all layers (default 128KiB: an 8B GQA model in bf16)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--policy", default=HostConfig.policy,
                   help=f"host tier policy (default {HostConfig.policy}): " + ", ".join(policy_names()))
    p.add_argument("--lower-policy", default=DiskConfig.policy, help=f"disk tier policy (default {DiskConfig.policy})")
    p.add_argument("--mode", choices=("meta", "bytes"), default="meta",
                   help="meta: bookkeeping only; bytes: real copies and disk I/O, every hit verified")
    p.add_argument("--block-bytes", default="16KiB", help="bytes mode: stored size of a block (default 16KiB)")
    p.add_argument("--disk-path", default=None, help="bytes mode: disk tier directory (default: a temporary one)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.05,
                   help="prefill compute per token, for the time-saved estimate (default 0.05 ms)")
    p.add_argument("--host-gbps", type=float, default=None,
                   help="host tier load bandwidth in GB/s (default: measured once by this command, and printed)")
    p.add_argument("--disk-gbps", type=float, default=None,
                   help="disk tier load bandwidth in GB/s (default: measured once by this command, and printed)")
    p.add_argument("--no-bounds", action="store_true", help="skip the infinite / Belady / LRU references")
    p.add_argument("--json", metavar="PATH", help="append the summary as one JSON line")
    p.add_argument("--plot", metavar="DIR", help="write capacity-sweep PNGs (and their JSON lines) into DIR")
    p.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None, metavar="CAPS",
                   help="print every policy's hit ratio at these capacities next to LRU and Belady: "
                        "percentages of the trace's distinct blocks or token counts (default "
                        + DEFAULT_SWEEP.replace("%", "%%") + ")")
    add_progress_flags(p)


def load(spec: str, block_tokens: int, limit: int | None):
    """A trace from a path or ``synthetic:NAME``."""
    from ..replay.trace import load_trace
    if spec.startswith("synthetic:"):
        from ..replay.synthetic import make_trace
        tr = make_trace(spec.split(":", 1)[1])
        return tr.head(limit) if limit else tr
    return load_trace(spec, block_tokens=block_tokens, limit=limit)


def _sweep(trace, default: str, caps: list[int], distinct: int, host: int, block_bytes: int,
           prefill_ms_per_token: float, host_gbps: float) -> list[dict]:
    """Print every policy at ``caps`` (and Belady), then prefill saved per policy at the host capacity."""
    from ..replay.plots import capacity_sweep
    from ..replay.report import block_saving_s, format_sweep
    rows = capacity_sweep(trace, sorted(policy_names(), key=lambda p: (p != "lru", p)), caps)
    print(f"\ncapacity sweep of {trace.name} ({distinct} distinct blocks; policy alone, metadata only):")
    print(format_sweep(rows, default, "lru", distinct))
    at = host // trace.block_tokens * trace.block_tokens
    per = block_saving_s(trace.block_tokens, block_bytes, prefill_ms_per_token, host_gbps)
    saved = {r["policy"]: r["hit_ratio"] * trace.num_blocks * per for r in rows if r["capacity_tokens"] == at}
    print(f"prefill saved at the host capacity ({at:,} tokens), every policy costed at the same "
          f"{host_gbps:.2f} GB/s: " + ", ".join(f"{p} {v:,.1f} s" for p, v in saved.items()))
    return rows


def main(args: argparse.Namespace) -> int:
    from ..replay.plots import capacity_sweep, disk_sweep, plot_capacity, plot_disk
    from ..replay.report import bounds, format_text, measure_disk_gbps, measure_host_gbps, prefill_saved, summarize
    from ..replay.sim import ReplayConfig, replay

    host = parse_tokens("--host-tokens", args.host_tokens)
    disk = parse_tokens("--disk-tokens", args.disk_tokens) if args.disk_tokens else None
    if args.limit is not None and args.limit <= 0:
        raise ConfigError("--limit", args.limit, "a positive number of requests")
    if args.prefill_ms_per_token < 0:
        raise ConfigError("--prefill-ms-per-token", args.prefill_ms_per_token, "a non-negative number")
    for key, v in (("--host-gbps", args.host_gbps), ("--disk-gbps", args.disk_gbps)):
        if v is not None and not v > 0:
            raise ConfigError(key, v, "a positive bandwidth in GB/s")
    trace = load(args.trace, args.block_tokens, args.limit)
    if args.sweep:                          # checked before the replay, not after it
        distinct = len({h for r in trace.requests for h in r.blocks})
        sweep_caps = parse_sweep(args.sweep, distinct, trace.block_tokens)
    caps = (host,) if disk is None else (host, disk)
    tmp = None
    disk_path = args.disk_path
    if args.mode == "bytes" and disk is not None and disk_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="kvtier-replay-")
        disk_path = tmp.name
    try:
        cfg = ReplayConfig(caps, policy=args.policy, lower_policy=args.lower_policy, mode=args.mode,
                           kv_bytes_per_token=parse_bytes("--kv-bytes-per-token", args.kv_bytes_per_token),
                           block_tokens=trace.block_tokens,
                           stored_block_bytes=parse_bytes("--block-bytes", args.block_bytes),
                           disk_path=disk_path)
        res = replay(trace, cfg, progress=wanted(args.progress))
        refs = None if args.no_bounds else bounds(trace, cfg.num_slots[0])
        # one bandwidth per tier for the whole command: measured here once, or given
        gbps = {"host": args.host_gbps or measure_host_gbps()}
        source = {"host": "--host-gbps" if args.host_gbps else "measured once: native memcpy peak"}
        if disk is not None:
            gbps["disk"] = args.disk_gbps or measure_disk_gbps(disk_path)
            source["disk"] = "--disk-gbps" if args.disk_gbps else "measured once: fsync'd file read back"
        prefill = prefill_saved(res, args.prefill_ms_per_token, gbps)
        prefill["gbps_source"] = source
        summary = summarize(res, refs, prefill)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_text(summary))
    if args.sweep:
        caps = sorted(set(sweep_caps) | {host // cfg.block_tokens * cfg.block_tokens})
        summary["sweep"] = _sweep(trace, args.policy, caps, distinct, host, cfg.logical_block_bytes,
                                  args.prefill_ms_per_token, gbps["host"])
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        sweep = [c for c in (host // 4, host // 2, host, 2 * host, 4 * host, 8 * host)
                 if c >= trace.block_tokens]
        rows = capacity_sweep(trace, sorted(policy_names(), key=lambda p: (p != "lru", p)), sweep)
        paths = [plot_capacity(rows, os.path.join(args.plot, "hit_ratio_vs_capacity.png"))]
        if disk is not None:
            drows = disk_sweep(trace, host, [0, disk // 4, disk // 2, disk, 2 * disk], args.policy,
                               args.lower_policy)
            rows += drows
            paths.append(plot_disk(drows, os.path.join(args.plot, "host_disk_vs_disk_capacity.png")))
        with open(os.path.join(args.plot, "sweeps.jsonl"), "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print("plots: " + ", ".join(paths))
    return 0
