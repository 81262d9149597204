"""Python versions of every native op: the fallback and the test oracle.

Each function has the signature, argument checks and results of its twin in
the C extension (csrc/kvtier_native.c), so kvtier/_native.py can hand out
either. Work runs on the calling thread; ``threads`` is checked and ignored.

Spans are raw addresses (numpy uint64 arrays). An address is trusted once it is
non-null and does not wrap: pointing one at memory you do not own is undefined
behaviour here exactly as in C.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import os

import numpy as np

HARDWARE_CRC = False
MAX_THREADS = 64
DEFAULT_THREADS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1), 8)

_POLY = 0x82F63B78  # CRC32C (Castagnoli), bit-reflected
_INT64_MAX = 2**63 - 1
_ADDR_END = 2**64  # 64-bit address space
_UNSIGNED, _SIGNED = "BHILQN", "bhilqn"


# ---- argument checks (same rules and messages as the extension) ----------

def _dtype_of(view: memoryview) -> str | None:
    fmt = view.format.lstrip("@=<")
    if len(fmt) != 1:
        return None
    if fmt in _UNSIGNED:
        return f"uint{view.itemsize * 8}"
    if fmt in _SIGNED:
        return f"int{view.itemsize * 8}"
    return None


def _array(obj, name: str, allowed: tuple[str, ...]) -> np.ndarray:
    wanted = " or ".join(allowed)
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name} must be a 1-D {wanted} numpy array, "
                        f"got {type(obj).__name__}") from None
    dtype = _dtype_of(view)
    if dtype not in allowed:
        got = dtype or f"buffer format {view.format!r}"
        raise ValueError(f"{name} must be a 1-D {wanted} array, got dtype {got}")
    if view.ndim != 1:
        raise ValueError(f"{name} must be a 1-D {wanted} array, got {view.ndim} dimensions")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be a contiguous {wanted} array, got a strided view "
                         "(use numpy.ascontiguousarray)")
    return np.frombuffer(view, dtype=np.dtype(dtype))


def _same_length(a: str, va: np.ndarray, b: str, vb: np.ndarray) -> None:
    if va.size != vb.size:
        raise ValueError(f"{a} and {b} must have the same length, got {va.size} and {vb.size}")


def _check_span(name: str, i: int, addr: int, length: int) -> None:
    if length == 0:
        return
    if addr == 0:
        raise ValueError(f"span {i}: {name} is 0 (null) for a length of {length} bytes")
    if addr + length > _ADDR_END or length > 2**63 - 1:
        raise ValueError(f"span {i}: {name} {addr:#x} + {length} bytes runs past the end of memory")


def _threads(threads) -> int:
    if threads is None:
        return DEFAULT_THREADS
    if not isinstance(threads, int) or isinstance(threads, bool):
        raise TypeError(f"threads must be a positive int or None, got {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return min(threads, MAX_THREADS)


def _bytes(obj, name: str, writable: bool) -> memoryview:
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name} must support the buffer protocol, "
                        f"got {type(obj).__name__}") from None
    if writable and view.readonly:
        raise ValueError(f"{name} is read-only ({type(obj).__name__})")
    if not view.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return view


def _at(addr: int, length: int) -> np.ndarray:
    """A writable uint8 view of `length` bytes at a raw address."""
    return np.frombuffer((ctypes.c_char * length).from_address(addr), dtype=np.uint8)


def _address(view: memoryview) -> int:
    if view.nbytes == 0:
        return 0
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


# ---- copies -------------------------------------------------------------

def copy_spans(src_addrs, dst_addrs, lengths, threads=None) -> None:
    """memcpy(dst_addrs[i], src_addrs[i], lengths[i]) for every span."""
    _threads(threads)
    src = _array(src_addrs, "src_addrs", ("uint64",))
    dst = _array(dst_addrs, "dst_addrs", ("uint64",))
    lens = _array(lengths, "lengths", ("uint64",))
    _same_length("src_addrs", src, "dst_addrs", dst)
    _same_length("src_addrs", src, "lengths", lens)
    spans = list(zip(src.tolist(), dst.tolist(), lens.tolist()))
    for i, (s, d, n) in enumerate(spans):
        _check_span("src_addrs", i, s, n)
        _check_span("dst_addrs", i, d, n)
        if n and s < d + n and d < s + n:
            raise ValueError(f"span {i}: source and destination overlap")
    for s, d, n in spans:
        if n:
            ctypes.memmove(d, s, n)


def memcpy(dst, src, threads=None) -> None:
    """Copy every byte of buffer `src` into buffer `dst` (same size, no overlap)."""
    _threads(threads)
    dview = _bytes(dst, "dst", writable=True)
    sview = _bytes(src, "src", writable=False)
    if dview.nbytes != sview.nbytes:
        raise ValueError(f"dst has {dview.nbytes} bytes but src has {sview.nbytes} bytes")
    n = dview.nbytes
    if n == 0:
        return
    d, s = _address(dview), _address(sview)
    if s < d + n and d < s + n:
        raise ValueError("dst and src overlap")
    ctypes.memmove(d, s, n)


def alloc_aligned(nbytes: int, alignment: int = 4096) -> np.ndarray:
    """A zeroed uint8 array of `nbytes` whose first byte sits on `alignment`."""
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        raise ValueError(f"nbytes must be a non-negative int, got {nbytes!r}")
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1
            or alignment & (alignment - 1)):
        raise ValueError(f"alignment must be a power of two, got {alignment!r}")
    raw = np.zeros(nbytes + alignment, dtype=np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes]


# ---- CRC32C -------------------------------------------------------------

def _byte_tables() -> list[np.ndarray]:
    """Slice-by-4 tables: tables[k][b] is the register after byte b and k zero bytes."""
    first = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        first.append(c)
    tables = [np.array(first, dtype=np.uint32)]
    for _ in range(3):
        tables.append((tables[-1] >> 8) ^ tables[0][tables[-1] & 0xFF])
    return tables


_TABLES = _byte_tables()
_TABLE_LIST = _TABLES[0].tolist()
_LANE = 256  # bytes per lane in the vectorised update
_BITS = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(bool)


def _tables_from_basis(basis: np.ndarray) -> np.ndarray:
    """4 x 256 lookup tables of the linear map that sends bit i to basis[i]."""
    return np.stack([np.bitwise_xor.reduce(np.where(_BITS, basis[8 * k:8 * k + 8], 0), axis=1)
                     for k in range(4)]).astype(np.uint32)


def _apply(tables: np.ndarray, regs: np.ndarray) -> np.ndarray:
    return (tables[0][regs & 0xFF] ^ tables[1][(regs >> 8) & 0xFF]
            ^ tables[2][(regs >> 16) & 0xFF] ^ tables[3][regs >> 24])


@functools.lru_cache(maxsize=None)
def _shift(level: int) -> np.ndarray:
    """Tables of the map: register -> register after _LANE * 2**level zero bytes."""
    if level == 0:
        basis = np.array([1 << bit for bit in range(32)], dtype=np.uint32)
        for _ in range(_LANE):
            basis = _TABLES[0][basis & 0xFF] ^ (basis >> 8)
    else:
        half = _shift(level - 1)
        basis = _apply(half, _apply(half, np.array([1 << b for b in range(32)], dtype=np.uint32)))
    return _tables_from_basis(basis)


def _update_bytes(reg: int, data: bytes) -> int:
    table = _TABLE_LIST
    for b in data:
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _update_lanes(reg: int, data: np.ndarray, lanes: int) -> int:
    """Checksum `lanes` (a power of two) lanes of _LANE bytes side by side, four
    bytes a step, then join neighbours pairwise: crc(a + b) = shift(crc(a)) ^ crc(b)."""
    words = np.ascontiguousarray(data.view("<u4").reshape(lanes, _LANE // 4).T)
    regs = np.zeros(lanes, dtype=np.uint32)
    regs[0] = reg
    t0, t1, t2, t3 = _TABLES
    for column in words:
        x = regs ^ column
        regs = t3[x & 0xFF] ^ t2[(x >> 8) & 0xFF] ^ t1[(x >> 16) & 0xFF] ^ t0[x >> 24]
    level = 0
    while regs.size > 1:
        regs = _apply(_shift(level), regs[0::2]) ^ regs[1::2]
        level += 1
    return int(regs[0])


def _update(reg: int, data: np.ndarray) -> int:
    """Raw register update; long inputs go through numpy a power-of-two run of
    lanes at a time, the short rest byte by byte."""
    while data.size >= 64 * _LANE:  # below this the byte loop is faster
        lanes = 1 << (data.size // _LANE).bit_length() - 1
        reg = _update_lanes(reg, data[:lanes * _LANE], lanes)
        data = data[lanes * _LANE:]
    return _update_bytes(reg, data.tobytes())


def _crc_value(value) -> int:
    if not isinstance(value, int):
        raise TypeError(f"value must be an int, got {type(value).__name__}")
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"value must be a CRC in [0, 2**32), got {value!r}")
    return int(value)


def crc32c(buf, value: int = 0) -> int:
    """CRC32C of `buf`, continuing from `value` (crc32c(b, crc32c(a)) == crc32c(a + b))."""
    value = _crc_value(value)
    data = np.frombuffer(_bytes(buf, "buf", writable=False), dtype=np.uint8)
    return _update(value ^ 0xFFFFFFFF, data) ^ 0xFFFFFFFF


def crc32c_spans(addrs, lengths, threads=None) -> np.ndarray:
    """One fresh CRC32C per span, as uint32."""
    _threads(threads)
    addr = _array(addrs, "addrs", ("uint64",))
    lens = _array(lengths, "lengths", ("uint64",))
    _same_length("addrs", addr, "lengths", lens)
    spans = list(zip(addr.tolist(), lens.tolist()))
    for i, (a, n) in enumerate(spans):
        _check_span("addrs", i, a, n)
    out = np.empty(len(spans), dtype=np.uint32)
    for i, (a, n) in enumerate(spans):
        out[i] = _update(0xFFFFFFFF, _at(a, n)) ^ 0xFFFFFFFF if n else 0
    return out


def copy_crc_spans(src_addrs, dst_addrs, lengths, threads=None) -> np.ndarray:
    """copy_spans, then the fresh CRC32C of each span's bytes, as uint32."""
    copy_spans(src_addrs, dst_addrs, lengths, threads)
    return crc32c_spans(dst_addrs, lengths, threads)


