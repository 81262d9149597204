"""Opening a disk tier directory: lock, index, layout check and recovery scan.

:class:`DiskDirectory`, held by :class:`~kvtier.tiers.disk.DiskTier`, does what
runs once, at open, and holds the directory's lock until the tier closes:

    DiskDirectory(...)  create the directory (or find it read-only) and flock
                        ``<dir>/LOCK``: a second process gets a ConfigError naming the holder
    open_index          open the LMDB index (walked in a child process first unless sealed
                        intact, :mod:`.guard`); a damaged one is moved aside (``reset_index``)
    check_geometry      the slot layout recorded in the index must be this tier's
    scan                the blocks a previous process completed, with every entry that cannot
                        be right (other namespace, out of range, truncated slab, two entries
                        on one slot) dropped; their slots are claimed in the allocator
    release_lock        at close
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections import Counter

from ...errors import ConfigError
from .index import DiskIndex, IndexEntry, IndexFailure
from .faults import DiskFaults
from .guard import IndexGuard
from .slabs import FORMAT_VERSION, SlabFiles, SlabSlots, SlotGeometry

log = logging.getLogger("kvtier.tiers.disk")


class DiskDirectory:
    """A disk tier's directory: its lock, its index's opening, and the scan of what it holds."""

    def __init__(self, name: str, path: str, durability: str, geometry: SlotGeometry, faults: DiskFaults):
        self.name, self.path, self.geometry = name, path, geometry
        self.sync = durability == "full"
        self.faults = faults
        self.readonly = self._open_dir()
        self.lock_fd, self.lock_ino = self._take_lock(self.readonly)

    def _open_dir(self) -> bool:
        """Create the directory if needed; True when it can only be read."""
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            if not os.path.isdir(self.path):
                raise ConfigError(f"{self.name}.path", self.path,
                                  f"a directory that exists or can be created ({e.strerror})") from e
        return not os.access(self.path, os.W_OK) or _read_only_fs(self.path)

    def _take_lock(self, readonly: bool) -> tuple[int | None, int | None]:
        lock = os.path.join(self.path, "LOCK")
        try:
            fd = os.open(lock, os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None, None                    # read-only and never used: nothing to guard
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.name}.path", self.path,
                                  f"a directory no other process uses (held by pid {holder}); "
                                  "give each process its own disk.path") from None
            raise
        if not readonly:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd, os.fstat(fd).st_ino

    def release_lock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)             # closing drops the flock
            self.lock_fd = None

    def open_index(self) -> DiskIndex | None:
        """The directory's index; None (reads turned off) where there is none to read.
        An index not known intact is walked in a child process first (:mod:`.guard`)."""
        where = os.path.join(self.path, "index")
        if self.readonly and not os.path.exists(os.path.join(where, "data.mdb")):
            self.faults.off("reads", "no index in a read-only directory")
            return None
        guard = IndexGuard(where, readonly=self.readonly)
        why = guard.verdict()
        if why is not None:
            return self.reset_index(IndexFailure(f"disk index {where}: {why}"))
        try:
            index = DiskIndex(where, self.geometry.num_slots, readonly=self.readonly, sync=self.sync,
                              guard=guard)
        except IndexFailure as e:
            return self.reset_index(e)
        guard.opened()
        return index

    def reset_index(self, e: Exception) -> DiskIndex | None:
        """A damaged index: move it aside and start empty (its blocks are lost, never misread)."""
        where = os.path.join(self.path, "index")
        if self.readonly:
            self.faults.off("reads", f"index unreadable: {e}")
            return None
        aside = f"{where}.damaged-{time.time_ns()}"
        os.replace(where, aside)
        self.faults.counts["index_resets"] += 1
        log.error("%s: index %s is damaged (%s); moved to %s, starting empty", self.name, where, e, aside)
        guard = IndexGuard(where)
        index = DiskIndex(where, self.geometry.num_slots, sync=self.sync, guard=guard)
        guard.opened()
        return index

    def check_geometry(self, index: DiskIndex, block_bytes: int, salt: bytes, label: str) -> None:
        """Record this tier's layout in a new index; refuse an index laid out for another."""
        g = self.geometry
        want = {"block_bytes": block_bytes, "slot_bytes": g.slot_bytes,
                "slots_per_slab": g.slots_per_slab, "format_version": FORMAT_VERSION}
        have = index.geometry()
        here = {b"ns:" + salt: label.encode(), b"num_slots": str(g.num_slots).encode()}
        if have is None:
            if not index.readonly:
                index.set_meta({b"geometry": json.dumps(want).encode(), **here})
            return
        if {k: have.get(k) for k in want} != want:
            raise ConfigError(f"{self.name}.path", self.path,
                              f"a directory laid out for this tier: it holds {have}, this tier needs {want} "
                              "(use another directory, or remove this one)")
        if not index.readonly:
            index.set_meta(here)

    def scan(self, index: DiskIndex, files: SlabFiles, slots: SlabSlots, salt: bytes,
             block_bytes: int) -> tuple[list[tuple[bytes, int]], int]:
        """The blocks a previous process completed, least recently used first, and the next
        sequence number; entries that cannot be right are dropped, found slots claimed."""
        g = self.geometry
        sizes = files.existing()
        by_slot: dict[int, tuple[bytes, IndexEntry]] = {}
        drop: list[bytes] = []
        why: Counter = Counter()
        seq = 1
        for key, e in index.items():
            if e is None or e.version != FORMAT_VERSION or e.length != block_bytes or len(key) != 16:
                why["malformed"] += 1
                drop.append(key)
                continue
            if e.salt != salt:
                why["other_namespace"] += 1
                drop.append(key)
                continue
            slot = e.slab * g.slots_per_slab + e.offset // g.slot_bytes
            if e.offset % g.slot_bytes or not 0 <= slot < g.num_slots or g.slab_of(slot) != e.slab:
                why["out_of_range"] += 1
                drop.append(key)
                continue
            if sizes.get(e.slab, 0) < e.offset + g.slot_bytes:
                why["truncated_slab"] += 1
                drop.append(key)
                continue
            seq = max(seq, e.seq + 1)
            other = by_slot.get(slot)
            if other is not None:
                why["slot_conflict"] += 1
                if other[1].seq > e.seq:
                    drop.append(key)
                    continue
                drop.append(other[0])
            by_slot[slot] = (key, e)
        if drop:
            self.faults.counts["dropped_at_open"] += len(drop)
            log.warning("%s: dropped %d index entries at open (%s)", self.name, len(drop),
                        ", ".join(f"{k}: {v}" for k, v in sorted(why.items())))
            if not index.readonly:
                index.commit(deletes=drop)
        found = sorted(by_slot.items(), key=lambda kv: kv[1][1].last_access)
        slots.claim(list(by_slot))
        return [(key, slot) for slot, (key, _) in found], seq


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
