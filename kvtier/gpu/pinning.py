"""Pinning host memory for CUDA: each range registered once per process, unregistered at the end.

    r = pin_host_range(addr, nbytes)   # cudaHostRegister (portable, mapped); None without CUDA
    r.check()                          # the runtime still calls it pinned host memory
    r.close()                          # the last handle of a range unregisters it
    is_pinned(addr)                    # cudaPointerGetAttributes says registered host memory

Device copies from pageable memory are staged by the driver: slower, and
synchronous with the host.  A host arena that many processes map (the vLLM
connector's /dev/shm arena, a numpy or mmap buffer) is therefore registered
with ``cudaHostRegister`` by every process that copies to or from it, once:
a second ``pin_host_range`` of the same range shares the registration, and
the range is unregistered when its last handle closes, at
:func:`shutdown`, or when the process exits.  Memory someone else already
pinned (torch's ``pin_memory``) is used as it is and never unregistered here.

Pinning counts against the locked-memory limit (RLIMIT_MEMLOCK) where the
driver enforces it; when registration fails and that limit is below what was
asked for, the error names the limit and how to raise it.  A child process
after ``fork`` starts with no registrations (they belong to the parent's
CUDA context).
"""
from __future__ import annotations

import atexit
import logging
import os
import resource
import threading

import numpy as np

from ..errors import ConfigError, KVTierError
from .cudart import (ERROR_ALREADY_REGISTERED, ERROR_MEMORY_ALLOCATION, HOST_REGISTER_MAPPED,
                     HOST_REGISTER_PORTABLE, HostRegistration)

log = logging.getLogger(__name__)

FLAGS = HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED


def _limit(n: int) -> str:
    return "unlimited" if n == resource.RLIM_INFINITY else f"{n} bytes"


