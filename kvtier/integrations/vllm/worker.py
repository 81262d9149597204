"""Worker side of the connector: page copies between engine tensors and host slots.

The scheduler side decides everything; this side only moves bytes, through
one :class:`~kvtier.gpu.copier.KVCopier` per KV cache group, in the order
vLLM calls it each step:

    bind_connector_metadata (before_step)
                       the compute stream waits for the previous step's
                       stores (the host, on CPU): pages vLLM frees and
                       reuses are never overwritten while a store reads them
    start_load_kv      enqueue this step's loads; a synchronous load layer by
                       layer, an asynchronous one as a whole
    wait_for_layer_load
                       the compute stream waits for that layer's pages only
    wait_for_save      enqueue stores of blocks that became full; never waited
                       for inside the step
    get_transfer_results
                       async loads whose copies have finished (failed ones of a
                       model with several KV cache groups reported per request)
    get_block_ids_with_load_errors
                       blocks vLLM must recompute (one KV cache group)
    build_connector_worker_meta
                       results of this rank's ops that have finished: the
                       scheduler publishes a store only after its bytes landed

Each tensor-parallel rank runs one worker and copies only its own slice of a
slot (``rank * rank_bytes`` into it; see geometry.py), group by group.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ...errors import ConfigError
from ...gpu.copier import KVCopier
from ...layout import BlockLayout
from .early_attach import EarlyAttach, attach, release
from .geometry import EngineGeometry
from .inflight import InflightOp, take_done
from .metadata import ArenaInfo, KVTierConnectorMetadata, KVTierWorkerMetadata
from .shm import SharedArena
from .stats import KVTierConnectorStats

log = logging.getLogger(__name__)


def _block_dim(t, num_blocks: int) -> int:
    dims = [i for i, d in enumerate(t.shape) if d == num_blocks]
    if not dims:
        raise ConfigError("kv_caches.shape", tuple(t.shape), f"a dimension of {num_blocks} blocks")
    return dims[0]


def tp_rank() -> int:
    """This worker's tensor-parallel rank (0 when vLLM's parallel state is not set up)."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return int(get_tensor_model_parallel_rank())
    except Exception:          # no TP group: a single-rank engine
        return 0


