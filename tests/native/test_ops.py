"""The native core against its Python reference, and both against first principles.

Every op runs on both backends (the native one is skipped when the extension is
not built). Destinations are poisoned first so that bytes an op should not have
touched, or failed to write, show up.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import native
from kvtier.native import numpy_ref
from kvtier.errors import ConfigError, MissingDependencyError

from tests.helpers import ROOT

POISON = 0xA5
CHECK_VECTOR = 0xE3069283  # CRC32C of b"123456789"

native_only = pytest.mark.skipif(not native.NATIVE,
                                 reason="native extension not in use (not built, or KVTIER_NATIVE=off)")
BACKENDS = [
    pytest.param(numpy_ref, id="reference"),
    pytest.param(native, id="native", marks=native_only),
]


@pytest.fixture(params=BACKENDS)
def ops(request):
    return request.param


def addr(a: np.ndarray) -> int:
    """The array's address, registered for the native span ops while the array lives."""
    native.ranges.register(a, owner="test buffer")
    return a.ctypes.data


def u64(values) -> np.ndarray:
    return np.array(list(values), dtype=np.uint64)


def poisoned(n: int) -> np.ndarray:
    return np.full(n, POISON, dtype=np.uint8)


def random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, n, dtype=np.uint8)


def crc32c_bitwise(data: bytes, value: int = 0) -> int:
    """CRC32C straight from the definition: one bit at a time."""
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def random_layout(rng, num_spans: int, max_len: int, arena: int):
    """Span lengths (with 0s and 1s mixed in) and non-overlapping, unaligned
    destination offsets laid out with random gaps inside an arena."""
    lengths = rng.integers(0, max_len + 1, num_spans)
    lengths[rng.random(num_spans) < 0.1] = 0
    lengths[rng.random(num_spans) < 0.1] = 1
    gaps = rng.integers(0, 64, num_spans)
    offsets = np.cumsum(gaps + lengths) - lengths
    assert offsets[-1] + lengths[-1] <= arena, "arena too small for this layout"
    return lengths.astype(np.uint64), offsets.astype(np.uint64)


# ---- copy_spans ------------------------------------------------------------

@pytest.mark.parametrize("threads", [None, 1, 2, 5])
@pytest.mark.parametrize("num_spans,max_len", [(1, 17), (40, 300), (500, 3000), (12, 200_000)])
def test_copy_spans_scatters_random_spans(ops, num_spans, max_len, threads):
    rng = np.random.default_rng(num_spans * 31 + max_len)
    arena = num_spans * (max_len + 64) + 64
    src = random_bytes(rng, max_len + 4096)
    dst = poisoned(arena)
    lengths, dst_off = random_layout(rng, num_spans, max_len, arena)
    src_off = rng.integers(0, 4096, num_spans).astype(np.uint64)  # sources may overlap

    ops.copy_spans(src_off + addr(src), dst_off + addr(dst), lengths, threads=threads)

    expected = poisoned(arena)
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist()):
        expected[d:d + n] = src[s:s + n]
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("size", [1, 4095, 256 * 1024 + 7, 3 * 1024 * 1024 + 13])
def test_copy_spans_one_span_at_unaligned_addresses(ops, size, threads):
    rng = np.random.default_rng(size)
    src = random_bytes(rng, size + 8)
    dst = poisoned(size + 16)
    ops.copy_spans(u64([addr(src) + 3]), u64([addr(dst) + 5]), u64([size]), threads=threads)
    assert (dst[:5] == POISON).all() and (dst[5 + size:] == POISON).all()
    np.testing.assert_array_equal(dst[5:5 + size], src[3:3 + size])


@native_only
@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_native_copies_with_and_without_streaming_stores(streaming, threads):
    """Big batches bypass the cache with streaming stores where the CPU has them;
    both that path and plain memcpy must move every byte and nothing more."""
    from kvtier.native import _kvtier_native as ext
    rng = np.random.default_rng(threads)
    src = random_bytes(rng, 80 * 40_064 + 200)  # covers every span below, +7
    try:
        ext._set_streaming(streaming)
        for head, tail in [(0, 0), (1, 3), (31, 127), (17, 4097)]:
            n = src.size - 200 - tail
            dst = poisoned(src.size)
            ext.memcpy(dst[head:head + n], src[100:100 + n], threads=threads)
            np.testing.assert_array_equal(dst[head:head + n], src[100:100 + n])
            assert (dst[:head] == POISON).all() and (dst[head + n:] == POISON).all()
        lengths, dst_off = random_layout(rng, 80, 40_000, 80 * 40_064 + 64)
        dst = poisoned(80 * 40_064 + 64)
        ext.copy_spans(dst_off + addr(src) + 7, dst_off + addr(dst), lengths, threads=threads)
        expected = poisoned(dst.size)
        for d, n in zip(dst_off.tolist(), lengths.tolist()):
            expected[d:d + n] = src[d + 7:d + 7 + n]
        np.testing.assert_array_equal(dst, expected)
    finally:
        ext._set_streaming(True)


