"""Fuzz every native op's arguments; run as ``python -m tests.native.fuzz_native [examples]``.

A separate process on purpose (tests/native/test_fuzz.py starts it): an op that
dereferences a wild address kills this process, not the test suite.  Under
``strict`` range checks, with one registered buffer between two guard zones
nobody registered, every call must either work inside the registered bytes or
raise TypeError/ValueError; the guard zones must never change.  Exits 0 when
every example held, 1 with the failing example otherwise.
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier import native
from kvtier.native import ranges

GUARD = 64 << 10
SIZE = 1 << 20
GUARD_BYTE = 0x5C
CLEAN = (TypeError, ValueError)

_mem = native.alloc_aligned(GUARD + SIZE + GUARD)
_mem[:] = GUARD_BYTE
BASE = _mem.ctypes.data + GUARD
END = BASE + SIZE
_reg = ranges.register(BASE, SIZE, owner="fuzz buffer")
_unregistered = np.zeros(4096, dtype=np.uint8)      # real memory nobody registered
_fd, _path = tempfile.mkstemp(prefix="kvtier-fuzz-")
os.pwrite(_fd, bytes(range(256)) * (2 * SIZE // 256), 0)

# ---- strategies -------------------------------------------------------------------------------
addresses = st.one_of(
    st.integers(0, SIZE - 1).map(lambda o: BASE + o),                  # inside, any alignment
    st.integers(0, SIZE // 4096 - 1).map(lambda p: BASE + 4096 * p),   # inside, page-aligned
    st.integers(1, GUARD).map(lambda o: BASE - o),                     # just below
    st.integers(0, GUARD - 1).map(lambda o: END + o),                  # just past the end
    st.just(_unregistered.ctypes.data),
    st.sampled_from([0, 1, 8, 4096, 2**47, 2**63, 2**64 - 4096, 2**64 - 1]),
    st.integers(0, 2**64 - 1),                                          # wild
)
lengths = st.one_of(
    st.integers(0, 64), st.integers(0, SIZE), st.sampled_from([SIZE, SIZE + 1, 2 * SIZE]),
    st.sampled_from([2**31, 2**32 + 7, 2**63 - 1, 2**63, 2**64 - 1]),
    st.integers(1, 4096).map(lambda n: 2**64 - n),                      # a negative length, wrapped
)


def column(values: list[int], form: str):
    """The same numbers as the op's argument would be given right, or in a wrong shape or dtype."""
    if form == "u64":
        return np.array(values, dtype=np.uint64)
    if form == "i64":
        return np.array([v - 2**64 if v >= 2**63 else v for v in values], dtype=np.int64)
    if form == "u32":
        return np.array([v & 0xFFFFFFFF for v in values], dtype=np.uint32)
    if form == "2d":
        return np.array(values, dtype=np.uint64).reshape(1, -1)
    if form == "strided":
        return np.repeat(np.array(values, dtype=np.uint64), 2)[::2]
    if form == "list":
        return list(values)
    return np.array(values, dtype=np.uint64)[:-1] if values else np.array([7], dtype=np.uint64)  # "short"


forms = st.sampled_from(["u64"] * 8 + ["i64", "u32", "2d", "strided", "list", "short"])
threads = st.one_of(st.none(), st.integers(-2, 80), st.sampled_from([True, 1.5, "2", 2**70]))
spans = st.integers(0, 6).flatmap(lambda n: st.tuples(
    st.lists(addresses, min_size=n, max_size=n), st.lists(addresses, min_size=n, max_size=n),
    st.lists(lengths, min_size=n, max_size=n), forms, forms, forms))
block_args = st.tuples(st.integers(-8, 2 * SIZE) | st.sampled_from([2**63, 2**64, -2**63]),
                       st.integers(-8, 2 * SIZE) | st.sampled_from([4096, 1 << 20, 2**64]),
                       st.integers(-8, 2 * SIZE) | st.sampled_from([0, 512, 4096]))
offsets = st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, 2 * SIZE), min_size=0, max_size=6)


def guards_intact() -> None:
    if not ((_mem[:GUARD] == GUARD_BYTE).all() and (_mem[GUARD + SIZE:] == GUARD_BYTE).all()):
        raise AssertionError("an op wrote outside the registered buffer")


def attempt(fn, *args) -> None:
    try:
        fn(*args)
    except CLEAN:
        pass
    guards_intact()


def run(examples: int) -> None:
    common = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(spans, threads)
    def copies(sp, th):
        src, dst, lens, fs, fd, fl = sp
        a, b, n = column(src, fs), column(dst, fd), column(lens, fl)
        attempt(native.copy_spans, a, b, n, th)
        attempt(native.copy_crc_spans, a, b, n, th)
        attempt(native.crc32c_spans, a, n, th)

    @common
    @given(spans, offsets, st.sampled_from(["one", "i32", "i64", "bad"]), threads)
    def span_io(sp, offs, fd_form, th):
        addrs, _, lens, fa, _, fl = sp
        offs = (offs + [0] * len(addrs))[:len(addrs)]
        fds = {"one": _fd, "i32": np.full(len(addrs), _fd, np.int32), "i64": np.full(len(addrs), _fd, np.int64),
               "bad": np.full(len(addrs), 2**40, np.int64)}[fd_form]
        o = np.array(offs, dtype=np.int64)
        attempt(native.pread_spans, fds, o, column(addrs, fa), column(lens, fl), th)
        attempt(native.pwrite_spans, fds, o, column(addrs, fa), column(lens, fl), th)

    @common
    @given(st.lists(addresses, max_size=4), forms, block_args, threads, st.booleans())
    def block_io(addrs, fa, blk, th, write):
        block_len, chunk_len, piece_len = blk
        op = native.pwrite_blocks if write else native.pread_blocks
        o = np.zeros(len(addrs), dtype=np.int64)
        attempt(op, _fd, o, column(addrs, fa), block_len, chunk_len, piece_len, th)

    @common
    @given(st.integers(0, SIZE), st.integers(0, SIZE), st.integers(0, 4096),
           st.sampled_from(["bytes", "bytearray", "ro", "strided", "int"]), threads)
    def buffers(i, j, n, kind, th):
        view = memoryview(_mem[GUARD:GUARD + SIZE])
        dst, src = view[i:i + n], view[j:j + n]
        other = {"bytes": bytes(n), "bytearray": bytearray(n), "ro": memoryview(bytes(n)),
                 "strided": memoryview(bytearray(2 * n))[::2], "int": 7}[kind]
        attempt(native.memcpy, dst, src, th)
        attempt(native.memcpy, dst, other, th)
        attempt(native.memcpy, other, src, th)
        attempt(native.crc32c, other, i)
        attempt(native.crc32c, src, j * 2**20)

    for test in (copies, span_io, block_io, buffers):
        test()


if __name__ == "__main__":
    ranges.set_mode(sys.argv[2] if len(sys.argv) > 2 else "strict")   # "off" shows what it guards
    try:
        run(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
    finally:
        os.close(_fd)
        os.unlink(_path)
    print("fuzz ok", ranges.stats())
