"""Argument errors of the native ops: formatted, naming the argument, and the same
words from the extension and the reference (issue 19)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from kvtier import native
from kvtier.native import numpy_ref

from tests.native.test_ops import BACKENDS, POISON, addr, native_only, poisoned, u64


@pytest.fixture(params=BACKENDS)
def ops(request):
    return request.param


def _error(fn, *args):
    with pytest.raises((TypeError, ValueError)) as info:
        fn(*args)
    return info.type, str(info.value)


def _bad_calls():
    """A poisoned buffer, and (op name, args, words): each call must fail with
    `words` in its message."""
    buf = poisoned(8192)
    a, o = u64([addr(buf)]), np.zeros(1, dtype=np.int64)
    return buf, [
        ("pread_blocks", (1, o, a, -1, 4096), "block_len must be a non-negative int, got -1"),
        ("pwrite_blocks", (1, o, a, -1, 4096), "block_len must be a non-negative int, got -1"),
        ("pread_blocks", (1, o, a, 4096, -4096), "chunk_len must be a non-negative int, got -4096"),
        ("pwrite_blocks", (1, o, a, 4096, 4096, -7), "piece_len must be a non-negative int, got -7"),
        ("pread_blocks", (1, o, a, 4096, 4096, -7), "piece_len must be a non-negative int, got -7"),
        ("pwrite_blocks", (1, o, a, 2**64, 4096), "block_len must be below 2**64"),
        ("pwrite_blocks", (1, o, a, 4096, 4096, 1.5), "piece_len must be a non-negative int, got float"),
        ("pread_blocks", (1, o, u64([2**64 - 8]), 4096, 4096),
         "span 0: addrs 0xfffffffffffffff8 + 4096 bytes runs past the end of memory"),
        ("copy_spans", (u64([addr(buf)]), u64([2**64 - 8]), u64([32])),
         "span 0: dst_addrs 0xfffffffffffffff8 + 32 bytes runs past the end of memory"),
        ("crc32c_spans", (u64([0, 2**64 - 1]), u64([0, 2])),
         "span 1: addrs 0xffffffffffffffff + 2 bytes runs past the end of memory"),
        ("pwrite_spans", (1, o, u64([2**63]), u64([2**63])),
         "span 0: addrs 0x8000000000000000 + 9223372036854775808 bytes runs past the end of memory"),
    ]


def test_argument_errors_are_formatted_and_name_the_argument(ops):
    buf, calls = _bad_calls()
    for name, args, words in calls:
        exc_type, message = _error(getattr(ops, name), *args)
        assert exc_type is (TypeError if "float" in words else ValueError), (name, message)
        assert words in message, f"{name}{args[3:]}: {message!r}"
        assert "%" not in message, f"{name}: unformatted message {message!r}"
    assert (buf == POISON).all(), "bytes moved before the error"


@native_only
def test_extension_and_reference_raise_the_same_errors():
    buf, calls = _bad_calls()          # buf must outlive the calls that point into it
    for name, args, _ in calls:
        assert _error(getattr(native, name), *args) == _error(getattr(numpy_ref, name), *args)


def test_negative_piece_len_is_refused_not_written(ops, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    buf = poisoned(4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="piece_len"):
            ops.pwrite_blocks(fd, np.zeros(1, dtype=np.int64), u64([addr(buf)]), 4096, 4096, -7)
    finally:
        os.close(fd)
    assert path.stat().st_size == 0