def test_copy_spans_gathers_32_spans_into_one_block(ops):
    """The host tier's shape: one block made of per-layer pages."""
    rng = np.random.default_rng(7)
    pages = random_bytes(rng, 64 * 32 * 1024)
    block = poisoned(32 * 1024 * 32)
    picks = rng.permutation(64)[:32]
    ops.copy_spans(u64(addr(pages) + p * 32768 for p in picks),
                   u64(addr(block) + i * 32768 for i in range(32)),
                   np.full(32, 32768, dtype=np.uint64))
    np.testing.assert_array_equal(block.reshape(32, 32768), pages.reshape(64, 32768)[picks])


def test_copy_spans_accepts_empty_batches_and_null_zero_length_spans(ops):
    ops.copy_spans(u64([]), u64([]), u64([]))
    ops.copy_spans(u64([0]), u64([0]), u64([0]))


def test_copy_spans_runs_from_concurrent_callers(ops):
    rng = np.random.default_rng(3)
    srcs = [random_bytes(rng, 2 * 1024 * 1024) for _ in range(4)]
    dsts = [poisoned(2 * 1024 * 1024) for _ in range(4)]
    errors = []

    def worker(i):
        try:
            for _ in range(5):
                dsts[i][:] = POISON
                n = 64
                size = len(srcs[i]) // n
                offs = np.arange(n, dtype=np.uint64) * size
                ops.copy_spans(offs + addr(srcs[i]), offs[::-1].copy() + addr(dsts[i]),
                               np.full(n, size, dtype=np.uint64), threads=2)
                got = dsts[i].reshape(n, size)[::-1]
                if not np.array_equal(got, srcs[i].reshape(n, size)):
                    errors.append(i)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def _bad_span_args(src, dst):
    """Batches whose first span is fine and whose second is not."""
    a, b = addr(src), addr(dst)
    good_src, good_dst, good_len = u64([a + 32, a]), u64([b + 32, b]), u64([16, 16])
    return [
        ((u64([a + 32, a, a]), good_dst, good_len), ValueError, "same length"),
        ((good_src, good_dst, u64([16, 16, 16])), ValueError, "same length"),
        ((good_src.astype(np.int64), good_dst, good_len), ValueError, "src_addrs"),
        ((good_src, good_dst.astype(np.float64), good_len), ValueError, "dst_addrs"),
        ((good_src, good_dst, good_len.astype(np.uint32)), ValueError, "lengths"),
        ((good_src, good_dst, good_len.astype(">u8")), ValueError, "lengths"),
        ((good_src.reshape(1, 2), good_dst.reshape(1, 2), good_len.reshape(1, 2)),
         ValueError, "1-D"),
        ((u64([a + 32, 0, a])[::2], good_dst, good_len), ValueError, "contiguous"),
        ((good_src.tolist(), good_dst, good_len), TypeError, "src_addrs"),
        ((u64([a + 32, 0]), good_dst, good_len), ValueError, "null"),
        ((good_src, u64([b + 32, 2**64 - 8]), good_len), ValueError, "end of memory"),
        ((u64([a + 32, b + 8]), good_dst, good_len), ValueError, "overlap"),
    ]


def test_copy_spans_rejects_bad_arguments_before_copying_anything(ops):
    src = np.arange(64, dtype=np.uint8)
    dst = poisoned(64)
    for args, exc_type, words in _bad_span_args(src, dst):
        with pytest.raises(exc_type, match=words):
            ops.copy_spans(*args)
        assert (dst == POISON).all(), f"{words}: bytes moved before the error"


def test_threads_beyond_the_cap_are_capped(ops):
    src, dst = np.arange(100, dtype=np.uint8), poisoned(100)
    for threads in (64, 10**6, 2**80):
        ops.memcpy(dst, src, threads=threads)
    np.testing.assert_array_equal(dst, src)


