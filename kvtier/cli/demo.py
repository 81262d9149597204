"""``kvtier demo``: store a real prefix's KV, push it down the tiers, get it back.

A tiny random-weight attention stack computes the K and V of a prompt into
paged KV tensors, the way an engine would.  kvtier stores the prompt's blocks
in the host tier; other prompts then fill the host tier so the first one is
demoted to the disk tier (or a second host tier when lmdb is not installed).
A lookup shows where each block lives; a load promotes the blocks back and
copies them into fresh engine pages, which are compared with a recomputation.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time

import numpy as np

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_TOKENS, VOCAB, HIDDEN = 8, 4, 64, 16, 32000, 256


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=1024, help="tokens in the demo prompt")
    p.add_argument("--dir", default=None, help="disk tier directory (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)


class TinyKV:
    """K/V projections of a small random-weight model: real KV for real tokens."""

    def __init__(self, seed: int):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN ** 0.5
        self.wk = [torch.randn(HIDDEN, KV_HEADS * HEAD_DIM, generator=g) / HIDDEN ** 0.5 for _ in range(LAYERS)]
        self.wv = [torch.randn(HIDDEN, KV_HEADS * HEAD_DIM, generator=g) / HIDDEN ** 0.5 for _ in range(LAYERS)]

    def fill(self, kv, tokens: np.ndarray, block_ids) -> None:
        """Write the prompt's K and V into pages [block, 2, heads, block_tokens, head_dim]."""
        import torch
        x = self.emb[torch.as_tensor(tokens[: len(block_ids) * BLOCK_TOKENS])]
        for layer, t in enumerate(kv):
            for kind, w in enumerate((self.wk[layer], self.wv[layer])):
                h = (x @ w).view(len(block_ids), BLOCK_TOKENS, KV_HEADS, HEAD_DIM).transpose(1, 2)
                t[torch.as_tensor(block_ids), kind] = h.to(t.dtype)
            x = torch.tanh(x + x @ self.wk[layer][:, :HIDDEN] * 0.1)


def main(args) -> int:
    import torch
    from .. import DiskConfig, HostConfig, KVTierConfig, Namespace, PagedKVCache

    nblocks = args.prompt_tokens // BLOCK_TOKENS
    if nblocks < 1:
        from ..errors import ConfigError
        raise ConfigError("--prompt-tokens", args.prompt_tokens, f"at least {BLOCK_TOKENS} tokens (one block)")
    engine_blocks = 4 * nblocks
    kv = [torch.zeros(engine_blocks, 2, KV_HEADS, BLOCK_TOKENS, HEAD_DIM, dtype=torch.bfloat16)
          for _ in range(LAYERS)]
    block_bytes = sum(t[0].numel() * t.element_size() for t in kv)
    model = TinyKV(args.seed)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, VOCAB, args.prompt_tokens)
    others = [rng.integers(0, VOCAB, args.prompt_tokens) for _ in range(2)]

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="kvtier-demo-")
    have_lmdb = importlib.util.find_spec("lmdb") is not None
    host = HostConfig(capacity_bytes=nblocks * (block_bytes + 4096))     # room for one prompt
    if have_lmdb:
        cfg = KVTierConfig(host=host, disk=DiskConfig(path=args.dir or tmp.name,
                                                      capacity_bytes=8 * nblocks * block_bytes,
                                                      slab_bytes=4 * nblocks * block_bytes, admission="none"))
    else:
        cfg = KVTierConfig(host=host)
        print("note: lmdb is not installed, so there is no disk tier (pip install 'kvtier[disk]')")
    ns = Namespace(model="kvtier-demo-tiny", block_tokens=BLOCK_TOKENS, dtype="bfloat16")
    cache = PagedKVCache.create(cfg, ns, kv)
    tiers = " -> ".join(f"{t.name} ({t.num_slots} blocks)" for t in cache.cache.tiers)
    print(f"kvtier demo: {LAYERS} layers, {nblocks} blocks of {BLOCK_TOKENS} tokens, "
          f"{block_bytes / 1024:.0f} KiB a block; tiers: {tiers}")

    ids = list(range(nblocks))
    model.fill(kv, others[0], ids)              # warm-up, so the timing below is the computation
    t0 = time.perf_counter()
    model.fill(kv, prompt, ids)
    t_compute = time.perf_counter() - t0
    want = [t[ids].clone() for t in kv]
    n = cache.store(prompt, ids)
    print(f"1. prefill computed the prompt's KV in {t_compute * 1e3:.1f} ms; stored {n} blocks in the host tier")
    for i, other in enumerate(others):
        model.fill(kv, other, ids)
        cache.store(other, ids)
    cache.cache.flush()
    where = cache.cache.lookup(cache.keys(prompt))
    counts = {name: where.tiers.count(name) for name in dict.fromkeys(where.tiers)}
    print(f"2. two more prompts filled the host tier; the first prompt's {where.num_blocks} blocks now live in: {counts}")
    dst = list(range(nblocks, 2 * nblocks))
    for t in kv:
        t[dst] = 0
    t0 = time.perf_counter()
    got = cache.load(prompt, dst)
    t_load = time.perf_counter() - t0
    same = all(torch.equal(t[dst].view(torch.int16), w.view(torch.int16)) for t, w in zip(kv, want))
    print(f"3. loaded {got}/{nblocks} blocks back into fresh engine pages in {t_load * 1e3:.1f} ms "
          f"(promoted through the host tier); bytes identical to the computed KV: {same}")
    st = cache.stats()
    moved = {k: v for k, v in st.items() if k.endswith(("evicted_blocks", "stored_blocks", "promoted_blocks"))}
    print(f"4. stats: {moved}")
    cache.close()
    if tmp is not None:
        tmp.cleanup()
    return 0 if same and got == nblocks else 1
