"""Disk faults degrade to misses: ENOSPC, EIO, read-only and vanished directories,
truncated slabs, a damaged index.  Never wrong bytes, never an exception other
than TierIOError out of a write."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from kvtier import TierIOError
from kvtier.tiers.disk.tier import DiskTier

from tests.helpers import block, k
from tests.disk.helpers import NS, inject, make, put, verify


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def _umount(path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A real 1 MiB filesystem (tmpfs), or skip where mounting is not allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)):
        pytest.skip("cannot mount a small filesystem here (see the injected ENOSPC test)")
    yield mnt
    _umount(mnt)


@pytest.fixture
def read_only_view(tmp_path):
    """(writable dir, read-only bind mount of it), or skip where mounting is not allowed."""
    src, ro = tmp_path / "rw", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if not _mount("--bind", str(src), str(ro)):
        pytest.skip("cannot bind-mount here (see the injected EROFS test)")
    if not _mount("-o", "remount,bind,ro", str(ro)):
        _umount(ro)
        pytest.skip("cannot remount read-only here (see the injected EROFS test)")
    yield src, ro
    _umount(ro)


# ---- ENOSPC ---------------------------------------------------------------------------

def test_enospc_on_a_real_small_filesystem(small_fs):
    # 4 MiB of capacity on a 1 MiB filesystem: slabs run out of space part way
    t = DiskTier("disk", str(small_fs), 60000, 4 << 20, namespace=NS, slab_bytes=128 << 10)
    placed, ok_total = {}, 0
    for rnd in range(16):
        keys = [k(rnd * 4 + j) for j in range(4)]
        slots = t.allocate(4)
        if slots is None:
            break
        try:
            ok = t.write(keys, slots, [block(x, 60000) for x in keys])
        except TierIOError:                      # the index itself ran out of room
            ok = [False] * 4
        for key, s, good in zip(keys, slots, ok):
            if good:
                placed[key] = s
            else:
                t.free([s])
        ok_total += sum(ok)
    st = t.stats()
    assert st.get("enospc", 0) + st.get("retired_slabs", 0) + (st["writes_off"] is not None) > 0, st
    assert 0 < ok_total < 64
    assert verify(t, placed) == [True] * len(placed)
    t.close()


def test_enospc_injected_retires_the_slab_only(tmp_path, monkeypatch):
    t = make(tmp_path, slots=16, per_slab=4)
    before = put(t, range(4))                    # slab 0
    slab1 = t._files.ensure(1)
    inject(monkeypatch, "pwrite_spans", errno.ENOSPC, fd_filter=lambda fd: fd == slab1)
    slots = t.allocate(4)                       # slab 1
    keys = [k(10 + i) for i in range(4)]
    assert t.write(keys, slots, [block(x, t.block_bytes) for x in keys]) == [False] * 4
    t.free(slots)
    assert t.stats()["enospc"] >= 1 and t.stats()["retired_slabs"] == 1
    assert t.num_free == 8                       # slabs 2 and 3 remain
    assert not set(t.allocate(8)) & set(t.geometry.slots_of(1))
    assert verify(t, before) == [True] * 4


# ---- EIO ------------------------------------------------------------------------------

def test_eio_on_write_fails_those_blocks_and_retires_the_slab(tmp_path, monkeypatch):
    t = make(tmp_path, slots=8, per_slab=4)
    fd0 = t._files.ensure(0)
    inject(monkeypatch, "pwrite_spans", errno.EIO, fd_filter=lambda fd: fd == fd0)
    slots = t.allocate(8)
    keys = [k(i) for i in range(8)]
    ok = t.write(keys, slots, [block(x, t.block_bytes) for x in keys])
    in0 = set(t.geometry.slots_of(0))
    assert ok == [s not in in0 for s in slots]
    assert t.stats()["io_errors"] >= 1
    monkeypatch.undo()
    placed = {x: s for x, s, good in zip(keys, slots, ok) if good}
    assert verify(t, placed) == [True] * 4
    for x, s, good in zip(keys, slots, ok):
        if not good:
            assert t.read([x], [s], [memoryview(bytearray(t.block_bytes))]) == [False]
    assert t.check()["ok"]


@pytest.mark.parametrize("bb", [8192, 5 << 19])      # 2.5 MiB blocks are read in two stages
def test_eio_on_read_is_a_miss_and_drops_the_block(tmp_path, monkeypatch, bb):
    t = make(tmp_path, bb=bb, slots=8, per_slab=8)
    placed = put(t, range(6))
    inject(monkeypatch, "pread_spans", errno.EIO, every=3)
    ok = verify(t, placed)
    assert not all(ok) and any(ok)
    monkeypatch.undo()
    again = verify(t, placed)
    assert again == ok                           # failed blocks were dropped, good ones stay
    assert t.stats()["io_errors"] >= 1


def test_fdatasync_failure_fails_the_batch_of_that_slab(tmp_path, monkeypatch):
    from kvtier.tiers.disk import slabs
    t = make(tmp_path, slots=8, per_slab=8, durability="data")

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(slabs.os, "fdatasync", broken)
    slots = t.allocate(2)
    assert t.write([k(1), k(2)], slots, [block(k(1), t.block_bytes), block(k(2), t.block_bytes)]) == [False] * 2
    monkeypatch.undo()
    assert t.read([k(1)], slots[:1], [memoryview(bytearray(t.block_bytes))]) == [False]
    assert t.index.get_many([k(1), k(2)]) == [None, None]


# ---- read-only and vanished directories -----------------------------------------------

def test_read_only_directory_serves_what_it_holds(read_only_view):
    src, ro = read_only_view
    t = make(src)
    placed = put(t, range(5))
    t.close()
    t = make(ro)
    assert t.writes_off is not None and "read-only" in t.writes_off
    found = dict(t.recover())
    assert found == placed
    assert verify(t, found) == [True] * 5
    assert t.allocate(1) is None
    assert t.write([k(9)], [0], [block(k(9), t.block_bytes)]) == [False]
    t.close()


def test_read_only_directory_without_a_tier_is_disabled_not_fatal(read_only_view):
    _, ro = read_only_view
    t = make(ro)
    assert t.recover() == [] and t.allocate(1) is None
    assert t.read([k(1)], [0], [memoryview(bytearray(t.block_bytes))]) == [False]
    t.close()


def test_erofs_mid_run_turns_writes_off_and_reads_go_on(tmp_path, monkeypatch):
    t = make(tmp_path)
    placed = put(t, range(4))
    inject(monkeypatch, "pwrite_spans", errno.EROFS)
    slots = t.allocate(2)
    assert t.write([k(8), k(9)], slots, [block(k(8), t.block_bytes)] * 2) == [False, False]
    monkeypatch.undo()
    assert t.writes_off is not None
    assert t.allocate(1) is None
    assert verify(t, placed) == [True] * 4


def test_vanished_directory_turns_writes_off_and_reads_go_on(tmp_path):
    path = tmp_path / "gone"
    t = make(path)
    placed = put(t, range(4))
    shutil.rmtree(path)
    slots = t.allocate(2)
    assert t.write([k(8), k(9)], slots, [block(k(8), t.block_bytes)] * 2) == [False, False]
    assert "vanished" in t.writes_off
    assert verify(t, placed) == [True] * 4      # open files still hold verified bytes
    t.close()
    t = make(path)                               # a fresh start, not a crash
    assert t.recover() == []
    t.close()


# ---- truncated slabs and a damaged index ----------------------------------------------

def test_truncated_slab_is_a_miss_then_dropped_and_regrown(tmp_path):
    t = make(tmp_path, slots=8, per_slab=8)
    placed = put(t, range(8))
    path = os.path.join(t.path, "slab-00000.kvt")
    os.truncate(path, 3 * t.slot_bytes)
    ok = verify(t, placed)
    by_slot = {s: good for s, good in zip(placed.values(), ok)}
    assert all(by_slot[s] == (s < 3) for s in by_slot)
    t.close()
    t = make(tmp_path, slots=8, per_slab=8)
    found = dict(t.recover())
    assert set(found.values()) == {0, 1, 2}
    assert os.stat(path).st_size == 3 * t.slot_bytes
    more = put(t, range(20, 25))                 # the slab grows back
    assert verify(t, {**found, **more}) == [True] * 8
    assert t.check()["ok"]


def test_damaged_index_is_moved_aside_and_the_tier_starts_empty(tmp_path):
    t = make(tmp_path)
    put(t, range(6))
    t.close()
    with open(tmp_path / "index" / "data.mdb", "r+b") as f:
        f.write(os.urandom(8192))                # both meta pages
    t = make(tmp_path)
    assert t.recover() == []
    assert t.stats()["index_resets"] == 1
    assert any(n.startswith("index.damaged-") for n in os.listdir(tmp_path))
    placed = put(t, range(100, 104))
    assert verify(t, placed) == [True] * 4
    t.close()
    t = make(tmp_path)
    assert dict(t.recover()) == placed


def test_truncated_index_is_moved_aside(tmp_path):
    t = make(tmp_path, slots=2048, per_slab=512, bb=100)
    put(t, range(2000))                          # enough entries for many LMDB pages
    t.close()
    data = tmp_path / "index" / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 3)
    t = make(tmp_path, slots=2048, per_slab=512, bb=100)
    assert t.recover() == [] and t.stats()["index_resets"] == 1
    placed = put(t, range(5))
    assert verify(t, placed) == [True] * 5
    t.close()


def test_failing_index_commit_raises_tier_io_error_and_stops_writes(tmp_path, monkeypatch):
    from kvtier.tiers.disk.index import DiskIndex, IndexFailure
    t = make(tmp_path)

    def broken(self, *a, **kw):
        raise IndexFailure("injected: MDB_PANIC")
    monkeypatch.setattr(DiskIndex, "commit", broken)
    slots = t.allocate(1)
    with pytest.raises(TierIOError):
        t.write([k(1)], slots, [block(k(1), t.block_bytes)])
    assert t.writes_off is not None
    monkeypatch.undo()
    assert t.read([k(1)], slots, [memoryview(bytearray(t.block_bytes))]) == [False]
