"""The torch reference of every device <-> buffer copy: pure tensor indexing.

It derives a block's bytes from torch semantics alone, independently of the
span arithmetic in :mod:`kvtier.layout`, so it is the oracle the span
mechanisms (native memcpy, CUDA DMA, CUDA kernels) are tested against, and
the copy path of last resort where CUDA tensors meet a machine without CuPy.

A block's bytes are, layer after layer, the bytes of that block's page in
physical (address) order: the page's dimensions sorted by stride, outermost
first.  For the usual contiguous page that is plain C order.

    data = gather_blocks(tensors, block_dim, ids)    # uint8 [n, block_bytes]
    scatter_blocks(tensors, block_dim, ids, data)    # the inverse
    store(layout, ids, slot_addrs, buffer_device)    # engine pages -> buffers
    load(layout, ids, slot_addrs, buffer_device)     # buffers -> engine pages
    copy_spans_torch(spans, src_device, dst_device)  # raw spans, one copy each

Buffers are given by address, as the tiers hand them out: host memory
(``buffer_device="cpu"``, pinned or not) or device memory (a GPU pool).
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError


def physical_view(t: torch.Tensor, block_dim: int) -> torch.Tensor:
    """``t`` as ``[num_blocks, *page]`` with the page dims in address order."""
    v = t.movedim(block_dim, 0)
    page_strides = v.stride()[1:]
    order = sorted(range(len(page_strides)), key=lambda d: -page_strides[d])
    return v.permute(0, *[1 + d for d in order])


def page_bytes(t: torch.Tensor, block_dim: int) -> int:
    return (t.numel() // t.shape[block_dim]) * t.element_size()


def _ids(block_ids, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(block_ids, dtype=np.int64))
    return ids.to(device)


def gather_blocks(tensors: Sequence[torch.Tensor], block_dim: int, block_ids) -> torch.Tensor:
    """Bytes of blocks ``block_ids``: uint8 ``[n, block_bytes]`` on the tensors' device."""
    dev = tensors[0].device
    ids = _ids(block_ids, dev)
    parts = []
    for t in tensors:
        pages = physical_view(t, block_dim).index_select(0, ids).contiguous()
        parts.append(pages.view(torch.uint8).reshape(ids.numel(), -1))
    return torch.cat(parts, dim=1)


def scatter_blocks(tensors: Sequence[torch.Tensor], block_dim: int, block_ids, data: torch.Tensor) -> None:
    """Write ``data`` (uint8 ``[n, block_bytes]``) into the pages of blocks ``block_ids``."""
    dev = tensors[0].device
    ids = _ids(block_ids, dev)
    data = data.to(dev)
    pos = 0
    for t in tensors:
        pb = page_bytes(t, block_dim)
        target = physical_view(t, block_dim)
        rows = data[:, pos:pos + pb].contiguous().view(t.dtype).reshape((ids.numel(),) + tuple(target.shape[1:]))
        target.index_copy_(0, ids, rows)
        pos += pb


# ---- raw buffers as tensors ---------------------------------------------------

class _DeviceBuffer:
    """Just enough of the CUDA array interface for torch to alias device memory."""

    def __init__(self, addr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (int(addr), False), "version": 3, "strides": None}


def buffer_tensor(addr: int, nbytes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A uint8 tensor aliasing ``nbytes`` at ``addr`` (host memory, or device memory on ``device``)."""
    device = torch.device(device)
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8, device=device)
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(int(addr)), dtype=torch.uint8)
    if device.type == "cuda":
        return torch.as_tensor(_DeviceBuffer(addr, nbytes), device=device)
    raise ConfigError("buffer_device", str(device), "cpu or cuda")


def _slots(addrs, nbytes: int, device) -> list[torch.Tensor]:
    return [buffer_tensor(int(a), nbytes, device) for a in np.asarray(addrs, dtype=np.uint64)]


def store(layout, block_ids, slot_addrs, buffer_device="cpu", sync: bool = True) -> None:
    """Copy blocks ``block_ids`` out of the engine pages into the buffers at ``slot_addrs``.

    ``sync``: wait for the device before returning (False: the caller synchronises the
    current stream, e.g. a transfer thread on its side stream)."""
    ids = layout.check_block_ids(block_ids)
    if ids.size == 0:
        return
    data = gather_blocks(layout.tensors, layout.block_dim, ids)
    for i, buf in enumerate(_slots(slot_addrs, layout.block_bytes, buffer_device)):
        buf.copy_(data[i])
    if sync and data.is_cuda:
        torch.cuda.synchronize(data.device)


def load(layout, block_ids, slot_addrs, buffer_device="cpu", sync: bool = True) -> None:
    """Copy the buffers at ``slot_addrs`` into the engine pages of blocks ``block_ids``."""
    ids = layout.check_block_ids(block_ids)
    if ids.size == 0:
        return
    bufs = _slots(slot_addrs, layout.block_bytes, buffer_device)
    data = torch.stack(bufs) if len(bufs) > 1 else bufs[0].reshape(1, -1)
    scatter_blocks(layout.tensors, layout.block_dim, ids, data)
    if sync and layout.tensors[0].is_cuda:
        torch.cuda.synchronize(layout.tensors[0].device)


def copy_spans_torch(spans, src_device, dst_device) -> None:
    """Copy raw spans with torch, one ``copy_`` per span; every side of a span on the given device.

    The fallback for CUDA span copies where CuPy is missing: correct, and as
    slow as one copy call per span makes it.
    """
    for s, d, n in zip(spans.src.tolist(), spans.dst.tolist(), spans.lengths.tolist()):
        buffer_tensor(d, n, dst_device).copy_(buffer_tensor(s, n, src_device), non_blocking=True)
    for dev in {torch.device(src_device), torch.device(dst_device)}:
        if dev.type == "cuda":
            torch.cuda.current_stream(dev).synchronize()