@settings(max_examples=60, deadline=None)
@given(spans=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3000), st.integers(0, 99)),
                      max_size=40),
       threads=st.integers(1, 4))
def test_copy_spans_matches_a_model_on_any_span_list(spans, threads):
    """Any list of (source offset, length, gap) spans: both backends write exactly
    the model's bytes into a poisoned destination."""
    src = np.random.default_rng(len(spans)).integers(0, 256, 8000, dtype=np.uint8)
    dst_off, pos = [], 0
    for _, n, gap in spans:
        dst_off.append(pos + gap)
        pos += gap + n
    expected = poisoned(pos + 1)
    for (s, n, _), d in zip(spans, dst_off):
        expected[d:d + n] = src[s:s + n]
    backends = [numpy_ref] + ([native] if native.NATIVE else [])
    for ops in backends:
        dst = poisoned(pos + 1)
        ops.copy_spans(u64(s + addr(src) for s, _, _ in spans), u64(d + addr(dst) for d in dst_off),
                       u64(n for _, n, _ in spans), threads=threads)
        np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("threads,exc_type", [(0, ValueError), (-3, ValueError),
                                              ("2", TypeError), (1.5, TypeError)])
def test_threads_must_be_positive_ints(ops, threads, exc_type):
    with pytest.raises(exc_type, match="threads"):
        ops.copy_spans(u64([]), u64([]), u64([]), threads=threads)
    with pytest.raises(exc_type, match="threads"):
        ops.memcpy(bytearray(1), b"x", threads=threads)


# ---- memcpy -------------------------------------------------------------------

@pytest.mark.parametrize("threads", [None, 1, 4])
@pytest.mark.parametrize("size", [0, 1, 7, 4096, 300_001, 5 * 1024 * 1024 + 3])
def test_memcpy_copies_every_byte(ops, size, threads):
    rng = np.random.default_rng(size)
    src = random_bytes(rng, size + 1)[1:]  # unaligned source
    backing = poisoned(size + 3)
    dst = backing[2:2 + size]               # unaligned destination
    ops.memcpy(dst, src, threads=threads)
    np.testing.assert_array_equal(dst, src)
    assert backing[0] == backing[1] == POISON and backing[-1] == POISON


def test_memcpy_takes_any_buffer_of_equal_bytes(ops):
    src = np.linspace(0, 1, 1000, dtype=np.float32)
    dst = bytearray(4000)
    ops.memcpy(dst, src)
    assert bytes(dst) == src.tobytes()
    out = np.zeros((10, 100), dtype=np.float32)
    ops.memcpy(out, bytes(dst))
    np.testing.assert_array_equal(out.ravel(), src)


def test_memcpy_rejects_bad_buffers_and_leaves_dst_alone(ops):
    dst = poisoned(16)
    with pytest.raises(ValueError, match="16 bytes.*15 bytes"):
        ops.memcpy(dst, b"x" * 15)
    with pytest.raises(ValueError, match="read-only"):
        ops.memcpy(b"y" * 16, dst)
    with pytest.raises(ValueError, match="contiguous"):
        ops.memcpy(dst, np.zeros(32, dtype=np.uint8)[::2])
    with pytest.raises(ValueError, match="overlap"):
        ops.memcpy(dst[:8], dst[4:12])
    with pytest.raises(TypeError, match="src"):
        ops.memcpy(dst, [0] * 16)
    assert (dst == POISON).all()


# ---- CRC32C -------------------------------------------------------------------

def test_crc32c_check_vector(ops):
    assert ops.crc32c(b"123456789") == CHECK_VECTOR
    assert ops.crc32c(b"") == 0
    assert crc32c_bitwise(b"123456789") == CHECK_VECTOR


@pytest.mark.parametrize("size", [1, 3, 8, 63, 255, 769, 4096, 5003, 25_000, 49_155])
def test_crc32c_matches_bitwise_definition(ops, size):
    rng = np.random.default_rng(size)
    data = random_bytes(rng, size + 7)
    for start in (0, 1, 7):  # every alignment of the first byte
        chunk = data[start:start + size]
        assert ops.crc32c(chunk) == crc32c_bitwise(chunk.tobytes())


