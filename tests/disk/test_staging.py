"""No block is lost on its way to disk: staging grows, then pushes back, and drops only when told to
(issue 19, item 7).  Every test reopens the cache over the same directory and reads every block
that should be on disk."""
from __future__ import annotations

import numpy as np
import pytest

from kvtier import KVTierConfig, Namespace, TieredCache

from tests.helpers import k

NS = Namespace("staging-model", 16)


def payload(i: int, nbytes: int) -> bytes:
    return np.random.default_rng(i).bytes(nbytes)


def config(path, bb: int, host_blocks: int, *, write_mode: str, **top) -> KVTierConfig:
    disk = {"path": str(path), "capacity_bytes": 1024 * (bb + 4096), "slab_bytes": 64 * (bb + 4096),
            "admission": "none", "write_mode": write_mode, "durability": "none"}
    return KVTierConfig.from_dict({"host": {"capacity_bytes": host_blocks * bb, "pinned": "off",
                                            "populate": False},
                                   "disk": disk, "transfer_threads": 2, **top})


def store(cache, ids, bb: int) -> list[int]:
    """Store ids in one request; returns the ids that got slots."""
    h = cache.prepare_store([k(i) for i in ids], "w")
    if h is None:
        return []
    for key, view in zip(h.keys, h.views):
        view[:] = payload(int.from_bytes(key, "little"), bb)
    cache.complete_store(h, True)
    return [int.from_bytes(key, "little") for key in h.keys]


def readable_after_restart(cfg, ids, bb: int, chunk: int) -> list[int]:
    """Reopen the cache over the directory: the ids whose bytes come back exact."""
    good = []
    with TieredCache.from_config(cfg, NS, bb) as c:
        assert c.lookup([k(i) for i in ids]).tiers == ("disk",) * len(ids)
        for at in range(0, len(ids), chunk):
            part = ids[at:at + chunk]
            h = c.prepare_load([k(i) for i in part], "r")
            assert h is not None and h.wait(60)
            for i, view, ok in zip(part, h.views, h.ok):
                if ok and bytes(view) == payload(i, bb):
                    good.append(i)
            c.complete_load(h)
    return good


@pytest.mark.parametrize("threads", [1, 2])
def test_write_through_prompt_eight_times_the_staging_pool_reaches_disk_whole(tmp_path, threads):
    bb, n = 16384, 64
    cfg = config(tmp_path, bb, n, write_mode="through", staging_bytes=n // 8 * bb,
                 transfer_threads=threads)
    with TieredCache.from_config(cfg, NS, bb) as c:
        assert store(c, range(n), bb) == list(range(n))
        assert c.flush(60)
        st = c.stats()
        assert st.get("disk.demotions_dropped", 0) == 0 and st["disk.demotions_in_place"] > 0
        assert st["disk.stored_blocks"] == n
        assert st["staging.max_slots"] == n // 8 and st["staging.high_water_slots"] <= n // 8
        assert st["host.leased_blocks"] == 0 and st["inflight_blocks"] == 0
    assert readable_after_restart(cfg, list(range(n)), bb, chunk=16) == list(range(n))


def test_write_through_prompt_eight_times_the_old_default_pool_reaches_disk_whole(tmp_path):
    # the case: a prompt 8x the former fixed 64 MiB pool, under the default staging settings
    bb, n = 1 << 20, 512
    cfg = config(tmp_path, bb, n + 8, write_mode="through")
    with TieredCache.from_config(cfg, NS, bb) as c:
        assert store(c, range(n), bb) == list(range(n))
        assert c.flush(300)
        st = c.stats()
        assert st.get("disk.demotions_dropped", 0) == 0 and st["disk.stored_blocks"] == n
        assert st["staging.max_bytes"] <= (n + 8) * bb // 4 + bb     # a quarter of the host tier
    assert readable_after_restart(cfg, list(range(n)), bb, chunk=64) == list(range(n))


def test_burst_of_evictions_from_a_full_host_tier_reaches_disk_whole(tmp_path):
    bb, host, total, burst = 16384, 16, 96, 16
    cfg = config(tmp_path, bb, host, write_mode="back", staging_bytes=2 * bb)
    stored: list[int] = []
    with TieredCache.from_config(cfg, NS, bb) as c:
        todo = list(range(total))
        while todo:                             # an engine retries what was pushed back
            got = store(c, todo[:burst], bb)
            stored += got
            todo = [i for i in todo if i not in got]
            if len(got) < burst:
                assert c.flush(60)
        assert c.flush(60)
        st = c.stats()
        assert st.get("disk.demotions_dropped", 0) == 0
        assert st["disk.demotions_in_place"] > 0            # staging was full: back-pressure ran
        where = dict(zip(stored, c.lookup([k(i) for i in stored]).tiers))
        assert len(where) == total                           # nothing vanished
        on_disk = sorted(i for i, t in where.items() if t == "disk")
        assert len(on_disk) == st["host.evicted_blocks"] == total - host
    assert readable_after_restart(cfg, on_disk, bb, chunk=8) == on_disk


def test_drops_only_when_asked_and_counted(tmp_path):
    bb, host = 16384, 4
    cfg = config(tmp_path, bb, host, write_mode="back", staging_bytes=0, staging_full="drop")
    with TieredCache.from_config(cfg, NS, bb) as c:
        for i in range(0, 12, 4):
            store(c, range(i, i + 4), bb)
        assert c.flush(60)
        st = c.stats()
        assert st["disk.demotions_dropped"] == st["host.evicted_blocks"] == 8
        assert st.get("disk.stored_blocks", 0) == 0


def test_staging_settings_are_checked():
    from kvtier import ConfigError
    with pytest.raises(ConfigError, match="staging_full"):
        KVTierConfig.from_dict({"staging_full": "sometimes"})
    assert KVTierConfig.from_dict({"staging_bytes": "auto"}).staging_bytes is None
    assert KVTierConfig.from_dict({"staging_bytes": "8MiB"}).staging_bytes == 8 << 20
