"""``kvtier bench host``: store and load through the host tier vs the memcpy peak.

A fake engine (32 per-layer CPU tensors, pages of block_bytes/32) stores a
working set of blocks into a HostTier and loads them back into other engine
blocks.  The peak is the native multithreaded memcpy of the same number of
bytes, measured in the same run; store+load moves each byte twice, so its
ratio is taken against twice that memcpy time.  Lookup rate is measured on a
1,000-block prefix.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from .common import median_time, peak_buffer, row

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20]
LAYERS = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="block sizes in bytes, comma-separated (default 64KiB..8MiB)")
    p.add_argument("--working-set", type=int, default=256 << 20,
                   help="bytes stored and loaded per repetition (default 256 MiB)")
    p.add_argument("--repeat", type=int, default=7, help="repetitions; the median is reported")
    p.add_argument("--quick", action="store_true", help="small working set, few repetitions")


def _engine(num_blocks: int, block_bytes: int):
    import torch
    page = block_bytes // LAYERS // 2           # bf16 elements per page
    g = torch.Generator().manual_seed(0)
    return [torch.randint(-2**15, 2**15, (num_blocks, page), dtype=torch.int16, generator=g).view(torch.bfloat16)
            for _ in range(LAYERS)]


def run(args) -> list[dict]:
    from .. import HostConfig, KVTierConfig, Namespace, PagedKVCache
    from .. import native
    import torch

    sizes = [int(s) for s in str(args.sizes).split(",") if s]
    ws = (32 << 20) if args.quick else args.working_set
    repeat = 3 if args.quick else args.repeat
    rows = []
    for bb in sizes:
        n = max(4, ws // bb)
        kv = _engine(2 * n, bb)
        ns = Namespace(model="bench-host", block_tokens=16, dtype="bfloat16")
        cfg = KVTierConfig(host=HostConfig(capacity_bytes=(n + 8) * (bb + 4096), pinned="off"),
                           transfer_threads=1)
        cache = PagedKVCache.create(cfg, ns, kv)
        src_ids = np.arange(n)
        dst_ids = np.arange(n, 2 * n)
        counter = itertools.count()

        def fresh_keys():
            base = next(counter)
            return [base.to_bytes(8, "little") + i.to_bytes(8, "little") for i in range(n)]

        keys_box = []

        def store():
            keys_box[:] = [fresh_keys()]
            assert cache.store(None, src_ids, keys=keys_box[0]) == n

        def load():
            assert cache.load(None, dst_ids, keys=keys_box[0]) == n

        a, b = peak_buffer(n * bb), peak_buffer(n * bb, fill=1)
        store()                                 # warm-up: touch the arena once
        load()
        native.memcpy(a, b)
        peaks, stores, loads = [], [], []
        for _ in range(repeat):                 # interleaved, so drift hits peak and path alike
            t0 = time.perf_counter(); native.memcpy(a, b); peaks.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); store(); stores.append(time.perf_counter() - t0)
            t0 = time.perf_counter(); load(); loads.append(time.perf_counter() - t0)
        peak = n * bb / float(np.median(peaks)) / 1e9
        ts, tl = float(np.median(stores)), float(np.median(loads))
        # correctness of the measured path: the loaded pages equal the stored ones
        for layer in kv[:2]:
            raw = layer.view(torch.int16)
            if not bool((raw[src_ids] == raw[dst_ids]).all()):
                raise RuntimeError("host bench: loaded pages differ from stored pages")
        nb = n * bb
        rows.append(row("host", f"store {bb >> 10}KiB", nb, ts, peak, blocks=n, block_bytes=bb))
        rows.append(row("host", f"load {bb >> 10}KiB", nb, tl, peak, blocks=n, block_bytes=bb))
        rows.append(row("host", f"store+load {bb >> 10}KiB", 2 * nb, ts + tl, peak, blocks=n, block_bytes=bb))
        cache.close()
        del kv, a, b
    rows.append(_lookup_row(repeat))
    return rows


def _lookup_row(repeat: int) -> dict:
    from .. import Namespace, TieredCache, chain_keys
    from ..tiers import HostTier

    ns = Namespace(model="bench-host", block_tokens=16)
    keys = chain_keys(ns, np.arange(16 * 1000) % 32000)
    cache = TieredCache([HostTier("host", 4096, 2000, memory="none")], transfer_threads=0)
    for i in range(0, 1000, 100):
        h = cache.prepare_store(keys[i:i + 100], "w")
        cache.complete_store(h, True)
    assert cache.lookup(keys).num_blocks == 1000
    loops = 50
    t = median_time(lambda: [cache.lookup(keys) for _ in range(loops)], repeat=repeat) / loops
    r = row("host", "lookup 1000-block prefix", 0, t, None, blocks_per_s=round(1000 / t))
    r["gbps"] = None
    return r