@native_only
@pytest.mark.parametrize("size", [0, 1, 9, 777, 24_576 + 5, 100_003, 1_000_000])
def test_native_table_and_hardware_paths_agree_with_reference(size):
    """The extension's portable table path is checked here even on CPUs where
    crc32c() itself takes the hardware one (three-way blocks start at 24 KiB)."""
    from kvtier.native import _kvtier_native as ext
    rng = np.random.default_rng(size)
    data = random_bytes(rng, size + 3)[3:]
    expected = numpy_ref.crc32c(data)
    assert ext.crc32c(data) == expected
    assert ext._crc32c_table(data) == expected
    assert ext._crc32c_table(data, 12345) == numpy_ref.crc32c(data, 12345)


@settings(max_examples=150, deadline=None)
@given(a=st.binary(max_size=6000), b=st.binary(max_size=6000), seed=st.integers(0, 2**32 - 1))
def test_crc32c_chains_like_zlib(a, b, seed):
    for ops in (numpy_ref, native):
        assert ops.crc32c(b, ops.crc32c(a)) == ops.crc32c(a + b)
        assert ops.crc32c(b, ops.crc32c(a, seed)) == ops.crc32c(a + b, seed)
    assert native.crc32c(a + b, seed) == numpy_ref.crc32c(a + b, seed)


def test_crc32c_accepts_buffers_and_checks_value(ops):
    data = np.arange(1000, dtype=np.float32)
    expected = crc32c_bitwise(data.tobytes())
    assert ops.crc32c(data) == expected
    assert ops.crc32c(memoryview(data.tobytes())) == expected
    assert ops.crc32c(bytearray(data.tobytes())) == expected
    with pytest.raises(ValueError, match="value"):
        ops.crc32c(b"x", -1)
    with pytest.raises(ValueError, match="value"):
        ops.crc32c(b"x", 2**32)
    with pytest.raises(TypeError, match="value"):
        ops.crc32c(b"x", "0")
    with pytest.raises(ValueError, match="contiguous"):
        ops.crc32c(data[::2])
    with pytest.raises(TypeError, match="buf"):
        ops.crc32c("text")


@pytest.mark.parametrize("threads", [None, 1, 3])
@pytest.mark.parametrize("num_spans,max_len", [(0, 1), (5, 100), (300, 4000), (6, 300_000)])
def test_crc32c_spans_one_checksum_per_span(ops, num_spans, max_len, threads):
    rng = np.random.default_rng(num_spans + max_len)
    data = random_bytes(rng, max_len + 4096)
    lengths = rng.integers(0, max_len + 1, num_spans).astype(np.uint64)
    if num_spans:
        lengths[0] = 0
    offsets = rng.integers(0, 4096, num_spans).astype(np.uint64)
    got = ops.crc32c_spans(offsets + addr(data), lengths, threads=threads)
    assert got.dtype == np.uint32 and got.shape == (num_spans,)
    expected = [numpy_ref.crc32c(data[o:o + n]) for o, n in zip(offsets.tolist(),
                                                                  lengths.tolist())]
    assert got.tolist() == expected


def test_crc32c_spans_rejects_bad_arrays(ops):
    data = np.zeros(8, dtype=np.uint8)
    with pytest.raises(ValueError, match="same length"):
        ops.crc32c_spans(u64([addr(data)]), u64([1, 2]))
    with pytest.raises(ValueError, match="addrs"):
        ops.crc32c_spans(np.array([addr(data)], dtype=np.int64), u64([1]))
    with pytest.raises(ValueError, match="null"):
        ops.crc32c_spans(u64([0]), u64([1]))


# ---- copy_crc_spans ---------------------------------------------------------------

@pytest.mark.parametrize("threads", [None, 1, 2, 5])
@pytest.mark.parametrize("num_spans,max_len", [(1, 17), (40, 3000), (7, 3 * 1024 * 1024 + 13)])
def test_copy_crc_spans_copies_and_checksums_each_span(ops, num_spans, max_len, threads):
    """Spans over a piece (1 MiB) are cut, checksummed apart and combined; every byte
    must land and every checksum must be the span's own."""
    rng = np.random.default_rng(num_spans * 7 + max_len)
    arena = num_spans * (max_len + 64) + 64
    src = random_bytes(rng, max_len + 4096)
    dst = poisoned(arena)
    lengths, dst_off = random_layout(rng, num_spans, max_len, arena)
    lengths[-1] = max_len                                  # at least one span of the full length
    dst_off[-1] = arena - 64 - max_len
    if num_spans > 1:
        assert dst_off[-2] + lengths[-2] <= dst_off[-1]
    src_off = rng.integers(0, 4096, num_spans).astype(np.uint64)

    got = ops.copy_crc_spans(src_off + addr(src), dst_off + addr(dst), lengths, threads=threads)

    expected = poisoned(arena)
    for s, d, n in zip(src_off.tolist(), dst_off.tolist(), lengths.tolist()):
        expected[d:d + n] = src[s:s + n]
    np.testing.assert_array_equal(dst, expected)
    assert got.dtype == np.uint32 and got.tolist() == [
        numpy_ref.crc32c(src[s:s + n]) for s, n in zip(src_off.tolist(), lengths.tolist())]


