"""KVCopier: engine KV pages <-> tier slots, by whichever mechanism is cheapest.

One copier serves one engine's KV tensors (a :class:`~kvtier.layout.BlockLayout`)
and one kind of buffer (host slots, or device slots of a GPU pool):

    copier = KVCopier(layout, mechanism="auto")
    t = copier.store(block_ids, slot_addrs)    # engine pages -> slots; a Transfer
    t = copier.load(block_ids, slot_addrs)     # slots -> engine pages
    t.done() / t.wait()                        # poll, never blocks the caller's loop

    lw = copier.load_layers(block_ids, slot_addrs)   # one transfer per layer
    lw.wait_for_layer(i)          # the compute stream waits for layer i only
    copier.save_layer(i, block_ids, slot_addrs)      # store one layer's pages

Every copy is reduced to coalesced (source, destination, bytes) spans and
submitted through a mechanism:

    native   host memcpy on kvtier's thread pool (CPU tensors)
    torch    the pure-torch reference (kvtier.gpu.torch_ref); any device, any buffer
    dma      the GPU copy engines: cudaMemcpyBatchAsync, or cudaMemcpyAsync per span
    kernel   one gather/scatter kernel launch per batch (kvtier/gpu/kv_copy.cu)

``auto`` picks per transfer by measured cost (:class:`CostModel`); an explicit
mechanism that cannot run here fails loudly at construction.  On CUDA, copies
run on dedicated streams ordered after the engine's compute stream with events:
a store sees every write the compute stream issued before it, and a load's
completion event is what the compute stream waits on.  On CPU everything is
synchronous: a transfer is done when ``store``/``load`` return.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from .. import native
from ..errors import ConfigError
from ..layout import BlockLayout, Spans
from . import torch_ref
from .cost import CostModel
from .transfer import LayerwiseLoad, Transfer

log = logging.getLogger(__name__)

MECHANISMS = ("auto", "native", "torch", "dma", "kernel")
CPU_MECHANISMS = ("native", "torch")
CUDA_MECHANISMS = ("dma", "kernel", "torch")


class KVCopier:
    """Copies between an engine's KV pages and slot buffers; see the module docstring."""

    def __init__(self, layout: BlockLayout, mechanism: str = "auto", *, buffer_device="cpu",
                 compute_stream=None, candidates: Sequence[str] | None = None,
                 cost_model: CostModel | None = None):
        if mechanism not in MECHANISMS:
            raise ConfigError("mechanism", mechanism, "one of " + ", ".join(MECHANISMS))
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
        self._cuda = None
        if on_cuda and any(m in ("dma", "kernel") for m in (mechanism, *self.candidates)):
            from . import cuda_copy
            self._cuda = cuda_copy.device_copier(self.device.index if self.device.index is not None else 0)
        self.compute_stream = compute_stream
        # per-layer layouts for layer-wise transfers; layer l's page starts after layers 0..l-1
        self._layers: list[BlockLayout] | None = None
        self._layer_offsets = np.concatenate(([0], np.cumsum(layout.page_bytes)[:-1])).astype(np.uint64)

    @staticmethod
    def _usable(on_cuda: bool, mechanism: str) -> tuple[str, ...]:
        if not on_cuda:
            return CPU_MECHANISMS
        from . import cuda_copy
        if cuda_copy.available():
            return CUDA_MECHANISMS
        if mechanism in ("dma", "kernel"):
            cuda_copy._cupy()                   # an explicit CUDA mechanism without CuPy names the extra
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
        addrs = np.asarray(slot_addrs, dtype=np.uint64) + self._layer_offsets[layer]
        return self._submit(self._layer_layout(layer), block_ids, addrs, False, mechanism)

    def load_layer(self, layer: int, block_ids, slot_addrs, mechanism: str | None = None) -> Transfer:
        addrs = np.asarray(slot_addrs, dtype=np.uint64) + self._layer_offsets[layer]
        return self._submit(self._layer_layout(layer), block_ids, addrs, True, mechanism)

    def load_layers(self, block_ids, slot_addrs, mechanism: str | None = None) -> LayerwiseLoad:
        """Submit one load per layer, in layer order, each with its own completion."""
        ids = self.layout.check_block_ids(block_ids)
        return LayerwiseLoad([self.load_layer(l, ids, slot_addrs, mechanism)
                              for l in range(self.layout.num_layers)])

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
            self._cuda = cuda_copy.device_copier(self.device.index or 0)
        t = self._run(mech, layout, ids, addrs, spans, to_engine, direction)
        if key is not None:
            record = lambda tr, key=key: (tr.ok and tr.seconds is not None and
                                          self.cost.record(key, tr.mechanism, tr.nbytes, tr.seconds))
            if t.ok is None:
                t.on_done = record         # measured when a poll sees it complete
            else:
                record(t)                   # finished synchronously (CPU, or failed at submission)
        return t

    def _run(self, mech: str, layout: BlockLayout, ids: np.ndarray, addrs: np.ndarray, spans: Spans,
             to_engine: bool, direction: str) -> Transfer:
        if mech in ("dma", "kernel"):
            return self._cuda.submit(spans, mech, direction, after=self._after_stream())
        t = Transfer(mech, spans.nbytes, len(spans))
        t0 = time.perf_counter()
        try:
            if mech == "native":
                if self.buffer_device != "cpu":
                    raise ConfigError("mechanism", "native", "host buffers (buffer_device='cpu')")
                native.copy_spans(spans.src, spans.dst, spans.lengths)
            elif to_engine:
                torch_ref.load(layout, ids, addrs, self.buffer_device)
            else:
                torch_ref.store(layout, ids, addrs, self.buffer_device)
        except ConfigError:
            raise
        except Exception as e:  # the one boundary where copy failures become failed transfers
            t.finish(False, error=f"{type(e).__name__}: {e}")
            return t
        t.finish(True, seconds=time.perf_counter() - t0)
        return t

    def _after_stream(self) -> int | None:
        """Raw handle of the stream copies are ordered after (the engine's compute stream)."""
        s = self.compute_stream
        if s is None:
            import torch
            return torch.cuda.current_stream(self.device).cuda_stream
        return s if isinstance(s, int) else s.cuda_stream

    def stats(self) -> dict:
        return {"mechanism": self.mechanism, "candidates": self.candidates, "choices": self.cost.summary()}
