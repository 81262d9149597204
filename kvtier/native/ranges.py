"""Registered host memory: the only bytes kvtier's raw-address ops may touch.

The span ops (``copy_spans``, ``copy_crc_spans``, ``crc32c_spans``, the
``pread``/``pwrite`` span and block ops) take raw addresses.  A wrong one is
not an error in C: it is a crash, or worse, a write into someone else's
memory.  So every buffer those ops are pointed at is registered here first,
by whoever owns it, for as long as it lives:

    reg = ranges.register(arena, owner="host arena")   # numpy array, memoryview,
    ...                                                # mmap, CPU tensor or (addr, nbytes)
    reg.close()                                        # before the memory goes away

and :mod:`kvtier.native` checks every span of every call against the
registered ranges before any byte moves.  Buffers that live for one call only
(bounce buffers, a frame being checksummed) are passed to the op itself
(``within=[buf, ...]``) instead of being registered.  Only host memory belongs
here: device pointers are never valid for these ops.

How strictly spans are checked is the mode (``KVTIER_NATIVE_RANGES``, read at
import; :func:`set_mode` or :func:`enforcing` to change it):

    strict   (default) every span must lie inside one registered range (or a
             ``within`` buffer): anything else is an :class:`UnregisteredMemoryError`
    known    a span that starts inside a registered range must end inside it;
             spans in memory nobody registered pass, counted in :func:`stats`
             (for code of one's own that does not register yet)
    off      no check

The check is a binary search per span over the sorted, merged ranges: in the
C extension where it is built (about a microsecond a batch), else a few
vectorised numpy operations; the ranges are rebuilt only when one is
registered or closed.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import os
import threading
import weakref
from typing import Iterable, Iterator

import numpy as np

from ..errors import ConfigError, KVTierError

log = logging.getLogger(__name__)

MODES = ("strict", "known", "off")


class UnregisteredMemoryError(KVTierError, ValueError):
    """A span of a native op lies outside every registered memory range."""


def buffer_range(obj) -> tuple[int, int]:
    """(address, nbytes) of a host buffer: a numpy array, anything with the buffer
    protocol, a CPU torch tensor, or an (address, nbytes) pair."""
    if isinstance(obj, tuple) and len(obj) == 2:
        addr, nbytes = int(obj[0]), int(obj[1])
    elif isinstance(obj, np.ndarray):
        if obj.nbytes == 0:
            return 0, 0
        low, high = _byte_bounds(obj)
        addr, nbytes = low, high - low
    elif hasattr(obj, "data_ptr") and hasattr(obj, "device"):      # a torch tensor
        if getattr(obj.device, "type", "cpu") != "cpu":
            raise ValueError(f"only host memory can be registered, got a tensor on {obj.device}")
        extent = 1 + sum((n - 1) * st for n, st in zip(obj.shape, obj.stride())) if obj.numel() else 0
        addr, nbytes = int(obj.data_ptr()), int(extent * obj.element_size())   # views included
    else:
        view = memoryview(obj)
        if view.nbytes == 0:
            return 0, 0
        if not view.c_contiguous:
            raise ValueError("only contiguous buffers can be registered")
        arr = np.frombuffer(view.cast("B"), dtype=np.uint8)
        addr, nbytes = arr.ctypes.data, arr.nbytes
    if addr < 0 or nbytes < 0 or addr + nbytes > 2**64:
        raise ValueError(f"not a host memory range: {addr:#x} + {nbytes} bytes")
    return addr, nbytes


def _byte_bounds(a: np.ndarray) -> tuple[int, int]:
    """First and one-past-last byte an array (or a strided view) can touch."""
    low = high = a.ctypes.data
    for n, stride in zip(a.shape, a.strides):
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + a.itemsize


class _Snapshot:
    """Disjoint ranges, sorted: starts[i] <= a < ends[i]; owners name them in errors."""
    __slots__ = ("starts", "ends", "ends0", "owners", "py_starts", "py_ends")

    def __init__(self, ranges: list[tuple[int, int, str]]):
        merged: list[list] = []
        for start, end, owner in sorted(ranges):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
                merged[-1][2] += f" + {owner}"
            else:
                merged.append([start, end, owner])
        self.starts = np.array([m[0] for m in merged], dtype=np.uint64)
        self.ends = np.array([m[1] for m in merged], dtype=np.uint64)
        self.ends0 = np.concatenate((np.zeros(1, np.uint64), self.ends))   # 0: below the first
        self.owners = [m[2] for m in merged]
        self.py_starts = [m[0] for m in merged]
        self.py_ends = [m[1] for m in merged]


class Registration:
    """One registered range; ``close()`` (or leaving a ``with``) unregisters it."""
    __slots__ = ("addr", "nbytes", "owner", "_registry", "_finalizer", "__weakref__")

    def __init__(self, registry: "RangeRegistry", addr: int, nbytes: int, owner: str):
        self.addr, self.nbytes, self.owner, self._registry = addr, nbytes, owner, registry
        self._finalizer = None

    @property
    def closed(self) -> bool:
        return self._registry is None

    def close(self) -> None:
        registry, self._registry = self._registry, None
        if registry is not None:
            registry._remove(self)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def __enter__(self) -> "Registration":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registration({self.owner!r}, {self.addr:#x} + {self.nbytes} bytes)"


class RangeRegistry:
    """The registered ranges of one process (module functions use :data:`REGISTRY`)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holder: int | None = None        # the thread inside _update, if any
        self._queued: collections.deque[Registration] = collections.deque()
        self._live: dict[int, Registration] = {}
        self._snap = _Snapshot([])
        self.num_unregistered_spans = 0        # spans let through in "known" mode
        self.num_refused_calls = 0

    def register(self, obj, nbytes: int | None = None, *, owner: str) -> Registration:
        """Register a buffer (or ``obj`` = an address and ``nbytes``) until the
        returned :class:`Registration` is closed.  Where the buffer can be weakly
        referenced its range also goes when it is garbage collected."""
        addr, size = (int(obj), int(nbytes)) if nbytes is not None else buffer_range(obj)
        if addr < 0 or size < 0 or addr + size > 2**64:
            raise ValueError(f"not a host memory range: {addr:#x} + {size} bytes")
        reg = Registration(self, addr, size, str(owner))
        if size:
            self._update(add=reg)
        if size and nbytes is None and not isinstance(obj, tuple):
            try:
                reg._finalizer = weakref.finalize(obj, _forget, weakref.ref(reg))
            except TypeError:                  # bytearray, memoryview: no weak references
                pass
        return reg

    def _remove(self, reg: Registration) -> None:
        self._update(drop=reg)

    def _update(self, add: Registration | None = None, drop: Registration | None = None) -> None:
        """Add or drop one range and rebuild the snapshot.

        Rebuilding allocates, so the garbage collector may run inside it and call
        the finalizer of a registered buffer, which drops that buffer's range: on
        the very thread that holds the lock.  Such a nested drop is queued and
        applied by the outer call before it lets go of the lock, never waited for
        (waiting would deadlock the thread on itself)."""
        me = threading.get_ident()
        if self._holder == me:
            if drop is not None:
                self._queued.append(drop)
            return
        with self._lock:
            self._holder = me
            try:
                if add is not None:
                    self._live[id(add)] = add
                changed = add is not None or (drop is not None and self._live.pop(id(drop), None) is not None)
                while changed:
                    self._snap = _Snapshot([(r.addr, r.addr + r.nbytes, r.owner) for r in self._live.values()])
                    changed = False
                    while self._queued:
                        changed |= self._live.pop(id(self._queued.popleft()), None) is not None
            finally:
                self._holder = None

    def ranges(self) -> list[tuple[int, int, str]]:
        """The merged ranges: (address, nbytes, owners)."""
        s = self._snap
        return [(int(a), int(e - a), o) for a, e, o in zip(s.starts, s.ends, s.owners)]

    def check(self, op: str, spans: Iterable[tuple[str, object]], lengths, within=(), mode: str = "strict") -> None:
        """Raise :class:`UnregisteredMemoryError` for the first span of ``op`` that
        ``mode`` refuses.  ``spans``: (argument name, uint64 address array) pairs
        sharing ``lengths`` (an array, or one int for every span).  Arguments of a
        shape the op itself refuses are left to the op's own checks."""
        snap = self._snap
        lens = _as_u64(lengths)
        if lens is None:
            return
        extra = None
        for name, addrs in spans:
            a = _as_u64(addrs)
            if a is None or a.ndim != 1 or (lens.ndim and lens.shape != a.shape):
                continue
            if _fast is not None:              # the extension's binary search: a microsecond or two
                if _fast(snap.starts, snap.ends0, a, lens if lens.ndim else int(lens)) < 0:
                    continue
            elif a.size <= _SMALL and _covered_small(snap, a, lens):
                continue
            ok = _covered(snap.starts, snap.ends0, a, lens)
            if ok.all():
                continue
            if within and extra is None:
                extra = _within(within)
            if extra is not None:
                if _fast is not None and _fast(extra[0], extra[1], a, lens if lens.ndim else int(lens)) < 0:
                    continue                   # all inside the call's own buffers
                ok |= _covered(extra[0], extra[1], a, lens)
                if ok.all():
                    continue
            if mode == "known":                # memory nobody registered: let it through
                outside = ~ok & ~_starts_inside(snap.starts, snap.ends0, a)
                self.num_unregistered_spans += int(np.count_nonzero(outside))
                ok |= outside
                if ok.all():
                    continue
            self.num_refused_calls += 1
            i = int(np.flatnonzero(~ok)[0])
            n = int(lens[i] if lens.ndim else lens)
            raise UnregisteredMemoryError(f"{op}: span {i}: {name} {int(a[i]):#x} + {n} bytes "
                                          f"{_where(snap, int(a[i]), n)}")


