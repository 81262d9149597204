"""Slab files: the disk tier's bytes, in large preallocated files cut into slots.

A slot holds one block, padded to whole 4 KiB pages so that every read and
write can be O_DIRECT::

    | block bytes ......................... | zero padding |
    0                                   block_bytes    slot_bytes (a 4 KiB multiple)

What a slot holds is recorded in the index only (key, namespace salt, length,
checksum): a block is written with exactly one I/O when its size is a multiple
of 4 KiB, as on the raw device path.  A slot whose index entry is stale (its
bytes were rewritten) fails the checksum, so it can never be returned.  Slot
``s`` lives in slab ``s // slots_per_slab`` at byte ``(s % slots_per_slab) *
slot_bytes``.  Slabs are created and preallocated (``posix_fallocate``) the
first time one of their slots is written.

I/O goes through :mod:`kvtier.native` in batches of spans (thread pool, GIL
released).  O_DIRECT is probed when the tier opens: ``auto`` falls back to
buffered I/O and logs why once; ``on`` raises if the filesystem refuses it.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ... import native
from ...errors import ConfigError, TierIOError
from ...layout import round_up
from ..base import SlotAllocator

log = logging.getLogger(__name__)

ALIGN = 4096
FORMAT_VERSION = 1
SLAB_NAME = "slab-{:05d}.kvt"



CHECK_CHUNK = 1 << 20


def block_checksums(addrs: Sequence[int], block_bytes: int, threads: int | None = None, *,
                    within=()) -> list[int]:
    """The checksum of each block: CRC32C over the CRC32Cs of its 1 MiB chunks.

    Chunks are checksummed in parallel on the native thread pool, so one large
    block does not wait on one core.  Any change inside a chunk changes that
    chunk's CRC, and any change of one 4-byte chunk CRC changes the outer CRC.
    """
    per = max(1, -(-block_bytes // CHECK_CHUNK))
    starts = np.arange(per, dtype=np.uint64) * np.uint64(CHECK_CHUNK)
    lens = np.minimum(np.uint64(block_bytes) - starts, np.uint64(CHECK_CHUNK)).astype(np.uint64)
    base = np.asarray(addrs, dtype=np.uint64)
    chunk_addrs = (base[:, None] + starts[None, :]).reshape(-1)
    chunk_crcs = native.crc32c_spans(np.ascontiguousarray(chunk_addrs), np.tile(lens, len(base)), threads,
                                     within=within)
    raw = np.ascontiguousarray(chunk_crcs, dtype="<u4").reshape(len(base), per)
    return [native.crc32c(row.tobytes()) for row in raw]


MIN_PIECE = 512 << 10


def io_plan(num_blocks: int, block_bytes: int, io_threads: int) -> tuple[int, int]:
    """How a batch of whole, page-aligned blocks moves: (piece bytes, threads).

    Blocks of 1 MiB or more move in pieces of one checksum chunk (half of one
    when that still leaves fewer than two pieces per thread), each checksummed
    by the thread that moved it: with more pieces than threads, checksums run
    while other pieces are in flight, and the batch ends on one small piece's
    checksum rather than on every thread's at once.  Smaller blocks move
    whole.  Piece 0 means whole blocks.
    """
    piece = 0
    if block_bytes > MIN_PIECE:
        piece = CHECK_CHUNK
        if num_blocks * -(-block_bytes // piece) < 2 * io_threads:
            piece = MIN_PIECE
        if piece >= block_bytes:
            piece = 0
    tasks = num_blocks * (-(-block_bytes // piece) if piece else 1)
    return piece, max(1, min(tasks, io_threads))


@dataclass(frozen=True)
class SlotGeometry:
    """Where slots sit in slab files, for one block size."""
    block_bytes: int
    slot_bytes: int
    slots_per_slab: int
    num_slots: int

    @classmethod
    def plan(cls, block_bytes: int, capacity_bytes: int, slab_bytes: int) -> "SlotGeometry":
        slot = round_up(block_bytes, ALIGN)
        n = capacity_bytes // slot
        if n <= 0:
            raise ConfigError("disk.capacity_bytes", capacity_bytes,
                              f"room for at least one slot of {slot} bytes (a block in whole 4 KiB pages)")
        per = max(1, slab_bytes // slot)
        return cls(block_bytes, slot, min(per, n), n)

    @property
    def body_bytes(self) -> int:
        """Leading block bytes that fill whole pages (written straight from the caller)."""
        return self.block_bytes // ALIGN * ALIGN

    @property
    def tail_bytes(self) -> int:
        """The last page of a slot when the block ends inside it (remainder + padding), else 0."""
        return self.slot_bytes - self.body_bytes

    @property
    def num_slabs(self) -> int:
        return (self.num_slots + self.slots_per_slab - 1) // self.slots_per_slab

    def slab_of(self, slot: int) -> int:
        return slot // self.slots_per_slab

    def offset_of(self, slot: int) -> int:
        return slot % self.slots_per_slab * self.slot_bytes

    def slab_size(self, slab: int) -> int:
        first = slab * self.slots_per_slab
        return min(self.slots_per_slab, self.num_slots - first) * self.slot_bytes

    def slots_of(self, slab: int) -> range:
        first = slab * self.slots_per_slab
        return range(first, min(first + self.slots_per_slab, self.num_slots))


def probe_direct(path: str) -> str | None:
    """None when O_DIRECT aligned I/O works in directory ``path``, else the reason."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    probe = os.path.join(path, ".odirect-probe")
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        return f"the filesystem refuses O_DIRECT ({os.strerror(e.errno)})"
    try:
        buf = native.alloc_aligned(ALIGN)
        addr = np.array([buf.ctypes.data], dtype=np.uint64)
        n = np.array([ALIGN], dtype=np.uint64)
        got = native.pwrite_spans(fd, np.zeros(1, dtype=np.int64), addr, n, within=[buf])
        if got[0] != ALIGN:
            return f"an aligned O_DIRECT write failed ({os.strerror(-int(got[0])) if got[0] < 0 else 'short'})"
        got = native.pread_spans(fd, np.zeros(1, dtype=np.int64), addr, n, within=[buf])
        if got[0] != ALIGN:
            return f"an aligned O_DIRECT read failed ({os.strerror(-int(got[0])) if got[0] < 0 else 'short'})"
        return None
    finally:
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError:
            pass


