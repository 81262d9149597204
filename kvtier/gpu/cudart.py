"""ctypes bindings to the CUDA runtime that torch already loaded (no CuPy needed).

Two entry points CuPy does not wrap, or that must work without it:

    BatchMemcpy.load()     cudaMemcpyBatchAsync (CUDA 12.8+; 12.x takes a
                           ``failIdx`` argument that 13.0 dropped)
    PointerKinds.load()    cudaPointerGetAttributes: "host" (pinned or
                           pageable), "device" (with its ordinal) or "managed"
    HostRegistration.load()
                           cudaHostRegister / Unregister / GetFlags, used by
                           :mod:`kvtier.gpu.pinning`

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
    """cudaPointerAttributes, with headroom.

    CUDA 11-12 define 24 bytes; 13.0 appends ``long reserved[8]`` (88 bytes) and
    the runtime writes all of them.  The padding leaves room for a later
    runtime that grows the struct again: a short buffer here is a heap overflow.
    """
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                ("devicePointer", ctypes.c_void_p), ("hostPointer", ctypes.c_void_p),
                ("reserved", ctypes.c_long * 8), ("_headroom", ctypes.c_long * 24)]


_KINDS = {0: "host", 1: "host", 2: "device", 3: "managed"}   # 0: unregistered (pageable) host memory
MEMORY_UNREGISTERED, MEMORY_HOST, MEMORY_DEVICE, MEMORY_MANAGED = 0, 1, 2, 3


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

    def attributes(self, addr: int) -> _PointerAttributes:
        """The runtime's cudaPointerAttributes of ``addr``; OSError if it refuses."""
        a = _PointerAttributes()
        status = self._fn(ctypes.addressof(a), ctypes.c_void_p(int(addr)))
        if status != 0:
            self._clear()
            raise OSError(f"cudaPointerGetAttributes({int(addr):#x}) returned error {status}")
        return a

    def __call__(self, addr: int) -> tuple[str, int | None]:
        """("host", None), ("device", ordinal) or ("managed", ordinal); OSError if the runtime refuses."""
        a = self.attributes(addr)
        kind = _KINDS.get(a.type, "host")
        return kind, (None if kind == "host" else a.device)


HOST_REGISTER_PORTABLE, HOST_REGISTER_MAPPED = 0x01, 0x02
ERROR_MEMORY_ALLOCATION, ERROR_ALREADY_REGISTERED, ERROR_NOT_REGISTERED = 2, 712, 713


class HostRegistration:
    """cudaHostRegister / cudaHostUnregister / cudaHostGetFlags, and the device count.

    Every call returns the runtime's status (0: success) and leaves no error
    behind for the next launch check of whoever shares the runtime.
    """

    def __init__(self, lib: ctypes.CDLL):
        p, u, s = ctypes.c_void_p, ctypes.c_uint, ctypes.c_size_t
        self._register = self._bind(lib.cudaHostRegister, [p, s, u])
        self._unregister = self._bind(lib.cudaHostUnregister, [p])
        self._flags = self._bind(lib.cudaHostGetFlags, [p, p])
        self._count = self._bind(lib.cudaGetDeviceCount, [p])
        self._clear = lib.cudaGetLastError
        self.kinds = PointerKinds(lib)

    @staticmethod
    def _bind(fn, argtypes):
        fn.restype = ctypes.c_int
        fn.argtypes = argtypes
        return fn

    @classmethod
    def load(cls, path: str | None = None) -> "HostRegistration | None":
        lib = _cudart(path)
        need = ("cudaHostRegister", "cudaHostUnregister", "cudaHostGetFlags", "cudaGetDeviceCount")
        return cls(lib) if lib is not None and all(hasattr(lib, n) for n in need) else None

    def _status(self, status: int) -> int:
        if status != 0:
            self._clear()
        return status

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        return n.value if self._status(self._count(ctypes.byref(n))) == 0 else 0

    def register(self, addr: int, nbytes: int, flags: int) -> int:
        return self._status(self._register(ctypes.c_void_p(addr), nbytes, flags))

    def unregister(self, addr: int) -> int:
        return self._status(self._unregister(ctypes.c_void_p(addr)))

    def flags(self, addr: int) -> int | None:
        """The flags ``addr`` was registered with; None if it is not registered host memory."""
        f = ctypes.c_uint(0)
        return f.value if self._status(self._flags(ctypes.byref(f), ctypes.c_void_p(addr))) == 0 else None

    def is_pinned(self, addr: int) -> bool:
        """cudaPointerGetAttributes calls ``addr`` registered (or allocated pinned) host memory."""
        try:
            return self.kinds.attributes(addr).type == MEMORY_HOST
        except OSError:
            return False

    def same_address(self, addr: int) -> bool:
        """Pinned host memory the device reaches at the host's own address (what a kernel needs)."""
        try:
            a = self.kinds.attributes(addr)
        except OSError:
            return False
        return a.type == MEMORY_HOST and a.devicePointer == addr
