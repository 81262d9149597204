"""TieredCache scenarios: visibility, two-phase store/load, leases, eviction, demotion, promotion."""
from __future__ import annotations

import time

import pytest

from kvtier import ConfigError, TieredCache
from kvtier.tiers import HostTier

from tests.helpers import block, k, load_and_verify

BB = 4096 + 100          # not a multiple of the slot alignment on purpose


def make(num_slots=(4,), policy="lru", threads=0, **kw) -> TieredCache:
    tiers = [HostTier(f"t{i}", BB, n, memory="pageable") for i, n in enumerate(num_slots)]
    return TieredCache(tiers, policy, transfer_threads=threads, **kw)


def store(cache, ids, owner="o", success=True):
    keys = [k(i) for i in ids]
    h = cache.prepare_store(keys, owner)
    if h is None:
        return None
    for key, view in zip(h.keys, h.views):
        view[:] = block(key, BB)
    cache.complete_store(h, success)
    return h


def verify_load(cache, ids, owner="r") -> int:
    """Load ids, check every byte of every block that came back; returns num_ok."""
    return load_and_verify(cache, ids, BB, owner)


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "prefix", "adaptive"])
def test_store_visible_only_after_complete(policy):
    c = make(policy=policy)
    h = c.prepare_store([k(1), k(2)], "o")
    assert c.lookup([k(1), k(2)]).num_blocks == 0
    for key, v in zip(h.keys, h.views):
        v[:] = block(key, BB)
    assert c.lookup([k(1)]).num_blocks == 0
    c.complete_store(h, True)
    assert c.lookup([k(1), k(2), k(3)]) .num_blocks == 2
    assert c.lookup([k(1), k(2)]).tiers == ("t0", "t0")
    assert verify_load(c, [1, 2]) == 2


def test_failed_store_rolls_back_and_frees_slots():
    c = make(num_slots=(2,))
    h = store(c, [1, 2], success=False)
    assert h is not None
    assert c.lookup([k(1)]).num_blocks == 0
    assert c.tiers[0].num_free == 2
    assert store(c, [3, 4]) is not None
    assert c.lookup([k(3), k(4)]).num_blocks == 2


def test_prefix_semantics_and_skip_of_stored_keys():
    c = make(num_slots=(8,))
    store(c, [1, 2])
    h = c.prepare_store([k(1), k(2), k(3)], "o")
    assert h.keys == [k(3)] and h.positions == [2]
    c.complete_store(h, True)
    assert c.lookup([k(1), k(9), k(3)]).num_blocks == 1


def test_leased_block_is_never_evicted():
    c = make(num_slots=(2,))
    store(c, [1, 2])
    h = c.prepare_load([k(1)], "reader")
    assert h.ready() and h.num_ok == 1
    store(c, [3])                                  # must evict 2, not the leased 1
    assert c.lookup([k(1)]).num_blocks == 1
    assert c.lookup([k(2)]).num_blocks == 0
    assert bytes(h.views[0]) == block(k(1), BB)
    c.complete_load(h)
    # with everything leased there is no room: None, cache intact
    h1 = c.prepare_load([k(1)], "a")
    h3 = c.prepare_load([k(3)], "a")
    assert c.prepare_store([k(4)], "o") is None
    assert c.lookup([k(1)]).num_blocks == 1 and c.lookup([k(3)]).num_blocks == 1
    c.complete_load(h1), c.complete_load(h3)


def test_pending_store_is_not_evicted_and_partial_room():
    c = make(num_slots=(3,))
    h = c.prepare_store([k(1), k(2)], "o")         # pending, protected
    h2 = c.prepare_store([k(3), k(4), k(5)], "o")   # only one slot left
    assert h2.keys == [k(3)]
    c.complete_store(h, False)
    c.complete_store(h2, False)


def test_lease_timeout_releases_load_and_pending_store():
    c = make(num_slots=(2,), lease_timeout_s=0.05)
    store(c, [1])
    h = c.prepare_load([k(1)], "dead-reader")
    s = c.prepare_store([k(2)], "dead-writer")
    time.sleep(0.1)
    assert c.lookup([k(1)]).num_blocks == 1        # triggers the sweep
    st = c.stats()
    assert st["lease_timeouts"] == 2 and st["open_handles"] == 0
    assert not c.complete_load(h) and not c.complete_store(s, True)
    assert c.lookup([k(2)]).num_blocks == 0         # an expired store never becomes visible
    store(c, [3, 4])                                # both slots reusable: 1 was unleased
    assert c.lookup([k(3), k(4)]).num_blocks == 2


def test_release_owner_aborts_everything():
    c = make(num_slots=(4,))
    store(c, [1])
    c.prepare_load([k(1)], "req")
    c.prepare_store([k(2)], "req")
    assert c.release("req") == 2
    assert c.stats()["open_handles"] == 0
    assert c.lookup([k(2)]).num_blocks == 0
    assert c.tiers[0].num_free == 3


