"""pytest-benchmark versions of the host suite: ``pytest bench/test_bench_host.py``.

Each case reports its own memcpy peak of the same bytes in ``extra_info``.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from kvtier import HostConfig, KVTierConfig, Namespace, PagedKVCache
from kvtier import native

from kvtier.bench.host import LAYERS, _engine


@pytest.fixture(scope="module", params=[64 << 10, 1 << 20, 8 << 20], ids=lambda b: f"{b >> 10}KiB")
def setup(request):
    bb = request.param
    n = max(4, (64 << 20) // bb)
    kv = _engine(2 * n, bb)
    cfg = KVTierConfig(host=HostConfig(capacity_bytes=(n + 8) * (bb + 4096), pinned="off"), transfer_threads=1)
    cache = PagedKVCache.create(cfg, Namespace(model="bench", block_tokens=16, dtype="bfloat16"), kv)
    yield cache, n, bb
    cache.close()


def _memcpy_peak(nbytes: int) -> float:
    import time
    a, b = np.empty(nbytes, np.uint8), np.ones(nbytes, np.uint8)
    best = []
    for _ in range(5):
        t0 = time.perf_counter(); native.memcpy(a, b); best.append(time.perf_counter() - t0)
    return nbytes / float(np.median(best)) / 1e9


def test_store(benchmark, setup):
    cache, n, bb = setup
    counter = itertools.count()
    ids = np.arange(n)

    def store():
        base = next(counter)
        keys = [base.to_bytes(8, "little") + i.to_bytes(8, "little") for i in range(n)]
        assert cache.store(None, ids, keys=keys) == n
    benchmark(store)
    benchmark.extra_info.update(bytes=n * bb, peak_gbps=_memcpy_peak(n * bb), layers=LAYERS)


def test_load(benchmark, setup):
    cache, n, bb = setup
    keys = [b"L" * 8 + i.to_bytes(8, "little") for i in range(n)]
    cache.store(None, np.arange(n), keys=keys)
    dst = np.arange(n, 2 * n)
    benchmark(lambda: cache.load(None, dst, keys=keys))
    benchmark.extra_info.update(bytes=n * bb, peak_gbps=_memcpy_peak(n * bb), layers=LAYERS)
