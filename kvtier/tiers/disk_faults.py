"""How the disk tier degrades: every I/O outcome is classified here, once.

:class:`DiskFaults` is the part of :class:`~kvtier.tiers.disk.DiskTier` that
turns failed spans into actions, each counted and logged once:

    EROFS, EACCES, EPERM   writes are turned off (a read-only directory); reads go on
    ENOSPC                 the slab is retired: its free slots leave the allocator
    EIO and other errors   reads: the block is dropped (a miss); writes: the slab is retired
    short transfer         a truncated slab file: the block is dropped
    a vanished directory   writes are turned off (no writing into unlinked files)

A retired slab's blocks stay readable until a read of one fails.
"""
from __future__ import annotations

import errno
import logging
import os

import numpy as np

from .slabs import SpanBatch

log = logging.getLogger("kvtier.tiers.disk")

_READONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class DiskFaults:
    """Failure handling of the disk tier (a mixin: the tier supplies the attributes)."""

    def _outcome(self, plan: SpanBatch, res: np.ndarray, what: str) -> dict[int, bool]:
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
