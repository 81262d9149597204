"""The embedding API: a TieredCache bound to an engine's paged KV-cache tensors.

    cache = PagedKVCache.create(config, namespace, kv_tensors)
    n = cache.store(token_ids, block_ids)         # engine pages -> kvtier
    hit = cache.lookup(token_ids)                 # how many leading blocks kvtier has
    n = cache.load(token_ids, block_ids)          # kvtier -> engine pages

``block_ids[i]`` is the engine block that holds (or will hold) the i-th block
of ``token_ids``.  Keys are chained hashes of the tokens, salted by the
namespace; callers that already have block hashes pass ``keys=`` instead.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .cache import TieredCache
from .config import KVTierConfig
from .errors import CacheClosedError, ConfigError
from .keys import Namespace, chain_keys, check_keys
from .layout import BlockLayout
from .gpu.span_copy import copy_spans

_owners = itertools.count()


class PagedKVCache:
    """Store and load whole blocks between engine tensors and a TieredCache."""

    def __init__(self, cache: TieredCache, layout: BlockLayout, namespace: Namespace):
        if namespace.dtype not in ("auto", "") and str(layout.tensors[0].dtype).replace("torch.", "") != namespace.dtype:
            raise ConfigError("kv_caches.dtype", str(layout.tensors[0].dtype), f"{namespace.dtype}, the namespace's dtype")
        if layout.block_bytes != cache.block_bytes:
            raise ConfigError("kv_caches", f"{layout.block_bytes} bytes per block",
                              f"{cache.block_bytes} bytes per block, as the cache was built for")
        self.cache = cache
        self.layout = layout
        self.namespace = namespace
        self.closed = False

    def _check_open(self, method: str) -> None:
        if self.closed:
            raise CacheClosedError(f"PagedKVCache.{method}() called after close(): the cache is closed")

    @classmethod
    def create(cls, config: KVTierConfig, namespace: Namespace, kv_caches: Sequence,
               block_dim: int = 0) -> "PagedKVCache":
        layout = BlockLayout(kv_caches, block_dim)
        return cls(TieredCache.from_config(config, namespace, layout.block_bytes), layout, namespace)

    def keys(self, token_ids) -> list[bytes]:
        self._check_open("keys")
        return chain_keys(self.namespace, token_ids)

    def _keys(self, token_ids, keys) -> list[bytes]:
        if keys is None:
            return self.keys(token_ids)
        check_keys(keys)
        return list(keys)

    def lookup(self, token_ids=None, *, keys: Sequence[bytes] | None = None) -> int:
        """Number of leading full blocks of the prompt that kvtier holds."""
        self._check_open("lookup")
        return self.cache.lookup(self._keys(token_ids, keys)).num_blocks

    def store(self, token_ids, block_ids, *, keys: Sequence[bytes] | None = None) -> int:
        """Copy the prompt's full blocks out of engine pages; returns blocks newly stored."""
        self._check_open("store")
        keys = self._keys(token_ids, keys)
        ids = self.layout.check_block_ids(block_ids)
        if ids.size < len(keys):
            keys = keys[:ids.size]
        owner = ("store", next(_owners))
        h = self.cache.prepare_store(keys, owner)
        if h is None:
            return 0
        ok = False
        try:
            self._copy(ids[h.positions], h, to_engine=False)
            ok = True
        finally:
            self.cache.complete_store(h, ok)
        return len(h)

    def load(self, token_ids, block_ids, *, keys: Sequence[bytes] | None = None,
             timeout: float | None = None) -> int:
        """Copy stored leading blocks into engine pages; returns how many were loaded."""
        self._check_open("load")
        keys = self._keys(token_ids, keys)
        ids = self.layout.check_block_ids(block_ids)
        keys = keys[:ids.size]
        if not keys:
            return 0
        h = self.cache.prepare_load(keys, ("load", next(_owners)))
        if h is None:
            return 0
        try:
            h.wait(timeout if timeout is not None else self.cache.lease_timeout_s)
            n = h.num_ok if h.ready() else 0
            if n:
                self._copy(ids[:n], h, to_engine=True, count=n)
        except BaseException:
            self.cache.complete_load(h, success=False)
            raise
        self.cache.complete_load(h)
        return n

    def _copy(self, ids: np.ndarray, h, to_engine: bool, count: int | None = None) -> None:
        n = len(h.slots) if count is None else count
        addrs = self.cache.tiers[0].addresses(h.slots[:n])
        if addrs is None:
            return                      # metadata-only cache: nothing to copy
        spans = self.layout.spans(ids[:n], addrs, to_engine=to_engine)
        copy_spans(self.layout.device.type, spans)

    def stats(self) -> dict:
        self._check_open("stats")
        return self.cache.stats()

    def close(self) -> None:
        """Close the cache; every other method then raises CacheClosedError.  A second
        close() does nothing, like a file's."""
        if self.closed:
            return
        self.closed = True
        self.cache.close()