class KVTierWorker:
    def __init__(self, geometry: EngineGeometry, num_blocks: int, rank: int = 0, mechanism: str = "auto"):
        if not 0 <= rank < geometry.tp_size:
            raise ConfigError("tensor_parallel_rank", rank, f"a rank in [0, {geometry.tp_size})")
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.rank = rank
        self.mechanism = mechanism
        self.layouts: list[BlockLayout] = []       # one per KV cache group
        self.copiers: list[KVCopier] = []
        self._layer_of: dict[str, tuple[int, int]] = {}   # layer name -> (group, layer in its layout)
        self.arena: SharedArena | None = None
        self._pin = None
        self._early: EarlyAttach | None = None    # mapping (pinning) the arena before the first step
        self._arena_info: ArenaInfo | None = None
        self._stores: list[InflightOp] = []        # not yet reported
        self._async_loads: list[InflightOp] = []
        self._step_loads: list[InflightOp] = []    # this step's synchronous loads
        self._waited: set[tuple[int, int]] = set()
        self._fenced: list[InflightOp] = []        # stores the next step must be ordered after
        self._failed_reqs: set[str] = set()
        self._finished: set[str] = set()
        self._invalid: set[int] = set()
        self._results = KVTierWorkerMetadata()
        self.stats = KVTierConnectorStats()       # since vLLM last took them
        self.totals = KVTierConnectorStats()      # since start-up

    def _count(self, key: str, n: float) -> None:
        self.stats.add(key, n)
        self.totals.add(key, n)

    def count_hook_time(self, seconds: float) -> None:
        """Time one of vLLM's calls into this side took (the connector's ``hook_seconds``)."""
        self._count("hook_seconds", seconds)

    # ---- set-up -------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict) -> None:
        layouts, layer_of = [], {}
        for gi, group in enumerate(self.geometry.groups):
            unique, seen = [], {}
            for name in group.layer_names:
                t = kv_caches.get(name)
                if t is None:
                    raise ConfigError("kv_caches", name, f"a KV tensor for every layer of KV cache group {group.index}")
                if t.data_ptr() not in seen:        # layers sharing one cache are copied once
                    seen[t.data_ptr()] = len(unique)
                    unique.append(t)
                layer_of[name] = (gi, seen[t.data_ptr()])
            if len(unique) != group.num_layers:
                raise ConfigError(f"kv_caches[group {group.index}]", f"{len(unique)} distinct tensors",
                                  f"{group.num_layers}, one per layer of the KV cache group")
            layout = BlockLayout(unique, block_dim=_block_dim(unique[0], self.num_blocks))
            self.geometry.check_group(gi, layout)
            layouts.append(layout)
        self.layouts = layouts
        self._layer_of = layer_of
        self.copiers = [KVCopier(layout, self.mechanism) for layout in layouts]
        log.info("kvtier worker (rank %d of %d): %s, %d-byte slice of %d-byte blocks, %s copies",
                 self.rank, self.geometry.tp_size,
                 ", ".join(f"group {g.index} {g.kind} {g.num_layers} layers" for g in self.geometry.groups),
                 self.geometry.rank_bytes, self.geometry.block_bytes, self.copiers[0].mechanism)

    def expect_arena(self, path: str, nbytes: int) -> None:
        """Map, and on CUDA pin, the arena at ``path`` as soon as the scheduler creates it
        (see early_attach.py), so the first request's step does not pay for it."""
        if self._early is None and self.arena is None:
            self._early = EarlyAttach(path, nbytes, self._device())

    def _device(self):
        """The KV tensors' device (None before they are registered)."""
        return self.layouts[0].device if self.layouts else None

    def _attach(self, info: ArenaInfo | None) -> None:
        if info is None or (self._arena_info is not None and self._arena_info.path == info.path):
            return
        self._close_arena()
        early, self._early = self._early, None
        got = early.take(info) if early is not None else None
        # else map (and pin) it now: KVTierError naming RLIMIT_MEMLOCK if pinning is refused
        self.arena, self._pin = got or attach(info.path, info.nbytes, self._device())
        self._arena_info = info
        self._results.attached.add(self.rank)

    def _close_arena(self) -> None:
        for c in self.copiers:
            c.flush()
        release(self.arena, self._pin)
        self.arena = self._pin = None

    def _slot_addrs(self, slots) -> np.ndarray:
        """Where this rank's slice of each slot starts."""
        base = np.uint64(self.arena.base + self.rank * self.geometry.rank_bytes)
        return base + np.asarray(slots, dtype=np.uint64) * np.uint64(self._arena_info.slot_bytes)

    def _submit(self, op, kind: str) -> InflightOp:
        """One transfer per group holding pages at the op's positions (-1 entries are skipped)."""
        inflight = InflightOp(op)
        try:
            addrs = self._slot_addrs(op.slots)
            for gi, copier in enumerate(self.copiers):
                ids = np.asarray(op.block_ids[gi], dtype=np.int64)
                keep = ids >= 0
                if not keep.any():
                    inflight.transfers.append(None)
                    continue
                where = addrs[keep] + np.uint64(self.geometry.group_offset(gi))
                if kind == "store":
                    t = copier.store(ids[keep], where)
                elif kind == "layers":
                    t = copier.load_layers(ids[keep], where)
                else:
                    t = copier.load(ids[keep], where)
                inflight.transfers.append(t)
        except Exception as e:          # bad ids or addresses: a failed op, never a crash
            inflight.error = f"{type(e).__name__}: {e}"
        return inflight

    # ---- per step ----------------------------------------------------------------
    def before_step(self) -> None:
        """Order this step's compute after the previous step's stores (they read pages vLLM may reuse)."""
        fenced, self._fenced = self._fenced, []
        if not fenced:
            return
        t0 = time.perf_counter()
        for op in fenced:
            op.wait_on_stream()
        self._count("store_fence_seconds", time.perf_counter() - t0)

    def start_load_kv(self, meta: KVTierConnectorMetadata) -> None:
        self._attach(meta.arena)
        self._waited = set()
        for op in meta.loads:
            if not op.slots or (op.failed_block_ids and self.geometry.hybrid):
                # Nothing to copy, or the request recomputes whole anyway (several groups).
                self._finish_load(InflightOp(op))
                continue
            inflight = self._submit(op, "load" if op.is_async else "layers")
            (self._async_loads if op.is_async else self._step_loads).append(inflight)

    def wait_for_layer_load(self, layer_name: str) -> None:
        where = self._layer_of.get(layer_name)
        if where is None or not self._step_loads:
            return
        gi, li = where
        self._waited.add(where)
        for inflight in self._step_loads:
            t = inflight.transfers[gi] if gi < len(inflight.transfers) else None
            if t is not None:
                t.wait_for_layer(li)

    def wait_for_save(self, meta: KVTierConnectorMetadata) -> None:
        self._attach(meta.arena)
        self._settle_step_loads()
        for op in meta.stores:
            inflight = self._submit(op, "store")
            self._stores.append(inflight)
            self._fenced.append(inflight)

    def _settle_step_loads(self) -> None:
        """This step's synchronous loads are over once the forward is: results, and any layer nobody waited for."""
        loads, self._step_loads = self._step_loads, []
        for inflight in loads:
            for t in inflight.live:
                t.wait()
            unwaited = [(gi, li) for gi, t in enumerate(inflight.transfers) if t is not None
                        for li in range(len(t.layers)) if (gi, li) not in self._waited]
            if unwaited and inflight.error is None:
                # The forward may have read these pages before they landed: recompute.
                inflight.error = f"layers {unwaited[:4]} were read before the connector was asked to wait"
                self._count("load_unwaited_ops", 1)
            self._finish_load(inflight)

    def _fail_load(self, op, block_ids) -> None:
        """Blocks promised to vLLM that this rank cannot supply."""
        if self.geometry.hybrid:
            # vLLM maps block-level failures to requests only for one KV cache group;
            # with several it recomputes the whole request, which async loads report.
            self._failed_reqs.add(op.req_id)
        else:
            self._invalid.update(b for b in block_ids if b >= 0)

    def _finish_load(self, inflight: InflightOp) -> None:
        """A load is over (copied, failed, or never started): its results, all reported together,
        so vLLM never hears of a request's load before its pages are no longer being written."""
        op = inflight.op
        n = inflight.num_blocks if inflight.live or inflight.error else 0   # blocks it tried to copy
        ok = inflight.ok()
        if op.failed_block_ids:
            self._fail_load(op, op.failed_block_ids)
        if n and not ok:
            log.warning("kvtier: load op %d for %s failed: %s", op.op_id, op.req_id, inflight.why())
            self._fail_load(op, [b for ids in op.block_ids for b in ids])
            self._count("load_failed_blocks", n)
        elif n:
            self._count("load_seconds", inflight.seconds())
            self._count("load_blocks", n)
            self._count("load_bytes", n * self.geometry.rank_bytes)
        self._results.report("load", op.op_id, self.rank, ok)
        if op.is_async:
            self._finished.add(op.req_id)

    def _poll(self) -> None:
        done, self._async_loads = take_done(self._async_loads)
        for inflight in done:
            self._finish_load(inflight)
        done, self._stores = take_done(self._stores)
        for inflight in done:
            op, n = inflight.op, inflight.num_blocks
            ok = inflight.ok()
            self._results.report("store", op.op_id, self.rank, ok)
            if ok:
                self._count("store_seconds", inflight.seconds())
                self._count("store_blocks", n)
                self._count("store_bytes", n * self.geometry.rank_bytes)
            else:
                log.warning("kvtier: store op %d for %s failed: %s", op.op_id, op.req_id, inflight.why())
                self._count("store_failed_blocks", n)

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        self._poll()
        if not self._finished:
            return None, None
        done, self._finished = self._finished, set()
        return None, done

    def take_failed_requests(self) -> set[str]:
        """Async loads that must be recomputed whole (several KV cache groups)."""
        bad, self._failed_reqs = self._failed_reqs, set()
        return bad

    def take_load_errors(self) -> set[int]:
        bad, self._invalid = self._invalid, set()
        return bad

    def take_results(self) -> KVTierWorkerMetadata | None:
        self._poll()
        r = self._results
        if r.empty():
            return None
        self._results = KVTierWorkerMetadata()
        return r

    def pending(self) -> int:
        """Ops whose copies are still running."""
        return len(self._stores) + len(self._async_loads) + len(self._step_loads)

    def shutdown(self) -> None:
        if self._early is not None:
            self._early.close()
            self._early = None
        self._poll()
        self._close_arena()