@pytest.mark.parametrize("threads", [0, 2])
def test_demotion_and_promotion_through_a_second_tier(threads):
    c = make(num_slots=(2, 8), threads=threads)
    for i in range(1, 7):
        store(c, [i])
    c.flush()
    lk = c.lookup([k(i) for i in range(1, 7)])
    assert lk.num_blocks == 6
    assert lk.tiers[:4] == ("t1",) * 4 and lk.tiers[4:] == ("t0", "t0")
    assert verify_load(c, [1, 2]) == 2            # promoted back into t0
    c.flush()
    assert c.lookup([k(1), k(2)]).tiers == ("t0", "t0")
    st = c.stats()
    assert st["t1.promoted_blocks"] == 2 and st["t0.evicted_blocks"] >= 4
    assert st["t1.stored_blocks"] >= 4


@pytest.mark.parametrize("full", ["wait", "drop"])
def test_demotion_without_staging_room_waits_or_is_dropped_when_asked(full):
    tiers = [HostTier("t0", BB, 1, memory="pageable"), HostTier("t1", BB, 8, memory="pageable")]
    c = TieredCache(tiers, staging_bytes=0, staging_full=full, transfer_threads=2)
    store(c, [1])
    store(c, [2])                                    # evicts 1; the pool has no slot
    c.flush()
    st = c.stats()
    if full == "wait":                               # written from its own slot, then freed
        assert st.get("t1.demotions_dropped", 0) == 0 and st["t1.demotions_in_place"] == 1
        assert c.lookup([k(1)]).tiers == ("t1",) and verify_load(c, [1]) == 1
    else:
        assert st["t1.demotions_dropped"] == 1 and st.get("t1.stored_blocks", 0) == 0


def test_bad_input_is_rejected_and_cache_intact():
    c = make()
    store(c, [1])
    for bad in ([b"short"], [1234], ["x" * 16], [k(1), b"y" * 17]):
        with pytest.raises(ConfigError):
            c.lookup(bad)
        with pytest.raises(ConfigError):
            c.prepare_store(bad, "o")
        with pytest.raises(ConfigError):
            c.prepare_load(bad, "o")
    assert verify_load(c, [1]) == 1
    with pytest.raises(ConfigError, match="policy"):
        make(policy="belady-oracle")
    with pytest.raises(ConfigError, match="capacity"):
        HostTier("h", BB, 0)


def test_stats_snapshot_counts():
    c = make(num_slots=(2, 4))
    h = store(c, [1, 2, 3])
    assert h.keys == [k(1), k(2)]                   # room for two: the leading ones
    assert c.stats()["store_rejected_blocks"] == 1
    store(c, [3])
    c.lookup([k(1), k(2), k(3), k(4)])
    s = c.stats()
    assert s["lookups"] == 1 and s["lookup_blocks"] == 4 and s["miss_blocks"] == 1
    assert s["t0.evicted_blocks"] == 1 and s["t0.stored_blocks"] == 3
    assert s["t0.bytes_in"] == 3 * BB


def test_promotion_cascade_never_evicts_its_own_source():
    """Promoting a block can evict from the top tier, whose demotion can evict
    from the tier below: the block being promoted must survive that cascade."""
    c = make(num_slots=(1, 2))
    store(c, [1])
    store(c, [2])          # 1 -> t1
    store(c, [3])          # 2 -> t1; t1 full
    # promote 1: evicts 3 from t0, whose demotion needs a t1 slot while 1 is being read from t1
    assert verify_load(c, [1]) == 1
    c.flush()
    assert c.lookup([k(2)]).num_blocks == 0          # the unleased block below made room
    assert verify_load(c, [3]) == 1                  # and the demoted one is intact


def test_discard_drops_every_copy_and_waits_for_leases():
    c = make(num_slots=(2, 4))
    store(c, [1]); store(c, [2]); store(c, [3])       # 1 demoted to t1
    c.flush()
    h = c.prepare_load([k(3)], "reader")
    assert c.discard([k(1), k(3), k(9)]) == 2
    assert c.lookup([k(1)]).num_blocks == 0 and c.lookup([k(3)]).num_blocks == 0
    assert bytes(h.views[0]) == block(k(3), BB)       # the leased copy is still intact
    used = c.tiers[0].num_slots - c.tiers[0].num_free
    c.complete_load(h)
    assert c.tiers[0].num_slots - c.tiers[0].num_free == used - 1
    assert verify_load(c, [2]) == 1


def test_host_tier_over_an_external_buffer():
    import numpy as np
    buf = np.zeros(2 * 8192, dtype=np.uint8)
    with pytest.raises(ConfigError, match="buffer"):
        HostTier("h", BB, 4, buffer=buf)                     # too small for 4 slots of 8 KiB
    with pytest.raises(ConfigError, match="buffer"):
        HostTier("h", BB, 2, buffer=buf.view(np.uint16))
    c = TieredCache([HostTier("h", BB, 2, buffer=buf)], transfer_threads=0)
    store(c, [1])
    assert bytes(buf[:BB]) == block(k(1), BB)                # the bytes live in the caller's buffer
    assert verify_load(c, [1]) == 1
