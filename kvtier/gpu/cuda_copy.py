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

The kernel is compiled before the first transfer that may use it
(:meth:`DeviceCopier.compile`), never between a transfer's timing events.
Every span of a kernel transfer must be reachable from the device: every
distinct allocation it touches is checked (:meth:`DeviceCopier.kernel_can_reach`).
A batch call the runtime refuses falls back to one call per span; after
``BATCH_GIVE_UP`` identical refusals in a row it is no longer tried, and
``stats()`` reports ``batch`` (calls that worked) and ``batch_failures``.

Without CuPy the module still imports (its numpy helpers are CPU code), the
span copier falls back to torch, and an explicit dma or kernel raises
MissingDependencyError naming the extra (``kvtier[cuda13]`` under CUDA 13).
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingDependencyError
from ..extras import require
from ..layout import Spans
from . import pinning
from .cost import CostModel
from .cudart import BatchMemcpy
from .transfer import Transfer, failed

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 10
THREADS = 512
_KIND_H2D, _KIND_DEFAULT = 1, 4
_STREAM_NON_BLOCKING = 1
_NOT_READY = 600
_MEM_HOST, _MEM_DEVICE, _MEM_MANAGED = 1, 2, 3
GRANULE_SHIFT = 21          # device allocations never share a 2 MiB page of address space with host memory
BATCH_GIVE_UP = 3           # identical cudaMemcpyBatchAsync refusals in a row before it is no longer tried
SOURCE = Path(__file__).resolve().with_name("kv_copy.cu")   # package data


def cuda_extra() -> str:
    """The kvtier extra that brings the CuPy build for torch's CUDA: cuda13 under CUDA 13."""
    try:
        import torch
        major = int((torch.version.cuda or "12").split(".")[0])
    except (ImportError, ValueError):
        major = 12
    return "cuda13" if major >= 13 else "cuda"


def require_cupy():
    """CuPy, or MissingDependencyError naming the extra for this CUDA version."""
    needed_for = "copying KV pages with CUDA DMA or kernels"
    try:
        return require("cupy", needed_for)
    except MissingDependencyError as e:
        raise MissingDependencyError("cupy", cuda_extra(), needed_for) from e



