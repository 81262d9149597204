"""CUDA copies of KV spans: the only module that imports CuPy.

Two mechanisms move a batch of (source, destination, bytes) spans between
device memory and pinned host memory (or device memory):

    dma      the copy engines.  cudaMemcpyBatchAsync submits every span in one
             call where the CUDA runtime has it (12.8+; its signature lost the
             ``failIdx`` argument in 13.0, both are handled); otherwise one
             cudaMemcpyAsync per coalesced span.
    kernel   ``kvtier_copy_chunks`` from kvtier/gpu/kv_copy.cu (package data), compiled at run time
             by NVRTC through ``cupy.RawModule`` (CuPy caches the binary on
             disk): spans are cut into 64 KiB chunks, the chunk table goes to
             the device in one copy, one launch moves them all.  Host memory
             must be pinned and mapped (unified addressing: same pointer).

Each device has two dedicated non-blocking streams, one for loads and one for
stores, so both directions can use the two copy engines at once.  A transfer
first makes its stream wait on an event recorded on the engine's compute
stream (it sees every write issued there before it), then records timing
events around the copy; completion is polled with ``cudaEventQuery`` and never
blocks.  The engine's compute stream waits for a load with
:meth:`CudaTransfer.wait_on_stream`, on the device, without a host sync.

Without CuPy the module still imports (its numpy helpers are CPU code), the
span copier falls back to torch, and an explicit dma or kernel raises
MissingDependencyError naming the extra.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from .cudart import BatchMemcpy
from ..errors import ConfigError, MissingDependencyError
from ..extras import require
from .transfer import Transfer
from .cost import CostModel
from ..layout import Spans

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 10
THREADS = 512
_KIND_H2D, _KIND_DEFAULT = 1, 4
_STREAM_NON_BLOCKING = 1
_NOT_READY = 600
_MEM_HOST, _MEM_DEVICE, _MEM_MANAGED = 1, 2, 3
SOURCE = Path(__file__).resolve().with_name("kv_copy.cu")   # package data


def _cupy():
    return require("cupy", "copying KV pages with CUDA DMA or kernels")


def available() -> bool:
    """CuPy imports and sees at least one CUDA device."""
    try:
        cupy = _cupy()
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "not here"
        return False


def chunk_table(spans: Spans, chunk: int = CHUNK_BYTES) -> np.ndarray:
    """The kernel's table: uint64 [src..., dst..., len...] of chunks of at most ``chunk`` bytes.

    Chunks start at multiples of ``chunk`` inside each span, so a span's
    alignment carries over to its chunks.
    """
    lens = spans.lengths.astype(np.uint64)
    counts = ((lens + np.uint64(chunk - 1)) // np.uint64(chunk)).astype(np.int64)
    n = int(counts.sum())
    owner = np.repeat(np.arange(lens.size), counts)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    off = (np.arange(n, dtype=np.int64) - np.repeat(first, counts)).astype(np.uint64) * np.uint64(chunk)
    out = np.empty(3 * n, dtype=np.uint64)
    out[:n] = spans.src[owner] + off
    out[n:2 * n] = spans.dst[owner] + off
    out[2 * n:] = np.minimum(np.uint64(chunk), lens[owner] - off)
    return out


# ---- transfers ------------------------------------------------------------------------

class CudaTransfer(Transfer):
    """A copy in flight on a CUDA stream; ``done()`` polls its end event."""

    def __init__(self, mechanism: str, spans: Spans, runtime, start: int, end: int, keep: tuple):
        super().__init__(mechanism, spans.nbytes, len(spans))
        self._rt = runtime
        self._start, self._end = start, end
        self._keep = keep                   # tables the device still reads until the end event
        self._lock = threading.Lock()       # done() may release the events while another thread waits

    def done(self) -> bool:
        if self.ok is not None:
            return True
        with self._lock:
            return self._poll()

    def _poll(self) -> bool:
        if self.ok is not None:
            return True
        status = self._rt.eventQuery(self._end)
        if status == _NOT_READY:
            return False
        if status == 0:
            ms = self._rt.eventElapsedTime(self._start, self._end)
            self._release()
            self.finish(True, seconds=ms / 1e3)
        else:
            self._release()
            self.finish(False, error=f"cudaEventQuery returned error {status}")
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until done; without a timeout the runtime waits (exact), else poll every <= 50 us."""
        if timeout is None:
            with self._lock:
                if self.ok is None:
                    self._rt.eventSynchronize(self._end)
                    self._poll()
            return True
        deadline = time.monotonic() + timeout
        pause = 10e-6
        while not self.done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 50e-6)
        return True

    def wait_on_stream(self, stream=None) -> None:
        if stream is None:
            import torch
            stream = torch.cuda.current_stream().cuda_stream
        with self._lock:
            if self.ok is not None:
                return                      # already complete: nothing to order
            self._rt.streamWaitEvent(stream if isinstance(stream, int) else stream.cuda_stream, self._end, 0)

    def _release(self) -> None:
        for ev in (self._start, self._end):
            self._rt.eventDestroy(ev)
        self._keep = ()

    def __del__(self):
        if self.ok is None and getattr(self, "_keep", ()):
            try:
                self._rt.eventSynchronize(self._end)   # the device may still read our tables
                self._release()
            except Exception:
                pass


