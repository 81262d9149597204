"""BlockLayout: how one block's bytes map onto an engine's paged KV tensors.

The engine side is one tensor per layer (or one tensor for MLA's latent page),
each a view whose ``block_dim`` indexes engine blocks.  A block's bytes are the
concatenation, layer after layer, of that block's page in each tensor.  Pages
are copied as opaque bytes: kvtier never asks where K and V sit inside one.

Every copy is reduced to a list of ``(source, destination, bytes)`` spans.  The
page of block ``b`` in layer ``l`` is a fixed pattern of contiguous runs
shifted by ``b * block_stride[l]``, so spans for many blocks come out of one
vectorised numpy expression, and adjacent spans are coalesced.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import ConfigError


def round_up(n: int, align: int) -> int:
    """The least multiple of ``align`` that is at least ``n``."""
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Spans:
    """Parallel uint64 arrays: copy ``lengths[i]`` bytes from ``src[i]`` to ``dst[i]``."""
    src: np.ndarray
    dst: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def nbytes(self) -> int:
        return int(self.lengths.sum())


def coalesce(src: np.ndarray, dst: np.ndarray, lengths: np.ndarray) -> Spans:
    """Merge consecutive spans that continue each other on both sides."""
    if src.size <= 1:
        return Spans(src, dst, lengths)
    ends_s = src[:-1] + lengths[:-1]
    ends_d = dst[:-1] + lengths[:-1]
    brk = np.ones(src.size, dtype=bool)
    brk[1:] = (src[1:] != ends_s) | (dst[1:] != ends_d)
    starts = np.flatnonzero(brk)
    return Spans(src[starts], dst[starts], np.add.reduceat(lengths, starts).astype(np.uint64))


def _runs(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> tuple[np.ndarray, int]:
    """Offsets (bytes) of the contiguous runs of one page, and the run length."""
    dims = [(s, st) for s, st in zip(shape, strides) if s != 1]
    run, expect = 1, 1
    while dims and dims[-1][1] == expect:       # fold the contiguous suffix
        s, _ = dims.pop()
        run *= s
        expect *= s
    offsets = np.zeros(1, dtype=np.int64)
    for s, st in dims:
        offsets = (offsets[:, None] + np.arange(s, dtype=np.int64)[None, :] * st).ravel()
    return np.sort(offsets) * itemsize, run * itemsize


class BlockLayout:
    """Spans of one block's bytes across an engine's per-layer KV tensors."""

    def __init__(self, tensors: Sequence, block_dim: int = 0):
        if isinstance(tensors, dict):
            tensors = list(tensors.values())
        tensors = list(tensors)
        if not tensors:
            raise ConfigError("kv_caches", "[]", "at least one tensor")
        import torch
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise ConfigError(f"kv_caches[{i}]", type(t).__name__, "a torch.Tensor")
            if t.dim() <= block_dim:
                raise ConfigError(f"kv_caches[{i}].shape", tuple(t.shape),
                                  f"a tensor with a block dimension at index {block_dim}")
            if t.is_complex() or t.dtype == torch.bool:
                raise ConfigError(f"kv_caches[{i}].dtype", str(t.dtype), "a real numeric dtype")
        dev = tensors[0].device
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError("kv_caches[0].device", str(dev), "a cpu or cuda tensor")
        num_blocks = tensors[0].shape[block_dim]
        for i, t in enumerate(tensors):
            if t.device != dev:
                raise ConfigError(f"kv_caches[{i}].device", str(t.device), f"the same device as layer 0 ({dev})")
            if t.shape[block_dim] != num_blocks:
                raise ConfigError(f"kv_caches[{i}].shape[{block_dim}]", t.shape[block_dim],
                                  f"{num_blocks} blocks, like layer 0")
        self.tensors = tensors
        self.block_dim = block_dim
        self.device = dev
        self.num_blocks = int(num_blocks)
        self.num_layers = len(tensors)
        base, stride, length, dst = [], [], [], []
        page_bytes = []
        pos = 0
        for t in tensors:
            itemsize = t.element_size()
            shape = list(t.shape)
            strides = list(t.stride())
            bstride = strides.pop(block_dim) * itemsize
            shape.pop(block_dim)
            offs, run = _runs(shape, strides, itemsize)
            # merge runs that touch each other inside one page
            sp = coalesce(offs.astype(np.uint64), offs.astype(np.uint64),
                          np.full(offs.size, run, dtype=np.uint64))
            n = len(sp)
            base.append(np.uint64(t.data_ptr()) + sp.src)
            stride.append(np.full(n, bstride, dtype=np.int64))
            length.append(sp.lengths)
            dst.append(pos + np.concatenate(([0], np.cumsum(sp.lengths)[:-1])).astype(np.uint64))
            pb = int(sp.lengths.sum())
            page_bytes.append(pb)
            pos += pb
        self.page_bytes = tuple(page_bytes)
        self.block_bytes = pos
        self._base = np.concatenate(base).astype(np.uint64)
        self._stride = np.concatenate(stride)
        self._len = np.concatenate(length).astype(np.uint64)
        self._dst = np.concatenate(dst).astype(np.uint64)
        self.fingerprint = self._fingerprint()
        # The native copy ops touch only registered host memory: the engine's CPU pages are.
        from .native import ranges
        self._ranges = [ranges.register(t, owner=f"engine KV layer {i}")
                        for i, t in enumerate(tensors) if dev.type == "cpu"]

    def _fingerprint(self) -> str:
        desc = [(str(t.dtype), tuple(t.shape[:self.block_dim]) + tuple(t.shape[self.block_dim + 1:]),
                 self.block_dim) for t in self.tensors]
        raw = repr((desc, self.page_bytes)).encode()
        return hashlib.blake2b(raw, digest_size=8).hexdigest()

    def check_block_ids(self, block_ids) -> np.ndarray:
        """int64 array of block ids; ConfigError for anything out of range."""
        try:
            ids = np.asarray(block_ids.cpu() if hasattr(block_ids, "cpu") else block_ids)
        except (TypeError, ValueError) as e:
            raise ConfigError("block_ids", type(block_ids).__name__, "a 1-D sequence of ints") from e
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ConfigError("block_ids", f"shape {ids.shape} dtype {ids.dtype}", "a 1-D sequence of ints")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            bad = int(ids[(ids < 0) | (ids >= self.num_blocks)][0])
            raise ConfigError("block_ids", bad, f"engine block ids in [0, {self.num_blocks})")
        return ids

    def spans(self, block_ids, slot_addrs: np.ndarray, to_engine: bool) -> Spans:
        """Spans between engine blocks ``block_ids`` and block buffers at ``slot_addrs``.

        ``to_engine`` picks the direction: buffers → engine pages (load) or
        engine pages → buffers (store).
        """
        ids = self.check_block_ids(block_ids)
        slot_addrs = np.asarray(slot_addrs, dtype=np.uint64)
        if slot_addrs.shape != ids.shape:
            raise ConfigError("slots", slot_addrs.size, f"one buffer per block ({ids.size})")
        eng = (self._base[None, :].astype(np.int64) + ids[:, None] * self._stride[None, :]).astype(np.uint64)
        buf = slot_addrs[:, None] + self._dst[None, :]
        lens = np.broadcast_to(self._len, eng.shape)
        eng, buf, lens = eng.ravel(), buf.ravel(), np.ascontiguousarray(lens).ravel()
        return coalesce(buf, eng, lens) if to_engine else coalesce(eng, buf, lens)
