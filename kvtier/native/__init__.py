"""kvtier's native ops: the C extension when it is there, the Python reference otherwise.

This is the only module that imports ``kvtier.native._kvtier_native``. Every op exists
twice with one signature: in the extension (batched, multithreaded on a
persistent thread pool, GIL released) and in :mod:`kvtier.native.numpy_ref`.

Ops:
    copy_spans(src_addrs, dst_addrs, lengths, threads=None)   gather/scatter copies
        (sources may overlap; a destination must not overlap another span's
        source or destination: spans run in parallel. A span whose own source
        and destination overlap is rejected.)
    memcpy(dst, src, threads=None)                           one big host copy
    crc32c(buf, value=0) -> int                              block checksum, chainable
    crc32c_spans(addrs, lengths, threads=None) -> uint32[]   one checksum per span
    copy_crc_spans(src_addrs, dst_addrs, lengths, threads=None) -> uint32[]
                                                             copy_spans + crc32c_spans in one pass
    pwrite_spans / pread_spans(fds, offsets, addrs, lengths, threads=None) -> int64[]
                                                             bytes moved or -errno per span
    pwrite_blocks / pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0,
                                 threads=None) -> (int64[], uint32[])
                                                             whole blocks, each checksummed by
        the thread that moves it (CRC32C over its chunk_len chunks' CRC32Cs, as
        block_checksums in kvtier.tiers.disk.slabs); pieces of piece_len bytes move in
        parallel, so checksumming overlaps I/O even within one block
    alloc_aligned(nbytes, alignment=4096) -> uint8[]         buffers fit for O_DIRECT

The raw-address ops (copy_spans, crc32c_spans, copy_crc_spans and the pread/pwrite
ops) check every span against the host memory registered in
:mod:`kvtier.native.ranges` before either implementation runs; ``within=[buf, ...]``
adds buffers that live for that call only.

Address and length arguments are 1-D contiguous numpy uint64 arrays (offsets
int64 or uint64, fds int32 or int64 or one int); anything else is a ValueError
or TypeError naming the argument; a batch is checked whole before any byte
moves. ``threads`` is a positive int (capped at 64) or None for
:data:`DEFAULT_THREADS`; batches under 256 KiB run on the calling thread, and
copies over 1 MiB use streaming stores that bypass the cache where the CPU has them.

The environment variable ``KVTIER_NATIVE`` picks the implementation, read once at
import: ``auto`` (default) uses the extension when it imports and the reference
otherwise; ``on`` requires the extension and raises if it is missing; ``off``
always uses the reference.

Attributes: ``mode`` (the requested mode), ``NATIVE`` (extension in use),
``HARDWARE_CRC`` (CRC32C runs on a CPU instruction), ``DEFAULT_THREADS``.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from . import numpy_ref, ranges
from ..errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")


class NativeExtensionMissing(MissingDependencyError):
    """KVTIER_NATIVE=on but the compiled extension cannot be imported."""

    def __init__(self, reason: str):
        self.module = "kvtier.native._kvtier_native"
        self.extra = None
        ImportError.__init__(
            self,
            f"KVTIER_NATIVE=on but kvtier's native extension cannot be imported ({reason}). "
            "Rebuild it with a C compiler present: `pip install -e .` in the kvtier "
            "checkout (or `python setup.py build_ext --inplace`), or set KVTIER_NATIVE=auto "
            "to run on the Python reference ops.",
        )


def _read_mode() -> str:
    raw = os.environ.get("KVTIER_NATIVE", "auto")
    mode = raw.strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError("KVTIER_NATIVE", raw, "one of " + ", ".join(MODES))
    return mode


def _load(mode: str):
    if mode == "off":
        return None
    try:
        from . import _kvtier_native
    except ImportError as exc:
        if mode == "on":
            raise NativeExtensionMissing(str(exc)) from exc
        log.debug("kvtier native extension unavailable (%s); using the Python reference ops",
                  exc)
        return None
    return _kvtier_native


mode = _read_mode()
_ext = _load(mode)

NATIVE: bool = _ext is not None
ranges.use_native_check(getattr(_ext, "_first_outside", None) if _ext is not None else None)
HARDWARE_CRC: bool = bool(_ext.HARDWARE_CRC) if _ext else False
DEFAULT_THREADS: int = int(_ext.DEFAULT_THREADS) if _ext else numpy_ref.DEFAULT_THREADS

alloc_aligned = numpy_ref.alloc_aligned

if _ext is not None:
    _impl_copy_spans = _ext.copy_spans
    memcpy = _ext.memcpy
    crc32c = _ext.crc32c

    def _impl_crc32c_spans(addrs, lengths, threads=None) -> np.ndarray:
        return np.frombuffer(_ext.crc32c_spans(addrs, lengths, threads), dtype=np.uint32)

    def _impl_copy_crc_spans(src_addrs, dst_addrs, lengths, threads=None) -> np.ndarray:
        return np.frombuffer(_ext.copy_crc_spans(src_addrs, dst_addrs, lengths, threads),
                             dtype=np.uint32)

    def _impl_pwrite_spans(fds, offsets, addrs, lengths, threads=None) -> np.ndarray:
        return np.frombuffer(_ext.pwrite_spans(fds, offsets, addrs, lengths, threads),
                             dtype=np.int64)

    def _impl_pread_spans(fds, offsets, addrs, lengths, threads=None) -> np.ndarray:
        return np.frombuffer(_ext.pread_spans(fds, offsets, addrs, lengths, threads),
                             dtype=np.int64)

    def _impl_pwrite_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None):
        res, crcs = _ext.pwrite_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len, threads)
        return np.frombuffer(res, dtype=np.int64), np.frombuffer(crcs, dtype=np.uint32)

    def _impl_pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None):
        res, crcs = _ext.pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len, threads)
        return np.frombuffer(res, dtype=np.int64), np.frombuffer(crcs, dtype=np.uint32)
else:
    _impl_copy_spans = numpy_ref.copy_spans
    memcpy = numpy_ref.memcpy
    crc32c = numpy_ref.crc32c
    _impl_crc32c_spans = numpy_ref.crc32c_spans
    _impl_copy_crc_spans = numpy_ref.copy_crc_spans
    _impl_pwrite_spans = numpy_ref.pwrite_spans
    _impl_pread_spans = numpy_ref.pread_spans
    _impl_pwrite_blocks = numpy_ref.pwrite_blocks
    _impl_pread_blocks = numpy_ref.pread_blocks


# ---- the raw-address ops: every span checked against registered memory first ----------
# (kvtier.native.ranges; ``within``: buffers of this call only, e.g. bounce buffers)

def copy_spans(src_addrs, dst_addrs, lengths, threads=None, *, within=()) -> None:
    """memcpy(dst_addrs[i], src_addrs[i], lengths[i]) for every span."""
    if ranges._mode != "off":
        ranges.check("copy_spans", (("src_addrs", src_addrs), ("dst_addrs", dst_addrs)), lengths, within)
    _impl_copy_spans(src_addrs, dst_addrs, lengths, threads)


def crc32c_spans(addrs, lengths, threads=None, *, within=()) -> np.ndarray:
    """One fresh CRC32C per span, as uint32."""
    if ranges._mode != "off":
        ranges.check("crc32c_spans", (("addrs", addrs),), lengths, within)
    return _impl_crc32c_spans(addrs, lengths, threads)


def copy_crc_spans(src_addrs, dst_addrs, lengths, threads=None, *, within=()) -> np.ndarray:
    """copy_spans, and the CRC32C of each span's bytes (uint32), in one pass."""
    if ranges._mode != "off":
        ranges.check("copy_crc_spans", (("src_addrs", src_addrs), ("dst_addrs", dst_addrs)), lengths,
                     within)
    return _impl_copy_crc_spans(src_addrs, dst_addrs, lengths, threads)


