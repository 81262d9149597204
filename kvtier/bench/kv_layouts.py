"""Engine KV-cache layouts as serving engines allocate them, for tests and benchmarks.

Each factory returns ``(tensors, block_dim)``, ready for ``BlockLayout``:

    LBNHC  one tensor per layer, [2, num_blocks, block_tokens, heads, dim]
           (vLLM FlashAttention: K and V halves are separate runs, block_dim=1)
    LBHNC  one tensor per layer, [num_blocks, 2, heads, block_tokens, dim]
           (vLLM's CPU backend style: one contiguous page per block and layer)
    BLHNC  one block-major tensor [num_blocks, layers, 2, heads, block_tokens, dim],
           handed over as per-layer views: all layers of a block are adjacent
    MLA    one tensor per layer, [num_blocks, block_tokens, latent_dim]
           (a single latent page, no separate K and V)
"""
from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("LBNHC", "LBHNC", "BLHNC", "MLA")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    latent_dim: int = 576          # MLA: 512 latent + 64 rope dims
    dtype: str = "bfloat16"        # a torch dtype name (torch is imported only when tensors are made)


LLAMA_3_1_8B = ModelShape()


def make_kv(layout: str, num_blocks: int, block_tokens: int, shape: ModelShape = LLAMA_3_1_8B,
            device="cpu", fill: str = "random", generator=None):
    """Allocate an engine KV cache in ``layout``; ``fill``: random | empty."""
    import torch
    dtype = getattr(torch, shape.dtype)
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    if layout == "LBNHC":
        dims, block_dim = [(2, num_blocks, block_tokens, H, D)] * L, 1
    elif layout == "LBHNC":
        dims, block_dim = [(num_blocks, 2, H, block_tokens, D)] * L, 0
    elif layout == "BLHNC":
        whole = _alloc((num_blocks, L, 2, H, block_tokens, D), dtype, device, fill, generator)
        return [whole[:, l] for l in range(L)], 0
    elif layout == "MLA":
        dims, block_dim = [(num_blocks, block_tokens, shape.latent_dim)] * L, 0
    else:
        raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)}")
    return [_alloc(d, dtype, device, fill, generator) for d in dims], block_dim


def _alloc(dims, dtype, device, fill, generator):
    import torch
    t = torch.empty(dims, dtype=dtype, device=device)
    if fill == "random":
        # random bytes, not random numbers: every bit pattern (NaNs included) must survive
        t.view(torch.uint8).random_(0, 256, generator=generator)
    return t


def kv_bytes_per_token(layout: str, shape: ModelShape = LLAMA_3_1_8B) -> int:
    import torch
    item = torch.empty(0, dtype=getattr(torch, shape.dtype)).element_size()
    if layout == "MLA":
        return shape.num_layers * shape.latent_dim * item
    return shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * item
