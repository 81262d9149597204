"""Many threads, many mixed operations, every loaded byte checked."""
from __future__ import annotations

import random
import threading

import pytest

from kvtier import TieredCache
from kvtier.tiers import HostTier

from tests.helpers import block, k

BB = 512
THREADS = 4
OPS = 25_000                       # per thread: 100k in all


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "prefix", "adaptive"])
def test_threads_mixed_operations_bytes_always_right(policy):
    tiers = [HostTier("host", BB, 64, memory="pageable"), HostTier("host2", BB, 128, memory="pageable")]
    cache = TieredCache(tiers, policy, transfer_threads=2, staging_bytes=32 * 4096)
    errors: list[str] = []
    counts = {"loaded": 0, "stored": 0}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        loaded = stored = 0
        try:
            for _ in range(OPS):
                start = rnd.randrange(0, 300)
                ids = list(range(start, start + rnd.randint(1, 4)))
                keys = [k(i) for i in ids]
                op = rnd.random()
                if op < 0.4:
                    h = cache.prepare_store(keys, seed)
                    if h is not None:
                        for key, v in zip(h.keys, h.views):
                            v[:] = block(key, BB)
                        ok = rnd.random() > 0.05
                        cache.complete_store(h, ok)
                        stored += len(h) if ok else 0
                elif op < 0.9:
                    h = cache.prepare_load(keys, seed)
                    if h is not None:
                        if not h.wait(10):
                            errors.append("promotion never finished")
                            return
                        for key, v in zip(h.keys[:h.num_ok], h.views[:h.num_ok]):
                            if bytes(v) != block(key, BB):
                                errors.append(f"wrong bytes for {key.hex()}")
                        loaded += h.num_ok
                        cache.complete_load(h)
                else:
                    cache.lookup(keys)
        except Exception as e:  # surfaced by the assertion below
            errors.append(repr(e))
        with lock:
            counts["loaded"] += loaded
            counts["stored"] += stored

    ts = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in ts)
    cache.flush()
    assert errors == []
    assert counts["loaded"] > 1000 and counts["stored"] > 1000
    st = cache.stats()
    assert st["open_handles"] == 0 and st["inflight_blocks"] == 0
    for t, tier in enumerate(cache.tiers):
        assert tier.num_slots - tier.num_free == len(cache._index[t])
    cache.close()
