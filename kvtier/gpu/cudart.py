"""ctypes bindings to the CUDA runtime that torch already loaded (no CuPy needed).

Two entry points CuPy does not wrap, or that must work without it:

    BatchMemcpy.load()     cudaMemcpyBatchAsync (CUDA 12.8+; 12.x takes a
                           ``failIdx`` argument that 13.0 dropped)
    pointer_kind(addr)     cudaPointerGetAttributes: "host" (pinned or
                           pageable), "device" (with its ordinal) or "managed"

The library is the ``libcudart.so`` this process has mapped (torch's) when
there is one, so errors it records are the ones torch would see next: every
failed call here clears them.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np

class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int),
                ("srcLocType", ctypes.c_int), ("srcLocId", ctypes.c_int),
                ("dstLocType", ctypes.c_int), ("dstLocId", ctypes.c_int),
                ("flags", ctypes.c_uint)]


_ACCESS_ORDER_STREAM = 1
_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 1


def _cudart(path: str | None = None) -> ctypes.CDLL | None:
    """The CUDA runtime library this process already loaded (torch's), or one on the path."""
    if path is not None:
        return ctypes.CDLL(path)
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({ln.split()[-1] for ln in f if "libcudart.so" in ln})
    except OSError:
        pass
    for name in paths + ["libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart") or ""]:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class BatchMemcpy:
    """cudaMemcpyBatchAsync(dsts, srcs, sizes, count, attrs, attrIdxs, numAttrs[, failIdx], stream)."""

    def __init__(self, fn, with_fail_idx: bool, version: int, clear_error=None):
        self._fn = fn
        self._clear = clear_error
        self._fail = with_fail_idx
        self.version = version
        self._attrs = _MemcpyAttributes(_ACCESS_ORDER_STREAM, 0, 0, 0, 0, _FLAG_PREFER_OVERLAP_WITH_COMPUTE)
        self._idx = (ctypes.c_size_t * 1)(0)

    @classmethod
    def load(cls, path: str | None = None) -> "BatchMemcpy | None":
        lib = _cudart(path)
        if lib is None or not hasattr(lib, "cudaMemcpyBatchAsync"):
            return None
        v = ctypes.c_int(0)
        if lib.cudaRuntimeGetVersion(ctypes.byref(v)) != 0 or v.value < 12080:
            return None
        fn = lib.cudaMemcpyBatchAsync
        fn.restype = ctypes.c_int
        p = ctypes.c_void_p
        args = [p, p, p, ctypes.c_size_t, p, p, ctypes.c_size_t]
        fn.argtypes = args + ([p] if v.value < 13000 else []) + [p]
        return cls(fn, v.value < 13000, v.value, lib.cudaGetLastError)

    def __call__(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: int) -> int:
        args = [dsts.ctypes.data, srcs.ctypes.data, sizes.ctypes.data, sizes.size,
                ctypes.addressof(self._attrs), ctypes.addressof(self._idx), 1]
        if self._fail:
            fail = ctypes.c_size_t(0)
            args.append(ctypes.addressof(fail))
        status = self._fn(*args, stream)
        if status != 0 and self._clear is not None:
            self._clear()       # this may be torch's runtime: leave no error for its next launch check
        return status


class _PointerAttributes(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                ("devicePointer", ctypes.c_void_p), ("hostPointer", ctypes.c_void_p)]


_KINDS = {0: "host", 1: "host", 2: "device", 3: "managed"}   # 0: unregistered (pageable) host memory


class PointerKinds:
    """Where addresses live, asked of the CUDA runtime."""

    def __init__(self, lib: ctypes.CDLL):
        self._fn = lib.cudaPointerGetAttributes
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._clear = lib.cudaGetLastError

    @classmethod
    def load(cls, path: str | None = None) -> "PointerKinds | None":
        lib = _cudart(path)
        return cls(lib) if lib is not None and hasattr(lib, "cudaPointerGetAttributes") else None

    def __call__(self, addr: int) -> tuple[str, int | None]:
        """("host", None), ("device", ordinal) or ("managed", ordinal); OSError if the runtime refuses."""
        a = _PointerAttributes()
        status = self._fn(ctypes.addressof(a), ctypes.c_void_p(int(addr)))
        if status != 0:
            self._clear()
            raise OSError(f"cudaPointerGetAttributes({int(addr):#x}) returned error {status}")
        kind = _KINDS.get(a.type, "host")
        return kind, (None if kind == "host" else a.device)
