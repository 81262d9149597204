"""HostTier: one arena of host memory, allocated once, cut into fixed slots.

The arena is pinned (page-locked, registered with CUDA) when CUDA is available
so device copies run as DMA, and page-aligned ordinary memory otherwise.  Slots
are ``block_bytes`` rounded up to 4 KiB, so every slot can also be the buffer
of an O_DIRECT read or write.  ``memory="none"`` keeps the bookkeeping without
bytes, for metadata-only studies (trace replay).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from typing import Sequence

import numpy as np

from .. import native
from ..errors import ConfigError, KVTierError
from ..layout import round_up
from .base import Tier

log = logging.getLogger(__name__)

SLOT_ALIGN = 4096
_MEMORY = ("auto", "pinned", "pageable", "none")
MADV_POPULATE_WRITE = 23          # Linux 5.14+: map pages writable without touching their bytes
POPULATE_STEP = 32 << 20          # bytes per madvise call of the background populate
SLOT_BOOKKEEPING_BYTES = 40       # free-list entry, int object and used flag per slot


def memory_limit() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                limits.append(int(f.read().strip()))        # "max" (no limit) is not an int
            break
        except (OSError, ValueError):
            pass
    return min(limits) if limits else None


def check_capacity(name: str, slot_bytes: int, num_slots: int, *, arena: bool) -> None:
    """ConfigError (``<name>.capacity_bytes``) unless the slots' bookkeeping, and their
    bytes when this tier allocates its own ``arena``, fit in :func:`memory_limit`.
    Too much would end in an OOM kill or a bare MemoryError, not a miss."""
    nbytes = slot_bytes * num_slots
    limit = memory_limit()
    if limit is not None and (nbytes if arena else 0) + num_slots * SLOT_BOOKKEEPING_BYTES > limit:
        raise ConfigError(f"{name}.capacity_bytes", nbytes,
                          f"at most the memory this process may use ({limit} bytes, of which "
                          f"{SLOT_BOOKKEEPING_BYTES} per {slot_bytes}-byte slot go to bookkeeping)")


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # a broken torch install is "no CUDA"
        return False


class HostTier(Tier):
    medium = "host"
    addressable = True

    def __init__(self, name: str, block_bytes: int, num_slots: int, memory: str = "auto",
                 buffer: np.ndarray | None = None, populate: bool | str = True):
        """``buffer``: a uint8 array to use as the arena instead of allocating one
        (e.g. shared memory mapped by several processes); its owner frees it.
        ``populate``: touch every page of pageable memory now (seconds for many GiB),
        so that no store pays for page faults; False maps pages as slots are first used;
        "background" maps them from a thread while the tier is already in use (stores
        that come first fault their own pages; the bytes are never touched)."""
        if (isinstance(block_bytes, int) and isinstance(num_slots, int)   # else Tier says why
                and block_bytes > 0 and num_slots > 0):
            check_capacity(name, round_up(block_bytes, SLOT_ALIGN), num_slots,
                           arena=buffer is None and memory != "none")
        try:
            super().__init__(name, block_bytes, num_slots)
        except MemoryError:     # the slot bookkeeping, where memory_limit() knows no limit
            raise ConfigError(f"{name}.capacity_bytes", round_up(block_bytes, SLOT_ALIGN) * num_slots,
                              "few enough slots that this process can keep track of them") from None
        if not (isinstance(populate, bool) or populate == "background"):
            raise ConfigError(f"{name}.populate", populate, "true, false or \"background\"")
        self.slot_bytes = round_up(block_bytes, SLOT_ALIGN)
        self._mmap = None
        self._tensor = None
        self._range = None
        self._populating: threading.Thread | None = None
        self._stop_populating = threading.Event()
        if buffer is not None:
            need = self.slot_bytes * num_slots
            if not (isinstance(buffer, np.ndarray) and buffer.dtype == np.uint8 and buffer.ndim == 1
                    and buffer.flags.c_contiguous and buffer.nbytes >= need):
                raise ConfigError(f"{name}.buffer", getattr(buffer, "shape", type(buffer).__name__),
                                  f"a contiguous 1-D uint8 array of at least {need} bytes")
            self.memory = "external"
            self._attach(buffer)
            return
        if memory not in _MEMORY:
            raise ConfigError(f"{name}.memory", memory, "one of " + ", ".join(_MEMORY))
        if memory == "auto":
            memory = "pinned" if _cuda_available() else "pageable"
        self.memory = memory
        if memory == "none":
            self._arena = None
            self._mv = None
            return
        nbytes = self.slot_bytes * num_slots
        if memory == "pinned":
            import torch
            try:
                self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError as e:
                raise ConfigError(f"{name}.capacity_bytes", nbytes,
                                  f"an amount of pinned memory this machine can lock ({e})") from e
            arena = self._tensor.numpy()
        else:
            try:
                # anonymous and page-aligned
                self._mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except (OSError, OverflowError) as e:
                raise ConfigError(f"{name}.capacity_bytes", nbytes,
                                  f"an amount of memory this machine can map ({e})") from e
            try:   # huge pages where the kernel offers them: scattered page copies miss the TLB less
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except (AttributeError, OSError):
                pass
            arena = np.frombuffer(self._mmap, dtype=np.uint8)
            if populate is True:
                arena[::4096] = 0          # populate now, so no store pays for page faults
        self._attach(arena)
        if populate == "background" and self._mmap is not None:
            self._populating = threading.Thread(target=self._populate, name=f"{name}-populate", daemon=True)
            self._populating.start()
        log.debug("%s: %d slots of %d bytes, %s memory", name, num_slots, self.slot_bytes, memory)

    def _attach(self, arena: np.ndarray) -> None:
        self._arena = arena
        self._base = arena.ctypes.data
        self._mv = memoryview(arena)              # slicing this is cheap; ndarray export is not
        # the native span ops may touch the arena (addresses() hands out its slots)
        self._range = native.ranges.register(arena, owner=f"{self.name} arena")

    def _populate(self) -> None:
        """Map the arena's pages step by step (GIL released in each madvise call)."""
        try:
            madvise = ctypes.CDLL(None, use_errno=True).madvise
        except (OSError, AttributeError):
            return
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        nbytes = self.slot_bytes * self.num_slots
        for off in range(0, nbytes, POPULATE_STEP):
            if self._stop_populating.is_set():
                return
            if madvise(self._base + off, min(POPULATE_STEP, nbytes - off), MADV_POPULATE_WRITE) != 0:
                log.debug("%s: background populate stopped: %s", self.name,
                          ctypes.get_errno())   # EINVAL before Linux 5.14: pages map on first use
                return

    @property
    def stores_bytes(self) -> bool:
        return self._arena is not None

    def _slot(self, slot: int) -> np.ndarray:
        off = slot * self.slot_bytes
        return self._arena[off:off + self.block_bytes]

    def view(self, slot: int) -> memoryview | None:
        self._check_open("view")
        if self._arena is None:
            return None
        if not 0 <= slot < self.num_slots:
            raise KVTierError(f"{self.name}: slot {slot} out of range [0, {self.num_slots})")
        off = slot * self.slot_bytes
        return self._mv[off:off + self.block_bytes]

    def addresses(self, slots: Sequence[int]) -> np.ndarray | None:
        self._check_open("addresses")
        if self._arena is None:
            return None
        return self._base + np.asarray(slots, dtype=np.uint64) * np.uint64(self.slot_bytes)

    def write(self, keys, slots, srcs) -> list[bool]:
        self._check_open("write")
        if self._arena is not None:
            for slot, src in zip(slots, srcs):
                native.memcpy(self._slot(slot), src)
        return [True] * len(slots)

    def read(self, keys, slots, dsts) -> list[bool]:
        self._check_open("read")
        if self._arena is not None:
            for slot, dst in zip(slots, dsts):
                native.memcpy(dst, self._slot(slot))
        return [True] * len(slots)

    @property
    def populating(self) -> bool:
        """True while a background populate is still mapping pages."""
        return self._populating is not None and self._populating.is_alive()

    def stats(self) -> dict:
        d = super().stats()
        d.update(memory=self.memory, slot_bytes=self.slot_bytes,
                 capacity_bytes=self.slot_bytes * self.num_slots, populating=self.populating)
        return d

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._stop_populating.set()
        if self._populating is not None:
            self._populating.join()
        if self._range is not None:
            self._range.close()                  # before the memory can go away
            self._range = None
        self._mv = None
        self._arena = None
        self._tensor = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:   # a view is still exported; the GC unmaps it later
                pass
            self._mmap = None
