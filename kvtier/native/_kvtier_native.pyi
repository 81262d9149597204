"""Type stub of the C extension kvtier.native._kvtier_native (csrc/kvtier_native.c).

Import kvtier._native instead: it wraps these ops (returning numpy arrays where
the extension returns bytearrays) and falls back to kvtier._reference.
Address, length and offset arguments are 1-D contiguous numpy arrays: uint64
addresses and lengths, int64 or uint64 offsets, int32 or int64 fds (or one int).
"""
from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

import numpy as np
import numpy.typing as npt

HARDWARE_CRC: bool
DEFAULT_THREADS: int
MAX_THREADS: int
INLINE_BYTES: int

_U64 = npt.NDArray[np.uint64]

def copy_spans(src_addrs: _U64, dst_addrs: _U64, lengths: _U64,
               threads: int | None = None) -> None: ...
def memcpy(dst: Buffer, src: Buffer, threads: int | None = None) -> None: ...
def crc32c(buf: Buffer, value: int = 0) -> int: ...
def _crc32c_table(buf: Buffer, value: int = 0) -> int: ...
def crc32c_spans(addrs: _U64, lengths: _U64, threads: int | None = None) -> bytearray: ...
def copy_crc_spans(src_addrs: _U64, dst_addrs: _U64, lengths: _U64,
                   threads: int | None = None) -> bytearray: ...
def pread_spans(fds: npt.NDArray[np.int32] | npt.NDArray[np.int64] | int,
                offsets: npt.NDArray[np.int64] | _U64, addrs: _U64, lengths: _U64,
                threads: int | None = None) -> bytearray: ...
def pwrite_spans(fds: npt.NDArray[np.int32] | npt.NDArray[np.int64] | int,
                 offsets: npt.NDArray[np.int64] | _U64, addrs: _U64, lengths: _U64,
                 threads: int | None = None) -> bytearray: ...
def pread_blocks(fds: npt.NDArray[np.int32] | npt.NDArray[np.int64] | int,
                 offsets: npt.NDArray[np.int64] | _U64, addrs: _U64, block_len: int, chunk_len: int,
                 piece_len: int = 0, threads: int | None = None) -> tuple[bytearray, bytearray]: ...
def pwrite_blocks(fds: npt.NDArray[np.int32] | npt.NDArray[np.int64] | int,
                  offsets: npt.NDArray[np.int64] | _U64, addrs: _U64, block_len: int, chunk_len: int,
                  piece_len: int = 0, threads: int | None = None) -> tuple[bytearray, bytearray]: ...
def _pool_workers() -> int: ...
def _set_streaming(enabled: bool) -> bool: ...