class DeviceCopier:
    """Streams, compiled kernels and the batch-copy entry point for one device."""

    def __init__(self, index: int):
        cupy = _cupy()
        self.cupy = cupy
        self.rt = cupy.cuda.runtime
        self.index = index
        with cupy.cuda.Device(index):
            self.streams = {d: cupy.cuda.Stream(non_blocking=True) for d in ("load", "store")}
            self.sm_count = self.rt.getDeviceProperties(index)["multiProcessorCount"]
        self.kernel_blocks = self.sm_count
        self._module = None
        self._lock = threading.Lock()
        self.batch = BatchMemcpy.load()
        self.batch_failures = 0
        self.cost = CostModel(("dma", "kernel"))
        log.debug("cuda:%d: %d SMs, cudaMemcpyBatchAsync %s", index, self.sm_count,
                  f"(runtime {self.batch.version})" if self.batch else "unavailable")

    def _kernel(self, name: str):
        with self._lock:
            if self._module is None:
                self._module = self.cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",))
            return self._module.get_function(name)

    def _reachable(self, addr: int) -> bool:
        try:
            a = self.rt.pointerGetAttributes(int(addr))
        except self.rt.CUDARuntimeError:
            return False
        if a.type in (_MEM_DEVICE, _MEM_MANAGED):
            return True
        return a.type == _MEM_HOST and a.devicePointer == int(addr)

    def kernel_can_reach(self, spans: Spans) -> bool:
        """Both ends of the spans are device memory or pinned, mapped host memory."""
        if len(spans) == 0:
            return True
        ends = {int(spans.src[0]), int(spans.dst[0]), int(spans.src[-1]), int(spans.dst[-1])}
        return all(self._reachable(a) for a in ends)

    def submit(self, spans: Spans, mechanism: str, direction: str, after: int | None) -> Transfer:
        """Queue the copy on the direction's stream, after the ``after`` stream's current work."""
        if mechanism == "kernel" and not self.kernel_can_reach(spans):
            raise ConfigError("mechanism", "kernel", "device memory or pinned host memory on both sides "
                              "(a buffer here is pageable: use dma)")
        stream = self.streams["load" if direction == "load" else "store"]
        rt = self.rt
        keep: tuple = (spans,)
        start = end = None
        try:
            with self.cupy.cuda.Device(self.index):
                if after is not None:
                    ready = rt.eventCreateWithFlags(2)      # ordering only: no timing
                    rt.eventRecord(ready, after)
                    rt.streamWaitEvent(stream.ptr, ready, 0)
                    rt.eventDestroy(ready)                  # released once the wait is satisfied
                start, end = rt.eventCreate(), rt.eventCreate()
                rt.eventRecord(start, stream.ptr)
                if len(spans):
                    keep = self._dma(spans, stream) if mechanism == "dma" else self._launch(spans, stream)
                rt.eventRecord(end, stream.ptr)
        except Exception as e:  # the boundary: a CUDA error is a failed transfer, not a crash
            t = Transfer(mechanism, spans.nbytes, len(spans))
            for ev in (start, end):
                if ev is not None:
                    rt.eventDestroy(ev)
            t.finish(False, error=f"{type(e).__name__}: {e}")
            return t
        return CudaTransfer(mechanism, spans, rt, start, end, keep)

    def _dma(self, spans: Spans, stream) -> tuple:
        src = np.ascontiguousarray(spans.src, dtype=np.uint64)
        dst = np.ascontiguousarray(spans.dst, dtype=np.uint64)
        lens = np.ascontiguousarray(spans.lengths, dtype=np.uint64)
        if self.batch is not None and lens.size > 1:
            status = self.batch(dst, src, lens, stream.ptr)
            if status == 0:
                return (src, dst, lens)
            # re-issuing every span below is safe: the copies are idempotent
            self.batch_failures += 1
            if self.batch_failures == 1:
                log.warning("cuda:%d: cudaMemcpyBatchAsync failed (error %d); this transfer and any "
                            "other it refuses go through cudaMemcpyAsync per span", self.index, status)
        memcpy = self.rt.memcpyAsync
        for s, d, n in zip(src.tolist(), dst.tolist(), lens.tolist()):
            memcpy(d, s, n, _KIND_DEFAULT, stream.ptr)
        return (src, dst, lens)

    def _launch(self, spans: Spans, stream) -> tuple:
        table = chunk_table(spans)
        n = table.size // 3
        host = self.cupy.cuda.alloc_pinned_memory(table.nbytes)
        hv = np.frombuffer(host, dtype=np.uint64, count=table.size)
        hv[:] = table
        dev = self.cupy.cuda.alloc(table.nbytes)
        self.rt.memcpyAsync(dev.ptr, hv.ctypes.data, table.nbytes, _KIND_H2D, stream.ptr)
        grid = max(1, min(n, self.kernel_blocks))
        fn = self._kernel("kvtier_copy_chunks")
        with stream:                        # CuPy launches on its current stream
            fn((grid,), (THREADS,), (np.uint64(dev.ptr), np.uint64(n)))
        return (host, dev, spans)

    def copy_spans_sync(self, spans: Spans, mechanism: str = "auto") -> None:
        """Copy and wait: ordered after torch's current stream (the synchronous span copier)."""
        import torch
        key = None
        if mechanism == "auto":
            key = self.cost.bucket("copy", spans.nbytes, len(spans))
            mechanism = self.cost.choose(key)
            if mechanism == "kernel" and not self.kernel_can_reach(spans):
                mechanism = "dma"
        t = self.submit(spans, mechanism, "store", torch.cuda.current_stream(self.index).cuda_stream)
        t.wait()
        if not t.ok:
            from ..errors import TierIOError
            raise TierIOError(f"cuda:{self.index} copy failed: {t.error}")
        if key is not None and t.seconds:
            self.cost.record(key, t.mechanism, t.nbytes, t.seconds)


