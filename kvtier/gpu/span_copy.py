"""copy_spans: one synchronous batch of (source, destination, bytes) spans between engine memory and tier slots.

Routed by where the engine memory lives:

    cpu    the native memcpy on kvtier's thread pool (:func:`kvtier.native.copy_spans`)
    cuda   DMA or copy kernels through CuPy, or the torch reference without CuPy
           (:func:`kvtier.gpu.cuda_copy.span_copier`, imported on first use)

Importing this module imports neither torch nor CuPy.
"""
from __future__ import annotations

from .. import native
from ..errors import ConfigError
from ..layout import Spans

_cuda_copy = None


def copy_spans(device_type: str, spans: Spans) -> None:
    """Copy ``spans`` whose engine side lives on ``device_type`` ("cpu" or "cuda"); returns when done."""
    global _cuda_copy
    if device_type == "cpu":
        native.copy_spans(spans.src, spans.dst, spans.lengths)
    elif device_type == "cuda":
        if _cuda_copy is None:
            from . import cuda_copy      # CuPy, or an error naming what is missing
            _cuda_copy = cuda_copy.span_copier()
        _cuda_copy(spans)
    else:
        raise ConfigError("kv_caches.device", device_type, "cpu or cuda tensors")