def contiguous_ranges(addrs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last byte of each maximal run of touching or overlapping spans."""
    order = np.argsort(addrs, kind="stable")
    a = addrs[order].astype(np.uint64)
    end = np.maximum.accumulate(a + lengths[order].astype(np.uint64))
    brk = a[1:] > end[:-1]
    starts = a[np.concatenate(([True], brk))]
    lasts = end[np.concatenate((brk, [True]))] - np.uint64(1)
    return starts, lasts


def available() -> bool:
    """CuPy imports and sees at least one CUDA device."""
    try:
        cupy = require_cupy()
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
        cupy = require_cupy()
        self.cupy = cupy
        self.rt = cupy.cuda.runtime
        self.index = index
        with cupy.cuda.Device(index):
            self.streams = {d: cupy.cuda.Stream(non_blocking=True) for d in ("load", "store")}
            self.sm_count = self.rt.getDeviceProperties(index)["multiProcessorCount"]
        self.kernel_blocks = self.sm_count
        self._module = None
        self._functions: dict = {}
        self._lock = threading.Lock()            # compilation
        self._submit_lock = threading.Lock()     # one transfer's stream operations at a time
        self.batch_memcpy = BatchMemcpy.load()
        self.num_batch = 0                       # cudaMemcpyBatchAsync calls that worked
        self.batch_failures = 0                  # ... and that the runtime refused
        self.batch_disabled = False
        self._batch_last = (None, 0)             # (last refusal status, refusals in a row)
        self._device_granules: set[int] = set()  # 2 MiB pages known to hold device memory
        self.num_pointer_queries = 0
        self.cost = CostModel(("dma", "kernel"))
        log.debug("cuda:%d: %d SMs, cudaMemcpyBatchAsync %s", index, self.sm_count,
                  f"(runtime {self.batch_memcpy.version})" if self.batch_memcpy else "unavailable")

    # ---- kernels -----------------------------------------------------------------------
    def compile(self, name: str = "kvtier_copy_chunks"):
        """The compiled kernel ``name`` (NVRTC on first use; CuPy caches it on disk)."""
        with self._lock:
            fn = self._functions.get(name)
            if fn is None:
                if self._module is None:
                    with self.cupy.cuda.Device(self.index):
                        self._module = self.cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",))
                fn = self._functions[name] = self._module.get_function(name)
            return fn

    def _kind(self, addr: int) -> str | None:
        """"device" (or managed), "mapped" (pinned host memory at the same address), else None."""
        self.num_pointer_queries += 1
        try:
            a = self.rt.pointerGetAttributes(int(addr))
        except self.rt.CUDARuntimeError:
            return None
        if a.type in (_MEM_DEVICE, _MEM_MANAGED):
            return "device"
        return "mapped" if a.type == _MEM_HOST and a.devicePointer == int(addr) else None

    def _reach_all(self, points: np.ndarray) -> bool:
        if points.size and self._device_granules:
            known = np.fromiter(self._device_granules, dtype=np.uint64)
            points = points[~np.isin(points >> np.uint64(GRANULE_SHIFT), known)]
        for a in points.tolist():
            g = a >> GRANULE_SHIFT
            if g in self._device_granules:
                continue
            kind = self._kind(a)
            if kind == "device":
                self._device_granules.add(g)
            elif kind != "mapped":
                return False
        return True

    def kernel_can_reach(self, spans: Spans) -> bool:
        """Every byte the spans touch is device memory or pinned, mapped host memory.

        Each side is cut into maximal contiguous ranges, and the first and last
        byte of every range is checked, so every distinct allocation is asked
        about, not only the first and last span's.  Ranges inside memory this
        process pinned (:mod:`kvtier.gpu.pinning`) and 2 MiB pages already
        seen to be device memory need no call.
        """
        if len(spans) == 0:
            return True
        for side in (spans.src, spans.dst):
            starts, lasts = contiguous_ranges(side, spans.lengths)
            pts = np.unique(np.concatenate((starts, lasts)))
            pts = pts[~pinning.covered(pts)]
            if not self._reach_all(pts):
                return False
        return True

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
            fn = self.compile() if mechanism == "kernel" else None    # before the start event
        except Exception as e:  # NVRTC or the driver refused the module: a failed transfer
            return failed(mechanism, spans.nbytes, len(spans), f"{type(e).__name__}: {e}")
        try:
            with self._submit_lock, self.cupy.cuda.Device(self.index):
                if after is not None:
                    ready = rt.eventCreateWithFlags(2)      # ordering only: no timing
                    rt.eventRecord(ready, after)
                    rt.streamWaitEvent(stream.ptr, ready, 0)
                    rt.eventDestroy(ready)                  # released once the wait is satisfied
                start, end = rt.eventCreate(), rt.eventCreate()
                rt.eventRecord(start, stream.ptr)
                if len(spans):
                    keep = self._dma(spans, stream) if mechanism == "dma" else self._launch(spans, stream, fn)
                rt.eventRecord(end, stream.ptr)
        except Exception as e:  # the boundary: a CUDA error is a failed transfer, not a crash
            for ev in (start, end):
                if ev is not None:
                    rt.eventDestroy(ev)
            return failed(mechanism, spans.nbytes, len(spans), f"{type(e).__name__}: {e}")
        return CudaTransfer(mechanism, spans, rt, start, end, keep)

    def _dma(self, spans: Spans, stream) -> tuple:
        src = np.ascontiguousarray(spans.src, dtype=np.uint64)
        dst = np.ascontiguousarray(spans.dst, dtype=np.uint64)
        lens = np.ascontiguousarray(spans.lengths, dtype=np.uint64)
        if self.batch_memcpy is not None and not self.batch_disabled and lens.size > 1:
            status = self.batch_memcpy(dst, src, lens, stream.ptr)
            if status == 0:
                self.num_batch += 1
                self._batch_last = (None, 0)
                return (src, dst, lens)
            # re-issuing every span below is safe: the copies are idempotent
            self._batch_refused(status)
        memcpy = self.rt.memcpyAsync
        for s, d, n in zip(src.tolist(), dst.tolist(), lens.tolist()):
            memcpy(d, s, n, _KIND_DEFAULT, stream.ptr)
        return (src, dst, lens)

    def _batch_refused(self, status: int) -> None:
        self.batch_failures += 1
        last, run = self._batch_last
        run = run + 1 if status == last else 1
        self._batch_last = (status, run)
        if self.batch_failures == 1:
            log.warning("cuda:%d: cudaMemcpyBatchAsync failed (error %d); this transfer goes through "
                        "cudaMemcpyAsync per span", self.index, status)
        if run >= BATCH_GIVE_UP:
            self.batch_disabled = True
            log.warning("cuda:%d: cudaMemcpyBatchAsync refused %d times in a row with error %d: "
                        "no longer tried; every DMA transfer goes span by span", self.index, run, status)

    def stats(self) -> dict:
        """The batch path's record, for benchmark rows and the device check's environment file."""
        return {"batch": self.num_batch, "batch_failures": self.batch_failures,
                "batch_disabled": self.batch_disabled,
                "batch_runtime": getattr(self.batch_memcpy, "version", None)}

    def _launch(self, spans: Spans, stream, fn) -> tuple:
        table = chunk_table(spans)
        n = table.size // 3
        host = self.cupy.cuda.alloc_pinned_memory(table.nbytes)
        hv = np.frombuffer(host, dtype=np.uint64, count=table.size)
        hv[:] = table
        dev = self.cupy.cuda.alloc(table.nbytes)
        self.rt.memcpyAsync(dev.ptr, hv.ctypes.data, table.nbytes, _KIND_H2D, stream.ptr)
        grid = max(1, min(n, self.kernel_blocks))
        with stream:                        # CuPy launches on its current stream
            fn((grid,), (THREADS,), (np.uint64(dev.ptr), np.uint64(n)))
        return (host, dev, spans)


_DEVICES: dict[int, DeviceCopier] = {}
_DEVICES_LOCK = threading.Lock()


def device_copier(index: int) -> DeviceCopier:
    """The (cached) copier of CUDA device ``index``."""
    with _DEVICES_LOCK:
        c = _DEVICES.get(index)
        if c is None:
            c = _DEVICES[index] = DeviceCopier(index)
        return c
