"""The embedding API: a TieredCache bound to an engine's paged KV-cache tensors.

    cache = PagedKVCache.create(config, namespace, kv_tensors)
    n = cache.store(token_ids, block_ids)         # engine pages -> kvtier
    hit = cache.lookup(token_ids)                 # how many leading blocks kvtier has
    n = cache.load(token_ids, block_ids)          # kvtier -> engine pages

    plan = cache.plan(token_ids)                  # how much of the hit is worth loading
    n = cache.load(token_ids, block_ids, plan=plan)   # loads plan.load_now blocks at most

``block_ids[i]`` is the engine block that holds (or will hold) the i-th block
of ``token_ids``.  Keys are chained hashes of the tokens, salted by the
namespace; callers that already have block hashes pass ``keys=`` instead.

Bytes move through the same asynchronous :class:`~kvtier.gpu.copier.KVCopier`
the vLLM connector uses (with the fastest tier's slots as buffers and, above
a GPU tier, its ``mechanism``); these calls wait for the copy, since they
promise the bytes are in place on return.  A copy that fails is not an
exception: ``store`` drops the blocks (and returns 0), ``load`` reports no
blocks loaded, so the engine recomputes.

Load or recompute (:mod:`kvtier.load_plan`): every ``load`` is timed and fed to
``self.planner``; ``plan()`` applies the rule to the stored prefix and
``load(..., plan=)`` loads no more than it says (nothing while it says wait).
The rule needs the engine's compute per token: feed
``cache.planner.observe_prefill(tokens, seconds)`` from the engine's steps.
Until then (or with no ``prefill_s_per_token`` in the config) every hit is
worth loading, and ``load`` without a plan loads every hit, as before.
"""
from __future__ import annotations

import itertools
import logging
from typing import Sequence

import numpy as np

from .cache import TieredCache
from .config import KVTierConfig
from .errors import CacheClosedError, ConfigError
from .keys import Namespace, chain_keys, check_keys
from .layout import BlockLayout
from .load_plan import LoadPlanConfig, LoadPlanner, Plan
from .gpu.copier import KVCopier

log = logging.getLogger(__name__)
_owners = itertools.count()


class PagedKVCache:
    """Store and load whole blocks between engine tensors and a TieredCache."""

    def __init__(self, cache: TieredCache, layout: BlockLayout, namespace: Namespace,
                 planner: LoadPlanner | None = None):
        if namespace.dtype not in ("auto", "") and str(layout.tensors[0].dtype).replace("torch.", "") != namespace.dtype:
            raise ConfigError("kv_caches.dtype", str(layout.tensors[0].dtype), f"{namespace.dtype}, the namespace's dtype")
        if layout.block_bytes != cache.block_bytes:
            raise ConfigError("kv_caches", f"{layout.block_bytes} bytes per block",
                              f"{cache.block_bytes} bytes per block, as the cache was built for")
        self.cache = cache
        self.layout = layout
        self.namespace = namespace
        top = cache.tiers[0]
        mechanism = getattr(top, "mechanism", "auto") if layout.device.type == "cuda" else "auto"
        self.copier = KVCopier(layout, mechanism, buffer_device=str(getattr(top, "device", "cpu")))
        self.planner = planner if planner is not None else LoadPlanner()
        self._tier_rank = {t.name: i for i, t in enumerate(cache.tiers)}
        self.closed = False

    def _check_open(self, method: str) -> None:
        if self.closed:
            raise CacheClosedError(f"PagedKVCache.{method}() called after close(): the cache is closed")

    @classmethod
    def create(cls, config: KVTierConfig, namespace: Namespace, kv_caches: Sequence,
               block_dim: int = 0, load_plan: LoadPlanConfig | None = None) -> "PagedKVCache":
        layout = BlockLayout(kv_caches, block_dim)
        return cls(TieredCache.from_config(config, namespace, layout.block_bytes), layout, namespace,
                   LoadPlanner(load_plan))

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

    def plan(self, token_ids=None, *, keys: Sequence[bytes] | None = None,
             deadline: float | None = None) -> Plan:
        """How many of the stored leading blocks are worth loading now (see :mod:`kvtier.load_plan`).

        ``deadline``: that of an earlier plan for the same request that said wait.
        """
        self._check_open("plan")
        lk = self.cache.lookup(self._keys(token_ids, keys))
        return self.planner.plan(lk.tiers[:lk.num_blocks], self.layout.block_bytes,
                                 self.namespace.block_tokens, deadline=deadline)

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
            ok = self._copy(ids[h.positions], h, to_engine=False)
        finally:
            self.cache.complete_store(h, ok)
        return len(h) if ok else 0

    def load(self, token_ids, block_ids, *, keys: Sequence[bytes] | None = None,
             timeout: float | None = None, plan: Plan | None = None) -> int:
        """Copy stored leading blocks into engine pages; returns how many were loaded.

        With ``plan`` (from :meth:`plan`) at most ``plan.load_now`` blocks are loaded.
        """
        self._check_open("load")
        keys = self._keys(token_ids, keys)
        ids = self.layout.check_block_ids(block_ids)
        keys = keys[:ids.size if plan is None else min(ids.size, plan.load_now)]
        if not keys:
            return 0
        t0 = self.planner.clock()
        h = self.cache.prepare_load(keys, ("load", next(_owners)))
        if h is None:
            return 0
        share = self._begin(h.tiers)
        copied = False
        try:
            h.wait(timeout if timeout is not None else self.cache.lease_timeout_s)
            n = h.num_ok if h.ready() else 0
            copied = not n or self._copy(ids[:n], h, to_engine=True, count=n)
        except BaseException:
            self.cache.complete_load(h, success=False)
            raise
        finally:
            self._end(share, self.planner.clock() - t0, copied and n == len(h))
        self.cache.complete_load(h, success=copied)
        return n if copied else 0

    def _begin(self, tiers: Sequence[str]) -> dict[str, int]:
        """Announce a load's bytes per tier to the planner."""
        share: dict[str, int] = {}
        for t in tiers:
            share[t] = share.get(t, 0) + self.layout.block_bytes
        for t, nbytes in share.items():
            self.planner.begin(t, nbytes)
        return share

    def _end(self, share: dict[str, int], seconds: float, ok: bool) -> None:
        """One measurement per load: its slowest tier's bytes, for the whole time (an upper
        bound: tiers overlap); the other tiers' bytes leave the queue unmeasured."""
        slowest = max(share, key=lambda t: self._tier_rank.get(t, 0), default=None)
        for t, nbytes in share.items():
            self.planner.end(t, nbytes, seconds if t == slowest else None, ok=ok)

    def _copy(self, ids: np.ndarray, h, to_engine: bool, count: int | None = None) -> bool:
        """Copy and wait; False (logged, counted by the copier) if the copy failed."""
        n = len(h.slots) if count is None else count
        addrs = self.cache.tiers[0].addresses(h.slots[:n])
        if addrs is None:
            return True                 # metadata-only cache: nothing to copy
        ids = ids[:n]
        t = self.copier.load(ids, addrs) if to_engine else self.copier.store(ids, addrs)
        t.wait()
        if not t.ok:
            log.warning("PagedKVCache: %s of %d blocks failed: %s", "load" if to_engine else "store",
                        ids.size, t.error)
        return bool(t.ok)

    def stats(self) -> dict:
        self._check_open("stats")
        return self.cache.stats()

    def close(self) -> None:
        """Close the cache; every other method then raises CacheClosedError.  A second
        close() does nothing, like a file's."""
        if self.closed:
            return
        self.closed = True
        self.copier.flush()
        self.cache.close()
