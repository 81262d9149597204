"""Scheduler side of the connector: lookups, leases, and the per-step plan.

Lifecycle of one request, as vLLM's scheduler drives it:

    get_num_new_matched_tokens   salt ``request.block_hashes`` into kvtier keys;
                                 lookup() past the local prefix-cache hit
    update_state_after_alloc     prepare_load(): lease the blocks (promotion
                                 from disk/remote starts in the background)
    build_connector_meta         issue loads whose promotion is done (async) or
                                 wait for them (sync); prepare_store() the
                                 blocks that become full in this step
    update_connector_output      the worker's results: complete_store() /
                                 complete_load(); failures are counted
    request_finished             drop the request; leases of ops the worker
                                 still holds are released when it reports

A block that was promised to vLLM but cannot be supplied (lease lost,
promotion failed a checksum, timeout) travels to the worker as a failed block
id; the worker reports it through ``get_block_ids_with_load_errors`` (or, for
a model with several KV cache groups, fails the request's load) and vLLM
recomputes it.

Tensor parallelism: this side runs once for all ranks, so every rank copies
the same blocks into and out of the same slots (each its own slice).  An op
is complete only when every rank has reported it; one rank's failure fails
it for all (a store is dropped, a load is recomputed everywhere, since vLLM
unites the ranks' load errors).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ...keys import salt_hashes
from ...load_plan import LoadPlanner
from .events import EventLog, TierRecords
from .geometry import EngineGeometry
from .metadata import ArenaInfo, KVTierConnectorMetadata, KVTierWorkerMetadata, LoadOp, RankTally, StoreOp
from .options import ConnectorOptions
from .shm import arena_path, build_shared_cache
from .stats import KVTierConnectorStats, plan_gauges

log = logging.getLogger(__name__)


@dataclass
class _PendingLoad:
    req_id: str
    block_ids: list[list[int]]     # per KV cache group, -1 where vLLM holds no page
    handle: Any                    # LoadHandle | None (None: nothing could be leased)
    is_async: bool
    tiers: dict[str, int] = field(default_factory=dict)   # bytes announced to the planner, per tier
    since: float = field(default_factory=time.monotonic)


@dataclass
class _ReqState:
    request: Any
    keys: list[bytes] = field(default_factory=list)   # salted block_hashes, grown lazily
    num_stored: int = 0           # leading blocks already offered to prepare_store
    num_local: int = 0            # block-aligned local hit seen by the last lookup
    num_hit: int = 0              # kvtier blocks found past it
    is_async: bool = True         # how the last lookup's hit loads
    hit_tiers: tuple = ()         # tier of each block the last lookup decided to load
    deferred_since: float | None = None   # first lookup deferred behind a store in flight
    plan_deadline: float | None = None    # a waiting load plan's deadline
    looked_up: bool = False       # counted in lookup_blocks / hit_blocks already


class KVTierScheduler:
    def __init__(self, vllm_config, geometry: EngineGeometry, opts: ConnectorOptions):
        self.geometry = geometry
        self.opts = opts
        self.block_tokens = geometry.block_tokens
        self.namespace = geometry.namespace
        engine_id = vllm_config.kv_transfer_config.engine_id
        self.records = TierRecords()              # where blocks move between tiers, for take_events
        self.cache, self.shared = build_shared_cache(opts.cache, geometry.namespace, geometry.block_bytes,
                                                     arena_path(engine_id), listeners=[self.records])
        self.arena = ArenaInfo(self.shared.path, self.shared.nbytes, self.cache.tiers[0].slot_bytes,
                               self.shared.identity)
        self._attached = False
        self._ranks_attached: set[int] = set()
        self._store_tally = RankTally(geometry.tp_size)     # results still missing a rank
        self._storing: dict[bytes, int] = {}                 # key -> store op copying it now
        # Load only what beats recomputing it (None: every hit loads).
        self.planner = LoadPlanner(opts.load_plan) if opts.load_plan is not False else None
        self._last_step: tuple[float, int, set] | None = None
        self._load_tally = RankTally(geometry.tp_size)
        capacity = sum(t.num_slots or 0 for t in self.cache.tiers)
        self.events = EventLog(self.block_tokens, max_keys=capacity)
        self.stats = KVTierConnectorStats()       # since vLLM last took them
        self.totals = KVTierConnectorStats()      # since start-up
        self._reqs: dict[str, _ReqState] = {}
        self._new_loads: list[_PendingLoad] = []      # allocated this step
        self._waiting: list[_PendingLoad] = []        # async, promotion still running
        self._issued_loads: dict[int, Any] = {}       # op id -> LoadHandle | None
        self._issued_stores: dict[int, tuple[Any, str, list[bytes]]] = {}
        self._ops = itertools.count(1)
        log.info("kvtier connector: namespace %s, %d-byte blocks (%d groups, %d tensor-parallel ranks), "
                 "%s loads, tiers %s", self.namespace.label, geometry.block_bytes, len(geometry.groups),
                 geometry.tp_size, opts.load_mode, [t.name for t in self.cache.tiers])

    def _count(self, key: str, n: float) -> None:
        self.stats.add(key, n)
        self.totals.add(key, n)

    def count_hook_time(self, seconds: float) -> None:
        """Time one of vLLM's calls into this side took (the connector's ``hook_seconds``)."""
        self._count("hook_seconds", seconds)

    # ---- keys -------------------------------------------------------------------
    def _state(self, request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = self._reqs[request.request_id] = _ReqState(request)
        return st

    def _keys(self, st: _ReqState, n: int) -> list[bytes]:
        hashes = st.request.block_hashes
        if len(st.keys) < n:
            new = list(hashes[len(st.keys):n])
            keys = salt_hashes(self.namespace, new)
            self.events.remember(keys, new)
            st.keys.extend(keys)
        return st.keys[:n]

    # ---- lookup -----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        bt = self.block_tokens
        # vLLM must compute at least one token itself, so the last token's block stays local.
        limit = min(len(request.block_hashes), (request.num_tokens - 1) // bt)
        start = num_computed_tokens // bt
        st.num_local, st.num_hit = start, 0
        if limit <= start:
            return 0, False
        keys = self._keys(st, limit)
        res = self.cache.lookup(keys[start:limit])
        found = res.num_blocks
        if start + found < limit and keys[start + found] in self._storing and self._may_defer(st):
            # The next block is being copied out of the engine right now: ask again next step
            # rather than recompute what a store makes visible in a moment.
            return None, False
        st.deferred_since = None
        if found and self.planner is not None:
            plan = self.planner.plan(res.tiers[:found], self.geometry.block_bytes, bt, deadline=st.plan_deadline)
            if plan.wait:                       # a tier's queue is full: ask again shortly
                st.plan_deadline = plan.deadline
                return None, False
            st.plan_deadline = None
            if plan.num_blocks < found:
                self._count("plan_recomputed_blocks", found - plan.num_blocks)
            found = plan.num_blocks
        if not st.looked_up:            # vLLM asks again every step a request waits: count it once
            st.looked_up = True
            self._count("lookup_blocks", limit - start)
            self._count("hit_blocks", res.num_blocks)
        if found < self.opts.min_load_blocks:
            return 0, False
        st.num_hit = found
        st.hit_tiers = tuple(res.tiers[:found])
        st.is_async = self._load_async(st.hit_tiers, found)
        return found * bt, st.is_async

    def _may_defer(self, st: _ReqState) -> bool:
        now = time.monotonic()
        if st.deferred_since is None:
            st.deferred_since = now
        return now - st.deferred_since < self.opts.load_timeout_s

    def _load_async(self, tiers, found: int) -> bool:
        """``auto``: a hit held wholly in host memory and small enough is copied inside the step
        (no scheduling round trip); anything else loads between steps.  A model with several
        KV cache groups always loads between steps (see geometry.py)."""
        mode = self.opts.load_mode
        if mode != "auto":
            return mode == "async"
        if self.geometry.hybrid:
            return True
        host = self.cache.tiers[0].name
        return not (all(t == host for t in tiers) and found * self.geometry.block_bytes <= self.opts.inline_load_bytes)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        st = self._state(request)
        n = num_external_tokens // self.block_tokens
        start = st.num_local
        block_ids = self._group_block_ids(blocks, start, start + n)
        keys = self._keys(st, start + n)[start:]
        handle = self.cache.prepare_load(keys, ("load", request.request_id), start=start)
        announced: dict[str, int] = {}
        for tier in st.hit_tiers[:n]:
            announced[tier] = announced.get(tier, 0) + self.geometry.block_bytes
        for tier, nbytes in announced.items():
            if self.planner is not None:
                self.planner.begin(tier, nbytes)
        self._new_loads.append(_PendingLoad(request.request_id, block_ids, handle, st.is_async, announced))

    # ---- the per-step plan ----------------------------------------------------------
    def _observe_step(self, so) -> None:
        """The engine's compute per token, from the time between two steps of running requests.

        Only steps that were mostly prefill count, and only when a request of the
        previous step is still running (no idle gap between the two)."""
        if self.planner is None:
            return
        now = time.monotonic()
        scheduled = so.num_scheduled_tokens
        if self._last_step is not None:
            t0, tokens, reqs = self._last_step
            if tokens and reqs & set(so.scheduled_cached_reqs.req_ids):
                self.planner.observe_prefill(tokens, now - t0)
        prefill = sum(n for n in scheduled.values() if n > 1)
        total = sum(scheduled.values())
        self._last_step = (now, prefill if total and prefill * 2 >= total else 0, set(scheduled))

    def _loaded(self, p: _PendingLoad, ok: bool) -> None:
        """A load's promotion is over: the planner learns how long its slowest tier took."""
        if self.planner is None:
            return
        host = self.cache.tiers[0].name
        slowest = next((t for t in p.tiers if t != host), None)
        for tier, nbytes in p.tiers.items():
            timed = tier == slowest and ok
            self.planner.end(tier, nbytes, time.monotonic() - p.since if timed else None, ok=ok)

    def build_connector_meta(self, scheduler_output) -> KVTierConnectorMetadata:
        self._observe_step(scheduler_output)
        meta = KVTierConnectorMetadata(arena=None if self._attached else self.arena)
        new, self._new_loads = self._new_loads, []
        for p in new:
            if p.is_async:
                self._waiting.append(p)
            else:
                if p.handle is not None and not p.handle.wait(self.opts.load_timeout_s):
                    log.warning("kvtier: load for %s still promoting after %.1fs: recomputing",
                                p.req_id, self.opts.load_timeout_s)
                meta.loads.append(self._issue(p))
        still = []
        now = time.monotonic()
        for p in self._waiting:
            if p.handle is None or p.handle.ready() or now - p.since > self.opts.load_timeout_s:
                meta.loads.append(self._issue(p))
            else:
                still.append(p)
        self._waiting = still
        self._plan_stores(scheduler_output, meta)
        return meta

    def _group_block_ids(self, blocks, lo: int, hi: int) -> list[list[int]]:
        """Per transferred group, the engine block ids of positions [lo, hi); -1 for vLLM's null block."""
        out = []
        for g in self.geometry.groups:
            row = list(blocks.blocks[g.index][lo:hi])
            out.append([-1 if b.is_null else int(b.block_id) for b in row] + [-1] * (hi - lo - len(row)))
        return out

    def _issue(self, p: _PendingLoad) -> LoadOp:
        h = p.handle
        n = h.num_ok if h is not None and h.ready() else 0
        n = min(n, len(p.block_ids[0]))
        self._loaded(p, ok=n == len(p.block_ids[0]))
        failed = [b for ids in p.block_ids for b in ids[n:] if b >= 0]
        op = LoadOp(next(self._ops), p.req_id, [ids[:n] for ids in p.block_ids],
                    list(h.slots[:n]) if n else [], failed, p.is_async)
        if failed:
            self._count("load_failed_blocks", len(p.block_ids[0]) - n)
        if n == 0 and h is not None:
            self.cache.complete_load(h, success=False)
            h = None
        self._issued_loads[op.op_id] = h
        return op

    def _plan_stores(self, so, meta: KVTierConnectorMetadata) -> None:
        if self._kv_cache_manager is None:
            return
        computed: dict[str, int] = {}
        for r in so.scheduled_new_reqs:
            computed[r.req_id] = r.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            computed[req_id] = cached.num_computed_tokens[i]
        for req_id, before in computed.items():
            st = self._reqs.get(req_id)
            if st is None:
                continue
            after = before + so.num_scheduled_tokens.get(req_id, 0)
            full = min(after // self.block_tokens, len(st.request.block_hashes))
            if full <= st.num_stored:
                continue
            start = st.num_stored
            st.num_stored = full
            table = self._group_block_ids(self._kv_cache_manager.get_blocks(req_id), start, full)
            # A position is stored only with every group's page; a sliding-window group
            # holds none before its window (vLLM's null block), so the stored run starts
            # after the last position that lacks one.
            lacking = [i for i in range(full - start) if any(ids[i] < 0 for ids in table)]
            skip = lacking[-1] + 1 if lacking else 0
            if skip >= full - start:
                continue
            start += skip
            table = [ids[skip:] for ids in table]
            keys = self._keys(st, full)[start:]
            h = self.cache.prepare_store(keys, ("store", req_id), start=start)
            if h is None:
                continue
            ids = [[row[i] for i in h.positions] for row in table]
            op = StoreOp(next(self._ops), req_id, ids, list(h.slots))
            hashes = st.request.block_hashes
            tokens = st.request.all_token_ids
            info = [(hashes[start + i], hashes[start + i - 1] if start + i > 0 else None,
                     tokens[(start + i) * self.block_tokens:(start + i + 1) * self.block_tokens])
                    for i in h.positions]
            self._issued_stores[op.op_id] = (h, req_id, info)
            for i in h.positions:
                self._storing[keys[i]] = op.op_id
            meta.stores.append(op)

    _kv_cache_manager = None

    def bind(self, kv_cache_manager) -> None:
        self._kv_cache_manager = kv_cache_manager

    # ---- results ------------------------------------------------------------------
    def update_connector_output(self, output) -> None:
        wm = getattr(output, "kv_connector_worker_meta", None)
        if not isinstance(wm, KVTierWorkerMetadata):
            return
        self._ranks_attached |= set(wm.attached)
        if not self._attached and len(self._ranks_attached) >= self.geometry.tp_size:
            self._attached = True
            self.shared.unlink()                    # every rank mapped: memory lives as long as they do
        for op_id, ok in self._store_tally.add(wm.store_results):
            entry = self._issued_stores.pop(op_id, None)
            if entry is None:
                continue
            h, _, info = entry
            for k in h.keys:
                if self._storing.get(k) == op_id:
                    del self._storing[k]
            published = self.cache.complete_store(h, ok) and ok
            if published:
                for block_hash, parent, tokens in info:
                    self.events.stored([block_hash], parent, tokens)
        for op_id, ok in self._load_tally.add(wm.load_results):
            if op_id in self._issued_loads:
                h = self._issued_loads.pop(op_id)
                if h is not None:
                    self.cache.complete_load(h, success=ok)

    def request_finished(self, request) -> None:
        req_id = request.request_id
        self._reqs.pop(req_id, None)
        keep = []
        for p in self._waiting:            # never issued: nobody will copy from these slots
            if p.req_id == req_id:
                self._loaded(p, ok=False)
                if p.handle is not None:
                    self.cache.complete_load(p.handle, success=False)
            else:
                keep.append(p)
        self._waiting = keep

    def take_events(self):
        self.events.add_records(self.records.take())
        return self.events.take()

    def take_stats(self) -> KVTierConnectorStats | None:
        """Counters since the last take, with the load plan's measurements as gauges."""
        out = self.stats.take()
        if out is not None and self.planner is not None:
            out.set_gauges(plan_gauges(self.planner.stats()))
        return out

    def shutdown(self) -> None:
        try:
            self.cache.close()
        except Exception as e:       # shutting down: report, never raise into vLLM's teardown
            log.warning("kvtier: closing the cache failed: %s", e)
        self.shared.unlink()
        self.shared.close()