def pwrite_spans(fds, offsets, addrs, lengths, threads=None, *, within=()) -> np.ndarray:
    """pwrite every span; int64 results: bytes written or -errno. Never raises for I/O."""
    if ranges._mode != "off":
        ranges.check("pwrite_spans", (("addrs", addrs),), lengths, within)
    return _impl_pwrite_spans(fds, offsets, addrs, lengths, threads)


def pread_spans(fds, offsets, addrs, lengths, threads=None, *, within=()) -> np.ndarray:
    """pread every span; int64 results: bytes read (short at end of file) or -errno."""
    if ranges._mode != "off":
        ranges.check("pread_spans", (("addrs", addrs),), lengths, within)
    return _impl_pread_spans(fds, offsets, addrs, lengths, threads)


def pwrite_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None, *, within=()):
    """Checksum then pwrite every block: (int64 bytes written or -errno, uint32 checksums)."""
    if ranges._mode != "off":
        ranges.check("pwrite_blocks", (("addrs", addrs),), block_len, within)
    return _impl_pwrite_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len, threads)


def pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None, *, within=()):
    """pread then checksum every block: (int64 bytes read or -errno, uint32 checksums,
    valid where the whole block was read)."""
    if ranges._mode != "off":
        ranges.check("pread_blocks", (("addrs", addrs),), block_len, within)
    return _impl_pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len, threads)


__all__ = [
    "mode", "NATIVE", "HARDWARE_CRC", "DEFAULT_THREADS", "NativeExtensionMissing",
    "copy_spans", "memcpy", "crc32c", "crc32c_spans", "copy_crc_spans", "pwrite_spans", "pread_spans",
    "pwrite_blocks", "pread_blocks",
    "alloc_aligned", "ranges",
]
