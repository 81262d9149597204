"""HostStream: a CUDA stream's contract on the CPU, for copies that run on host threads.

    s = host_streams()["load"]          # one per direction, shared by the process
    s.submit(transfer, fn)              # returns at once; fn() runs on the stream's thread
    s.flush()                           # wait for everything submitted so far

Jobs of one stream run one at a time, in submission order, so the layers of a
layer-wise load complete in layer order, as they do on a CUDA stream.  Loads
and stores have a stream each, as on CUDA, so a long store never delays the
load a step waits for.  The copies themselves are native span copies (their
own thread pool, the GIL released) or torch copies; ``fn`` returning is
success, an exception is a failed transfer carrying its message, never an
exception in the submitter.

Threads start on first use, are daemons, and are started again in a child
after ``fork`` (threads do not survive it).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable

from .transfer import Transfer

log = logging.getLogger(__name__)

DIRECTIONS = ("load", "store")


class HostStream:
    """One FIFO transfer thread."""

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.num_jobs = 0

    def submit(self, transfer: Transfer, fn: Callable[[], None]) -> Transfer:
        """Run ``fn`` on this stream after every job submitted before it; ``transfer``
        completes when it returns (ok) or raises (failed)."""
        self._start()
        self._jobs.put((transfer, fn))
        return transfer

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job submitted before this call has run."""
        marker = Transfer("flush", 0, 0)
        self.submit(marker, lambda: None)
        return marker.wait(timeout)

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"kvtier-{self.name}",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            t, fn = self._jobs.get()
            if t is None:
                return
            t0 = time.perf_counter()
            try:
                fn()
            except BaseException as e:  # the boundary: a failed copy is a failed transfer
                t.finish(False, error=f"{type(e).__name__}: {e}")
            else:
                t.finish(True, seconds=time.perf_counter() - t0)
            self.num_jobs += 1

    def close(self, timeout: float | None = 10.0) -> None:
        """Run what was submitted, then stop the thread."""
        th = self._thread
        if th is None or not th.is_alive():
            return
        self._jobs.put((None, None))
        th.join(timeout)


_STREAMS: dict[str, HostStream] = {}
_PID = None
_LOCK = threading.Lock()


def host_streams() -> dict[str, HostStream]:
    """The process's host streams, ``{"load": ..., "store": ...}``."""
    global _STREAMS, _PID
    with _LOCK:
        if _PID != os.getpid():
            _STREAMS = {d: HostStream(d) for d in DIRECTIONS}
            _PID = os.getpid()
        return _STREAMS