def _forget(ref) -> None:
    reg = ref()
    if reg is not None:
        reg.close()


def _as_u64(x) -> np.ndarray | None:
    if isinstance(x, np.ndarray):
        return x if x.dtype == np.uint64 else None
    if isinstance(x, int) and not isinstance(x, bool):
        return np.uint64(x) if 0 <= x < 2**64 else None
    try:
        a = np.asarray(memoryview(x))
    except (TypeError, ValueError):
        return None
    return a if a.dtype == np.uint64 else None


_END, _MAX_LEN = 2**64 - 1, 2**63 - 1
_fast = None    # the extension's _first_outside, handed over by kvtier.native (its only importer)
_SMALL = 8      # batches this short are checked in plain Python (numpy calls cost more)


def _covered_small(snap: _Snapshot, addrs: np.ndarray, lens) -> bool:
    """Whether every span is empty or inside one range (a few spans: bisect per span)."""
    starts, ends = snap.py_starts, snap.py_ends
    lens = lens.tolist() if lens.ndim else [int(lens)] * addrs.size
    for a, n in zip(addrs.tolist(), lens):
        if n and a and a + n <= _END and n <= _MAX_LEN:      # else the op refuses it itself
            i = bisect.bisect_right(starts, a) - 1
            if i < 0 or a + n > ends[i]:
                return False
    return True


