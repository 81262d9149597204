"""Handles of submitted KV copies.

    t = copier.store(...)        # a Transfer, returned before any byte moves
    t.done()                     # poll: never blocks
    t.wait(timeout)              # block the host until done (True) or timeout (False)
    t.ok, t.error                # after done: True, or False with the reason
    t.wait_on_stream(stream)     # order a CUDA stream after the copy (CPU: blocks the host)

    lw = copier.load_layers(...) # a LayerwiseLoad: one Transfer per layer, in layer order
    lw.wait_for_layer(i)         # layer i's bytes are in place for what comes next

A Transfer completes exactly once.  A copy that fails completes with
``ok=False`` and an ``error`` string; no method here raises because a copy
failed.  A :class:`Transfer` is completed by whoever runs the copy (a host
transfer thread, or the submitter when the copy failed before it started);
:class:`kvtier.gpu.cuda_copy.CudaTransfer` completes by polling its end event.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

log = logging.getLogger("kvtier.gpu.copier")


class Transfer:
    """One submitted copy: ``ok`` is None while running, then True or False (``error`` says why).

    ``seconds`` is the measured copy time once done (device time on CUDA,
    thread time on the host).
    """

    def __init__(self, mechanism: str, nbytes: int, num_spans: int):
        self.mechanism = mechanism
        self.nbytes = nbytes
        self.num_spans = num_spans
        self.ok: bool | None = None
        self.error: str | None = None
        self.seconds: float | None = None
        self.on_done = None
        self._event = threading.Event()

    def done(self) -> bool:
        return self.ok is not None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the copy is done; False if ``timeout`` seconds passed first."""
        return self._event.wait(timeout)

    def wait_on_stream(self, stream=None) -> None:
        """Order ``stream`` after this copy.  A host copy has no event a stream could wait
        on, so the host waits for it instead (it returns once the bytes are in place)."""
        self.wait()

    def finish(self, ok: bool, seconds: float | None = None, error: str | None = None) -> None:
        """Complete the transfer once (later calls are ignored) and run ``on_done`` if set;
        called by the mechanism that ran the copy."""
        if self.ok is not None:
            return
        self.seconds, self.error = seconds, error
        if not ok:
            log.warning("kv copy (%s, %d bytes) failed: %s", self.mechanism, self.nbytes, error)
        cb, self.on_done = self.on_done, None
        if cb is not None:
            try:
                cb(self, ok)
            except Exception:      # a bookkeeping hook must not turn a copy into a failure
                log.exception("kv copy completion hook failed")
        self.ok = ok
        self._event.set()

    def __repr__(self) -> str:
        state = {None: "running", True: "ok", False: f"failed: {self.error}"}[self.ok]
        return f"<Transfer {self.mechanism} {self.nbytes} bytes {state}>"


def failed(mechanism: str, nbytes: int, num_spans: int, error: str) -> Transfer:
    """A transfer that failed before it started."""
    t = Transfer(mechanism, nbytes, num_spans)
    t.finish(False, error=error)
    return t


class LayerwiseLoad:
    """Per-layer loads of one batch: layer i completes independently of the others."""

    def __init__(self, transfers: Sequence[Transfer]):
        self.layers = list(transfers)
        self.nbytes = sum(t.nbytes for t in self.layers)

    def layer_done(self, layer: int) -> bool:
        return self.layers[layer].done()

    def wait_for_layer(self, layer: int, stream=None) -> bool:
        """Make what runs next see layer ``layer``'s bytes.

        CUDA: ``stream`` (default: the compute stream) waits for the layer's
        event on the device; the host does not block.  Host copies: the host
        blocks until the layer's copy is done.  Returns False if the copy
        failed (as far as is known now): the engine must recompute.
        """
        t = self.layers[layer]
        t.wait_on_stream(stream)
        return t.ok is not False

    def wait_on_stream(self, stream=None) -> None:
        """Order ``stream`` after every layer (the host waits for host copies)."""
        for t in self.layers:
            t.wait_on_stream(stream)

    def done(self) -> bool:
        return all(t.done() for t in self.layers)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.layers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not t.wait(left):
                return False
        return True

    @property
    def ok(self) -> bool | None:
        """False once any layer failed; True when every layer succeeded; else None."""
        if any(t.ok is False for t in self.layers):
            return False
        return True if all(t.ok for t in self.layers) else None

    @property
    def error(self) -> str | None:
        return next((f"layer {i}: {t.error}" for i, t in enumerate(self.layers) if t.ok is False), None)

    @property
    def seconds(self) -> float | None:
        s = [t.seconds for t in self.layers]
        return None if any(x is None for x in s) else sum(s)