@native_only
@pytest.mark.parametrize("streaming", [False, True])
def test_native_copy_crc_spans_with_and_without_streaming_stores(streaming):
    from kvtier.native import _kvtier_native as ext
    rng = np.random.default_rng(11)
    sizes = [(1 << 20) + 5, 2 << 20, 4095, (1 << 20) - 3]
    srcs = [random_bytes(rng, n) for n in sizes]
    dsts = [poisoned(n + 9) for n in sizes]
    try:
        ext._set_streaming(streaming)
        got = native.copy_crc_spans(u64(addr(s) for s in srcs), u64(addr(d) + 4 for d in dsts),
                                     u64(sizes), threads=3)
    finally:
        ext._set_streaming(True)
    for s, d, n in zip(srcs, dsts, sizes):
        np.testing.assert_array_equal(d[4:4 + n], s)
        assert (d[:4] == POISON).all() and (d[4 + n:] == POISON).all()
    assert got.tolist() == [numpy_ref.crc32c(s) for s in srcs]


def test_copy_crc_spans_rejects_bad_arrays(ops):
    data = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match="same length"):
        ops.copy_crc_spans(u64([addr(data)]), u64([addr(data) + 32]), u64([1, 2]))
    with pytest.raises(ValueError, match="overlap"):
        ops.copy_crc_spans(u64([addr(data)]), u64([addr(data) + 8]), u64([16]))
    with pytest.raises(ValueError, match="null"):
        ops.copy_crc_spans(u64([0]), u64([addr(data)]), u64([1]))
    assert (data == 0).all()


# ---- pread_spans / pwrite_spans ---------------------------------------------------

def _io_layout(rng, num_spans, max_len):
    lengths = rng.integers(0, max_len + 1, num_spans).astype(np.uint64)
    lengths[::7] = 0
    lengths[1::11] = 1
    file_offsets = (np.cumsum(lengths + 13) - lengths).astype(np.int64)
    mem_offsets = (np.cumsum(lengths + 5) - lengths).astype(np.uint64)
    return lengths, file_offsets, mem_offsets


@pytest.mark.parametrize("threads", [None, 1, 4])
@pytest.mark.parametrize("fd_form", ["int32", "int64", "scalar"])
def test_pwrite_then_pread_round_trips(ops, tmp_path, fd_form, threads):
    rng = np.random.default_rng(11)
    lengths, file_off, mem_off = _io_layout(rng, 60, 20_000)
    total = int(mem_off[-1] + lengths[-1]) + 8
    src = random_bytes(rng, total)
    fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fds = {"int32": np.full(len(lengths), fd, dtype=np.int32),
               "int64": np.full(len(lengths), fd, dtype=np.int64), "scalar": fd}[fd_form]
        wrote = ops.pwrite_spans(fds, file_off, mem_off + addr(src), lengths, threads=threads)
        assert wrote.dtype == np.int64
        assert wrote.tolist() == lengths.astype(np.int64).tolist()
        dst = poisoned(total)
        got = ops.pread_spans(fds, file_off.view(np.uint64), mem_off + addr(dst), lengths,
                              threads=threads)
        assert got.tolist() == lengths.astype(np.int64).tolist()
    finally:
        os.close(fd)
    expected = poisoned(total)
    for m, n in zip(mem_off.tolist(), lengths.tolist()):
        expected[m:m + n] = src[m:m + n]
    np.testing.assert_array_equal(dst, expected)


