"""StagingPool: grows on demand in segments, never past its bound, and its memory is registered."""
from __future__ import annotations

import numpy as np
import pytest

from kvtier import native
from kvtier.errors import KVTierError
from kvtier.staging import AUTO_MIN_BYTES, StagingPool, auto_bytes

BB = 4096


def test_grows_on_demand_up_to_its_bound_and_no_further():
    p = StagingPool(BB, 10 * BB)
    assert p.num_slots == 0 and p.stats()["bytes"] == 0          # nothing mapped before use
    got = p.allocate(3)
    assert len(set(got)) == 3 and p.num_slots == 10               # one segment (capped at the bound)
    assert p.allocate(8) is None and p.num_used == 3              # all or nothing
    rest = p.allocate(7)
    assert p.num_used == 10 and p.allocate(1) is None
    assert p.stats()["bytes"] == 10 * BB and p.stats()["high_water_slots"] == 10
    p.free(got + rest)
    with pytest.raises(KVTierError, match="freed but not allocated"):
        p.free([got[0]])
    p.close()


def test_slots_are_distinct_registered_memory():
    p = StagingPool(BB, 64 << 20)
    got = p.allocate(5000)                                        # more than one 16 MiB segment
    assert len(p.stats()) and p.stats()["bytes"] > 16 << 20
    views = [p.view(s) for s in got[::997]]
    for i, v in enumerate(views):
        v[:] = bytes([i]) * BB
    assert [bytes(v[:1]) for v in views] == [bytes([i]) for i in range(len(views))]
    addrs = np.array([np.frombuffer(v, dtype=np.uint8).ctypes.data for v in views], dtype=np.uint64)
    with native.ranges.enforcing("strict"):
        native.crc32c_spans(addrs, np.full(len(addrs), BB, dtype=np.uint64))
    p.close()
    with native.ranges.enforcing("strict"), pytest.raises(native.ranges.UnregisteredMemoryError):
        native.crc32c_spans(addrs, np.full(len(addrs), BB, dtype=np.uint64))


def test_metadata_only_pool_holds_no_bytes():
    p = StagingPool(BB, 0, stores_bytes=False, min_slots=100)
    assert len(p.allocate(100)) == 100 and p.view(0) is None and p.stats()["bytes"] == 0


def test_auto_bound_is_a_quarter_of_the_top_tier_and_at_least_64_mib():
    assert auto_bytes(BB, 16) == AUTO_MIN_BYTES
    assert auto_bytes(1 << 20, 4096) == 1 << 30
