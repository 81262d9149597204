"""The Tier contract.

A tier holds equal-size blocks in numbered slots and moves their bytes; it
does not decide what to keep (that is the TieredCache and its policies).

Lifecycle of a block in a tier, as the cache drives it:

    allocate(n)            reserve n slots (atomic: all or None)
    write(keys, slots, srcs)
                           put the bytes in place; per-block success
    read(keys, slots, dsts)
                           get them back; per-block success (a corrupt or
                           vanished block is a False, never wrong bytes)
    discard(keys, slots)   forget stored blocks (index entries, remote copies)
    free(slots)            return slots to the free list

Attributes every tier has (defaults here; subclasses set or override them):

    slot_bytes             bytes a slot takes (``block_bytes`` rounded up to the
                           tier's alignment); the cache sizes its staging pool by it
    stores_bytes           False for metadata-only tiers (no bytes are kept or moved)
    write_through          receives a copy of every store, not only demotions
    admission              an :class:`AdmissionFilter` the cache feeds with every use
                           of a block and asks before demoting a block here, or None

After ``close()`` every method but ``close`` (which may be called again) and
``stats`` raises :class:`~kvtier.errors.CacheClosedError`.

Optional hooks, concrete no-ops here: ``recover`` (persistent tiers report the
blocks a previous process left), ``contains`` (tiers whose membership changes
behind our back, e.g. remote servers shared by several nodes), ``view``
(directly addressable tiers expose a slot as writable memory), ``check``,
``stats`` and ``close``.

Slot bookkeeping is shared by every local tier through :class:`SlotAllocator`:
O(1) allocate and free, double frees detected.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import ClassVar, Protocol, Sequence

import numpy as np

from ..errors import CacheClosedError, ConfigError, KVTierError


class SlotAllocator:
    """A free list over ``num_slots`` slots; thread-safe, no allocation per call."""

    def __init__(self, num_slots: int):
        self._free = list(range(num_slots - 1, -1, -1))   # pop() hands out slot 0 first
        self._used = bytearray(num_slots)
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        with self._lock:
            if n < 0 or n > len(self._free):
                return None
            out = [self._free.pop() for _ in range(n)]
            for s in out:
                self._used[s] = 1
            return out

    def free(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                if not 0 <= s < len(self._used) or not self._used[s]:
                    raise KVTierError(f"slot {s} freed but not allocated")
            for s in slots:
                self._used[s] = 0
                if self._reusable(s):
                    self._free.append(s)

    def _reusable(self, slot: int) -> bool:
        """Whether a freed slot goes back on the free list (subclasses retire slots)."""
        return True

    def is_allocated(self, slot: int) -> bool:
        return bool(self._used[slot])


class AdmissionFilter(Protocol):
    """Keeps blocks off a tier unless they are used often enough (e.g. ``policy.admission.TinyLFU``)."""

    def record(self, keys: Sequence[bytes]) -> None:
        """Blocks a request stored or loaded (the cache calls this for every use, under its lock)."""

    def admit(self, key: bytes) -> bool:
        """Whether a block evicted from the tier above may be written here."""


class Tier(ABC):
    """A place that holds equal-size blocks in numbered slots."""

    medium: ClassVar[str]            # "gpu" | "host" | "disk" | "remote"
    addressable: ClassVar[bool] = False   # view()/addresses() give the slot's memory
    write_through: bool = False      # receives a copy of every store (not only demotions)
    admission: AdmissionFilter | None = None   # consulted before a demotion writes here
    slot_bytes: int                  # bytes per slot; block_bytes unless a subclass aligns it

    def __init__(self, name: str, block_bytes: int, num_slots: int | None):
        if not isinstance(block_bytes, int) or block_bytes <= 0:
            raise ConfigError(f"{name}.block_bytes", block_bytes, "a positive int")
        if num_slots is not None and (not isinstance(num_slots, int) or num_slots <= 0):
            raise ConfigError(f"{name}.capacity", num_slots,
                              f"room for at least one block of {block_bytes} bytes")
        self.name = name
        self.block_bytes = block_bytes
        self.num_slots = num_slots
        self.slot_bytes = block_bytes
        self._slots = SlotAllocator(num_slots) if num_slots is not None else None
        self._closed = False

    # ---- closing -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return getattr(self, "_closed", False)

    def _check_open(self, method: str) -> None:
        """Raise CacheClosedError when the tier has been closed (subclasses call this
        first in every method that touches slots or bytes)."""
        if getattr(self, "_closed", False):
            raise CacheClosedError(f"{type(self).__name__} {self.name!r}: {method}() called after close()")

    @property
    def stores_bytes(self) -> bool:
        """False when the tier keeps no bytes (metadata-only studies): nothing is copied."""
        return True

    # ---- slots ---------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._slots.num_free if self._slots is not None else 0

    def allocate(self, n: int) -> list[int] | None:
        """Reserve ``n`` slots, or None (and nothing reserved)."""
        self._check_open("allocate")
        if self._slots is None:
            return [0] * n            # keyed tiers: slots are placeholders
        return self._slots.allocate(n)

    def free(self, slots: Sequence[int]) -> None:
        self._check_open("free")
        if self._slots is not None:
            self._slots.free(slots)

    # ---- bytes ---------------------------------------------------------
    @abstractmethod
    def write(self, keys: Sequence[bytes], slots: Sequence[int],
              srcs: Sequence[memoryview]) -> list[bool]:
        """Store each block's bytes.

        Args:
            keys: the blocks' keys (recorded by tiers that index by key).
            slots: slots from :meth:`allocate`.
            srcs: ``block_bytes`` bytes each.
        Returns:
            Per-block success.
        Raises:
            TierIOError: the tier failed as a whole (the cache rolls back).
        """

    @abstractmethod
    def read(self, keys: Sequence[bytes], slots: Sequence[int],
             dsts: Sequence[memoryview]) -> list[bool]:
        """Fetch each block's bytes into ``dsts``.

        Returns:
            Per-block success. False means a miss: the block is absent, or its
            bytes or header failed verification (it is dropped and counted).
        """

    def discard(self, keys: Sequence[bytes], slots: Sequence[int]) -> None:
        """Forget stored blocks (the cache frees the slots itself)."""

    # ---- optional hooks --------------------------------------------------
    def recover(self) -> list[tuple[bytes, int]]:
        """Blocks a previous process stored here, as (key, slot); slots come back allocated."""
        return []

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Membership of keys this process did not store (shared tiers)."""
        return [False] * len(keys)

    def view(self, slot: int) -> memoryview | None:
        """A writable view of a slot's bytes, for addressable tiers."""
        return None

    def addresses(self, slots: Sequence[int]) -> np.ndarray | None:
        """Start addresses (uint64) of slots, for addressable tiers."""
        return None

    def check(self) -> dict:
        """Verify internal consistency; returns a report with an ``ok`` flag."""
        return {"ok": True}

    def stats(self) -> dict:
        used = (self.num_slots - self.num_free) if self.num_slots is not None else None
        return {"medium": self.medium, "block_bytes": self.block_bytes,
                "num_slots": self.num_slots, "used_slots": used}

    def close(self) -> None:
        """Release resources; the tier refuses use afterwards (subclasses call this)."""
        self._closed = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, block_bytes={self.block_bytes}, num_slots={self.num_slots})"
