"""Handles of submitted KV copies: a Transfer completes exactly once, polled
with ``done()``; a LayerwiseLoad is one Transfer per layer of the same batch."""
from __future__ import annotations

import logging
import time
from typing import Sequence

log = logging.getLogger("kvtier.gpu.copier")


class Transfer:
    """One submitted copy: completes exactly once, polled with ``done()``.

    ``ok`` is None while running, then True or False (``error`` says why).
    ``seconds`` is the measured copy time once done (device time on CUDA).
    """

    def __init__(self, mechanism: str, nbytes: int, num_spans: int):
        self.mechanism = mechanism
        self.nbytes = nbytes
        self.num_spans = num_spans
        self.ok: bool | None = None
        self.error: str | None = None
        self.seconds: float | None = None
        self.on_done = None

    def done(self) -> bool:
        return self.ok is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self.done()

    def wait_on_stream(self, stream=None) -> None:
        """Make ``stream`` (default: the compute stream) wait for this copy; no-op on CPU."""

    def finish(self, ok: bool, seconds: float | None = None, error: str | None = None) -> None:
        """Complete the transfer once (later calls are ignored) and run ``on_done`` if set;
        called by the mechanism that ran the copy."""
        if self.ok is not None:
            return
        self.seconds, self.error, self.ok = seconds, error, ok
        if not ok:
            log.warning("kv copy (%s, %d bytes) failed: %s", self.mechanism, self.nbytes, error)
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(self)


class LayerwiseLoad:
    """Per-layer loads of one batch: layer i completes independently of the others."""

    def __init__(self, transfers: Sequence[Transfer]):
        self.layers = list(transfers)

    def layer_done(self, layer: int) -> bool:
        return self.layers[layer].done()

    def wait_for_layer(self, layer: int, stream=None) -> bool:
        """Order the compute stream after layer ``layer``'s copy (CPU: already done).

        Returns False if that layer's copy failed: the engine must recompute.
        """
        t = self.layers[layer]
        if t.ok is False:
            return False
        t.wait_on_stream(stream)
        return t.ok is not False

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
        if any(t.ok is False for t in self.layers):
            return False
        return True if all(t.ok for t in self.layers) else None
