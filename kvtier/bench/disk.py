"""``kvtier bench disk``: the disk tier against the raw native path, dd and file-per-block.

For each block size and queue depth (blocks per batch; the tier runs
max(depth, 4) I/O threads) a working set is written and read back four ways,
in one run, on one filesystem:

    tier         DiskTier.write / DiskTier.read from / into page-aligned host
                 buffers: O_DIRECT on the native thread pool, every block (or
                 piece of one: a batch of fewer blocks than threads is cut into
                 pieces) checksummed by the thread that moves it, an LMDB
                 lookup or commit per batch
    raw          the same native O_DIRECT pwrite/pread of the same pieces on the
                 same number of threads, on one preallocated file: no index, no
                 checksum (the peak)
    dd           ``dd bs=4M oflag=direct`` / ``iflag=direct`` (one row per run)
    safetensors  one file per block, ``safetensors.numpy.save_file`` /
                 ``load_file`` + a copy into the destination, as simple
                 connectors do; the write is timed up to ``os.sync()`` (the
                 bytes are on disk), and each file's pages are dropped from the
                 page cache (posix_fadvise DONTNEED) before it is read back

``ratio`` is the tier's figure over the raw path's at the same size and depth;
``vs_safetensors`` is the tier over the file-per-block baseline at that size.
Throughput counts block bytes.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import weakref

import numpy as np

from .common import median_time, row

SIZES = [256 << 10, 1 << 20, 4 << 20, 8 << 20]
DEPTHS = [1, 4, 16]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=None,
                   help="directory to benchmark in (default: ./kvtier-bench-disk under the current directory)")
    p.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                   help="block sizes, comma-separated, in bytes or like 1MiB (default 256KiB,1MiB,4MiB,8MiB)")
    p.add_argument("--depths", default=",".join(str(d) for d in DEPTHS),
                   help="queue depths (blocks per batch = I/O threads), comma-separated (default 1,4,16)")
    p.add_argument("--working-set", type=int, default=256 << 20,
                   help="bytes written and read per repetition (default 256 MiB)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--durability", default="none", choices=("none", "data", "full"),
                   help="the tier's durability mode (default none: no fdatasync per batch)")
    p.add_argument("--quick", action="store_true", help="32 MiB working set, 2 repetitions")
    p.add_argument("--no-safetensors", action="store_true", help="skip the file-per-block baseline")


def _label(n: int) -> str:
    return f"{n >> 20}MiB" if n >= 1 << 20 else f"{n >> 10}KiB"


def _ints(text: str, key: str = "--depths") -> list[int]:
    from ..errors import ConfigError
    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(key, text, "positive ints, comma-separated") from None


def _sizes(text: str) -> list[int]:
    from ..config import parse_size
    return [parse_size("--sizes", s.strip()) for s in str(text).split(",") if s.strip()]


def run(args) -> list[dict]:
    from .. import native
    from ..errors import ConfigError

    sizes, depths = _sizes(args.sizes), _ints(args.depths)
    if not sizes or any(s <= 0 for s in sizes):
        raise ConfigError("--sizes", args.sizes, "positive byte sizes, comma-separated")
    if not depths or any(d <= 0 for d in depths):
        raise ConfigError("--depths", args.depths, "positive ints, comma-separated")
    ws = (32 << 20) if args.quick else args.working_set
    repeat = 2 if args.quick else args.repeat
    base = os.path.abspath(args.dir or os.path.join(os.getcwd(), "kvtier-bench-disk"))
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=base)
    rows: list[dict] = []
    try:
        rows += _dd(work, ws)
        for bb in sizes:
            n = max(max(depths), ws // bb)
            src = native.alloc_aligned(n * bb)
            src[:] = np.random.default_rng(bb).integers(0, 256, n * bb, dtype=np.uint8)
            dst = native.alloc_aligned(n * bb)
            st = None if args.no_safetensors else _safetensors(work, src, dst, n, bb, repeat)
            tier = _open_tier(work, bb, n, args.durability)
            try:
                for qd in depths:
                    raw_io, tier_io = _raw(work, src, dst, n, bb, qd), _tier(tier, src, dst, n, bb, qd)
                    raw, got = {}, {}
                    for op in ("write", "read"):     # alternate the two paths: same load on both
                        t = _interleaved({"raw": raw_io[op], "tier": tier_io[op]}, repeat)
                        raw[op], got[op] = n * bb / t["raw"], n * bb / t["tier"]
                    raw_io["close"]()
                    if not np.array_equal(src, dst):
                        raise RuntimeError("disk tier returned different bytes during the benchmark")
                    for op in ("write", "read"):
                        peak = raw[op]
                        rows.append(row("disk", f"raw {op} {_label(bb)} qd{qd}", n * bb, n * bb / peak,
                                        peak / 1e9, path="raw", op=op, block_bytes=bb, depth=qd))
                        extra = {}
                        if st is not None:
                            extra["vs_safetensors"] = round(got[op] / st[op], 2)
                        rows.append(row("disk", f"tier {op} {_label(bb)} qd{qd}", n * bb, n * bb / got[op],
                                        peak / 1e9, path="tier", op=op, block_bytes=bb, depth=qd,
                                        durability=args.durability, direct_io=tier.stats()["direct_io"], **extra))
            finally:
                tier.close()
            if st is not None:
                for op in ("write", "read"):
                    rows.append(row("disk", f"safetensors {op} {_label(bb)}", n * bb, n * bb / st[op],
                                    None, path="safetensors", op=op, block_bytes=bb, depth=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


# ---- the four paths; each returns bytes/second per op ---------------------------------

def _open_tier(work: str, bb: int, n: int, durability: str):
    from ..keys import Namespace
    from ..tiers.disk.tier import DiskTier
    from ..layout import round_up
    from ..tiers.disk.slabs import ALIGN
    slot = round_up(bb, ALIGN)
    return DiskTier("bench", os.path.join(work, f"tier-{bb}"), bb, n * slot,
                    namespace=Namespace("bench-disk", 16), slab_bytes=1 << 30, durability=durability)


def _interleaved(fns: dict, repeat: int) -> dict[str, float]:
    """Median seconds of each function, runs alternating (after one warm-up run each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


_SLOTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _io_threads(qd: int) -> int:
    return max(qd, 4)


def _tier(tier, src, dst, n: int, bb: int, qd: int) -> dict:
    tier.io_threads = _io_threads(qd)
    keys = [i.to_bytes(16, "little") for i in range(n)]
    slots = _SLOTS.get(tier) or tier.allocate(n)
    _SLOTS[tier] = slots                        # one set of slots per tier, reused by every case
    srcs = [memoryview(src[i * bb:(i + 1) * bb]) for i in range(n)]
    dsts = [memoryview(dst[i * bb:(i + 1) * bb]) for i in range(n)]

    def write():
        for i in range(0, n, qd):
            if not all(tier.write(keys[i:i + qd], slots[i:i + qd], srcs[i:i + qd])):
                raise RuntimeError("disk tier write failed during the benchmark")

    def read():
        for i in range(0, n, qd):
            if not all(tier.read(keys[i:i + qd], slots[i:i + qd], dsts[i:i + qd])):
                raise RuntimeError("disk tier read failed during the benchmark")
    return {"write": write, "read": read}


def _raw(work: str, src, dst, n: int, bb: int, qd: int) -> dict:
    from .. import native
    from ..tiers.disk.slabs import io_plan
    path = os.path.join(work, f"raw-{bb}")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)   # no O_DIRECT here: buffered, like the tier
    if os.fstat(fd).st_size < n * bb:
        os.posix_fallocate(fd, 0, n * bb)
    batches = []                                  # the tier's pieces and threads, batch by batch
    for i in range(0, n, qd):
        m = min(qd, n - i)
        piece, threads = io_plan(m, bb, _io_threads(qd))
        piece = piece or bb
        starts = np.arange(0, bb, piece, dtype=np.int64)
        offs = ((np.arange(i, i + m, dtype=np.int64) * bb)[:, None] + starts[None, :]).reshape(-1)
        lens = np.minimum(bb - starts, piece).astype(np.uint64)
        batches.append((offs, np.tile(lens, m), threads))

    def io(fn, base, buf):
        def go():
            for offs, lens, threads in batches:
                res = fn(fd, offs, base + offs.astype(np.uint64), lens, threads, within=[buf])
                if (res != lens.astype(np.int64)).any():
                    raise RuntimeError(f"raw I/O failed: {res.tolist()}")
        return go
    return {"write": io(native.pwrite_spans, np.uint64(src.ctypes.data), src),
            "read": io(native.pread_spans, np.uint64(dst.ctypes.data), dst), "close": lambda: os.close(fd)}


