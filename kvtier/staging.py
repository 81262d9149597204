"""The staging pool: host slots for blocks on their way between tiers.

An evicted block's bytes are copied into a staging slot so that its own slot
can be reused at once; the TransferEngine then writes the staged copy to the
tier below and frees the staging slot.  The pool starts empty and grows on
demand, one segment of host memory at a time, up to ``max_bytes``; it never
shrinks below what it has grown to until it is closed.  When it is at its
bound, :meth:`allocate` returns None and the caller applies back-pressure
(:mod:`kvtier.movement` writes the block from the slot it already has).

The default bound is a quarter of the top tier's bytes, and at least 64 MiB
(:func:`auto_bytes`): room for a burst of evictions a quarter of the tier
deep without the tier waiting for the disk.  Memory is mapped only as the
pool grows, so a bound the pool never reaches costs nothing.

Primitives (the cache's lock is held by every caller):

    allocate(n)      n slots, growing the pool if it must; None (and nothing
                     taken) when the bound does not allow n more
    view(slot)       the slot's bytes (writable memoryview), None for a
                     metadata-only pool
    free(slots)      give slots back
    stats()          slots, bytes mapped, bound, high-water mark
    close()          unmap every segment (use afterwards: CacheClosedError)

Every segment is registered in :mod:`kvtier.native.ranges`, so native span
ops may copy into and out of staged blocks.
"""
from __future__ import annotations

import mmap
from typing import Sequence

import numpy as np

from . import native
from .errors import CacheClosedError, ConfigError, KVTierError
from .layout import round_up

SLOT_ALIGN = 4096
SEGMENT_BYTES = 16 << 20         # host memory mapped per growth step (fewer for huge blocks)
AUTO_FRACTION = 4                # default bound: 1/AUTO_FRACTION of the top tier's bytes ...
AUTO_MIN_BYTES = 64 << 20        # ... and at least this much


def auto_bytes(top_slot_bytes: int, top_num_slots: int) -> int:
    """The default bound: a quarter of the top tier, at least 64 MiB (and one block)."""
    return max(AUTO_MIN_BYTES, top_slot_bytes, top_slot_bytes * top_num_slots // AUTO_FRACTION)


class StagingPool:
    """Host slots of ``block_bytes`` (rounded up to 4 KiB), grown in segments up to ``max_bytes``."""

    def __init__(self, block_bytes: int, max_bytes: int, *, stores_bytes: bool = True,
                 min_slots: int = 0, name: str = "staging"):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError("staging_bytes", max_bytes, "a non-negative number of bytes, or None for auto")
        self.name = name
        self.block_bytes = block_bytes
        self.slot_bytes = round_up(block_bytes, SLOT_ALIGN)
        self.max_slots = max(min_slots, max_bytes // self.slot_bytes)
        self.stores_bytes = stores_bytes
        self.segment_slots = max(1, min(self.max_slots or 1, SEGMENT_BYTES // self.slot_bytes))
        self._segments: list[tuple[mmap.mmap, np.ndarray, memoryview, object]] = []
        self._num_slots = 0                  # slots mapped so far
        self._free: list[int] = []
        self._used = bytearray()
        self._high_water = 0
        self._closed = False

    # ---- slots -----------------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        """Slots mapped so far (grows up to :attr:`max_slots`)."""
        return self._num_slots

    @property
    def num_used(self) -> int:
        return self._num_slots - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        self._check_open("allocate")
        if n < 0 or self.num_used + n > self.max_slots:
            return None
        while len(self._free) < n:
            self._grow()
        out = [self._free.pop() for _ in range(n)]
        for s in out:
            self._used[s] = 1
        self._high_water = max(self._high_water, self.num_used)
        return out

    def free(self, slots: Sequence[int]) -> None:
        self._check_open("free")
        for s in slots:
            if not 0 <= s < self._num_slots or not self._used[s]:
                raise KVTierError(f"{self.name}: slot {s} freed but not allocated")
        for s in slots:
            self._used[s] = 0
            self._free.append(s)

    def view(self, slot: int) -> memoryview | None:
        self._check_open("view")
        if not self.stores_bytes:
            return None
        if not 0 <= slot < self._num_slots:
            raise KVTierError(f"{self.name}: slot {slot} out of range [0, {self._num_slots})")
        seg, i = divmod(slot, self.segment_slots)
        off = i * self.slot_bytes
        return self._segments[seg][2][off:off + self.block_bytes]

    def _grow(self) -> None:
        n = min(self.segment_slots, self.max_slots - self._num_slots)
        first = self._num_slots
        if self.stores_bytes:           # the last segment may be short: never past the bound
            nbytes = n * self.slot_bytes
            try:
                mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except (OSError, OverflowError) as e:
                raise KVTierError(f"{self.name}: cannot map {nbytes} more bytes ({e})") from e
            arr = np.frombuffer(mem, dtype=np.uint8)
            reg = native.ranges.register(arr, owner=f"{self.name} segment {len(self._segments)}")
            self._segments.append((mem, arr, memoryview(arr), reg))
        self._num_slots += n
        self._used.extend(bytes(n))
        self._free.extend(range(first + n - 1, first - 1, -1))   # pop() hands out the lowest first

    # ---- housekeeping ---------------------------------------------------------------
    def stats(self) -> dict:
        return {"slots": self._num_slots, "used_slots": self.num_used, "max_slots": self.max_slots,
                "bytes": sum(seg[1].nbytes for seg in self._segments),
                "max_bytes": self.max_slots * self.slot_bytes, "high_water_slots": self._high_water}

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise CacheClosedError(f"{self.name}.{method}() called after close(): the pool is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        segments, self._segments = self._segments, []
        for mem, _, _, reg in segments:
            reg.close()                        # before the memory goes away
            try:
                mem.close()
            except BufferError:                # a view is still exported; the GC unmaps it later
                pass
        self._free = []