def test_pread_stops_at_end_of_file(ops, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(b"abcdefghij")
    dst = poisoned(64)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = ops.pread_spans(fd, np.array([6, 10, 100], dtype=np.int64),
                              u64([addr(dst), addr(dst) + 16, addr(dst) + 32]), u64([8, 8, 8]))
    finally:
        os.close(fd)
    assert got.tolist() == [4, 0, 0]
    assert bytes(dst[:4]) == b"ghij" and (dst[4:] == POISON).all()


def test_io_errors_come_back_as_negative_errno(ops, tmp_path):
    buf = poisoned(32)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)  # now a closed descriptor
    lengths = u64([16, 0])
    addrs = u64([addr(buf), addr(buf)])
    offs = np.zeros(2, dtype=np.int64)
    assert ops.pread_spans(fd, offs, addrs, lengths).tolist() == [-errno.EBADF, 0]
    assert ops.pwrite_spans(fd, offs, addrs, lengths).tolist() == [-errno.EBADF, 0]
    assert ops.pread_spans(np.array([-1, 2**40], dtype=np.int64), offs, addrs,
                           u64([4, 4])).tolist() == [-errno.EBADF, -errno.EBADF]

    ro = os.open(tmp_path / "f", os.O_RDONLY)
    dirfd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert ops.pwrite_spans(ro, offs[:1], addrs[:1], lengths[:1]).tolist() == [-errno.EBADF]
        assert ops.pread_spans(dirfd, offs[:1], addrs[:1], lengths[:1]).tolist() == [-errno.EISDIR]
        assert ops.pread_spans(ro, np.array([-5], dtype=np.int64), addrs[:1],
                               lengths[:1]).tolist() == [-errno.EINVAL]
        assert ops.pread_spans(ro, u64([2**63 + 1]), addrs[:1],
                               lengths[:1]).tolist() == [-errno.EINVAL]
    finally:
        os.close(ro)
        os.close(dirfd)
    assert (buf == POISON).all()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_disk_is_a_result_not_an_exception(ops):
    buf = np.arange(100, dtype=np.uint8)
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        got = ops.pwrite_spans(fd, np.zeros(2, dtype=np.int64), u64([addr(buf)] * 2), u64([100, 0]))
    finally:
        os.close(fd)
    assert got.tolist() == [-errno.ENOSPC, 0]


def test_io_spans_reject_bad_arrays(ops, tmp_path):
    buf = poisoned(8)
    a, n, o = u64([addr(buf)]), u64([8]), np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="fds"):
        ops.pread_spans(np.array([1], dtype=np.uint64), o, a, n)
    with pytest.raises(ValueError, match="fds"):
        ops.pread_spans(np.array([1, 1], dtype=np.int32), o, a, n)
    with pytest.raises(ValueError, match="offsets"):
        ops.pwrite_spans(1, np.zeros(1, dtype=np.float64), a, n)
    with pytest.raises(ValueError, match="same length"):
        ops.pwrite_spans(1, o, a, u64([8, 8]))
    with pytest.raises(ValueError, match="null"):
        ops.pread_spans(1, o, u64([0]), n)
    with pytest.raises(ValueError, match="fds"):
        ops.pread_spans(2**40, o, a, n)


def _open_direct(path):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        pytest.skip(f"O_DIRECT not supported here: {exc}")


def test_o_direct_round_trip(ops, tmp_path):
    rng = np.random.default_rng(5)
    block = 4096
    src = ops.alloc_aligned(16 * block)
    src[:] = random_bytes(rng, src.size)
    dst = ops.alloc_aligned(16 * block)
    dst[:] = POISON
    fd = _open_direct(tmp_path / "direct")
    try:
        lengths = u64([block, 4 * block, 0, 2 * block])
        mem = u64([0, block, 5 * block, 5 * block]) + addr(src)
        file_off = np.array([8 * block, 0, 0, 20 * block], dtype=np.int64)
        wrote = ops.pwrite_spans(fd, file_off, mem, lengths, threads=2)
        if wrote[0] == -errno.EINVAL:
            pytest.skip("filesystem refuses O_DIRECT writes")
        assert wrote.tolist() == lengths.astype(np.int64).tolist()
        got = ops.pread_spans(fd, file_off, mem - addr(src) + addr(dst), lengths, threads=2)
    finally:
        os.close(fd)
    assert got.tolist() == lengths.astype(np.int64).tolist()
    np.testing.assert_array_equal(dst[:7 * block], src[:7 * block])
    assert (dst[7 * block:] == POISON).all()