class SlabFiles:
    """The open slab files of one directory; slabs are created on first use.

    ``ensure(slab)`` returns the slab's fd or None when the slab cannot exist
    (no space, I/O error): the caller retires its slots.  Thread-safe.
    """

    def __init__(self, path: str, geometry: SlotGeometry, o_direct: str, readonly: bool = False):
        self.path = path
        self.geometry = geometry
        self.readonly = readonly
        self._fds: dict[int, int] = {}
        self._failed: dict[int, str] = {}
        self._lock = threading.Lock()
        if readonly:
            reason = "the directory is read-only"
        else:
            reason = probe_direct(path) if o_direct != "off" else "o_direct=off"
        if reason is not None and o_direct == "on":
            raise ConfigError("disk.o_direct", "on", f"a filesystem that supports O_DIRECT: {reason} in {path}")
        self.direct = reason is None
        self.direct_reason = reason
        if reason is not None and o_direct == "auto":
            log.warning("disk tier %s: buffered I/O, because %s", path, reason)

    def file(self, slab: int) -> str:
        return slab_file(self.path, slab)

    def existing(self) -> dict[int, int]:
        """Slab number -> current file size, for every slab file on disk."""
        return slab_sizes(self.path)

    def failed(self, slab: int) -> str | None:
        return self._failed.get(slab)

    def ensure(self, slab: int) -> int | None:
        """The slab's fd, creating and preallocating the file if needed."""
        fd = self._fds.get(slab)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(slab)
            if fd is not None or slab in self._failed:
                return fd
            flags = os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT
            flags |= os.O_DIRECT if self.direct else 0
            size = self.geometry.slab_size(slab)
            try:
                fd = os.open(self.file(slab), flags, 0o644)
            except OSError as e:
                self._fail(slab, e)
                return None
            try:
                if not self.readonly and os.fstat(fd).st_size < size:
                    _preallocate(fd, size)
            except OSError as e:
                os.close(fd)
                self._fail(slab, e)
                return None
            self._fds[slab] = fd
            return fd

    def _fail(self, slab: int, e: OSError) -> None:
        self._failed[slab] = errno.errorcode.get(e.errno, str(e.errno))
        log.debug("disk tier %s: slab %d unavailable: %s", self.path, slab, e.strerror or e)

    def mark_failed(self, slab: int, why: str) -> None:
        with self._lock:
            self._failed.setdefault(slab, why)

    def open_fd(self, slab: int) -> int | None:
        """The fd of a slab already open (or openable without creating it)."""
        fd = self._fds.get(slab)
        if fd is not None:
            return fd
        if not os.path.exists(self.file(slab)):
            return None
        return self.ensure(slab)

    def sync(self, slabs) -> list[int]:
        """fdatasync the given slabs; returns those that failed."""
        bad = []
        for slab in slabs:
            fd = self._fds.get(slab)
            if fd is None:
                continue
            try:
                os.fdatasync(fd)
            except OSError as e:
                log.warning("disk tier %s: fdatasync of slab %d failed: %s", self.path, slab, e.strerror)
                bad.append(slab)
        return bad

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


def slab_file(path: str, slab: int) -> str:
    return os.path.join(path, SLAB_NAME.format(slab))


def slab_sizes(path: str) -> dict[int, int]:
    """Slab number -> file size, for every slab file in directory ``path``."""
    out = {}
    for name in os.listdir(path):
        if name.startswith("slab-") and name.endswith(".kvt") and name[5:-4].isdigit():
            try:
                out[int(name[5:-4])] = os.stat(os.path.join(path, name)).st_size
            except FileNotFoundError:
                continue
    return out


def _preallocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)       # the filesystem cannot reserve space: a sparse file


def address(view: memoryview) -> int:
    """Start address of a contiguous buffer."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))    # writable: the quick way
    except (TypeError, ValueError):
        return np.frombuffer(view, dtype=np.uint8).ctypes.data


def io_error(what: str, path: str, res: int) -> TierIOError:
    return TierIOError(f"{what} {path}: {os.strerror(-res) if res < 0 else 'short transfer'}")


class SlabSlots(SlotAllocator):
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

    def _reusable(self, slot: int) -> bool:
        return not self._retired[slot]

    @property
    def num_retired(self) -> int:
        return sum(self._retired)

    @property
    def num_used(self) -> int:
        return sum(self._used)


class SpanBatch:
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

    def __add__(self, other: "SpanBatch") -> "SpanBatch":
        out = SpanBatch()
        for name in ("block", "slab", "fd", "off", "addr", "length"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def arrays(self):
        return (np.array(self.fd, dtype=np.int32), np.array(self.off, dtype=np.int64),
                np.array(self.addr, dtype=np.uint64), np.array(self.length, dtype=np.uint64))