def memlock_error(status: int, nbytes: int, already: int) -> KVTierError:
    """The error for a refused registration: naming RLIMIT_MEMLOCK when it is the likely cause."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < nbytes + already:
        return KVTierError(
            f"cudaHostRegister of {nbytes} bytes failed (CUDA error {status}): this process's "
            f"locked-memory limit RLIMIT_MEMLOCK is {_limit(soft)} (hard limit {_limit(hard)}), below "
            f"the {nbytes + already} bytes kvtier pins. Raise it for the serving process: "
            "`ulimit -l unlimited` in the shell that starts it (as root, or after raising the hard "
            "limit in /etc/security/limits.conf); Docker: `--ulimit memlock=-1:-1`; Kubernetes: "
            "add the IPC_LOCK capability to the container (securityContext.capabilities.add: "
            "[IPC_LOCK]) or set LimitMEMLOCK=infinity for the container runtime (containerd or "
            "dockerd). Or make the host tier smaller (host.capacity_bytes), or set host.pinned=off.")
    what = "the machine could not lock that much memory" if status == ERROR_MEMORY_ALLOCATION \
        else "the CUDA runtime refused"
    return KVTierError(f"cudaHostRegister of {nbytes} bytes failed (CUDA error {status}): {what} "
                       f"(RLIMIT_MEMLOCK is {_limit(soft)})")


class PinnedRange:
    """One handle on a registered host range; ``close()`` is idempotent."""

    def __init__(self, registry: "PinRegistry", addr: int, nbytes: int, owned: bool):
        self._registry = registry
        self.addr = addr
        self.nbytes = nbytes
        self.owned = owned          # registered by this process (False: pinned by someone else)
        self.closed = False

    def check(self) -> bool:
        """The runtime calls both ends of the range registered, pinned host memory."""
        return not self.closed and self._registry.is_pinned(self.addr) and \
            self._registry.is_pinned(self.addr + self.nbytes - 1)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._registry.release(self.addr, self.nbytes)

    def __enter__(self) -> "PinnedRange":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PinnedRange {self.addr:#x}+{self.nbytes}{' closed' if self.closed else ''}>"


class PinRegistry:
    """The ranges one process registered, with a count of open handles each."""

    def __init__(self, runtime: HostRegistration | None = None, *, load=HostRegistration.load):
        self._load = (lambda: runtime) if runtime is not None else load
        self._runtime: HostRegistration | None = None
        self._loaded = False
        self._lock = threading.Lock()
        self._ranges: dict[tuple[int, int], list] = {}     # (addr, nbytes) -> [handles, owned, mapped]
        self._index = (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
        self._pid = os.getpid()
        self.num_registered = 0
        self.num_unregistered = 0

    def runtime(self) -> HostRegistration | None:
        """The CUDA runtime when a device is visible, else None (pinning is then a no-op)."""
        if not self._loaded:
            rt = self._load()
            self._runtime = rt if rt is not None and rt.device_count() > 0 else None
            self._loaded = True
        return self._runtime

    def _fork_check(self) -> None:
        if self._pid != os.getpid():       # a forked child: the parent's context is not ours
            self._ranges.clear()
            self._reindex()
            self._pid = os.getpid()

    def pin(self, addr: int, nbytes: int) -> PinnedRange | None:
        addr, nbytes = int(addr), int(nbytes)
        if addr <= 0 or nbytes <= 0:
            raise ConfigError("pin_host_range", (addr, nbytes), "a non-null address and a positive size")
        rt = self.runtime()
        if rt is None:
            return None
        with self._lock:
            self._fork_check()
            entry = self._ranges.get((addr, nbytes))
            if entry is None:
                owned = self._register(rt, addr, nbytes)
                mapped = rt.same_address(addr) and rt.same_address(addr + nbytes - 1)
                entry = [0, owned, mapped]
                self._ranges[(addr, nbytes)] = entry
                self._reindex()
            entry[0] += 1
            return PinnedRange(self, addr, nbytes, entry[1])

    def _register(self, rt: HostRegistration, addr: int, nbytes: int) -> bool:
        if rt.flags(addr) is not None:
            return False                   # pinned already (torch pin_memory, another library)
        status = rt.register(addr, nbytes, FLAGS)
        if status == ERROR_ALREADY_REGISTERED:
            return False
        if status != 0:
            raise memlock_error(status, nbytes, self.pinned_bytes())
        if rt.flags(addr) is None or not rt.is_pinned(addr):
            rt.unregister(addr)
            raise KVTierError(f"cudaHostRegister({addr:#x}, {nbytes}) succeeded but the runtime does "
                              "not report the range as pinned host memory")
        self.num_registered += 1
        log.info("pinned %d bytes of host memory at %#x", nbytes, addr)
        return True

    def release(self, addr: int, nbytes: int) -> None:
        with self._lock:
            self._fork_check()
            entry = self._ranges.get((addr, nbytes))
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] <= 0:
                del self._ranges[(addr, nbytes)]
                self._reindex()
                if entry[1]:
                    self._unregister(addr)

    def _unregister(self, addr: int) -> None:
        rt = self.runtime()
        status = rt.unregister(addr) if rt is not None else 0
        if status != 0:
            log.warning("cudaHostUnregister(%#x) returned error %d", addr, status)
        self.num_unregistered += 1

    def shutdown(self) -> None:
        """Unregister every range this process registered, whatever handles remain open."""
        with self._lock:
            self._fork_check()
            owned = [addr for (addr, _), (_, mine, _) in self._ranges.items() if mine]
            self._ranges.clear()
            self._reindex()
            for addr in owned:
                self._unregister(addr)

    def _reindex(self) -> None:
        keys = sorted(k for k, (_, _, mapped) in self._ranges.items() if mapped)
        starts = np.array([a for a, _ in keys], dtype=np.uint64)
        ends = np.array([a + n for a, n in keys], dtype=np.uint64)
        self._index = (starts, ends)

    def covered(self, addrs: np.ndarray) -> np.ndarray:
        """Per address: inside a range pinned through this registry that the device reaches
        at the same address (so a copy kernel may use it without asking the runtime)."""
        starts, ends = self._index
        addrs = np.asarray(addrs, dtype=np.uint64)
        if starts.size == 0 or self._pid != os.getpid():
            return np.zeros(addrs.shape, dtype=bool)
        i = np.searchsorted(starts, addrs, side="right") - 1
        ok = i >= 0
        j = np.clip(i, 0, None)
        return ok & (addrs >= starts[j]) & (addrs < ends[j])

    def is_pinned(self, addr: int) -> bool:
        rt = self.runtime()
        return rt is not None and rt.flags(int(addr)) is not None and rt.is_pinned(int(addr))

    def pinned_bytes(self) -> int:
        return sum(n for (_, n), (_, mine, _) in self._ranges.items() if mine)

    def ranges(self) -> list[tuple[int, int]]:
        with self._lock:
            return sorted(self._ranges)


REGISTRY = PinRegistry()
atexit.register(REGISTRY.shutdown)


def pin_host_range(addr: int, nbytes: int) -> PinnedRange | None:
    """Register ``nbytes`` at ``addr`` with CUDA (once per process); None where CUDA is absent.

    KVTierError, naming RLIMIT_MEMLOCK and how to raise it, when the runtime refuses.
    """
    return REGISTRY.pin(addr, nbytes)


def is_pinned(addr: int) -> bool:
    return REGISTRY.is_pinned(addr)


def covered(addrs: np.ndarray) -> np.ndarray:
    return REGISTRY.covered(addrs)


def shutdown() -> None:
    REGISTRY.shutdown()