def _safetensors(work: str, src, dst, n: int, bb: int, repeat: int) -> dict[str, float]:
    from safetensors.numpy import load_file, save_file
    folder = os.path.join(work, f"st-{bb}")
    os.makedirs(folder, exist_ok=True)
    names = [os.path.join(folder, f"{i:08d}.safetensors") for i in range(n)]

    def write():
        for i, name in enumerate(names):
            save_file({"kv": src[i * bb:(i + 1) * bb]}, name)
        os.sync()

    def read():
        for i, name in enumerate(names):
            dst[i * bb:(i + 1) * bb] = load_file(name)["kv"]

    def drop():
        for name in names:
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    tw = median_time(write, repeat=repeat)
    times = []
    for _ in range(repeat):
        drop()
        t0 = time.perf_counter()
        read()
        times.append(time.perf_counter() - t0)
    times.sort()
    if not np.array_equal(src, dst):
        raise RuntimeError("safetensors baseline read back different bytes")
    return {"write": n * bb / tw, "read": n * bb / times[len(times) // 2]}


def _dd(work: str, ws: int) -> list[dict]:
    if shutil.which("dd") is None:
        return []
    path = os.path.join(work, "dd.bin")
    count = max(1, ws // (4 << 20))
    out = []
    for op, cmd in (("write", ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}", "oflag=direct"]),
                    ("read", ["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"])):
        r = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"^(\d+) bytes .* copied, ([0-9.]+) s", r.stderr, re.M)
        if r.returncode or not m:
            out.append(row("disk", f"dd {op} bs=4M direct", 0, 0.0, None, path="dd", op=op,
                           error=r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "dd failed"))
            continue
        out.append(row("disk", f"dd {op} bs=4M direct", int(m.group(1)), float(m.group(2)), None,
                       path="dd", op=op, block_bytes=4 << 20, depth=1))
    return out
