"""copy_spans: one synchronous batch of (source, destination, bytes) spans between engine memory and tier slots.

Routed by where the engine memory lives:

    cpu    the native memcpy on kvtier's thread pool (:func:`kvtier.native.copy_spans`)
    cuda   DMA or copy kernels through CuPy, or the torch reference without CuPy
           (:func:`span_copier`, built on first use)

This is the blocking face for callers that hold raw spans and must have the
bytes in place on return; copies of engine pages go through the asynchronous
:class:`kvtier.gpu.copier.KVCopier`.  Importing this module imports neither
torch nor CuPy.
"""
from __future__ import annotations

import logging

from .. import native
from ..errors import ConfigError, MissingDependencyError, TierIOError
from ..layout import Spans

log = logging.getLogger(__name__)

_cuda_copy = None


def copy_spans(device_type: str, spans: Spans) -> None:
    """Copy ``spans`` whose engine side lives on ``device_type`` ("cpu" or "cuda"); returns when done."""
    global _cuda_copy
    if device_type == "cpu":
        native.copy_spans(spans.src, spans.dst, spans.lengths)
    elif device_type == "cuda":
        if _cuda_copy is None:
            _cuda_copy = span_copier()    # CuPy, torch, or an error naming what is missing
        _cuda_copy(spans)
    else:
        raise ConfigError("kv_caches.device", device_type, "cpu or cuda tensors")


def copy_sync(device, spans: Spans, mechanism: str = "auto") -> None:
    """Copy on ``device`` (a :class:`~kvtier.gpu.cuda_copy.DeviceCopier`) and wait, ordered after
    torch's current stream; TierIOError if the copy failed."""
    import torch
    key = None
    if mechanism == "auto":
        key = device.cost.bucket("copy", spans.nbytes, len(spans))
        mechanism = device.cost.choose(key)
        if mechanism == "kernel" and not device.kernel_can_reach(spans):
            mechanism = "dma"
    t = device.submit(spans, mechanism, "store", torch.cuda.current_stream(device.index).cuda_stream)
    t.wait()
    if not t.ok:
        raise TierIOError(f"cuda:{device.index} copy failed: {t.error}")
    if key is not None and t.seconds:
        device.cost.record(key, t.mechanism, t.nbytes, t.seconds)


def span_copier():
    """The synchronous copier that :func:`copy_spans` routes CUDA spans to.

    With CuPy: DMA or kernels, chosen per transfer by measured cost.  Without
    it (AUTO falls back quietly): the torch reference, one copy per span, with
    each side's memory identified by the CUDA runtime.  Neither: an error that
    names the extra to install.
    """
    import torch
    from . import cuda_copy
    if cuda_copy.available():
        def copy(spans: Spans) -> None:
            copy_sync(cuda_copy.device_copier(torch.cuda.current_device()), spans)
        return copy
    from .cudart import PointerKinds
    from .torch_ref import copy_spans_torch
    kinds = PointerKinds.load()
    extra = cuda_copy.cuda_extra()
    if kinds is None:
        cuda_copy.require_cupy()                  # raises MissingDependencyError naming the extra
        raise MissingDependencyError("cupy", extra, "copying KV pages between CUDA tensors and host memory")
    log.info("CuPy is not installed: CUDA span copies go through torch, one copy per span "
             "(pip install 'kvtier[%s]' for batched DMA and copy kernels)", extra)

    def where(addr) -> str:
        kind, ordinal = kinds(int(addr))
        return "cpu" if kind == "host" else f"cuda:{ordinal}"

    def copy(spans: Spans) -> None:
        if len(spans):
            copy_spans_torch(spans, where(spans.src[0]), where(spans.dst[0]))
    return copy
