"""The host tier in shared memory, so vLLM's scheduler and worker see one arena.

vLLM runs its scheduler and its model workers in different processes.  The
scheduler side owns the :class:`~kvtier.cache.TieredCache` (index, leases,
policies, the disk and remote tiers); the worker side copies pages between the
engine's KV tensors and host slots.  Both need the same bytes, so the host
tier's arena is a file in ``/dev/shm`` that each process maps:

    scheduler: SharedArena.create(path, nbytes)   fallocate: fails now, not with SIGBUS later
    worker:    SharedArena.attach(path, nbytes)   as soon as the file appears (early_attach.py),
                                                  checked against the path and inode in metadata
    scheduler: unlink() once the worker has attached (memory goes with the last mapping)

The scheduler's host tier is an ordinary HostTier over the arena's array
(``build_tiers(..., host_buffer=arena.array)``); the scheduler owns the arena
and closes it after the cache.
"""
from __future__ import annotations

import logging
import mmap
import os
from typing import TYPE_CHECKING

import numpy as np

from ...config import KVTierConfig
from ...errors import ConfigError, KVTierError
from ...keys import Namespace
from ...layout import round_up
from ...native import ranges
from ...tiers.host import SLOT_ALIGN

if TYPE_CHECKING:
    from ...cache import TieredCache

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


def arena_path(engine_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(engine_id))
    return os.path.join(SHM_DIR, f"kvtier-{safe}.host")


class SharedArena:
    """One shared mapping of ``nbytes`` bytes backed by a file in /dev/shm."""

    def __init__(self, path: str, nbytes: int, fd: int, populate: bool = True):
        self.path = path
        self.nbytes = nbytes
        try:
            st = os.fstat(fd)
            self.identity = (st.st_dev, st.st_ino)    # which file this is, whatever its path names now
            # MAP_POPULATE (creator): allocate and map every page now, so no copy pays for it.
            # A worker attaching maps lazily: the pages exist already, and populating a whole
            # arena inside the first request's step would stall it (~0.1 s per GiB).
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._mmap = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)
        self.base = self.array.ctypes.data
        self._range = ranges.register(self.array, owner=f"shared host arena {path}")   # for the native copies

    @classmethod
    def create(cls, path: str, nbytes: int, key: str = "host.capacity_bytes") -> "SharedArena":
        try:
            os.unlink(path)                     # a file left by a killed engine with this id
            log.warning("removed a stale host arena %s", path)
        except FileNotFoundError:
            pass
        st = os.statvfs(os.path.dirname(path) or ".")
        free = st.f_bavail * st.f_frsize
        if nbytes > free:       # checked first: fallocate would fill the tmpfs before failing
            raise ConfigError(key, nbytes, f"at most the {free} bytes free in {os.path.dirname(path)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise ConfigError(key, nbytes, f"an amount of shared memory {SHM_DIR} can hold ({e.strerror})") from e
        return cls(path, nbytes, fd)

    @classmethod
    def attach(cls, path: str, nbytes: int) -> "SharedArena":
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        if size != nbytes:
            os.close(fd)
            raise KVTierError(f"host arena {path} has {size} bytes, expected {nbytes}")
        return cls(path, nbytes, fd, populate=False)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self._range.close()
        self.array = None
        try:
            self._mmap.close()
        except BufferError:   # a view is still exported; the GC unmaps it later
            pass


def host_geometry(cfg: KVTierConfig, block_bytes: int) -> tuple[int, int]:
    """(slot_bytes, num_slots) of the host tier, as both processes compute it."""
    slot = round_up(block_bytes, SLOT_ALIGN)
    n = cfg.host.capacity_bytes // slot
    if n <= 0:
        raise ConfigError("kv_connector_extra_config.host.capacity_bytes", cfg.host.capacity_bytes,
                          f"room for at least one block ({slot} bytes with alignment)")
    return slot, n


def build_shared_cache(cfg: KVTierConfig, namespace: Namespace, block_bytes: int, path: str,
                       listeners=()) -> tuple[TieredCache, SharedArena]:
    """A TieredCache like ``TieredCache.from_config`` builds, with the host tier's arena in /dev/shm.

    Returns the cache and its arena.  The caller owns the arena: ``unlink()`` it
    once the worker has attached, ``close()`` it after closing the cache.
    """
    from ...cache import TieredCache
    from ...tiers.factory import build_tiers

    slot, num_slots = host_geometry(cfg, block_bytes)
    arena = SharedArena.create(path, slot * num_slots, key="kv_connector_extra_config.host.capacity_bytes")
    try:
        tiers, policies = build_tiers(cfg, namespace, block_bytes, host_buffer=arena.array)
        cache = TieredCache(tiers, policies, lease_timeout_s=cfg.lease_timeout_s,
                            staging_bytes=cfg.staging_bytes, transfer_threads=cfg.transfer_threads,
                            namespace=namespace, listeners=listeners)
    except BaseException:
        arena.unlink()
        arena.close()
        raise
    return cache, arena
