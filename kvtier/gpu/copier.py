"""KVCopier: the one asynchronous copier between engine KV pages and tier slots.

One copier serves one engine's KV tensors (a :class:`~kvtier.layout.BlockLayout`)
and one kind of slot buffer (host memory, or device memory of a GPU pool):

    copier = KVCopier(layout, mechanism="auto", buffer_device="cpu", compute_stream=None)
    t = copier.store(block_ids, slot_addrs)    # engine pages -> slots; a Transfer
    t = copier.load(block_ids, slot_addrs)     # slots -> engine pages
    t.done() / t.wait(timeout) / t.ok          # poll / block / outcome (never raises)
    t.wait_on_stream(stream)                   # the compute stream waits for the copy

    lw = copier.load_layers(block_ids, slot_addrs)   # one transfer per layer, in order
    lw.wait_for_layer(i)          # layer i's bytes are in place for the compute stream
    copier.save_layer(i, block_ids, slot_addrs)      # store one layer's pages
    copier.flush(timeout)         # wait for every transfer submitted so far

No call blocks on a copy.  On CUDA a transfer is enqueued on a side stream
(one for loads, one for stores) after an event recorded on the compute stream
at submission, so a store sees every write the compute stream issued before
the call.  On the CPU a transfer runs on a host transfer thread
(:mod:`kvtier.gpu.host_stream`, one per direction, in submission order).
A copy that fails finishes with ``ok=False`` and an error string.  At most
``max_inflight`` transfers are in flight: submitting another first waits for
the oldest (back-pressure, not an unbounded queue).

Every copy is reduced to coalesced (source, destination, bytes) spans and
runs through a mechanism:

    native   host memcpy on kvtier's thread pool (CPU tensors, host buffers)
    torch    the pure-torch reference (kvtier.gpu.torch_ref); any device, any buffer
    dma      the GPU copy engines: cudaMemcpyBatchAsync, or cudaMemcpyAsync per span
    kernel   one gather/scatter kernel launch per batch (kvtier/gpu/kv_copy.cu)

``auto`` picks per transfer by measured cost (:class:`CostModel`); an explicit
mechanism that cannot run here fails loudly at construction.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Sequence

import numpy as np

from .. import native
from ..errors import ConfigError
from ..layout import BlockLayout, Spans
from .cost import CostModel
from .host_stream import host_streams
from .transfer import LayerwiseLoad, Transfer

log = logging.getLogger(__name__)

MECHANISMS = ("auto", "native", "torch", "dma", "kernel")
CPU_MECHANISMS = ("native", "torch")
CUDA_MECHANISMS = ("dma", "kernel", "torch")
MAX_INFLIGHT = 256


class KVCopier:
    """Copies between an engine's KV pages and slot buffers; see the module docstring."""

    def __init__(self, layout: BlockLayout, mechanism: str = "auto", buffer_device="cpu",
                 compute_stream=None, *, candidates: Sequence[str] | None = None,
                 cost_model: CostModel | None = None, max_inflight: int = MAX_INFLIGHT):
        if mechanism not in MECHANISMS:
            raise ConfigError("mechanism", mechanism, "one of " + ", ".join(MECHANISMS))
        if not isinstance(max_inflight, int) or max_inflight < 1:
            raise ConfigError("max_inflight", max_inflight, "an int >= 1")
        self.layout = layout
        self.device = layout.device
        self.buffer_device = str(buffer_device)
        on_cuda = self.device.type == "cuda"
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError("kv_caches.device", str(self.device), "cpu or cuda tensors")
        usable = self._usable(on_cuda, mechanism)
        if mechanism != "auto" and mechanism not in usable:
            raise ConfigError("mechanism", mechanism,
                              f"one that runs on {self.device.type} tensors here: " + ", ".join(usable))
        if candidates is None:
            candidates = [m for m in (("dma", "kernel") if on_cuda else ("native",)) if m in usable] \
                or ["torch"]
        bad = [m for m in candidates if m not in usable]
        if bad:
            raise ConfigError("candidates", bad, "mechanisms that run here: " + ", ".join(usable))
        self.mechanism = mechanism
        self.usable = usable
        self.candidates = tuple(candidates)
        self.cost = cost_model or CostModel(self.candidates)
        self.compute_stream = compute_stream
        self.max_inflight = max_inflight
        self._cuda = None
        wanted = {mechanism, *self.candidates}
        if on_cuda and wanted & {"dma", "kernel"}:
            from . import cuda_copy
            self._cuda = cuda_copy.device_copier(self._index())
            if "kernel" in wanted:
                self._compile_kernel(mechanism)
        self._host = host_streams()
        self._side: dict[str, object] = {}  # torch streams of the torch mechanism on CUDA
        self._inflight: deque = deque()
        self._lock = threading.Lock()
        self.num_transfers = 0
        self.num_failed = 0
        # per-layer layouts for layer-wise transfers; layer l's page starts after layers 0..l-1
        self._layers: list[BlockLayout] | None = None
        self._layer_offsets = np.concatenate(([0], np.cumsum(layout.page_bytes)[:-1])).astype(np.uint64)

    def _compile_kernel(self, mechanism: str) -> None:
        """NVRTC now, not inside the first timed transfer.  An explicit ``kernel`` that does
        not compile fails loudly; under ``auto`` the kernel quietly leaves the candidates."""
        try:
            self._cuda.compile()
        except Exception as e:
            if mechanism == "kernel":
                raise ConfigError("mechanism", "kernel", f"a kernel that compiles here ({e})") from e
            log.warning("the copy kernel does not compile (%s): auto uses DMA only", e)
            self.candidates = tuple(m for m in self.candidates if m != "kernel") or ("dma",)
            self.cost = CostModel(self.candidates)

    def _index(self) -> int:
        if self.device.index is not None:
            return self.device.index
        import torch
        return torch.cuda.current_device()

    @staticmethod
    def _usable(on_cuda: bool, mechanism: str) -> tuple[str, ...]:
        if not on_cuda:
            return CPU_MECHANISMS
        from . import cuda_copy
        if cuda_copy.available():
            return CUDA_MECHANISMS
        if mechanism in ("dma", "kernel"):
            cuda_copy.require_cupy()        # an explicit CUDA mechanism without CuPy names the extra
        return ("torch",)

    # ---- whole blocks ------------------------------------------------------------------
    def store(self, block_ids, slot_addrs, mechanism: str | None = None) -> Transfer:
        """Engine pages of ``block_ids`` -> the block buffers at ``slot_addrs``."""
        return self._submit(self.layout, block_ids, slot_addrs, False, mechanism)

    def load(self, block_ids, slot_addrs, mechanism: str | None = None) -> Transfer:
        """The block buffers at ``slot_addrs`` -> engine pages of ``block_ids``."""
        return self._submit(self.layout, block_ids, slot_addrs, True, mechanism)

    # ---- layer-wise --------------------------------------------------------------------
    def _layer_layout(self, layer: int) -> BlockLayout:
        if not 0 <= layer < self.layout.num_layers:
            raise ConfigError("layer", layer, f"a layer index in [0, {self.layout.num_layers})")
        if self._layers is None:
            self._layers = [BlockLayout([t], self.layout.block_dim) for t in self.layout.tensors]
        return self._layers[layer]

    def save_layer(self, layer: int, block_ids, slot_addrs, mechanism: str | None = None) -> Transfer:
        """Store one layer's pages into its part of each block buffer."""
        lay = self._layer_layout(layer)
        addrs = np.asarray(slot_addrs, dtype=np.uint64) + self._layer_offsets[layer]
        return self._submit(lay, block_ids, addrs, False, mechanism)

    def load_layer(self, layer: int, block_ids, slot_addrs, mechanism: str | None = None) -> Transfer:
        """Load one layer's part of each block buffer into its pages."""
        lay = self._layer_layout(layer)
        addrs = np.asarray(slot_addrs, dtype=np.uint64) + self._layer_offsets[layer]
        return self._submit(lay, block_ids, addrs, True, mechanism)

    def load_layers(self, block_ids, slot_addrs, mechanism: str | None = None) -> LayerwiseLoad:
        """Submit one load per layer, in layer order, each with its own completion."""
        ids = self.layout.check_block_ids(block_ids)
        return LayerwiseLoad([self.load_layer(l, ids, slot_addrs, mechanism)
                              for l in range(self.layout.num_layers)])

    # ---- in flight ---------------------------------------------------------------------
    def _admit(self) -> None:
        """Drop finished transfers from the front; at the bound, wait for the oldest."""
        with self._lock:
            q = self._inflight
            while q and q[0].done():
                q.popleft()
            while len(q) >= self.max_inflight:
                q[0].wait()
                q.popleft()
                while q and q[0].done():
                    q.popleft()

    def pending(self) -> int:
        """Transfers submitted and not yet seen complete."""
        with self._lock:
            return sum(1 for t in self._inflight if not t.done())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for every transfer submitted so far; False if ``timeout`` passed first."""
        with self._lock:
            pending = list(self._inflight)
        ok = LayerwiseLoad(pending).wait(timeout)
        if ok:
            self._admit()
        return ok

    close = flush

    # ---- submission --------------------------------------------------------------------
    def _submit(self, layout: BlockLayout, block_ids, slot_addrs, to_engine: bool,
                mechanism: str | None) -> Transfer:
        mech = mechanism or self.mechanism
        if mech != "auto" and mech not in self.usable:
            raise ConfigError("mechanism", mech, f"one that runs on {self.device.type} tensors here: "
                              + ", ".join(("auto",) + self.usable))
        ids = layout.check_block_ids(block_ids)
        addrs = np.asarray(slot_addrs, dtype=np.uint64)
        if addrs.shape != ids.shape:
            raise ConfigError("slot_addrs", addrs.size, f"one buffer per block ({ids.size})")
        spans = layout.spans(ids, addrs, to_engine=to_engine)
        direction = "load" if to_engine else "store"
        key = None
        if mech == "auto":
            key = self.cost.bucket(direction, spans.nbytes, len(spans))
            mech = self.cost.choose(key)
            if mech == "kernel" and not self._cuda.kernel_can_reach(spans):
                mech = "dma" if "dma" in self.candidates else "torch"
        if mech in ("dma", "kernel") and self._cuda is None:
            from . import cuda_copy
            self._cuda = cuda_copy.device_copier(self._index())
        self.num_transfers += 1
        if len(spans) == 0:
            t = Transfer(mech, 0, 0)
            t.finish(True, seconds=0.0)
            return t
        self._admit()
        if key is not None:
            record = self._recorder(key)
        else:
            record = self._count_failures
        if mech in ("dma", "kernel"):
            t = self._cuda.submit(spans, mech, direction, after=self._after_stream())
            if t.ok is None:
                t.on_done = record
            else:
                record(t, t.ok)
        else:
            t = Transfer(mech, spans.nbytes, len(spans))
            t.on_done = record
            try:
                job = self._host_job(mech, layout, ids, addrs, spans, to_engine, direction)
            except ConfigError:
                raise
            except Exception as e:   # e.g. no CUDA event could be recorded: a failed transfer
                t.finish(False, error=f"{type(e).__name__}: {e}")
                return t
            self._host[direction].submit(t, job)
        with self._lock:
            self._inflight.append(t)
        return t

    def _recorder(self, key):
        def record(t: Transfer, ok: bool) -> None:
            self._count_failures(t, ok)
            if ok and t.seconds:
                self.cost.record(key, t.mechanism, t.nbytes, t.seconds)
        return record

    def _count_failures(self, t: Transfer, ok: bool) -> None:
        if not ok:
            self.num_failed += 1

    def _host_job(self, mech: str, layout: BlockLayout, ids: np.ndarray, addrs: np.ndarray,
                  spans: Spans, to_engine: bool, direction: str):
        """What a host transfer thread runs for ``mech`` (native or torch)."""
        if mech == "native":
            if self.buffer_device != "cpu" or self.device.type != "cpu":
                raise ConfigError("mechanism", "native", "CPU tensors and host buffers")
            return lambda: native.copy_spans(spans.src, spans.dst, spans.lengths)
        from . import torch_ref               # imports torch: only when the torch mechanism runs
        copy = torch_ref.load if to_engine else torch_ref.store
        if self.device.type != "cuda":
            return lambda: copy(layout, ids, addrs, self.buffer_device)
        # torch on CUDA (no CuPy): the thread's copies go on a side stream that first waits
        # for an event recorded on the compute stream now, as the DMA path does
        import torch
        ready = torch.cuda.Event()
        ready.record(self._compute_stream_obj())
        side = self._side_stream(direction)

        def job():
            with torch.cuda.device(self.device), torch.cuda.stream(side):
                side.wait_event(ready)
                copy(layout, ids, addrs, self.buffer_device, sync=False)
            side.synchronize()
        return job

    def _side_stream(self, direction: str):
        s = self._side.get(direction)
        if s is None:
            import torch
            s = self._side[direction] = torch.cuda.Stream(self.device)
        return s

    def _compute_stream_obj(self):
        import torch
        s = self.compute_stream
        if s is None:
            return torch.cuda.current_stream(self.device)
        if isinstance(s, int):
            return torch.cuda.ExternalStream(s, device=self.device)
        return s

    def _after_stream(self) -> int | None:
        """Raw handle of the stream copies are ordered after (the engine's compute stream)."""
        s = self.compute_stream
        if s is None:
            import torch
            return torch.cuda.current_stream(self.device).cuda_stream
        return s if isinstance(s, int) else s.cuda_stream

    def stats(self) -> dict:
        d = {"mechanism": self.mechanism, "candidates": self.candidates, "choices": self.cost.summary(),
             "transfers": self.num_transfers, "failed": self.num_failed, "in_flight": self.pending()}
        if self._cuda is not None:
            d.update(self._cuda.stats())
        return d