def test_o_direct_read_of_unaligned_file_end(ops, tmp_path):
    path = tmp_path / "tail"
    payload = np.random.default_rng(9).integers(0, 256, 5000, dtype=np.uint8)
    path.write_bytes(payload.tobytes())
    dst = ops.alloc_aligned(8192)
    dst[:] = POISON
    fd = _open_direct(path)
    try:
        got = ops.pread_spans(fd, np.zeros(1, dtype=np.int64), u64([addr(dst)]), u64([8192]))
    finally:
        os.close(fd)
    if got[0] == -errno.EINVAL:
        pytest.skip("filesystem refuses O_DIRECT reads")
    assert got.tolist() == [5000]
    np.testing.assert_array_equal(dst[:5000], payload)


# ---- checksummed block I/O --------------------------------------------------------

def block_checksum(data: bytes, chunk: int) -> int:
    """The disk tier's block checksum from the definition: CRC32C of the chunks' CRC32Cs."""
    table = b"".join(crc32c_bitwise(data[c:c + chunk]).to_bytes(4, "little") for c in range(0, len(data), chunk))
    return crc32c_bitwise(table)


@pytest.mark.parametrize("threads", [None, 1, 4])
@pytest.mark.parametrize("block_len,chunk,piece", [
    (4096, 4096, 0), (3 * 4096 + 100, 4096, 0), (8 * 4096, 2 * 4096, 4096), (8 * 4096, 2 * 4096, 1024),
    (9 * 4096, 2 * 4096, 4 * 4096), (5000, 65536, 0), (65536 + 17, 65536, 16384), (12 * 4096, 4096, 10 ** 9)])
def test_block_io_round_trips_and_checksums_every_block(ops, tmp_path, block_len, chunk, piece, threads):
    rng = np.random.default_rng(block_len + piece)
    n = 5
    src = random_bytes(rng, n * block_len + 64)
    mem = u64(range(3, 3 + n * block_len, block_len))          # unaligned: buffered I/O
    offs = np.array([block_len * i * 2 + 7 for i in range(n)], dtype=np.int64)  # gaps between blocks
    want = [block_checksum(bytes(src[m:m + block_len]), chunk) for m in mem.tolist()]
    fd = os.open(tmp_path / "blocks", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        wrote, sums = ops.pwrite_blocks(fd, offs, mem + addr(src), block_len, chunk, piece, threads)
        assert wrote.dtype == np.int64 and sums.dtype == np.uint32
        assert wrote.tolist() == [block_len] * n and sums.tolist() == want
        dst = poisoned(src.size)
        got, sums = ops.pread_blocks(np.full(n, fd, dtype=np.int64), offs, mem + addr(dst), block_len, chunk,
                                     piece, threads)
    finally:
        os.close(fd)
    assert got.tolist() == [block_len] * n and sums.tolist() == want
    np.testing.assert_array_equal(dst[3:-61], src[3:-61])
    assert (dst[:3] == POISON).all() and (dst[-61:] == POISON).all()


def test_block_io_reports_the_first_error_or_short_count_per_block(ops, tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes(range(256)) * 40)                  # 10240 bytes
    dst = poisoned(3 * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        got, sums = ops.pread_blocks(fd, np.array([0, 4096, 2**63 - 100], dtype=np.int64),
                                     u64([addr(dst), addr(dst) + 8192, addr(dst) + 16384]), 8192, 4096, 2048)
        assert got.tolist() == [8192, 10240 - 4096, -errno.EINVAL]
        assert sums[0] == block_checksum(bytes(range(256)) * 32, 4096) and sums[1:].tolist() == [0, 0]
        assert ops.pwrite_blocks(fd, np.zeros(1, dtype=np.int64), u64([addr(dst)]), 4096, 4096)[0].tolist() == \
            [-errno.EBADF]
    finally:
        os.close(fd)
    assert (dst[16384:] == POISON).all()


def test_block_io_rejects_bad_arguments(ops):
    buf = poisoned(8192)
    a, o = u64([addr(buf)]), np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="piece_len"):
        ops.pread_blocks(1, o, a, 8192, 4096, 3000)
    with pytest.raises(ValueError, match="positive"):
        ops.pread_blocks(1, o, a, 0, 4096)
    with pytest.raises(ValueError, match="positive"):
        ops.pwrite_blocks(1, o, a, 4096, 0)
    with pytest.raises(ValueError, match="same length"):
        ops.pread_blocks(np.array([1, 1], dtype=np.int32), o, a, 4096, 4096)
    with pytest.raises(ValueError, match="null"):
        ops.pread_blocks(1, o, u64([0]), 4096, 4096)
    with pytest.raises(ValueError, match="offsets"):
        ops.pread_blocks(1, np.zeros(1, dtype=np.float32), a, 4096, 4096)
    assert (buf == POISON).all()


# ---- buffers, thread pool ------------------------------------------------------------

@pytest.mark.parametrize("nbytes,alignment", [(0, 4096), (1, 64), (12345, 4096), (8192, 2**21)])
def test_alloc_aligned(ops, nbytes, alignment):
    buf = ops.alloc_aligned(nbytes, alignment)
    assert buf.dtype == np.uint8 and buf.size == nbytes and buf.flags.writeable
    assert nbytes == 0 or addr(buf) % alignment == 0  # an empty array has no address


@pytest.mark.parametrize("nbytes,alignment", [(-1, 4096), (10, 3), (10, 0), (1.5, 64)])
def test_alloc_aligned_rejects_bad_sizes(ops, nbytes, alignment):
    with pytest.raises(ValueError):
        ops.alloc_aligned(nbytes, alignment)


@native_only
def test_thread_pool_is_created_once():
    from kvtier.native import _kvtier_native as ext
    src = np.ones(8 * 1024 * 1024, dtype=np.uint8)
    dst = np.zeros_like(src)
    ext.memcpy(dst, src, threads=3)
    workers = ext._pool_workers()
    assert workers >= 2
    for _ in range(20):
        ext.memcpy(dst, src, threads=3)
        ext.copy_spans(u64([addr(src)]), u64([addr(dst)]), u64([src.size]), threads=2)
    assert ext._pool_workers() == workers
    assert (dst == 1).all()


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "KVTIER_NATIVE"}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=full_env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


