"""The ctypes bindings of kvtier.gpu.cudart against the CUDA headers and runtime installed here.

Structs the runtime writes into must be at least as large as the headers
define them (a short one is a heap overflow on every call); the bindings must
load the runtime, pick the right signature and come back with an error code,
not a crash, where there is no GPU.  On a GPU the same tests check the calls
work.
"""
from __future__ import annotations

import ctypes
import glob
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier.gpu.cudart import BatchMemcpy, HostRegistration, PointerKinds, _MemcpyAttributes, _PointerAttributes

CUDART_LIBS = sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so.1[2-9]*"))
HEADERS = sorted(glob.glob("/usr/local/cuda*/include/cuda_runtime_api.h"))
needs_cudart = pytest.mark.skipif(not CUDART_LIBS, reason="no CUDA runtime library installed")

SIZES_C = r"""
#include <stdio.h>
#include <cuda_runtime_api.h>
int main(void) {
    printf("%zu %zu\n", sizeof(struct cudaPointerAttributes), sizeof(struct cudaMemcpyAttributes));
    return 0;
}
"""


def header_sizes(tmp_path: Path, include: str) -> tuple[int, int]:
    src = tmp_path / "sizes.c"
    src.write_text(SIZES_C)
    exe = tmp_path / "sizes"
    res = subprocess.run([shutil.which("cc") or "gcc", f"-I{include}", str(src), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    a, b = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    return int(a), int(b)


def test_pointer_attributes_leave_room_for_cuda_13():
    """CUDA 13.0 appends long reserved[8]: 88 bytes, all written by the runtime."""
    assert ctypes.sizeof(_PointerAttributes) >= 88 + 64          # 88 and headroom
    assert _PointerAttributes.devicePointer.offset == 8 and _PointerAttributes.hostPointer.offset == 16


@pytest.mark.skipif(not HEADERS or not (shutil.which("cc") or shutil.which("gcc")),
                    reason="needs the CUDA headers and a C compiler")
@pytest.mark.parametrize("header", HEADERS)
def test_structs_are_at_least_as_large_as_the_headers_say(tmp_path, header):
    ptr_attrs, memcpy_attrs = header_sizes(tmp_path, str(Path(header).parent))
    assert ctypes.sizeof(_PointerAttributes) >= ptr_attrs
    assert ctypes.sizeof(_MemcpyAttributes) == memcpy_attrs     # an array element: exact


@needs_cudart
def test_pointer_kinds_binding_calls_through():
    """Without a GPU the runtime refuses, and says so with an OSError, not a crash."""
    kinds = PointerKinds.load(CUDART_LIBS[0])
    buf = np.zeros(16, dtype=np.uint8)
    if torch.cuda.is_available():
        assert kinds(buf.ctypes.data) == ("host", None)
    else:
        with pytest.raises(OSError, match="cudaPointerGetAttributes"):
            kinds(buf.ctypes.data)


@needs_cudart
def test_batch_memcpy_binding_matches_the_runtime():
    """The binding loads, picks the signature of the runtime's version and calls through:
    an error code without a GPU, a copy on one."""
    b = BatchMemcpy.load(CUDART_LIBS[0])
    assert b is not None and b.version >= 12080
    assert b._fail == (b.version < 13000)
    if not torch.cuda.is_available():
        src = np.arange(64, dtype=np.uint8)
        dst = np.zeros(64, dtype=np.uint8)
        addrs = lambda a: np.array([a.ctypes.data, a.ctypes.data + 32], dtype=np.uint64)
        assert b(addrs(dst), addrs(src), np.array([32, 32], dtype=np.uint64), 0) != 0
        return
    src = torch.arange(64, dtype=torch.uint8, device="cuda")
    dst = torch.zeros(64, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    addrs = lambda t: np.array([t.data_ptr(), t.data_ptr() + 32], dtype=np.uint64)
    stream = torch.cuda.Stream()            # the batch call refuses the legacy NULL stream
    assert b(addrs(dst), addrs(src), np.array([32, 32], dtype=np.uint64), stream.cuda_stream) == 0
    stream.synchronize()
    assert torch.equal(dst, src)


@needs_cudart
def test_host_registration_binding_calls_through():
    reg = HostRegistration.load(CUDART_LIBS[0])
    assert reg is not None
    buf = np.zeros(1 << 16, dtype=np.uint8)
    if not torch.cuda.is_available():
        assert reg.device_count() == 0
        assert reg.flags(buf.ctypes.data) is None and not reg.is_pinned(buf.ctypes.data)
        assert reg.register(buf.ctypes.data, buf.nbytes, 3) != 0
        return
    assert reg.device_count() >= 1
    assert reg.register(buf.ctypes.data, buf.nbytes, 3) == 0
    try:
        assert reg.flags(buf.ctypes.data) is not None and reg.is_pinned(buf.ctypes.data)
    finally:
        assert reg.unregister(buf.ctypes.data) == 0
    assert reg.flags(buf.ctypes.data) is None
