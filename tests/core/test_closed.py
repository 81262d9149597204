"""After close(), every public object refuses use with CacheClosedError; close() twice is fine
(issue 19)."""
from __future__ import annotations

import numpy as np
import pytest

from kvtier import Namespace, TieredCache
from kvtier.errors import CacheClosedError
from kvtier.staging import StagingPool
from kvtier.tiers import HostTier

from tests.helpers import k

BB = 4096


def refused(call, *args):
    with pytest.raises(CacheClosedError, match="after close"):
        call(*args)


def test_cache_refuses_every_call_after_close():
    c = TieredCache([HostTier("t0", BB, 4, memory="pageable"), HostTier("t1", BB, 4, memory="pageable")])
    h = c.prepare_store([k(1)], "w")
    c.close()
    c.close()
    assert c.closed
    keys = [k(1)]
    for call, args in [(c.lookup, (keys,)), (c.prepare_store, (keys, "w")), (c.complete_store, (h, True)),
                       (c.prepare_load, (keys, "r")), (c.complete_load, (h,)), (c.discard, (keys,)),
                       (c.release, ("w",)), (c.flush, ()), (c.stats, ()), (c.add_listener, (object(),))]:
        refused(call, *args)
    assert all(t.closed for t in c.tiers)


@pytest.mark.parametrize("memory", ["pageable", "none"])
def test_host_tier_refuses_use_after_close(memory):
    t = HostTier("h", BB, 4, memory=memory)
    slots = t.allocate(2)
    t.close()
    t.close()
    buf = memoryview(bytearray(BB))
    for call, args in [(t.allocate, (1,)), (t.free, (slots,)), (t.view, (0,)), (t.addresses, ([0],)),
                       (t.write, ([k(1)], [0], [buf])), (t.read, ([k(1)], [0], [buf]))]:
        refused(call, *args)
    assert t.stats()["num_slots"] == 4                     # stats stay readable


def test_disk_tier_refuses_use_after_close(tmp_path):
    from kvtier.tiers.disk.tier import DiskTier
    t = DiskTier("disk", str(tmp_path), BB, 16 * BB, namespace=Namespace("m", 16))
    slot = t.allocate(1)
    src = np.zeros(BB, dtype=np.uint8)
    assert t.write([k(1)], slot, [memoryview(src)]) == [True]
    t.close()
    t.close()
    for call, args in [(t.allocate, (1,)), (t.free, (slot,)), (t.write, ([k(2)], [1], [memoryview(src)])),
                       (t.read, ([k(1)], slot, [memoryview(src)])), (t.discard, ([k(1)], slot)),
                       (t.recover, ()), (t.check, ())]:
        refused(call, *args)


def test_staging_pool_refuses_use_after_close():
    p = StagingPool(BB, 4 * BB)
    got = p.allocate(2)
    p.close()
    p.close()
    for call, args in [(p.allocate, (1,)), (p.free, (got,)), (p.view, (0,))]:
        refused(call, *args)