# ---- positional I/O -----------------------------------------------------

def _io_one(write: bool, fd: int, offset: int, addr: int, length: int) -> int:
    if length == 0:
        return 0
    if offset < 0 or offset > _INT64_MAX - length:
        return -errno.EINVAL
    buf = _at(addr, length)
    done, short_read = 0, False
    while done < length:
        try:
            if write:
                got = os.pwrite(fd, buf[done:], offset + done)
            else:
                got = os.preadv(fd, [buf[done:]], offset + done)
        except InterruptedError:
            continue
        except OverflowError:  # an fd outside the C int range
            return -errno.EBADF
        except OSError as exc:
            # A short O_DIRECT read that stopped at an unaligned end of file makes
            # the next read at that unaligned offset fail with EINVAL: that is
            # end of file, not an error.
            if not write and short_read and exc.errno == errno.EINVAL:
                break
            return -(exc.errno or errno.EIO)
        if got == 0:
            break  # end of file (read) or no progress (write): a short count
        short_read = got < length - done
        done += got
    return done


def _io_spans(write: bool, fds, offsets, addrs, lengths, threads) -> np.ndarray:
    _threads(threads)
    scalar_fd = isinstance(fds, int) and not isinstance(fds, bool)
    if scalar_fd:
        if not -2**31 <= fds < 2**31:
            raise ValueError(f"fds must be a file descriptor, got {fds!r}")
    else:
        fd_array = _array(fds, "fds", ("int32", "int64"))
    offs = _array(offsets, "offsets", ("int64", "uint64"))
    addr = _array(addrs, "addrs", ("uint64",))
    lens = _array(lengths, "lengths", ("uint64",))
    if not scalar_fd:
        _same_length("fds", fd_array, "addrs", addr)
    _same_length("offsets", offs, "addrs", addr)
    _same_length("addrs", addr, "lengths", lens)
    for i, (a, n) in enumerate(zip(addr.tolist(), lens.tolist())):
        _check_span("addrs", i, a, n)
    fd_list = [fds] * addr.size if scalar_fd else fd_array.tolist()
    out = np.empty(addr.size, dtype=np.int64)
    for i, (fd, off, a, n) in enumerate(zip(fd_list, offs.tolist(), addr.tolist(),
                                            lens.tolist())):
        if off > _INT64_MAX:
            off = off - 2**64  # same reading as the extension: negative, EINVAL
        out[i] = _io_one(write, fd, off, a, n)
    return out


