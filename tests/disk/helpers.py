"""Helpers of the disk-tier tests: a small DiskTier, blocks put and verified by key, bit flips, injected I/O errors."""
from __future__ import annotations

import os
import random

import numpy as np

from kvtier import Namespace, native
from kvtier.layout import round_up
from kvtier.tiers.disk.slabs import ALIGN
from kvtier.tiers.disk.tier import DiskTier

from tests.helpers import block, k


NS = Namespace("disk-model", 16)


def make(path, bb=8192, slots=16, per_slab=4, **kw) -> DiskTier:
    slot = round_up(bb, ALIGN)
    kw.setdefault("namespace", NS)
    return DiskTier("disk", str(path), bb, slots * slot, slab_bytes=per_slab * slot, **kw)


def buffers(data: list[bytes], aligned: bool) -> list[memoryview]:
    """Writable copies of data: page-aligned (straight to disk, checksummed by the I/O
    threads) or not (through bounce buffers when O_DIRECT is on)."""
    if not aligned:
        return [memoryview(bytearray(d)) for d in data]
    out = []
    for d in data:
        buf = native.alloc_aligned(len(d))
        buf[:] = np.frombuffer(d, dtype=np.uint8)
        out.append(memoryview(buf))
    return out


def put(t, ids, bb=None, aligned=False):
    bb = bb or t.block_bytes
    keys = [k(i) for i in ids]
    slots = t.allocate(len(keys))
    assert slots is not None
    assert t.write(keys, slots, buffers([block(key, bb) for key in keys], aligned)) == [True] * len(keys)
    return dict(zip(keys, slots))


def verify(t, placed: dict, aligned=False) -> list[bool]:
    """Read every placed block into poisoned buffers; ok blocks must be byte-identical."""
    keys = list(placed)
    dsts = buffers([b"\xa5" * t.block_bytes for _ in keys], aligned)
    ok = t.read(keys, [placed[x] for x in keys], dsts)
    for key, good, d in zip(keys, ok, dsts):
        if good:
            assert bytes(d) == block(key, t.block_bytes)
    return ok


def flip(t, slot: int, where: int, rng: random.Random) -> None:
    """XOR one byte of a slot's block bytes with a random non-zero value."""
    g = t.geometry
    path = os.path.join(t.path, f"slab-{g.slab_of(slot):05d}.kvt")
    pos = g.offset_of(slot) + where
    with open(path, "r+b") as f:
        f.seek(pos)
        old = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([old ^ rng.randint(1, 255)]))


def inject(monkeypatch, op: str, err: int, *, fd_filter=None, every: int = 1):
    """Make native reads or writes (op "pread" or "pwrite") fail with -err, for I/Os whose
    fd passes fd_filter: both the span path (padded or bounced blocks) and the checksummed
    block path, so the test holds whichever one the tier takes."""
    op = op.removesuffix("_spans")
    count = {"n": 0}

    def fail(fds, res):
        fds_ = np.broadcast_to(np.asarray(fds), res.shape)
        for i in range(res.size):
            if fd_filter is None or fd_filter(int(fds_[i])):
                count["n"] += 1
                if count["n"] % every == 0:
                    res[i] = -err
        return res
    spans, blocks = getattr(native, op + "_spans"), getattr(native, op + "_blocks")

    def faulty_spans(fds, offsets, addrs, lengths, threads=None, *, within=()):
        return fail(fds, spans(fds, offsets, addrs, lengths, threads, within=within).copy())

    def faulty_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None, *, within=()):
        res, crcs = blocks(fds, offsets, addrs, block_len, chunk_len, piece_len, threads, within=within)
        return fail(fds, res.copy()), crcs
    monkeypatch.setattr(native, op + "_spans", faulty_spans)
    monkeypatch.setattr(native, op + "_blocks", faulty_blocks)
