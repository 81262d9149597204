"""DiskTier: blocks in preallocated slab files on local NVMe, indexed in LMDB.

Write, in this order, so that a crash at any moment leaves the index naming
complete blocks only:

    1. commit pending discards (a freed slot is rewritten only after the index
       stops naming its old block)
    2. pwrite every block of the batch (native thread pool), then checksum it
    3. fdatasync the touched slabs              (durability "data" and "full")
    4. commit the new index entries in one LMDB transaction (+ sync for "full")

Read verifies every block against its index entry: namespace salt, length,
slot, and the checksum of its bytes (CRC32C over its 1 MiB chunks' CRC32Cs).  A mismatch is a miss: the entry is
dropped, counted and logged once; the caller never gets the bytes as ok.

Failures degrade.  A slab that cannot be created or written (ENOSPC, EIO) is
retired: its free slots leave the allocator.  A read-only or vanished
directory, or a failing index, turns writes off; reads go on while the index
can answer.  A damaged index found at open is moved aside and a fresh one
started (its blocks are lost, never misread).  A second process on the same
directory gets a ConfigError (flock on ``<dir>/LOCK``).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections import Counter
from typing import Sequence

import numpy as np

from .. import _native
from ..errors import ConfigError, TierIOError
from .base import SlotAllocator, Tier
from .disk_index import DiskIndex, IndexEntry, IndexFailure
from .slabs import ALIGN, FORMAT_VERSION, SlabFiles, SlotGeometry, address, block_checksums

log = logging.getLogger(__name__)

_DURABILITY = ("none", "data", "full")
_READONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class DiskSlots(SlotAllocator):
    """A SlotAllocator that can claim recovered slots and retire slots of dead slabs."""

    def __init__(self, num_slots: int):
        super().__init__(num_slots)
        self._retired = bytearray(num_slots)

    def claim(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                self._used[s] = 1
            self._free = [s for s in self._free if not self._used[s]]

    def retire(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                self._retired[s] = 1
            self._free = [s for s in self._free if not self._retired[s]]

    def free(self, slots: Sequence[int]) -> None:
        from ..errors import KVTierError
        with self._lock:
            for s in slots:
                if not 0 <= s < len(self._used) or not self._used[s]:
                    raise KVTierError(f"slot {s} freed but not allocated")
            for s in slots:
                self._used[s] = 0
                if not self._retired[s]:
                    self._free.append(s)

    @property
    def num_retired(self) -> int:
        return sum(self._retired)

    @property
    def num_used(self) -> int:
        return sum(self._used)


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
        self._slots = DiskSlots(self.geometry.num_slots)
        self.path = os.path.abspath(path)
        self.slot_bytes = self.geometry.slot_bytes
        self.durability = durability
        self.io_threads = io_threads
        self.admission = admission
        self.salt = namespace.salt if namespace is not None else bytes(16)
        self.label = namespace.label if namespace is not None else "(none)"
        self._counts: Counter = Counter()
        self._logged: set[str] = set()
        self._lock = threading.Lock()           # pending discards and access times
        self._flush_lock = threading.Lock()     # one index flush at a time
        self._deletes: set[bytes] = set()
        self._touches: dict[bytes, float] = {}
        self._seq = 1
        self.writes_off: str | None = None
        self.reads_off: str | None = None
        self._recovered: list[tuple[bytes, int]] = []
        readonly = self._open_dir()
        self._lock_fd, self._lock_ino = self._take_lock(readonly)
        try:
            self._files = SlabFiles(self.path, self.geometry, "off" if readonly else o_direct,
                                    readonly=readonly)
            self.index = self._open_index(readonly)
            if self.index is not None:
                self._check_geometry()
                try:
                    self._recovered = self._scan()
                except IndexFailure as e:      # opened, but its pages cannot be walked
                    self.index.close()
                    self.index = self._reset_index(readonly, e)
                    if self.index is not None:
                        self._check_geometry()
        except BaseException:
            self._release_lock()
            raise
        if readonly:
            self._off("writes", f"directory {self.path} is read-only")

    @classmethod
    def from_config(cls, cfg, namespace=None, block_bytes: int = 0) -> "DiskTier":
        """Build the tier a :class:`~kvtier.config.DiskConfig` describes."""
        admission = None
        tier = cls("disk", cfg.path, block_bytes, cfg.capacity_bytes, namespace=namespace,
                   slab_bytes=cfg.slab_bytes, durability=cfg.durability, o_direct=cfg.o_direct,
                   io_threads=cfg.io_threads)
        if cfg.admission == "tinylfu":
            from ..policy.admission import TinyLFU
            admission = TinyLFU(tier.num_slots)
        tier.admission = admission
        tier.write_through = cfg.write_mode == "through"
        return tier

    # ---- opening ----------------------------------------------------------------
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

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)             # closing drops the flock
            self._lock_fd = None

    def _open_index(self, readonly: bool) -> DiskIndex | None:
        where = os.path.join(self.path, "index")
        sync = self.durability == "full"
        if readonly and not os.path.exists(os.path.join(where, "data.mdb")):
            self._off("reads", "no index in a read-only directory")
            return None
        try:
            return DiskIndex(where, self.num_slots, readonly=readonly, sync=sync)
        except IndexFailure as e:
            return self._reset_index(readonly, e)

    def _reset_index(self, readonly: bool, e: Exception) -> DiskIndex | None:
        """A damaged index: move it aside and start empty (its blocks are lost, never misread)."""
        where = os.path.join(self.path, "index")
        if readonly:
            self._off("reads", f"index unreadable: {e}")
            return None
        aside = f"{where}.damaged-{time.time_ns()}"
        os.replace(where, aside)
        self._counts["index_resets"] += 1
        log.error("%s: index %s is damaged (%s); moved to %s, starting empty", self.name, where, e, aside)
        return DiskIndex(where, self.num_slots, sync=self.durability == "full")

    def _check_geometry(self) -> None:
        want = {"block_bytes": self.block_bytes, "slot_bytes": self.slot_bytes,
                "slots_per_slab": self.geometry.slots_per_slab, "format_version": FORMAT_VERSION}
        have = self.index.geometry()
        here = {b"ns:" + self.salt: self.label.encode(), b"num_slots": str(self.num_slots).encode()}
        if have is None:
            if not self.index.readonly:
                import json
                self.index.set_meta({b"geometry": json.dumps(want).encode(), **here})
            return
        if {k: have.get(k) for k in want} != want:
            raise ConfigError(f"{self.name}.path", self.path,
                              f"a directory laid out for this tier: it holds {have}, this tier needs {want} "
                              "(use another directory, or remove this one)")
        if not self.index.readonly:
            self.index.set_meta(here)

    def _scan(self) -> list[tuple[bytes, int]]:
        """Find the blocks a previous process completed; drop entries that cannot be right."""
        g = self.geometry
        sizes = self._files.existing()
        by_slot: dict[int, tuple[bytes, IndexEntry]] = {}
        drop: list[bytes] = []
        why: Counter = Counter()
        for key, e in self.index.items():
            if e is None or e.version != FORMAT_VERSION or e.length != self.block_bytes or len(key) != 16:
                why["malformed"] += 1
                drop.append(key)
                continue
            if e.salt != self.salt:
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
            self._seq = max(self._seq, e.seq + 1)
            other = by_slot.get(slot)
            if other is not None:
                why["slot_conflict"] += 1
                if other[1].seq > e.seq:
                    drop.append(key)
                    continue
                drop.append(other[0])
            by_slot[slot] = (key, e)
        if drop:
            self._counts["dropped_at_open"] += len(drop)
            log.warning("%s: dropped %d index entries at open (%s)", self.name, len(drop),
                        ", ".join(f"{k}: {v}" for k, v in sorted(why.items())))
            if not self.index.readonly:
                self.index.commit(deletes=drop)
        found = sorted(by_slot.items(), key=lambda kv: kv[1][1].last_access)
        self._slots.claim(list(by_slot))
        return [(key, slot) for slot, (key, _) in found]

    # ---- the Tier contract --------------------------------------------------------
    def recover(self) -> list[tuple[bytes, int]]:
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
        if self.writes_off is not None:
            return None
        return self._slots.allocate(n)

    def discard(self, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        with self._lock:
            for k in keys:
                self._deletes.add(k)
                self._touches.pop(k, None)

    def write(self, keys: Sequence[bytes], slots: Sequence[int], srcs: Sequence[memoryview]) -> list[bool]:
        n = len(keys)
        ok = [False] * n
        if n == 0:
            return ok
        if self.writes_off is None:
            self._check_dir()
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
        tails = _native.alloc_aligned(n * tail) if tail else None
        keep = []                            # bounce buffers alive until the I/O returns
        plan = _Spans()
        for i, (slot, src) in enumerate(zip(slots, srcs)):
            slab = g.slab_of(slot)
            fd = self._files.ensure(slab)
            if fd is None:
                self._retire(slab, self._files.failed(slab) or "unavailable")
                continue
            off = g.offset_of(slot)
            if body:
                a = addrs[i]
                if self._files.direct and a % ALIGN:
                    b = _native.alloc_aligned(body)
                    _native.memcpy(b, src[:body])
                    keep.append(b)
                    a = b.ctypes.data
                plan.add(i, slab, fd, off, a, body)
            if tail:
                t = tails[i * tail:(i + 1) * tail]
                _native.memcpy(t[:self.block_bytes - body], src[body:])
                plan.add(i, slab, fd, off + body, t.ctypes.data, tail)
        if not plan:
            self._counts["write_failures"] += n
            return ok
        res = _native.pwrite_spans(*plan.arrays(), self._threads(plan))
        # the index needs the checksums, the I/O does not; computed after it, on the native
        # pool's threads (1 MiB chunks in parallel), they cost no thread hand-off per batch
        crcs = block_checksums(addrs, self.block_bytes, _native.DEFAULT_THREADS)
        good = self._outcome(plan, res, "write")
        if self.durability != "none":
            for slab in self._files.sync({plan.slab[j] for j in range(len(plan)) if good[plan.block[j]]}):
                self._retire(slab, "fdatasync failed")
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
            self._off("writes", f"index commit failed: {e}")
            raise TierIOError(f"{self.name}: {e}") from e
        for i, _ in enumerate(keys):
            ok[i] = bool(good.get(i))
        self._counts["blocks_written"] += len(puts)
        self._counts["bytes_written"] += len(puts) * g.slot_bytes
        self._counts["write_failures"] += n - len(puts)
        return ok

    def read(self, keys: Sequence[bytes], slots: Sequence[int], dsts: Sequence[memoryview]) -> list[bool]:
        n = len(keys)
        ok = [False] * n
        if n == 0 or self.reads_off is not None or self.index is None:
            self._counts["reads_refused"] += n
            return ok
        g = self.geometry
        try:
            entries = self.index.get_many(keys)
        except IndexFailure as e:
            self._off("reads", f"index lookup failed: {e}")
            return ok
        with self._lock:
            gone = [k in self._deletes for k in keys]
        dsts = [memoryview(d).cast("B") for d in dsts]
        body, tail = g.body_bytes, g.tail_bytes
        tails = _native.alloc_aligned(n * tail) if tail else None
        bounce: dict[int, np.ndarray] = {}
        plan = _Spans()
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
                    bounce[i] = _native.alloc_aligned(body)
                    a = bounce[i].ctypes.data
                plan.add(i, e.slab, fd, e.offset, a, body)
            if tail:
                plan.add(i, e.slab, fd, e.offset + body, tails[i * tail:(i + 1) * tail].ctypes.data, tail)
        if not plan:
            return ok
        res = _native.pread_spans(*plan.arrays(), self._threads(plan))
        good = self._outcome(plan, res, "read")
        rem = self.block_bytes - body
        done = sorted(i for i, v in good.items() if v)
        for i in done:
            if i in bounce:
                _native.memcpy(dsts[i][:body], bounce[i])
            if tail:
                _native.memcpy(dsts[i][body:], tails[i * tail:i * tail + rem])
        crcs = block_checksums([address(dsts[i]) for i in done], self.block_bytes, _native.DEFAULT_THREADS)
        for i, crc in zip(done, crcs):
            if crc != entries[i].crc:
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

    def _threads(self, plan: "_Spans") -> int:
        """Blocks in flight at once: the batch, up to twice io_threads (a block may be two spans)."""
        return max(1, min(len(plan), 2 * self.io_threads))

    # ---- failure handling ----------------------------------------------------------
    def _outcome(self, plan: "_Spans", res: np.ndarray, what: str) -> dict[int, bool]:
        """Per-block success of a batch of spans; errors are counted and acted on."""
        good: dict[int, bool] = {}
        for j, r in enumerate(res.tolist()):
            i = plan.block[j]
            full = r == plan.length[j]
            good[i] = good.get(i, True) and full
            if full:
                continue
            err = -r if r < 0 else None
            slab = plan.slab[j]
            if err in _READONLY_ERRNOS:
                self._off("writes", f"{what} refused: {os.strerror(err)}")
            elif err == errno.ENOSPC:
                self._counts["enospc"] += 1
                self._retire(slab, "ENOSPC")
            elif err is None:
                self._counts["short_" + what + "s"] += 1
                self._once(f"short-{what}-{slab}", f"short {what} in slab {slab} (truncated file?)")
            else:
                self._counts["io_errors"] += 1
                self._once(f"{what}-{err}-{slab}", f"{what} error in slab {slab}: {os.strerror(err)}")
                if what == "write":
                    self._retire(slab, errno.errorcode.get(err, str(err)))
        return good

    def _drop(self, key: bytes, counter: str | None, why: str | None) -> None:
        """Forget a block whose bytes cannot be trusted (the cache frees its slot)."""
        if counter is not None:
            self._counts[counter] += 1
            self._once(counter, f"dropped a block: {why}")
        with self._lock:
            self._deletes.add(key)
            self._touches.pop(key, None)

    def _retire(self, slab: int, why: str) -> None:
        if self._files.failed(slab) is None:
            self._files.mark_failed(slab, why)
        if self._once(f"retire-{slab}", f"slab {slab} retired ({why}); capacity shrinks"):
            self._counts["retired_slabs"] += 1
            self._slots.retire(list(self.geometry.slots_of(slab)))

    def _off(self, what: str, why: str) -> None:
        if what == "writes" and self.writes_off is None:
            self.writes_off = why
        elif what == "reads" and self.reads_off is None:
            self.reads_off = why
        else:
            return
        self._counts[f"{what}_disabled"] += 1
        log.warning("%s: %s disabled: %s", self.name, what, why)

    def _once(self, kind: str, msg: str) -> bool:
        if kind in self._logged:
            return False
        self._logged.add(kind)
        log.warning("%s (%s): %s", self.name, self.path, msg)
        return True

    def _check_dir(self) -> None:
        """A directory removed (or replaced) under us: stop writing into unlinked files."""
        try:
            ino = os.stat(os.path.join(self.path, "LOCK")).st_ino
        except OSError:
            ino = None
        if ino != self._lock_ino:
            self._off("writes", f"directory {self.path} vanished")

    def _flush(self) -> None:
        """Commit pending discards and access times."""
        with self._flush_lock:
            with self._lock:
                deletes, self._deletes = self._deletes, set()
                touches, self._touches = self._touches, {}
            try:
                self.index.commit(deletes=sorted(deletes), touches=touches)
            except IndexFailure as e:
                self._off("writes", f"index commit failed: {e}")
                raise TierIOError(f"{self.name}: {e}") from e

    # ---- housekeeping --------------------------------------------------------------
    def check(self) -> dict:
        from .disk_check import verify
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
        if self.index is not None:
            try:
                if self.writes_off is None:
                    self._flush()
            except TierIOError:
                pass
            self.index.close()
            self.index = None
        self._files.close()
        self._release_lock()


class _Spans:
    """Columns of one batch of positional I/O."""

    def __init__(self):
        self.block: list[int] = []
        self.slab: list[int] = []
        self.fd: list[int] = []
        self.off: list[int] = []
        self.addr: list[int] = []
        self.length: list[int] = []

    def add(self, block: int, slab: int, fd: int, off: int, addr: int, length: int) -> None:
        self.block.append(block)
        self.slab.append(slab)
        self.fd.append(fd)
        self.off.append(off)
        self.addr.append(addr)
        self.length.append(length)

    def __len__(self) -> int:
        return len(self.block)

    def __add__(self, other: "_Spans") -> "_Spans":
        out = _Spans()
        for name in ("block", "slab", "fd", "off", "addr", "length"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def arrays(self):
        return (np.array(self.fd, dtype=np.int32), np.array(self.off, dtype=np.int64),
                np.array(self.addr, dtype=np.uint64), np.array(self.length, dtype=np.uint64))


def _read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