def _covered(starts: np.ndarray, ends0: np.ndarray, addrs: np.ndarray, lens) -> np.ndarray:
    """Per span: empty, or wholly inside one range.  ``ends0``: 0, then each range's end
    (a running max where ranges overlap)."""
    end = ends0[np.searchsorted(starts, addrs, side="right")]
    # null, wrapping and oversized spans are left to the op, which refuses them before any byte moves
    refused = (addrs == 0) | (lens > ~addrs) | (lens > _MAX_LEN)
    return (lens == 0) | refused | ((addrs < end) & (lens <= end - addrs))     # uint64 arrays wrap silently


def _starts_inside(starts: np.ndarray, ends0: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    return addrs < ends0[np.searchsorted(starts, addrs, side="right")]


def _within(buffers) -> tuple[np.ndarray, np.ndarray]:
    """The ranges of one call's own buffers, sorted: (starts, 0 + running-max ends)."""
    pairs = sorted(buffer_range(b) for b in buffers)
    starts = np.array([a for a, _ in pairs], dtype=np.uint64)
    ends = np.maximum.accumulate(np.array([a + n for a, n in pairs], dtype=np.uint64))
    return starts, np.concatenate((np.zeros(1, np.uint64), ends))


def _where(snap: _Snapshot, addr: int, n: int) -> str:
    if snap.starts.size == 0:
        return "is in no registered memory range (none are registered)"
    i = int(np.searchsorted(snap.starts, np.uint64(addr), side="right")) - 1
    if i >= 0 and addr < int(snap.ends[i]):
        return (f"runs {addr + n - int(snap.ends[i])} bytes past the end of the registered range "
                f"{int(snap.starts[i]):#x} + {int(snap.ends[i] - snap.starts[i])} bytes ({snap.owners[i]})")
    near = f" (nearest below: {int(snap.starts[i]):#x} + {int(snap.ends[i] - snap.starts[i])} bytes, " \
           f"{snap.owners[i]})" if i >= 0 else ""
    return (f"is in no registered memory range{near}; register the buffer with "
            "kvtier.native.ranges.register() or pass it to the call in within=")


# ---- the process's registry and mode -----------------------------------------------
REGISTRY = RangeRegistry()


def _read_mode() -> str:
    raw = os.environ.get("KVTIER_NATIVE_RANGES", "strict")
    m = raw.strip().lower() or "strict"
    if m not in MODES:
        raise ConfigError("KVTIER_NATIVE_RANGES", raw, "one of " + ", ".join(MODES))
    return m


_mode = _read_mode()


def mode() -> str:
    return _mode


def set_mode(m: str) -> str:
    """Set the check mode; returns the previous one."""
    global _mode
    if m not in MODES:
        raise ConfigError("native ranges mode", m, "one of " + ", ".join(MODES))
    old, _mode = _mode, m
    return old


@contextlib.contextmanager
def enforcing(m: str = "strict") -> Iterator[None]:
    """Run a block under another check mode (tests run under "strict")."""
    old = set_mode(m)
    try:
        yield
    finally:
        set_mode(old)


def register(obj, nbytes: int | None = None, *, owner: str) -> Registration:
    """Register host memory in the process's registry (see :meth:`RangeRegistry.register`)."""
    return REGISTRY.register(obj, nbytes, owner=owner)


def check(op: str, spans, lengths, within=()) -> None:
    """Check an op's spans under the current mode (a no-op when it is "off")."""
    if _mode != "off":
        REGISTRY.check(op, spans, lengths, within, _mode)


def use_native_check(fn) -> None:
    """kvtier.native hands over the extension's span check (None: numpy only)."""
    global _fast
    _fast = fn


def stats() -> dict:
    return {"mode": _mode, "ranges": len(REGISTRY.ranges()),
            "unregistered_spans": REGISTRY.num_unregistered_spans,
            "refused_calls": REGISTRY.num_refused_calls}
