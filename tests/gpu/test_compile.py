"""Every csrc/*.cu compiles for Hopper (sm_90) with nvcc, with or without a GPU.

The kernels are compiled at run time through NVRTC on GPU machines; this keeps
them from rotting on machines without one.  NVRTC has no system headers, so
the sources may include nothing: that is checked here too.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT

SOURCES = sorted((ROOT / "kvtier" / "gpu").glob("*.cu"))


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in ("/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if os.access(cand, os.X_OK):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def test_there_are_kernels():
    assert SOURCES, "csrc/*.cu is empty"


@needs_nvcc
@pytest.mark.parametrize("src", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_for_sm90(src, tmp_path):
    out = tmp_path / (src.stem + ".o")
    res = subprocess.run([NVCC, "-arch=sm_90", "-c", str(src), "-o", str(out), "-Xptxas", "-v",
                          "-Werror", "all-warnings"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0
    # no spills: a copy kernel that spills moves more bytes than it copies
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    assert spills and all(s == "0" for s in spills), res.stderr


@needs_nvcc
def test_copy_kernel_uses_16_byte_accesses(tmp_path):
    src = ROOT / "kvtier" / "gpu" / "kv_copy.cu"
    ptx = tmp_path / "kv_copy.ptx"
    res = subprocess.run([NVCC, "-arch=sm_90", "-ptx", str(src), "-o", str(ptx)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = ptx.read_text()
    assert re.search(r"ld\.global(\.[a-z]+)*\.v4\.u32", text)
    assert re.search(r"st\.global(\.[a-z]+)*\.v4\.u32", text)


@pytest.mark.parametrize("src", SOURCES, ids=[s.name for s in SOURCES])
def test_sources_include_nothing(src):
    """NVRTC compiles these at run time without system headers."""
    includes = [ln for ln in src.read_text().splitlines() if ln.lstrip().startswith("#include")]
    assert includes == []


def _nvrtc_dirs() -> list[Path]:
    """Folders that may hold libnvrtc: $KVTIER_NVRTC_DIR, the CUDA toolkit, NVIDIA's pip wheels."""
    dirs = [Path(os.environ["KVTIER_NVRTC_DIR"])] if os.environ.get("KVTIER_NVRTC_DIR") else []
    dirs += [Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/targets/x86_64-linux/lib")]
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(Path(root).glob("*/lib"))
    return [d for d in dirs if list(d.glob("libnvrtc.so*"))]


def _load_nvrtc(d: Path):
    import ctypes
    for b in sorted(d.glob("libnvrtc-builtins.so.*")):   # found by soname when nvrtc opens it
        if ".alt." not in b.name:
            ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
    lib = next(p for p in sorted(d.glob("libnvrtc.so*")) if ".alt." not in p.name)
    return ctypes.CDLL(str(lib))


@pytest.mark.skipif(not _nvrtc_dirs(), reason="libnvrtc not found (set KVTIER_NVRTC_DIR)")
@pytest.mark.parametrize("src", SOURCES, ids=[s.name for s in SOURCES])
def test_compiles_with_nvrtc(src):
    """The run-time path: NVRTC, no include paths, the options kvtier/gpu/cuda_copy.py passes."""
    import ctypes
    lib = _load_nvrtc(_nvrtc_dirs()[0])
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.read_bytes(), src.name.encode(), 0, None, None) == 0
    opts = [b"-std=c++17", b"-arch=sm_90"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode(errors="replace")