_DEVICES: dict[int, DeviceCopier] = {}
_DEVICES_LOCK = threading.Lock()


def device_copier(index: int) -> DeviceCopier:
    """The (cached) copier of CUDA device ``index``."""
    with _DEVICES_LOCK:
        c = _DEVICES.get(index)
        if c is None:
            c = _DEVICES[index] = DeviceCopier(index)
        return c


def span_copier():
    """The synchronous copier that :func:`kvtier.gpu.span_copy.copy_spans` routes CUDA spans to.

    With CuPy: DMA or kernels, chosen per transfer by measured cost.  Without
    it (AUTO falls back quietly): the torch reference, one copy per span, with
    each side's memory identified by the CUDA runtime.  Neither: an error that
    names the extra to install.
    """
    import torch
    if available():
        def copy(spans: Spans) -> None:
            device_copier(torch.cuda.current_device()).copy_spans_sync(spans)
    else:
        from .cudart import PointerKinds
        from .torch_ref import copy_spans_torch
        kinds = PointerKinds.load()
        if kinds is None:
            _cupy()                                   # raises MissingDependencyError naming kvtier[cuda]
            raise MissingDependencyError("cupy", "cuda", "copying KV pages between CUDA tensors and host memory")
        log.info("CuPy is not installed: CUDA span copies go through torch, one copy per span "
                 "(pip install 'kvtier[cuda]' for batched DMA and copy kernels)")

        def where(addr) -> str:
            kind, ordinal = kinds(int(addr))
            return "cpu" if kind == "host" else f"cuda:{ordinal}"

        def copy(spans: Spans) -> None:
            if len(spans):
                copy_spans_torch(spans, where(spans.src[0]), where(spans.dst[0]))
    return copy
