"""DiskTier: the Tier contract, restart, layout, locking and configuration errors."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvtier import ConfigError, MissingDependencyError, Namespace
from kvtier.config import DiskConfig
from kvtier.tiers.disk.tier import DiskTier
from kvtier.tiers.disk.slabs import SLAB_NAME

from tests.disk.helpers import NS, make, put, verify
from tests.helpers import ROOT, block, k

@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("o_direct", ["auto", "off"])
@pytest.mark.parametrize("bb", [4096, 8192 + 100, 100, 3 * 4096 - 1, 5 << 19])
def test_write_read_roundtrip(tmp_path, bb, o_direct, aligned):
    t = make(tmp_path, bb=bb, o_direct=o_direct)
    placed = put(t, range(10), aligned=aligned)
    assert verify(t, placed, aligned) == [True] * 10
    for key, slot in placed.items():              # one block at a time: cut into pieces
        assert verify(t, {key: slot}, aligned) == [True]
    assert t.check()["ok"]
    assert t.stats()["blocks_written"] == 10


@pytest.mark.parametrize("bb", [1 << 20, (3 << 20) + 4096, 8 << 20])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_blocks_cut_into_pieces_come_back_whole(tmp_path, bb, batch):
    # batches smaller than io_threads move each block as pieces on several threads,
    # each checksummed apart and joined: the result must equal the one-piece checksum
    from kvtier.tiers.disk.slabs import block_checksums, io_plan
    t = make(tmp_path, bb=bb, slots=6, per_slab=3, io_threads=4)
    placed = put(t, range(batch), aligned=True)
    if batch < 4:
        assert io_plan(batch, bb, 4)[0] not in (0, bb)
    assert verify(t, placed, aligned=True) == [True] * batch
    want = [np.frombuffer(block(key, bb), dtype=np.uint8) for key in placed]
    assert [e.crc for e in t.index.get_many(list(placed))] == block_checksums([w.ctypes.data for w in want], bb,
                                                                               within=want)


def test_aligned_buffers_go_straight_to_disk(tmp_path):
    from kvtier.tiers.host import HostTier
    t = make(tmp_path, bb=16384)
    host = HostTier("h", 16384, 4, memory="pageable")
    keys = [k(i) for i in range(4)]
    for i, key in enumerate(keys):
        host.view(i)[:] = block(key, 16384)
    slots = t.allocate(4)
    assert t.write(keys, slots, [host.view(i) for i in range(4)]) == [True] * 4
    for i in range(4):
        host.view(i)[:] = b"\0" * 16384
    assert t.read(keys, slots, [host.view(i) for i in range(4)]) == [True] * 4
    for i, key in enumerate(keys):
        assert bytes(host.view(i)) == block(key, 16384)


def test_absent_and_discarded_blocks_miss(tmp_path):
    t = make(tmp_path)
    placed = put(t, range(4))
    t.discard([k(1)], [placed[k(1)]])
    assert verify(t, placed) == [True, False, True, True]
    assert t.read([k(99)], [0], [memoryview(bytearray(t.block_bytes))]) == [False]
    # a slot that does not match the index is a miss, not another block's bytes
    assert t.read([k(0)], [placed[k(2)]], [memoryview(bytearray(t.block_bytes))]) == [False]


def test_slots_are_reused_after_free(tmp_path):
    t = make(tmp_path, slots=4, per_slab=2)
    for rnd in range(5):
        placed = put(t, range(rnd * 4, rnd * 4 + 4))
        assert t.allocate(1) is None
        assert verify(t, placed) == [True] * 4
        t.discard(list(placed), list(placed.values()))
        t.free(list(placed.values()))
    assert t.check()["ok"]
    assert len(os.listdir(tmp_path)) >= 2


def test_slabs_are_preallocated_files_not_one_file_per_block(tmp_path):
    t = make(tmp_path, slots=12, per_slab=4)
    put(t, range(12))
    slabs = sorted(f for f in os.listdir(tmp_path) if f.startswith("slab-"))
    assert slabs == [SLAB_NAME.format(i) for i in range(3)]
    for f in slabs:
        assert os.stat(tmp_path / f).st_size == 4 * t.slot_bytes


def test_restart_finds_every_block_and_reuses_nothing_twice(tmp_path):
    t = make(tmp_path)
    placed = put(t, range(10))
    t.discard([k(3)], [placed.pop(k(3))])
    t.close()
    t = make(tmp_path)
    found = dict(t.recover())
    assert found == placed
    assert verify(t, found) == [True] * len(found)
    assert t.num_free == t.num_slots - len(found)
    fresh = t.allocate(t.num_free)
    assert not set(fresh) & set(found.values())
    assert t.recover() == []                    # reported once


def test_recover_orders_by_last_access(tmp_path):
    t = make(tmp_path)
    placed = put(t, range(4))
    verify(t, {k(0): placed[k(0)]})             # block 0 becomes the most recent
    t.close()
    t = make(tmp_path)
    order = [key for key, _ in t.recover()]
    assert order[-1] == k(0)


def test_other_namespace_blocks_are_dropped_at_open(tmp_path):
    t = make(tmp_path)
    put(t, range(3))
    t.close()
    other = Namespace("another-model", 16)
    t = make(tmp_path, namespace=other)
    assert t.recover() == []
    assert t.stats()["dropped_at_open"] == 3
    assert t.num_free == t.num_slots


def test_different_geometry_is_a_config_error(tmp_path):
    make(tmp_path, bb=8192).close()
    with pytest.raises(ConfigError, match="laid out"):
        make(tmp_path, bb=16384)


def test_second_opener_in_this_process_gets_a_clear_error(tmp_path):
    t = make(tmp_path)
    with pytest.raises(ConfigError, match="no other process"):
        make(tmp_path)
    t.close()
    make(tmp_path).close()                      # the lock goes with close()


def test_second_process_gets_a_clear_error(tmp_path):
    t = make(tmp_path)
    code = ("import sys; from tests.disk.helpers import make\n"
            "from kvtier import ConfigError\n"
            "try:\n    make(%r)\nexcept ConfigError as e:\n    print('REFUSED', e); sys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code % str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 3, r.stderr
    assert f"held by pid {os.getpid()}" in r.stdout
    t.close()


@pytest.mark.parametrize("field,value", [("durability", "sometimes"), ("o_direct", "maybe"),
                                         ("io_threads", 0), ("path", "")])
def test_bad_arguments_are_config_errors(tmp_path, field, value):
    kw = {field: value}
    path = kw.pop("path", tmp_path)
    with pytest.raises(ConfigError, match=field):
        make(path, **kw)


def test_capacity_below_one_slot_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="capacity"):
        DiskTier("disk", str(tmp_path), 8192, 4096)


def test_from_config_sets_write_mode_and_admission(tmp_path):
    cfg = DiskConfig(path=str(tmp_path), capacity_bytes=1 << 20, slab_bytes=1 << 18,
                     write_mode="through", admission="tinylfu")
    t = DiskTier.from_config(cfg, namespace=NS, block_bytes=8192)
    assert t.write_through and t.admission is not None
    t.close()
    cfg = DiskConfig(path=str(tmp_path), capacity_bytes=1 << 20, slab_bytes=1 << 18, admission="none")
    t = DiskTier.from_config(cfg, namespace=NS, block_bytes=8192)
    assert not t.write_through and t.admission is None
    t.close()


def test_o_direct_on_fails_loudly_where_impossible(tmp_path, monkeypatch):
    from kvtier.tiers.disk import slabs
    monkeypatch.setattr(slabs, "probe_direct", lambda path: "the filesystem refuses O_DIRECT (test)")
    with pytest.raises(ConfigError, match="O_DIRECT"):
        make(tmp_path, o_direct="on")
    t = make(tmp_path, o_direct="auto")           # auto: buffered, reason kept
    assert not t.stats()["direct_io"] and "refuses" in t.stats()["direct_io_reason"]
    assert verify(t, put(t, range(3))) == [True] * 3


def test_missing_lmdb_names_the_disk_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)
    with pytest.raises(MissingDependencyError, match=r"kvtier\[disk\]"):
        make(tmp_path)


def test_wrong_block_size_is_refused(tmp_path):
    t = make(tmp_path)
    slots = t.allocate(1)
    with pytest.raises(ValueError):
        t.write([k(1)], slots, [b"x" * 10])


def test_stats_count_bytes_written_and_read(tmp_path):
    t = make(tmp_path)
    placed = put(t, range(5))
    verify(t, placed)
    s = t.stats()
    assert s["bytes_written"] == 5 * t.slot_bytes and s["bytes_read"] == 5 * t.slot_bytes
    assert s["used_slots"] == 5


def test_parallel_writers_and_readers(tmp_path):
    import threading
    t = make(tmp_path, bb=8192, slots=64, per_slab=16)
    errors = []

    def worker(base):
        try:
            for r in range(5):
                placed = put(t, range(base + 10 * r, base + 10 * r + 4))
                assert verify(t, placed) == [True] * 4
                t.discard(list(placed), list(placed.values()))
                t.free(list(placed.values()))
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(1000 * i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors
    assert t.check()["ok"]


def _reference_checksum(data: bytes) -> int:
    """First principles: CRC32C over the little-endian CRC32Cs of the 1 MiB chunks."""
    from kvtier.native import numpy_ref
    chunk = 1 << 20
    crcs = [numpy_ref.crc32c(np.frombuffer(data[i:i + chunk], dtype=np.uint8)) for i in range(0, len(data), chunk)]
    return numpy_ref.crc32c(np.array(crcs, dtype="<u4").tobytes())


@pytest.mark.parametrize("bb", [8192, (5 << 19) + 100])
def test_index_checksum_matches_reference(tmp_path, bb):
    t = make(tmp_path, bb=bb, slots=2, per_slab=2)
    put(t, [7])
    e = t.index.get_many([k(7)])[0]
    assert e.crc == _reference_checksum(block(k(7), bb))
