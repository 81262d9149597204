"""DiskTier: blocks in preallocated slab files on local NVMe, indexed in LMDB.

Write, in this order, so that a crash at any moment leaves the index naming
complete blocks only:

    1. commit pending discards (a freed slot is rewritten only after the index
       stops naming its old block)
    2. pwrite every block of the batch and checksum it (native thread pool: each
       block, or piece of a block, checksummed by the thread that writes it)
    3. fdatasync the touched slabs              (durability "data" and "full")
    4. commit the new index entries in one LMDB transaction (+ sync for "full")

Read verifies every block against its index entry: namespace salt, length,
slot, and the checksum of its bytes (CRC32C over its 1 MiB chunks' CRC32Cs).
A mismatch is a miss: the entry is dropped, counted and logged once; the
caller never gets the bytes as ok.  Each block (or piece of one, when a batch
has fewer blocks than I/O threads: :func:`~.slabs.io_plan`) is checksummed by
the thread that read it, so checksums overlap the rest of the batch's I/O.

Failures degrade (:mod:`.faults`): a slab that cannot be created or
written (ENOSPC, EIO) is retired; a read-only or vanished directory, or a
failing index, turns writes off while reads go on.  Opening
(:mod:`.directory`) moves a damaged index aside and starts empty (its blocks
are lost, never misread), and gives a second process on the same directory a
ConfigError (flock on ``<dir>/LOCK``).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from typing import Sequence

import numpy as np

from ... import native
from ...errors import ConfigError, TierIOError
from ..base import Tier
from .index import IndexEntry, IndexFailure
from .directory import DiskDirectory
from .faults import DiskFaults
from .slabs import (ALIGN, CHECK_CHUNK, FORMAT_VERSION, SlabFiles, SlabSlots, SlotGeometry, SpanBatch, address,
                    block_checksums, io_plan)

log = logging.getLogger(__name__)

_DURABILITY = ("none", "data", "full")


class DiskTier(Tier):
    medium = "disk"

    def __init__(self, name: str, path: str, block_bytes: int, capacity_bytes: int, *,
                 namespace=None, slab_bytes: int = 1 << 30, durability: str = "data",
                 o_direct: str = "auto", io_threads: int = 4, admission=None):
        if durability not in _DURABILITY:
            raise ConfigError(f"{name}.durability", durability, "one of " + ", ".join(_DURABILITY))
        if o_direct not in ("auto", "on", "off"):
            raise ConfigError(f"{name}.o_direct", o_direct, "one of 'auto', 'on', 'off'")
        if not isinstance(io_threads, int) or io_threads <= 0:
            raise ConfigError(f"{name}.io_threads", io_threads, "a positive int")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{name}.path", path, "a directory path")
        self.geometry = SlotGeometry.plan(block_bytes, capacity_bytes, slab_bytes)
        super().__init__(name, block_bytes, self.geometry.num_slots)
        self._slots = SlabSlots(self.geometry.num_slots)
        self.path = os.path.abspath(path)
        self.slot_bytes = self.geometry.slot_bytes
        self.durability = durability
        self.io_threads = io_threads
        self.admission = admission
        self.salt = namespace.salt if namespace is not None else bytes(16)
        self.label = namespace.label if namespace is not None else "(none)"
        self._counts: Counter = Counter()
        self._faults = DiskFaults(name, self.path, self.geometry, self._slots, self._counts)
        self._lock = threading.Lock()           # pending discards and access times
        self._flush_lock = threading.Lock()     # one index flush at a time
        self._deletes: set[bytes] = set()
        self._touches: dict[bytes, float] = {}
        self._seq = 1
        self._recovered: list[tuple[bytes, int]] = []
        self._dir = DiskDirectory(name, self.path, durability, self.geometry, self._faults)
        readonly = self._dir.readonly
        try:
            self._files = SlabFiles(self.path, self.geometry, "off" if readonly else o_direct,
                                    readonly=readonly)
            self._faults.files = self._files
            self.index = self._dir.open_index()
            if self.index is not None:
                self._dir.check_geometry(self.index, block_bytes, self.salt, self.label)
                try:
                    self._recovered, self._seq = self._dir.scan(self.index, self._files, self._slots,
                                                                self.salt, block_bytes)
                except IndexFailure as e:      # opened, but its pages cannot be walked
                    self.index.close()
                    self.index = self._dir.reset_index(e)
                    if self.index is not None:
                        self._dir.check_geometry(self.index, block_bytes, self.salt, self.label)
        except BaseException:
            self._dir.release_lock()
            raise
        if readonly:
            self._faults.off("writes", f"directory {self.path} is read-only")

    @property
    def writes_off(self) -> str | None:
        """None while blocks can be written here, else why writing was turned off."""
        return self._faults.writes_off

    @property
    def reads_off(self) -> str | None:
        """None while blocks can be read here, else why reading was turned off."""
        return self._faults.reads_off

    @classmethod
    def from_config(cls, cfg, namespace=None, block_bytes: int = 0) -> "DiskTier":
        """Build the tier a :class:`~kvtier.config.DiskConfig` describes."""
        admission = None
        tier = cls("disk", cfg.path, block_bytes, cfg.capacity_bytes, namespace=namespace,
                   slab_bytes=cfg.slab_bytes, durability=cfg.durability, o_direct=cfg.o_direct,
                   io_threads=cfg.io_threads)
        if cfg.admission == "tinylfu":
            from ...policy.admission import TinyLFU
            admission = TinyLFU(tier.num_slots)
        tier.admission = admission
        tier.write_through = cfg.write_mode == "through"
        return tier

    # ---- the Tier contract --------------------------------------------------------
    def recover(self) -> list[tuple[bytes, int]]:
        self._check_open("recover")
        out, self._recovered = self._recovered, []
        if out:
            log.info("%s: %d blocks found in %s", self.name, len(out), self.path)
        return out

    @property
    def num_free(self) -> int:
        if self.writes_off is not None:
            return self.num_slots            # nothing to evict for: allocate() refuses anyway
        return self._slots.num_free

    def allocate(self, n: int) -> list[int] | None:
        self._check_open("allocate")
        if self.writes_off is not None:
            return None
        return self._slots.allocate(n)

    def discard(self, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        self._check_open("discard")
        with self._lock:
            for k in keys:
                self._deletes.add(k)
                self._touches.pop(k, None)

    def write(self, keys: Sequence[bytes], slots: Sequence[int], srcs: Sequence[memoryview]) -> list[bool]:
        self._check_open("write")
        n = len(keys)
        ok = [False] * n
        if n == 0:
            return ok
        if self.writes_off is None:
            self._faults.check_dir(self._dir.lock_ino)
        if self.writes_off is not None:
            self._counts["writes_refused"] += n
            return ok
        self._flush()                        # freed slots stop being named before they are rewritten
        g = self.geometry
        srcs = [memoryview(s).cast("B") for s in srcs]
        for s in srcs:
            if s.nbytes != self.block_bytes:
                raise ValueError(f"{self.name}: a block has {s.nbytes} bytes, expected {self.block_bytes}")
        addrs = [address(s) for s in srcs]
        body, tail = g.body_bytes, g.tail_bytes
        tails = native.alloc_aligned(n * tail) if tail else None
        keep = []                            # bounce buffers alive until the I/O returns
        plan = SpanBatch()
        for i, (slot, src) in enumerate(zip(slots, srcs)):
            slab = g.slab_of(slot)
            fd = self._files.ensure(slab)
            if fd is None:
                self._faults.retire(slab, self._files.failed(slab) or "unavailable")
                continue
            off = g.offset_of(slot)
            if body:
                a = addrs[i]
                if self._files.direct and a % ALIGN:
                    b = native.alloc_aligned(body)
                    native.memcpy(b, src[:body])
                    keep.append(b)
                    a = b.ctypes.data
                plan.add(i, slab, fd, off, a, body)
            if tail:
                t = tails[i * tail:(i + 1) * tail]
                native.memcpy(t[:self.block_bytes - body], src[body:])
                plan.add(i, slab, fd, off + body, t.ctypes.data, tail)
        if not plan:
            self._counts["write_failures"] += n
            return ok
        # the buffers of this call: the only memory its spans may touch (kvtier.native.ranges)
        within = [(a, self.block_bytes) for a in addrs] + keep + ([tails] if tail else [])
        if tail or keep:                     # bounced or padded blocks: spans, then checksums
            res = native.pwrite_spans(*plan.arrays(), self._threads(plan), within=within)
            crcs = block_checksums(addrs, self.block_bytes, native.DEFAULT_THREADS, within=within)
        else:                                # each block checksummed by the thread that writes it
            res, sums = self._move_blocks(True, plan, within)
            crcs = dict(zip(plan.block, sums.tolist()))
        good = self._faults.outcome(plan, res, "write")
        if self.durability != "none":
            for slab in self._files.sync({plan.slab[j] for j in range(len(plan)) if good[plan.block[j]]}):
                self._faults.retire(slab, "fdatasync failed")
                for j in range(len(plan)):
                    if plan.slab[j] == slab:
                        good[plan.block[j]] = False
        now = time.time()
        puts = []
        with self._lock:
            for i, key in enumerate(keys):
                if good.get(i):
                    puts.append((key, IndexEntry(g.slab_of(slots[i]), g.offset_of(slots[i]), self.block_bytes,
                                                 crcs[i], self.salt, FORMAT_VERSION, self._seq, now)))
                    self._seq += 1
        try:
            self.index.commit(puts=puts)
        except IndexFailure as e:
            self._faults.off("writes", f"index commit failed: {e}")
            raise TierIOError(f"{self.name}: {e}") from e
        for i, _ in enumerate(keys):
            ok[i] = bool(good.get(i))
        self._counts["blocks_written"] += len(puts)
        self._counts["bytes_written"] += len(puts) * g.slot_bytes
        self._counts["write_failures"] += n - len(puts)
        return ok

    def read(self, keys: Sequence[bytes], slots: Sequence[int], dsts: Sequence[memoryview]) -> list[bool]:
        self._check_open("read")
        n = len(keys)
        ok = [False] * n
        if n == 0 or self.reads_off is not None or self.index is None:
            self._counts["reads_refused"] += n
            return ok
        g = self.geometry
        try:
            entries = self.index.get_many(keys)
        except IndexFailure as e:
            self._faults.off("reads", f"index lookup failed: {e}")
            return ok
        with self._lock:
            gone = [k in self._deletes for k in keys]
        dsts = [memoryview(d).cast("B") for d in dsts]
        body, tail = g.body_bytes, g.tail_bytes
        tails = native.alloc_aligned(n * tail) if tail else None
        bounce: dict[int, np.ndarray] = {}
        plan = SpanBatch()
        for i, (key, slot, dst, e) in enumerate(zip(keys, slots, dsts, entries)):
            if (e is None or gone[i] or e.salt != self.salt or e.length != self.block_bytes
                    or g.slab_of(slot) != e.slab or g.offset_of(slot) != e.offset):
                self._counts["read_misses"] += 1
                continue
            if dst.nbytes != self.block_bytes:
                raise ValueError(f"{self.name}: a destination has {dst.nbytes} bytes, expected {self.block_bytes}")
            fd = self._files.open_fd(e.slab)
            if fd is None:
                self._drop(key, "vanished_slab", f"slab {e.slab} is missing")
                continue
            if body:
                a = address(dst)
                if self._files.direct and a % ALIGN:
                    bounce[i] = native.alloc_aligned(body)
                    a = bounce[i].ctypes.data
                plan.add(i, e.slab, fd, e.offset, a, body)
            if tail:
                plan.add(i, e.slab, fd, e.offset + body, tails[i * tail:(i + 1) * tail].ctypes.data, tail)
        if not plan:
            return ok
        within = [(address(d), d.nbytes) for d in dsts] + list(bounce.values()) + ([tails] if tail else [])
        if not tail and not bounce:          # each block checksummed by the thread that reads it
            res, sums = self._move_blocks(False, plan, within)
            good = self._faults.outcome(plan, res, "read")
            done = sorted(i for i, v in good.items() if v)
            crc_of = dict(zip(plan.block, sums.tolist()))
        else:                                # bounced or padded blocks: spans, copies, then checksums
            res = native.pread_spans(*plan.arrays(), self._threads(plan), within=within)
            good = self._faults.outcome(plan, res, "read")
            rem = self.block_bytes - body
            done = sorted(i for i, v in good.items() if v)
            for i in done:
                if i in bounce:
                    native.memcpy(dsts[i][:body], bounce[i])
                if tail:
                    native.memcpy(dsts[i][body:], tails[i * tail:i * tail + rem])
            crc_of = dict(zip(done, block_checksums([address(dsts[i]) for i in done], self.block_bytes,
                                                    native.DEFAULT_THREADS, within=within)))
        for i in done:
            if crc_of[i] != entries[i].crc:
                self._drop(keys[i], "corrupt_blocks", "checksum mismatch")
                continue
            ok[i] = True
        for i in range(n):
            if not ok[i] and good.get(i) is False:
                self._drop(keys[i], None, None)
        now = time.time()
        with self._lock:
            for i in done:
                if ok[i]:
                    self._touches[keys[i]] = now
        nok = sum(ok)
        self._counts["blocks_read"] += nok
        self._counts["bytes_read"] += nok * g.slot_bytes
        return ok

    def _drop(self, key: bytes, counter: str | None, why: str | None) -> None:
        """Forget a block whose bytes cannot be trusted (the cache frees its slot)."""
        if counter is not None:
            self._counts[counter] += 1
            self._faults.once(counter, f"dropped a block: {why}")
        with self._lock:
            self._deletes.add(key)
            self._touches.pop(key, None)

    def _threads(self, plan: SpanBatch) -> int:
        """Spans in flight at once: the batch, up to twice io_threads (a block may be two spans)."""
        return max(1, min(len(plan), 2 * self.io_threads))

    def _move_blocks(self, write: bool, plan: SpanBatch, within):
        """Whole page-aligned blocks (one span each) through the native checksummed I/O:
        (bytes moved or -errno, checksums) per span."""
        piece, threads = io_plan(len(plan), self.block_bytes, self.io_threads)
        fds, offs, addrs, _ = plan.arrays()
        move = native.pwrite_blocks if write else native.pread_blocks
        return move(fds, offs, addrs, self.block_bytes, CHECK_CHUNK, piece, threads, within=within)

    def _flush(self) -> None:
        """Commit pending discards and access times."""
        with self._flush_lock:
            with self._lock:
                deletes, self._deletes = self._deletes, set()
                touches, self._touches = self._touches, {}
            try:
                self.index.commit(deletes=sorted(deletes), touches=touches)
            except IndexFailure as e:
                self._faults.off("writes", f"index commit failed: {e}")
                raise TierIOError(f"{self.name}: {e}") from e

    # ---- housekeeping --------------------------------------------------------------
    def check(self) -> dict:
        self._check_open("check")
        from .check import verify
        if self.index is None:
            return {"ok": False, "problems": [self.reads_off or "no index"]}
        if self.writes_off is None:
            self._flush()
        report = verify(self.index, self.geometry, self.path, salt=self.salt)
        for slot in report.pop("slots", []):
            if not self._slots.is_allocated(slot):
                report["ok"] = False
                report["problems"].append(f"slot {slot} is indexed but free in the allocator")
        return report

    def stats(self) -> dict:
        d = super().stats()
        d["used_slots"] = self._slots.num_used
        d.update(path=self.path, slot_bytes=self.slot_bytes, capacity_bytes=self.slot_bytes * self.num_slots,
                 durability=self.durability, direct_io=self._files.direct,
                 direct_io_reason=self._files.direct_reason, writes_off=self.writes_off,
                 reads_off=self.reads_off, retired_slots=self._slots.num_retired)
        d.update(self._counts)
        if self.admission is not None:
            d.update({f"admission.{k}": v for k, v in self.admission.stats().items()})
        return d

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.index is not None:
            try:
                if self.writes_off is None:
                    self._flush()
            except TierIOError:
                pass
            index, self.index = self.index, None
            index.close()
            if index.guard is not None and self.writes_off is None and self.reads_off is None:
                try:
                    index.guard.seal()        # the next open may trust the index without a walk
                except OSError as e:
                    log.warning("%s: could not seal the index (%s): the next open walks it", self.name, e)
        self._files.close()
        self._dir.release_lock()
