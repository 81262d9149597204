"""``kvtier replay TRACE``: a Mooncake-format trace through a TieredCache.

    kvtier replay conversation_trace.jsonl --host-tokens 3M --disk-tokens 20M
    kvtier replay trace.jsonl --mode bytes --limit 2000 --disk-tokens 20M
    kvtier replay synthetic:rag --policy lru --json out.jsonl --plot figs/

Prints per-tier hit ratios and bytes, the infinite bound, Belady and LRU at the
host capacity, and the estimated prefill time saved; ``--json`` appends the
summary as one JSON line, ``--plot DIR`` adds a capacity sweep (and, with a
disk tier, a disk-capacity sweep) as PNGs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

from ..errors import ConfigError
from ..policy import policy_names

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


def parse_bytes(key: str, value: str) -> int:
    from ..config import parse_size
    return parse_size(key, value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="a Mooncake-format JSON-lines file, or synthetic:NAME "
                                 "(system-prompts, rag, scan, chat, tenants)")
    p.add_argument("--host-tokens", default="3M", help="host tier capacity in tokens (default 3M)")
    p.add_argument("--disk-tokens", default=None, help="disk tier capacity in tokens (default: no disk tier)")
    p.add_argument("--kv-bytes-per-token", default="128KiB",
                   help="KV bytes per token, all layers (default 128KiB: an 8B GQA model in bf16)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per block (default 512)")
    p.add_argument("--policy", default="prefix", help="host tier policy: " + ", ".join(policy_names()))
    p.add_argument("--lower-policy", default="lru", help="disk tier policy (default lru)")
    p.add_argument("--mode", choices=("meta", "bytes"), default="meta",
                   help="meta: bookkeeping only; bytes: real copies and disk I/O, every hit verified")
    p.add_argument("--block-bytes", default="16KiB", help="bytes mode: stored size of a block (default 16KiB)")
    p.add_argument("--disk-path", default=None, help="bytes mode: disk tier directory (default: a temporary one)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--prefill-ms-per-token", type=float, default=0.05,
                   help="prefill compute per token, for the time-saved estimate (default 0.05 ms)")
    p.add_argument("--host-gbps", type=float, default=None, help="host tier load bandwidth (default: measured)")
    p.add_argument("--disk-gbps", type=float, default=None, help="disk tier load bandwidth (default: measured)")
    p.add_argument("--no-bounds", action="store_true", help="skip the infinite / Belady / LRU references")
    p.add_argument("--json", metavar="PATH", help="append the summary as one JSON line")
    p.add_argument("--plot", metavar="DIR", help="write capacity-sweep PNGs (and their JSON lines) into DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def load(spec: str, block_tokens: int, limit: int | None):
    """A trace from a path or ``synthetic:NAME``."""
    from ..replay.trace import load_trace
    if spec.startswith("synthetic:"):
        from ..replay.synthetic import make_trace
        tr = make_trace(spec.split(":", 1)[1])
        return tr.head(limit) if limit else tr
    return load_trace(spec, block_tokens=block_tokens, limit=limit)


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
    trace = load(args.trace, args.block_tokens, args.limit)
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
        res = replay(trace, cfg, progress=not args.no_progress and sys.stderr.isatty())
        refs = None if args.no_bounds else bounds(trace, cfg.num_slots[0])
        gbps = {"host": args.host_gbps if args.host_gbps else measure_host_gbps()}
        if disk is not None:
            gbps["disk"] = args.disk_gbps if args.disk_gbps else measure_disk_gbps(disk_path)
        summary = summarize(res, refs, prefill_saved(res, args.prefill_ms_per_token, gbps))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_text(summary))
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        sweep = [c for c in (host // 4, host // 2, host, 2 * host, 4 * host, 8 * host)
                 if c >= trace.block_tokens]
        rows = capacity_sweep(trace, ["lru", "s3fifo", args.policy] if args.policy not in ("lru", "s3fifo")
                              else ["lru", "s3fifo"], sweep)
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
