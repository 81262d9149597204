"""TransferEngine: moves bytes between media in the background.

Work is submitted as jobs to a bounded queue served by a few worker threads.
A job completes by polling (``done()``) or waiting (``wait()``); its outcome is
``ok`` plus an ``error`` string.  An exception raised by a job's function is
caught here, once, at this boundary: it becomes a failed job, logged with the
job id, and never reaches the caller's hot loop.  A full queue refuses new work
(``submit`` returns a job that has already failed): that is backpressure, and
the cache turns it into a dropped demotion or a failed load.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
from typing import Callable


log = logging.getLogger(__name__)

_ids = itertools.count(1)


class Job:
    """One unit of background work; completes exactly once."""
    __slots__ = ("id", "kind", "ok", "error", "_event", "_fn", "_on_done", "result")

    def __init__(self, kind: str, fn: Callable[[], object] | None,
                 on_done: Callable[["Job"], None] | None = None):
        self.id = next(_ids)
        self.kind = kind
        self.ok: bool | None = None
        self.error: str | None = None
        self.result: object = None
        self._event = threading.Event()
        self._fn = fn
        self._on_done = on_done

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done (or timeout); returns done()."""
        return self._event.wait(timeout)

    def _run(self) -> None:
        try:
            self.result = self._fn() if self._fn is not None else None
            self.ok = True
        except Exception as e:  # the one boundary where job failures are caught
            self.ok = False
            self.error = f"{type(e).__name__}: {e}"
            log.warning("transfer job %d (%s) failed: %s", self.id, self.kind, self.error)
        self._finish()

    def _fail(self, reason: str) -> None:
        self.ok = False
        self.error = reason
        self._finish()

    def _finish(self) -> None:
        try:
            if self._on_done is not None:
                self._on_done(self)
        except Exception:
            log.exception("transfer job %d (%s): completion callback failed", self.id, self.kind)
        finally:
            self._fn = self._on_done = None
            self._event.set()


class TransferEngine:
    """A bounded queue of jobs and the worker threads that run them."""

    def __init__(self, threads: int = 2, max_queued: int = 1024, name: str = "kvtier-xfer"):
        """``threads=0`` runs every job inline in ``submit`` (deterministic replays, tests)."""
        self._inline = threads == 0
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queued)
        self._pending = 0
        self._idle = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for w in self._workers:
            w.start()

    def submit(self, kind: str, fn: Callable[[], object],
               on_done: Callable[[Job], None] | None = None) -> Job:
        """Queue ``fn``; the returned job has already failed if the queue is full or closed."""
        job = Job(kind, fn, on_done)
        if self._inline:
            job._run()
            return job
        with self._idle:
            if self._closed:
                job._fail("transfer engine closed")
                return job
            self._pending += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()
            job._fail("transfer queue full")
        return job

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job._run()
            with self._idle:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has finished; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        with self._idle:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(timeout=30)
