"""Native core against the same run's baselines: memcpy, span copies, CRC32C.

    python -m bench.bench_native [--quick] [--json PATH]    table + JSON lines
    pytest bench/bench_native.py                            the same cases, pytest-benchmark

Each row names its baseline (``peak_case``), measured in the same run:
  memcpy 64 MiB, threads 1 and 2        vs numpy.copyto of the same arrays
  copy_spans, 1 MiB blocks of 32 x 32 KiB vs native memcpy of 1 MiB blocks
  crc32c (hardware where available)     vs the extension's portable table path
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from .common import emit, median_time, row

SUITE = "native"
MiB = 1 << 20


def _arrays(nbytes: int):
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    return src, np.ones(nbytes, dtype=np.uint8)


def memcpy_cases(total: int, repeat: int) -> list[dict]:
    from .. import native
    src, dst = _arrays(total)
    t_numpy = median_time(lambda: np.copyto(dst, src), repeat=repeat)
    peak = total / t_numpy / 1e9
    rows = []
    for threads in (1, 2):
        t = median_time(lambda: native.memcpy(dst, src, threads=threads), repeat=repeat)
        rows.append(row(SUITE, f"memcpy_{total // MiB}MiB_t{threads}", total, t, peak,
                        peak_case="numpy.copyto", native=native.NATIVE))
    return rows


def copy_spans_cases(total: int, repeat: int, block: int = MiB, span: int = 32 << 10) -> list[dict]:
    from .. import native
    src, dst = _arrays(total)
    num_blocks, per_block = total // block, block // span
    order = np.random.default_rng(1).permutation(num_blocks * per_block).astype(np.uint64)
    srcs = [order[b * per_block:(b + 1) * per_block] * span + src.ctypes.data
            for b in range(num_blocks)]
    dsts = [np.arange(per_block, dtype=np.uint64) * span + dst.ctypes.data + b * block
            for b in range(num_blocks)]
    lengths = np.full(per_block, span, dtype=np.uint64)
    rows = []
    for threads in (1, 2):
        def spans():
            for s, d in zip(srcs, dsts):
                native.copy_spans(s, d, lengths, threads=threads, within=[src, dst])

        def blocks():
            for b in range(num_blocks):
                native.memcpy(dst[b * block:(b + 1) * block], src[b * block:(b + 1) * block],
                               threads=threads)
        t_peak = median_time(blocks, repeat=repeat)
        t = median_time(spans, repeat=repeat)
        rows.append(row(SUITE, f"copy_spans_{block // MiB}MiB_{per_block}x{span >> 10}KiB_t{threads}",
                        num_blocks * block, t, num_blocks * block / t_peak / 1e9,
                        peak_case="memcpy per block", native=native.NATIVE))
    return rows


def crc_cases(sizes: list[int], repeat: int) -> list[dict]:
    from .. import native
    try:
        from ..native import _kvtier_native as ext
    except ImportError:
        return []
    src, _ = _arrays(max(sizes))
    rows = []
    for size in sizes:
        buf = src[:size]
        t_table = median_time(lambda: ext._crc32c_table(buf), repeat=repeat)
        t = median_time(lambda: native.crc32c(buf), repeat=repeat)
        rows.append(row(SUITE, f"crc32c_{size // MiB}MiB", size, t, size / t_table / 1e9,
                        peak_case="crc32c table path", hardware=native.HARDWARE_CRC))
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="16 MiB and 3 repetitions")


def run(args) -> list[dict]:
    """The suite interface of ``kvtier bench``: rows for the table and JSON lines."""
    repeat = 3 if args.quick else 11
    total = 16 * MiB if args.quick else 64 * MiB
    return (memcpy_cases(total, repeat) + copy_spans_cases(total, repeat)
            + crc_cases([MiB, total], repeat))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--json", metavar="PATH", help="append results as JSON lines to PATH")
    args = p.parse_args(argv)
    emit(run(args), args.json)
    return 0


# ---- pytest-benchmark -----------------------------------------------------------

def test_bench_memcpy_64mib(benchmark):
    from .. import native
    src, dst = _arrays(64 * MiB)
    benchmark(native.memcpy, dst, src)


def test_bench_numpy_copyto_64mib(benchmark):
    src, dst = _arrays(64 * MiB)
    benchmark(np.copyto, dst, src)


def test_bench_copy_spans_1mib_block(benchmark):
    from .. import native
    src, dst = _arrays(2 * MiB)
    order = np.random.default_rng(1).permutation(64)[:32].astype(np.uint64)
    benchmark(native.copy_spans, order * 32768 + src.ctypes.data,
              np.arange(32, dtype=np.uint64) * 32768 + dst.ctypes.data,
              np.full(32, 32768, dtype=np.uint64), within=[src, dst])


def test_bench_crc32c_1mib(benchmark):
    from .. import native
    src, _ = _arrays(MiB)
    benchmark(native.crc32c, src)


if __name__ == "__main__":
    sys.exit(main())
