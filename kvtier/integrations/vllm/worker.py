"""Worker side of the connector: page copies between engine tensors and host slots.

The scheduler side decides everything; this side only moves bytes, in the
order vLLM calls it each step:

    start_load_kv      host slots -> engine blocks for this step's loads
                       (before the forward when a load is synchronous)
    wait_for_save      engine blocks -> host slots for blocks that became full
    get_finished       async loads done this step (failed ones included)
    get_block_ids_with_load_errors
                       blocks vLLM must recompute
    build_connector_worker_meta
                       per-op results for the scheduler side

Pages are opaque bytes: :class:`~kvtier.layout.BlockLayout` turns (engine
block, slot) pairs into byte spans and :func:`~kvtier.gpu.span_copy.copy_spans`
copies them (native, GIL released; CUDA kernels for device tensors).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from ...errors import ConfigError
from ...layout import BlockLayout
from ...gpu.span_copy import copy_spans
from .geometry import EngineGeometry
from .metadata import ArenaInfo, KVTierConnectorMetadata, KVTierWorkerMetadata
from .shm import SharedArena
from .stats import KVTierConnectorStats

log = logging.getLogger(__name__)


def _block_dim(t, num_blocks: int) -> int:
    dims = [i for i, d in enumerate(t.shape) if d == num_blocks]
    if not dims:
        raise ConfigError("kv_caches.shape", tuple(t.shape), f"a dimension of {num_blocks} blocks")
    return dims[0]


class KVTierWorker:
    def __init__(self, geometry: EngineGeometry, num_blocks: int):
        self.geometry = geometry
        self.num_blocks = num_blocks
        self.layout: BlockLayout | None = None
        self.arena: SharedArena | None = None
        self._arena_info: ArenaInfo | None = None
        self._recving: set[str] = set()
        self._invalid: set[int] = set()
        self._results = KVTierWorkerMetadata()
        self.stats = KVTierConnectorStats()       # since vLLM last took them
        self.totals = KVTierConnectorStats()      # since start-up

    def _count(self, key: str, n: float) -> None:
        self.stats.add(key, n)
        self.totals.add(key, n)

    # ---- set-up -------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict) -> None:
        unique, seen = [], set()
        for name in self.geometry.layer_names:
            t = kv_caches.get(name)
            if t is None:
                raise ConfigError("kv_caches", name, "a KV tensor for every layer of the KV cache group")
            if t.data_ptr() in seen:        # layers sharing one cache are stored once
                continue
            seen.add(t.data_ptr())
            unique.append(t)
        dim = _block_dim(unique[0], self.num_blocks)
        layout = BlockLayout(unique, block_dim=dim)
        if len(unique) != self.geometry.num_layers:
            raise ConfigError("kv_caches", f"{len(unique)} distinct tensors",
                              f"{self.geometry.num_layers}, one per layer of the KV cache group")
        self.geometry.check_layout(layout)
        self.layout = layout
        log.info("kvtier worker: %d layers, %d-byte pages, block dim %d, layout %s",
                 layout.num_layers, layout.page_bytes[0], dim, layout.fingerprint)

    def _attach(self, info: ArenaInfo | None) -> None:
        if info is None or (self._arena_info is not None and self._arena_info.path == info.path):
            return
        if self.arena is not None:
            self.arena.close()
        self.arena = SharedArena.attach(info.path, info.nbytes)
        self._arena_info = info
        self._results.attached = True

    def _addrs(self, slots) -> np.ndarray:
        info = self._arena_info
        return np.uint64(self.arena.base) + np.asarray(slots, dtype=np.uint64) * np.uint64(info.slot_bytes)

    def _copy(self, block_ids, slots, to_engine: bool) -> None:
        spans = self.layout.spans(block_ids, self._addrs(slots), to_engine=to_engine)
        copy_spans(self.layout.device.type, spans)

    # ---- per step ----------------------------------------------------------------
    def start_load_kv(self, meta: KVTierConnectorMetadata) -> None:
        self._attach(meta.arena)
        for op in meta.loads:
            ok = True
            if op.block_ids:
                t0 = time.perf_counter()
                try:
                    self._copy(op.block_ids, op.slots, to_engine=True)
                except Exception as e:   # a failed copy is a recompute, never a crash
                    log.warning("kvtier: load op %d for %s failed: %s", op.op_id, op.req_id, e)
                    ok = False
                    self._invalid.update(op.block_ids)
                    self._count("load_failed_blocks", len(op.block_ids))
                else:
                    self._count("load_seconds", time.perf_counter() - t0)
                    self._count("load_blocks", len(op.block_ids))
                    self._count("load_bytes", len(op.block_ids) * self.geometry.block_bytes)
            self._invalid.update(op.failed_block_ids)
            self._results.load_results[op.op_id] = ok
            if op.is_async:
                self._recving.add(op.req_id)

    def wait_for_save(self, meta: KVTierConnectorMetadata) -> None:
        self._attach(meta.arena)
        for op in meta.stores:
            t0 = time.perf_counter()
            try:
                self._copy(op.block_ids, op.slots, to_engine=False)
            except Exception as e:
                log.warning("kvtier: store op %d for %s failed: %s", op.op_id, op.req_id, e)
                self._results.store_results[op.op_id] = False
                self._count("store_failed_blocks", len(op.block_ids))
                continue
            self._results.store_results[op.op_id] = True
            self._count("store_seconds", time.perf_counter() - t0)
            self._count("store_blocks", len(op.block_ids))
            self._count("store_bytes", len(op.block_ids) * self.geometry.block_bytes)

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        if not self._recving:
            return None, None
        done, self._recving = self._recving, set()
        return None, done

    def take_load_errors(self) -> set[int]:
        bad, self._invalid = self._invalid, set()
        return bad

    def take_results(self) -> KVTierWorkerMetadata | None:
        r = self._results
        if not (r.load_results or r.store_results or r.attached):
            return None
        self._results = KVTierWorkerMetadata(attached=False)
        return r

    def shutdown(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None
