"""A CPU stand-in for CuPy's CUDA runtime that keeps the rules kvtier's CUDA code relies on.

Streams are FIFO queues of operations that run only when the fake device
runs (:meth:`FakeRuntime.run`), so asynchrony and ordering are real here:

- an event completes when the device reaches the point where it was recorded;
  ``eventQuery`` says not-ready before that, ``eventSynchronize`` runs the device;
- ``streamWaitEvent`` holds a stream until the event's latest record completes;
- events must be created before use and destroyed exactly once (a wait already
  queued may still refer to a destroyed one, as in CUDA);
- copies and kernels read their memory when the device runs them, so tables
  and buffers must stay alive until then.

``run(first=...)`` picks, among streams whose next operation can run, the
ones listed in ``first`` before all others: an adversarial schedule that
breaks any ordering the code forgot to state with events.  With
``eager=True`` the device runs after every call, like a fast GPU.
"""
from __future__ import annotations

import ctypes
import itertools
import sys
import types
from collections import deque

import numpy as np

NOT_READY = 600


class FakeRuntime(types.SimpleNamespace):
    CUDARuntimeError = RuntimeError

    def __init__(self, eager: bool = True):
        super().__init__()
        self.eager = eager
        self.live: set[int] = set()              # created and not destroyed
        self.recorded: dict[int, int] = {}       # event -> generation of its latest record
        self.reached: dict[int, int] = {}        # event -> generation the device reached
        self.queues: dict[int, deque] = {}
        self.ids = itertools.count(1000)
        self.registered: list[tuple[int, int]] = []   # pinned, mapped host ranges
        self.device_ranges: list[tuple[int, int]] = []
        self.memcpys = 0
        self.queries = 0
        self.calls: list[tuple] = []              # (what, stream, event) in submission order

    # ---- the device ---------------------------------------------------------------------
    def enqueue(self, stream: int, op: tuple) -> None:
        self.queues.setdefault(int(stream), deque()).append(op)
        if self.eager:
            self.run()

    def _runnable(self, op) -> bool:
        return op[0] != "wait" or self.reached.get(op[1], 0) >= op[2]

    def run(self, first=()) -> None:
        """Run operations until no stream can make progress; streams in ``first`` go first."""
        order = [int(s) for s in first]
        while True:
            heads = [s for s, q in self.queues.items() if q and self._runnable(q[0])]
            if not heads:
                return
            s = next((f for f in order if f in heads), heads[0])
            op = self.queues[s].popleft()
            if op[0] == "record":
                self.reached[op[1]] = max(self.reached.get(op[1], 0), op[2])
            elif op[0] == "fn":
                op[1]()

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    # ---- the runtime calls kvtier makes ------------------------------------------------
    def getDeviceCount(self):
        return 1

    def getDeviceProperties(self, i):
        return {"multiProcessorCount": 4}

    def eventCreate(self):
        e = next(self.ids)
        self.live.add(e)
        return e

    def eventCreateWithFlags(self, flags):
        return self.eventCreate()

    def eventRecord(self, e, stream):
        assert e in self.live, "record on a destroyed event"
        gen = self.recorded.get(e, 0) + 1
        self.recorded[e] = gen
        self.calls.append(("record", int(stream), e))
        self.enqueue(stream, ("record", e, gen))

    def _complete(self, e) -> bool:
        return self.reached.get(e, 0) >= self.recorded.get(e, 0)

    def eventQuery(self, e):
        assert e in self.live, "query of a destroyed event"
        return 0 if self._complete(e) else NOT_READY

    def eventSynchronize(self, e):
        assert e in self.live, "synchronize on a destroyed event"
        self.run()
        assert self._complete(e), "eventSynchronize would hang: the device cannot reach the event"

    def eventElapsedTime(self, a, b):
        assert a in self.live and b in self.live
        assert self._complete(a) and self._complete(b), "elapsed time of an event not yet reached"
        return 0.25

    def eventDestroy(self, e):
        assert e in self.live, "event destroyed twice"
        self.live.discard(e)

    def streamWaitEvent(self, stream, e, flags):
        assert e in self.live, "wait on a destroyed event"
        self.calls.append(("wait", int(stream), e))
        self.enqueue(stream, ("wait", e, self.recorded.get(e, 0)))

    def memcpyAsync(self, dst, src, n, kind, stream):
        self.memcpys += 1
        self.calls.append(("copy", int(stream), None))
        self.enqueue(stream, ("fn", lambda: ctypes.memmove(dst, src, n)))

    def pointerGetAttributes(self, addr):
        self.queries += 1
        if any(a <= addr < a + n for a, n in self.device_ranges):
            return types.SimpleNamespace(type=2, devicePointer=addr)
        pinned = any(a <= addr < a + n for a, n in self.registered)
        return types.SimpleNamespace(type=1 if pinned else 0, devicePointer=addr if pinned else 0)


class FakeStream:
    _n = itertools.count(1)

    def __init__(self, owner=None, non_blocking=False):
        self.owner = owner
        self.ptr = next(self._n)

    def __enter__(self):
        if self.owner is not None:
            self.owner.current.append(self.ptr)
        return self

    def __exit__(self, *a):
        if self.owner is not None:
            self.owner.current.pop()
        return False


class FakeKernel:
    def __init__(self, owner):
        self.owner = owner

    def __call__(self, grid, block, args):
        table_ptr, n = int(args[0]), int(args[1])

        def launch():
            table = np.ctypeslib.as_array((ctypes.c_uint64 * (3 * n)).from_address(table_ptr))
            for i in range(n):
                ctypes.memmove(int(table[n + i]), int(table[i]), int(table[2 * n + i]))
        stream = self.owner.current[-1] if self.owner.current else 0
        self.owner.launches += 1
        self.owner.cuda.runtime.calls.append(("launch", stream, None))
        self.owner.cuda.runtime.enqueue(stream, ("fn", launch))


def make_fake_cupy(eager: bool = True):
    rt = FakeRuntime(eager)
    cupy = types.ModuleType("cupy")
    cupy.current = []
    cupy.launches = 0
    cupy.compiles = 0
    cuda = types.SimpleNamespace(runtime=rt, Stream=lambda non_blocking=False: FakeStream(cupy, non_blocking))
    cuda.Device = lambda i: FakeStream()
    buffers = []

    def alloc(n):
        buf = np.zeros(n, dtype=np.uint8)
        buffers.append(buf)
        return types.SimpleNamespace(ptr=buf.ctypes.data, buf=buf)
    cuda.alloc = alloc
    cuda.alloc_pinned_memory = lambda n: bytearray(n)
    cupy.cuda = cuda

    class RawModule:
        def __init__(self, code, options=()):
            assert "kvtier_copy_chunks" in code

        def get_function(self, name):
            cupy.compiles += 1
            rt.calls.append(("compile", None, name))
            return FakeKernel(cupy)
    cupy.RawModule = RawModule
    return cupy


def install(monkeypatch, eager: bool = True):
    """Put a fake CuPy in sys.modules and a fresh device table in kvtier.gpu.cuda_copy."""
    cupy = make_fake_cupy(eager)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    from kvtier.gpu import cuda_copy
    from kvtier.gpu.cudart import BatchMemcpy
    monkeypatch.setattr(cuda_copy, "_DEVICES", {})
    monkeypatch.setattr(BatchMemcpy, "load", classmethod(lambda cls, path=None: None))
    return cupy, cuda_copy
