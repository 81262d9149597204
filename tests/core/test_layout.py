"""BlockLayout: spans for every layout copy exactly one block's pages, in order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier import BlockLayout, ConfigError
from kvtier import native
from kvtier.layout import coalesce

L, NB, H, N, C = 3, 10, 2, 4, 8


def layouts():
    """name -> (tensors, block_dim): per-layer LBNHC/LBHNC, K/V-split, block-major, MLA."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16)
    bm = rnd(NB, L, 2, H, N, C)                                  # BLHNC: all layers of a block adjacent
    return {
        "LBNHC": ([rnd(NB, 2, N, H, C) for _ in range(L)], 0),
        "LBHNC": ([rnd(NB, 2, H, N, C) for _ in range(L)], 0),
        "kv-split": ([rnd(2, NB, N, H, C) for _ in range(L)], 1),   # K and V halves are separate runs
        "BLHNC": ([bm[:, i] for i in range(L)], 0),
        "MLA": ([rnd(NB, N, 64)], 0),
        "float32": ([torch.randn(NB, 2, N, H, C, generator=g) for _ in range(L)], 0),
    }


def reference_block(tensors, block_dim, b) -> bytes:
    return b"".join(t.select(block_dim, b).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)


@pytest.mark.parametrize("name", list(layouts()))
@pytest.mark.parametrize("ids", [[0, 1, 2], [7, 2, 9, 0], [3, 3, 5], [9]])
def test_store_spans_gather_exact_pages(name, ids):
    tensors, bd = layouts()[name]
    lay = BlockLayout(tensors, bd)
    buf = native.alloc_aligned(len(ids) * lay.block_bytes)
    buf[:] = 0xAB                                                  # poison
    addrs = buf.ctypes.data + np.arange(len(ids), dtype=np.uint64) * np.uint64(lay.block_bytes)
    sp = lay.spans(ids, addrs, to_engine=False)
    assert sp.nbytes == len(ids) * lay.block_bytes
    native.copy_spans(sp.src, sp.dst, sp.lengths, within=[*tensors, buf])
    for i, b in enumerate(ids):
        assert buf[i * lay.block_bytes:(i + 1) * lay.block_bytes].tobytes() == reference_block(tensors, bd, b)


@pytest.mark.parametrize("name", list(layouts()))
def test_round_trip_into_other_blocks_leaves_the_rest_untouched(name):
    tensors, bd = layouts()[name]
    lay = BlockLayout(tensors, bd)
    src, dst = [4, 0, 8], [1, 9, 5]
    before = [t.clone() for t in tensors]
    buf = native.alloc_aligned(3 * lay.block_bytes)
    addrs = buf.ctypes.data + np.arange(3, dtype=np.uint64) * np.uint64(lay.block_bytes)
    sp = lay.spans(src, addrs, to_engine=False)
    native.copy_spans(sp.src, sp.dst, sp.lengths, within=[*tensors, buf])
    for t in tensors:                                              # poison destination pages
        t.select(bd, 1).view(torch.int16).fill_(-1)
    sp = lay.spans(dst, addrs, to_engine=True)
    native.copy_spans(sp.src, sp.dst, sp.lengths, within=[*tensors, buf])
    for t, t0 in zip(tensors, before):
        for s, d in zip(src, dst):
            assert torch.equal(t.select(bd, d).view(torch.int16), t0.select(bd, s).view(torch.int16))
        for b in set(range(NB)) - set(dst):
            assert torch.equal(t.select(bd, b).view(torch.int16), t0.select(bd, b).view(torch.int16))


def test_contiguous_pages_coalesce_to_one_span_per_layer_and_block_major_to_one_per_block():
    tensors, _ = layouts()["LBHNC"]
    lay = BlockLayout(tensors)
    assert lay._len.size == L                                      # one run per page
    bm, _ = layouts()["BLHNC"]
    lay = BlockLayout(bm)
    sp = lay.spans([2, 3], np.array([0, lay.block_bytes], dtype=np.uint64) + np.uint64(1 << 20), False)
    assert len(sp) == 1 and sp.nbytes == 2 * lay.block_bytes      # adjacent blocks, adjacent slots


def test_coalesce_only_merges_true_continuations():
    s = np.array([0, 10, 30], dtype=np.uint64)
    d = np.array([100, 110, 120], dtype=np.uint64)
    n = np.array([10, 10, 10], dtype=np.uint64)
    sp = coalesce(s, d, n)
    assert sp.src.tolist() == [0, 30] and sp.lengths.tolist() == [20, 10]


def test_bad_tensors_and_ids():
    t = torch.zeros(4, 8)
    with pytest.raises(ConfigError, match="kv_caches"):
        BlockLayout([])
    with pytest.raises(ConfigError, match=r"kv_caches\[1\].shape"):
        BlockLayout([t, torch.zeros(5, 8)])
    with pytest.raises(ConfigError, match=r"kv_caches\[1\]"):
        BlockLayout([t, np.zeros((4, 8))])
    with pytest.raises(ConfigError, match="dtype"):
        BlockLayout([torch.zeros(4, 8, dtype=torch.bool)])
    with pytest.raises(ConfigError, match="device"):
        BlockLayout([torch.zeros(4, 8, device="meta")])
    lay = BlockLayout([t])
    for bad in ([4], [-1], [[1]], [0.5]):
        with pytest.raises(ConfigError, match="block_ids"):
            lay.check_block_ids(bad)
