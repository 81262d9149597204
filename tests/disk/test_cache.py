"""The disk tier inside TieredCache: restart, write-back and write-through, admission, faults."""
from __future__ import annotations

import errno
import os
import random
import threading

import pytest

from kvtier import KVTierConfig, Namespace, TieredCache

from tests.helpers import block, k
from tests.disk.helpers import flip, inject

BB = 16384
NS = Namespace("cache-disk-model", 16)
HOST_BLOCKS = 8


def config(path, **disk) -> KVTierConfig:
    d = {"path": str(path), "capacity_bytes": 256 * (BB + 4096), "slab_bytes": 32 * (BB + 4096),
         "admission": "none"}
    d.update(disk)
    return KVTierConfig.from_dict({"host": {"capacity_bytes": HOST_BLOCKS * BB, "pinned": "off"},
                                   "disk": d, "staging_bytes": 64 * BB})


def store(cache, ids, owner="w"):
    keys = [k(i) for i in ids]
    h = cache.prepare_store(keys, owner)
    assert h is not None
    for key, view in zip(h.keys, h.views):
        view[:] = block(key, BB)
    cache.complete_store(h, True)
    return h


def load(cache, ids, owner="r") -> int:
    """Load ids in host-sized chunks; every block that comes back must be byte-identical."""
    total = 0
    for i in range(0, len(ids), HOST_BLOCKS // 2):
        chunk = ids[i:i + HOST_BLOCKS // 2]
        h = cache.prepare_load([k(j) for j in chunk], owner)
        if h is None:
            continue
        assert h.wait(30)
        for key, view, ok in zip(h.keys, h.views, h.ok):
            if ok:
                assert bytes(view) == block(key, BB)
        total += h.num_ok
        cache.complete_load(h)
    return total


@pytest.mark.parametrize("durability", ["none", "data", "full"])
def test_store_close_reopen_every_block_back_write_through(tmp_path, durability):
    cfg = config(tmp_path, write_mode="through", durability=durability)
    ids = list(range(40))
    with TieredCache.from_config(cfg, NS, BB) as c:
        for i in range(0, 40, 4):
            store(c, ids[i:i + 4])
        assert c.flush(30)
        assert c.stats()["disk.stored_blocks"] == 40
    with TieredCache.from_config(cfg, NS, BB) as c:
        look = c.lookup([k(i) for i in ids])
        assert look.num_blocks == 40 and set(look.tiers) == {"disk"}
        assert load(c, ids) == 40
        assert c.stats()["disk.promoted_blocks"] == 40


def test_write_through_copies_run_on_the_transfer_thread_and_are_never_torn(tmp_path):
    # The caller completing a store does not copy its blocks for the disk: they are
    # leased until the transfer thread copies them. Discarded meanwhile, their slots
    # must not be reused before the copy (it would carry another block's bytes under
    # their keys); evicted meanwhile, the eviction makes the copy first.
    cfg = config(tmp_path, write_mode="through")
    cfg = KVTierConfig.from_dict({**cfg.to_dict(), "transfer_threads": 1})
    with TieredCache.from_config(cfg, NS, BB) as c:
        gate = threading.Event()
        c._engine.submit("gate", lambda: gate.wait(30))      # holds the one transfer thread
        store(c, range(4))
        st = c.stats()
        assert st["inflight_blocks"] == 4 and st["host.leased_blocks"] == 4
        assert c.discard([k(0), k(1)]) == 2
        h = c.prepare_store([k(i) for i in range(100, 100 + HOST_BLOCKS)], "w")   # needs every free slot
        assert h is not None and len(h.keys) == HOST_BLOCKS - 2  # k0, k1 keep theirs until copied
        for key, view in zip(h.keys, h.views):
            view[:] = block(key, BB)
        c.complete_store(h, True)
        assert c.lookup([k(2)]).num_blocks == 0               # evicted, its copy made on the way out
        gate.set()
        assert c.flush(30)
        assert c.stats()["host.leased_blocks"] == 0
        disk = c.tiers[1]
        for i in range(4):                                   # every copy that reached the disk is whole
            dst = memoryview(bytearray(BB))
            slot = c._index[1].get(k(i))
            if slot is not None:
                assert disk.read([k(i)], [slot.slot], [dst]) == [True]
                assert bytes(dst) == block(k(i), BB)
        assert load(c, [2, 3]) == 2


def test_write_back_demotes_on_eviction_and_survives_restart(tmp_path):
    cfg = config(tmp_path)
    with TieredCache.from_config(cfg, NS, BB) as c:
        for i in range(0, 32, 4):
            store(c, range(i, i + 4))
        assert c.flush(30)
        on_disk = [i for i in range(32) if c.lookup([k(i)]).tiers == ("disk",)]
        assert len(on_disk) == 32 - HOST_BLOCKS
    with TieredCache.from_config(cfg, NS, BB) as c:
        assert c.lookup([k(i) for i in on_disk]).num_blocks == len(on_disk)
        assert load(c, on_disk) == len(on_disk)


def test_tinylfu_keeps_one_hit_blocks_off_the_disk(tmp_path):
    used = {}
    for admission in ("none", "tinylfu"):
        cfg = config(tmp_path / admission, admission=admission)
        with TieredCache.from_config(cfg, NS, BB) as c:
            store(c, range(4))                    # blocks 0-3: stored, then loaded again
            assert load(c, list(range(4))) == 4
            for i in range(100, 140, 4):           # one-hit blocks push everything out of host
                store(c, range(i, i + 4))
            assert c.flush(30)
            disk = c.tiers[1]
            used[admission] = disk.stats()["bytes_written"]
            got = {i for i in list(range(4)) + list(range(100, 140)) if c.lookup([k(i)]).num_blocks}
            if admission == "tinylfu":
                assert {0, 1, 2, 3} <= got
                assert c.stats()["disk.not_admitted"] >= 30
                assert load(c, [0, 1, 2, 3]) == 4
    assert used["tinylfu"] * 5 < used["none"]


def test_disk_read_errors_are_misses_and_the_cache_goes_on(tmp_path, monkeypatch):
    cfg = config(tmp_path, write_mode="through")
    with TieredCache.from_config(cfg, NS, BB) as c:
        for i in range(0, 24, 4):
            store(c, range(i, i + 4))
        assert c.flush(30)
        inject(monkeypatch, "pread_spans", errno.EIO, every=3)
        got = load(c, list(range(12)))
        assert 0 < got < 12
        assert c.stats()["disk.failed_reads"] > 0
        monkeypatch.undo()
        store(c, range(200, 204))                # the cache keeps storing and serving
        assert load(c, [200, 201, 202, 203]) == 4


def test_disk_write_errors_fail_demotions_not_the_cache(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    with TieredCache.from_config(cfg, NS, BB) as c:
        inject(monkeypatch, "pwrite_spans", errno.EIO)
        for i in range(0, 24, 4):
            store(c, range(i, i + 4))
        assert c.flush(30)
        assert c.stats().get("disk.stored_blocks", 0) == 0
        assert c.stats()["disk.failed_writes"] > 0
        assert load(c, list(range(16, 24))) == HOST_BLOCKS


def test_corrupt_disk_block_is_a_miss_through_the_cache(tmp_path):
    cfg = config(tmp_path, write_mode="through")
    with TieredCache.from_config(cfg, NS, BB) as c:
        for i in range(0, 16, 4):
            store(c, range(i, i + 4))
        assert c.flush(30)
        disk = c.tiers[1]
        slot = c._index[1][k(2)].slot
        flip(disk, slot, 100, random.Random(1))
        assert load(c, [0, 1, 2, 3]) == 2        # stops at the corrupt block: a miss, never bytes
        assert disk.stats()["corrupt_blocks"] == 1
        assert c.lookup([k(2)]).num_blocks == 0
        assert os.path.isdir(tmp_path)
