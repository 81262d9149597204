"""Mapping (and on CUDA pinning) the host arena before the first request needs it.

The scheduler side creates the shared arena only after vLLM's workers have
started and warmed up, and tells the workers where it is in the first step's
metadata.  Attaching then is a mapping, but on CUDA it is also a
``cudaHostRegister`` of the whole arena, which takes long for a large host
tier (the driver locks and maps every page): paid inside the first request's
step, that is seconds of time-to-first-token.  So each worker watches for the
arena from start-up, in a thread, and maps and pins it as soon as it appears:

    early = EarlyAttach(path, nbytes, device)   # at register_kv_caches
    got = early.take(info)     # the first step's ArenaInfo: (arena, pin) or None
    early.close()              # shutdown before any step

``take`` hands over what the thread attached only when it is the file the
scheduler created (same device and inode): a file left by a killed engine
with the same id is never adopted (the thread also ignores files created
before this worker started).  Anything that goes wrong in the thread leaves
``take`` returning None, and the worker attaches at the first step as before.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from .metadata import ArenaInfo
from .shm import SharedArena

log = logging.getLogger(__name__)

POLL_S = 0.05
WATCH_S = 1800.0       # give up watching after this long (the worker then attaches at its first step)
CLOCK_SLACK_NS = 1_000_000_000   # file times are coarser than time.time_ns()


def attach(path: str, nbytes: int, device=None) -> tuple[SharedArena, object]:
    """Map the arena and, for a CUDA device, pin it (on this thread, for that device):
    (arena, pin or None).  Nothing is left mapped when pinning fails: its KVTierError
    names RLIMIT_MEMLOCK where that limit is the likely cause."""
    arena = SharedArena.attach(path, nbytes)
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return arena, None
    try:
        import torch
        from ...gpu.pinning import pin_host_range
        torch.cuda.set_device(device)              # the calling thread's current device
        pin = pin_host_range(arena.base, nbytes)
        if pin is not None:
            pin.check()
    except BaseException:
        arena.close()
        raise
    return arena, pin


def release(arena: SharedArena | None, pin) -> None:
    """Undo :func:`attach`: unpin, then unmap (either may be None)."""
    if pin is not None:
        pin.close()
    if arena is not None:
        arena.close()


class EarlyAttach:
    def __init__(self, path: str, nbytes: int, device=None, watch_s: float = WATCH_S):
        self.path, self.nbytes, self.device = path, nbytes, device
        self._not_before = time.time_ns() - CLOCK_SLACK_NS
        self._deadline = time.monotonic() + watch_s
        self._stop = threading.Event()
        self._arena: SharedArena | None = None
        self._pin = None
        self.seconds: float | None = None     # how long attaching (and pinning) took
        self._thread = threading.Thread(target=self._run, name="kvtier-early-attach", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_size == self.nbytes and st.st_ctime_ns >= self._not_before:
                self._attach()
                return
            self._stop.wait(POLL_S)

    def _attach(self) -> None:
        t0 = time.perf_counter()
        try:
            self._arena, self._pin = attach(self.path, self.nbytes, self.device)
        except Exception as e:   # gone again, resized, RLIMIT_MEMLOCK: the first step attaches (and raises)
            log.info("kvtier: early attach of %s failed (%s); attaching at the first step", self.path, e)
            return
        self.seconds = time.perf_counter() - t0
        log.info("kvtier: host arena %s mapped%s before the first step (%.2f s)", self.path,
                 " and pinned" if self._pin is not None else "", self.seconds)

    def take(self, info: ArenaInfo) -> tuple[SharedArena, object] | None:
        """What the thread attached, if it is the arena ``info`` names; else None (and it is dropped).

        Stops the watch: a thread still pinning is waited for (the first step would
        pay that time anyway)."""
        self._stop.set()
        self._thread.join()
        arena = self._arena
        if arena is None or info.identity is None or arena.identity != tuple(info.identity) \
                or info.path != self.path or info.nbytes != self.nbytes:
            self._drop()
            return None
        got = (arena, self._pin)
        self._arena = self._pin = None
        return got

    def _drop(self) -> None:
        release(self._arena, self._pin)
        self._arena = self._pin = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drop()
