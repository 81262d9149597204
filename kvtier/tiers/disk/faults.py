"""How the disk tier degrades: every I/O outcome is classified here, once.

:class:`DiskFaults`, held by :class:`~kvtier.tiers.disk.DiskTier`, turns failed
spans into actions, each counted (in the tier's counters) and logged once:

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

from collections import Counter

from .slabs import SlabFiles, SlabSlots, SlotGeometry, SpanBatch

log = logging.getLogger("kvtier.tiers.disk")

_READONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class DiskFaults:
    """Failure handling of one disk tier: what is off, which slabs are retired, what was logged.

    ``writes_off`` / ``reads_off`` are None while that direction works, else why
    it was turned off.  ``counts`` is the tier's own counter, shared.
    """

    def __init__(self, name: str, path: str, geometry: SlotGeometry, slots: SlabSlots, counts: Counter):
        self.name, self.path, self.geometry = name, path, geometry
        self.slots = slots
        self.counts = counts
        self.files: SlabFiles | None = None      # set once the slab files are open
        self.writes_off: str | None = None
        self.reads_off: str | None = None
        self._logged: set[str] = set()

    def outcome(self, plan: SpanBatch, res: np.ndarray, what: str) -> dict[int, bool]:
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
                self.off("writes", f"{what} refused: {os.strerror(err)}")
            elif err == errno.ENOSPC:
                self.counts["enospc"] += 1
                self.retire(slab, "ENOSPC")
            elif err is None:
                self.counts["short_" + what + "s"] += 1
                self.once(f"short-{what}-{slab}", f"short {what} in slab {slab} (truncated file?)")
            else:
                self.counts["io_errors"] += 1
                self.once(f"{what}-{err}-{slab}", f"{what} error in slab {slab}: {os.strerror(err)}")
                if what == "write":
                    self.retire(slab, errno.errorcode.get(err, str(err)))
        return good

    def retire(self, slab: int, why: str) -> None:
        """Take a slab's free slots out of the allocator for good (its stored blocks stay readable)."""
        if self.files is not None and self.files.failed(slab) is None:
            self.files.mark_failed(slab, why)
        if self.once(f"retire-{slab}", f"slab {slab} retired ({why}); capacity shrinks"):
            self.counts["retired_slabs"] += 1
            self.slots.retire(list(self.geometry.slots_of(slab)))

    def off(self, what: str, why: str) -> None:
        """Turn ``"writes"`` or ``"reads"`` off, keeping the first reason."""
        if what == "writes" and self.writes_off is None:
            self.writes_off = why
        elif what == "reads" and self.reads_off is None:
            self.reads_off = why
        else:
            return
        self.counts[f"{what}_disabled"] += 1
        log.warning("%s: %s disabled: %s", self.name, what, why)

    def once(self, kind: str, msg: str) -> bool:
        """Log ``msg`` the first time ``kind`` happens; True if this was the first time."""
        if kind in self._logged:
            return False
        self._logged.add(kind)
        log.warning("%s (%s): %s", self.name, self.path, msg)
        return True

    def check_dir(self, lock_ino: int | None) -> None:
        """A directory removed (or replaced) under us: stop writing into unlinked files."""
        try:
            ino = os.stat(os.path.join(self.path, "LOCK")).st_ino
        except OSError:
            ino = None
        if ino != lock_ino:
            self.off("writes", f"directory {self.path} vanished")
