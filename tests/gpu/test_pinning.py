"""Pinning host ranges: registered once per process, unregistered on close, at shutdown and at exit.

A fake CUDA runtime stands in for cudaHostRegister and friends, keeping the
runtime's rules: a range may be registered once (again: error 712), only a
registered base address can be unregistered (else 713).
"""
from __future__ import annotations

import mmap
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.errors import ConfigError, KVTierError
from kvtier.gpu import pinning
from kvtier.gpu.cudart import ERROR_ALREADY_REGISTERED, ERROR_MEMORY_ALLOCATION, ERROR_NOT_REGISTERED
from kvtier.gpu.pinning import PinRegistry


class FakeRegistration:
    def __init__(self, devices=1, refuse=0, mapped=True):
        self.devices = devices
        self.mapped = mapped
        self.refuse = refuse
        self.pinned: dict[int, int] = {}
        self.registers = 0
        self.unregisters = 0

    def device_count(self):
        return self.devices

    def _find(self, addr):
        return next((a for a, n in self.pinned.items() if a <= addr < a + n), None)

    def register(self, addr, nbytes, flags):
        self.registers += 1
        if self.refuse:
            return self.refuse
        if any(a < addr + nbytes and addr < a + n for a, n in self.pinned.items()):
            return ERROR_ALREADY_REGISTERED
        self.pinned[addr] = nbytes
        return 0

    def unregister(self, addr):
        self.unregisters += 1
        if addr not in self.pinned:
            return ERROR_NOT_REGISTERED
        del self.pinned[addr]
        return 0

    def flags(self, addr):
        return 3 if self._find(addr) is not None else None

    def is_pinned(self, addr):
        return self._find(addr) is not None

    def same_address(self, addr):
        return self.mapped and self._find(addr) is not None


@pytest.fixture
def arena():
    m = mmap.mmap(-1, 1 << 20)
    a = np.frombuffer(m, dtype=np.uint8)
    yield a.ctypes.data, a.size
    del a
    m.close()


def test_a_range_is_registered_once_and_unregistered_with_its_last_handle(arena):
    rt = FakeRegistration()
    reg = PinRegistry(rt)
    addr, n = arena
    a = reg.pin(addr, n)
    b = reg.pin(addr, n)                    # the connector's worker attaching again, say
    assert rt.registers == 1 and a.owned and b.owned
    assert a.check() and b.check() and reg.is_pinned(addr + n - 1)
    assert reg.covered(np.array([addr, addr + n - 1, addr + n], dtype=np.uint64)).tolist() == [True, True, False]
    a.close()
    a.close()                               # idempotent: one handle counts once
    assert rt.unregisters == 0 and reg.is_pinned(addr)
    b.close()
    assert rt.unregisters == 1 and not rt.pinned and not reg.is_pinned(addr)
    assert not reg.covered(np.array([addr], dtype=np.uint64))[0]


def test_ranges_the_device_sees_elsewhere_are_not_taken_as_kernel_reachable(arena):
    reg = PinRegistry(FakeRegistration(mapped=False))
    addr, n = arena
    h = reg.pin(addr, n)
    assert h.check() and not reg.covered(np.array([addr], dtype=np.uint64))[0]
    h.close()


def test_shutdown_unregisters_every_range_this_process_registered(arena):
    rt = FakeRegistration()
    reg = PinRegistry(rt)
    addr, n = arena
    h1 = reg.pin(addr, n // 2)
    reg.pin(addr + n // 2, n // 2)
    assert rt.registers == 2 and len(rt.pinned) == 2
    reg.shutdown()
    assert rt.unregisters == 2 and not rt.pinned and reg.ranges() == []
    h1.close()                              # a handle closed after shutdown does nothing
    assert rt.unregisters == 2


def test_memory_pinned_by_someone_else_is_used_and_left_alone(arena):
    rt = FakeRegistration()
    addr, n = arena
    rt.pinned[addr] = n                     # e.g. torch's pin_memory
    reg = PinRegistry(rt)
    h = reg.pin(addr, n)
    assert h is not None and not h.owned and rt.registers == 0 and h.check()
    h.close()
    reg.shutdown()
    assert rt.unregisters == 0 and rt.pinned == {addr: n}


def test_without_cuda_pinning_is_a_no_op(arena):
    addr, n = arena
    assert PinRegistry(FakeRegistration(devices=0), load=lambda: FakeRegistration(devices=0)).pin(addr, n) is None
    assert PinRegistry(load=lambda: None).pin(addr, n) is None
    assert PinRegistry(load=lambda: FakeRegistration(devices=0)).pin(addr, n) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-op without a GPU")
def test_the_process_registry_is_a_no_op_without_a_gpu(arena):
    addr, n = arena
    assert pinning.pin_host_range(addr, n) is None
    assert not pinning.is_pinned(addr)


def test_bad_ranges_are_config_errors():
    with pytest.raises(ConfigError, match="pin_host_range"):
        PinRegistry(FakeRegistration()).pin(0, 4096)
    with pytest.raises(ConfigError, match="pin_host_range"):
        PinRegistry(FakeRegistration()).pin(4096, 0)


def test_a_refusal_under_a_low_lock_limit_names_rlimit_memlock(arena, monkeypatch):
    addr, n = arena
    monkeypatch.setattr(resource, "getrlimit", lambda what: (64 << 10, 64 << 10))
    with pytest.raises(KVTierError) as e:
        PinRegistry(FakeRegistration(refuse=ERROR_MEMORY_ALLOCATION)).pin(addr, n)
    msg = str(e.value)
    for needed in ("RLIMIT_MEMLOCK", "ulimit -l", "memlock=-1", "IPC_LOCK", "65536 bytes"):
        assert needed in msg, msg


def test_a_refusal_with_an_unlimited_lock_limit_says_what_the_runtime_said(arena, monkeypatch):
    addr, n = arena
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY,) * 2)
    with pytest.raises(KVTierError, match="error 2.*could not lock.*unlimited"):
        PinRegistry(FakeRegistration(refuse=ERROR_MEMORY_ALLOCATION)).pin(addr, n)


def test_at_exit_the_process_registry_unregisters():
    """A child process pins through the process registry with a fake runtime and exits."""
    code = r"""
import atexit, mmap, numpy as np
calls = []
atexit.register(lambda: print("unregistered", *calls))   # registered first: runs last
from kvtier.gpu import pinning
from tests.gpu.test_pinning import FakeRegistration
rt = FakeRegistration()
rt.unregister = lambda addr, real=rt.unregister: calls.append(addr) or real(addr)
pinning.REGISTRY._runtime, pinning.REGISTRY._loaded = rt, True
m = mmap.mmap(-1, 1 << 16)
a = np.frombuffer(m, dtype=np.uint8)
h = pinning.pin_host_range(a.ctypes.data, a.size)
assert h is not None and rt.registers == 1
"""
    from tests.helpers import ROOT
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "unregistered" and len(res.stdout.split()) == 2, res.stdout + res.stderr