@native_only
def test_pool_works_in_a_forked_child():
    code = """
import os, numpy as np
from kvtier import native
src = np.arange(4 << 20, dtype=np.uint64).view(np.uint8)
dst = np.zeros_like(src)
native.memcpy(dst, src, threads=2)          # workers exist before fork
pid = os.fork()
if pid == 0:
    dst[:] = 0
    native.memcpy(dst, src, threads=2)
    os._exit(0 if (dst == src).all() else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert "child 0" in result.stdout


HIDE_EXTENSION = "import sys; sys.modules['kvtier.native._kvtier_native'] = None\n"


def test_auto_falls_back_to_reference_when_extension_is_missing():
    result = _run_python(HIDE_EXTENSION + """
from kvtier import native
from kvtier.native import numpy_ref
assert native.mode == "auto" and not native.NATIVE and not native.HARDWARE_CRC
assert native.crc32c is numpy_ref.crc32c
print(hex(native.crc32c(b"123456789")))
""", KVTIER_NATIVE="auto")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hex(CHECK_VECTOR)


def test_on_fails_loudly_when_extension_is_missing():
    result = _run_python(HIDE_EXTENSION + """
try:
    from kvtier import native
except ImportError as exc:
    # kvtier itself failed to import; its errors module loaded first and stays
    assert isinstance(exc, sys.modules["kvtier.errors"].MissingDependencyError)
    print(exc)
""", KVTIER_NATIVE="on")
    assert result.returncode == 0, result.stderr
    assert "pip install -e ." in result.stdout
    assert "KVTIER_NATIVE=on" in result.stdout


def test_off_uses_reference_even_when_built():
    result = _run_python("from kvtier import native; print(native.NATIVE, native.mode)",
                         KVTIER_NATIVE="off")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "off"]


@native_only
def test_on_uses_the_extension_when_built():
    result = _run_python("from kvtier import native; print(native.NATIVE, native.mode)",
                         KVTIER_NATIVE="on")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "on"]


def test_unknown_mode_is_a_config_error():
    result = _run_python("""
import sys
try:
    from kvtier import native
except ValueError as exc:
    assert isinstance(exc, sys.modules["kvtier.errors"].ConfigError)
    print(exc)
""", KVTIER_NATIVE="fast")
    assert result.returncode == 0, result.stderr
    assert "KVTIER_NATIVE" in result.stdout and "'fast'" in result.stdout
    assert "auto, on, off" in result.stdout


def test_error_classes_are_kvtier_errors():
    assert issubclass(native.NativeExtensionMissing, MissingDependencyError)
    assert issubclass(ConfigError, ValueError)