def pwrite_spans(fds, offsets, addrs, lengths, threads=None) -> np.ndarray:
    """pwrite every span; int64 results: bytes written or -errno. Never raises for I/O."""
    return _io_spans(True, fds, offsets, addrs, lengths, threads)


def pread_spans(fds, offsets, addrs, lengths, threads=None) -> np.ndarray:
    """pread every span; int64 results: bytes read (short at end of file) or -errno."""
    return _io_spans(False, fds, offsets, addrs, lengths, threads)


# ---- checksummed block I/O ----------------------------------------------

def _block_args(block_len, chunk_len, piece_len) -> int:
    for name, v in (("block_len", block_len), ("chunk_len", chunk_len), ("piece_len", piece_len)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"{name} must be a non-negative int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if v >= 2**64:
            raise ValueError(f"{name} must be below 2**64, got {v!r}")
    if block_len == 0 or chunk_len == 0:
        raise ValueError(f"block_len and chunk_len must be positive, got {block_len} and {chunk_len}")
    if piece_len and piece_len < block_len and piece_len % chunk_len and chunk_len % piece_len:
        raise ValueError(f"piece_len must divide chunk_len ({chunk_len}) or be a multiple of it, "
                         f"got {piece_len}")
    return piece_len if 0 < piece_len < block_len else block_len


def _io_blocks(write, fds, offsets, addrs, block_len, chunk_len, piece_len, threads):
    _threads(threads)  # checked first, as the extension does
    piece = _block_args(block_len, chunk_len, piece_len)
    addr = _array(addrs, "addrs", ("uint64",))
    n = addr.size
    starts = list(range(0, block_len, piece))
    rep = len(starts)
    for i, a in enumerate(addr.tolist()):
        _check_span("addrs", i, a, block_len)
    if not (isinstance(fds, int) and not isinstance(fds, bool)):
        fds = _array(fds, "fds", ("int32", "int64"))
        _same_length("fds", fds, "addrs", addr)
        fds = np.repeat(fds, rep)
    res = _io_spans(write, fds, _piece_offsets(offsets, n, starts, block_len),
                    np.repeat(addr, rep) + np.tile(np.array(starts, np.uint64), n),
                    np.tile(np.array([min(piece, block_len - s) for s in starts], np.uint64), n), threads)
    results = np.empty(n, dtype=np.int64)
    crcs = np.zeros(n, dtype=np.uint32)
    for i in range(n):
        r = res[i * rep:(i + 1) * rep]
        neg = r[r < 0]
        results[i] = neg[0] if neg.size else r.sum()
        if results[i] == block_len:
            table = b"".join(crc32c(_at(int(addr[i]) + c, min(chunk_len, block_len - c))).to_bytes(4, "little")
                             for c in range(0, block_len, chunk_len))
            crcs[i] = crc32c(table)
    return results, crcs


def _piece_offsets(offsets, n: int, starts: list[int], block_len: int) -> np.ndarray:
    offs = _array(offsets, "offsets", ("int64", "uint64"))
    if offs.size != n:
        raise ValueError(f"offsets and addrs must have the same length, got {offs.size} and {n}")
    out = []
    for o in offs.tolist():
        if o > _INT64_MAX:
            o -= 2**64
        bad = o < 0 or o > _INT64_MAX - block_len          # EINVAL for every piece, as the extension
        out += [-1 if bad else o + s for s in starts]
    return np.array(out, dtype=np.int64)


def pwrite_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None):
    """Checksum then pwrite every block: (int64 bytes written or -errno, uint32 checksums)."""
    return _io_blocks(True, fds, offsets, addrs, block_len, chunk_len, piece_len, threads)


def pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None):
    """pread then checksum every block: (int64 bytes read or -errno, uint32 checksums)."""
    return _io_blocks(False, fds, offsets, addrs, block_len, chunk_len, piece_len, threads)
