"""KVTierConnector: kvtier as a vLLM V1 KV connector.

    --kv-transfer-config '{"kv_connector": "KVTierConnector",
                           "kv_connector_module_path": "kvtier.integrations.vllm",
                           "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"host": {"capacity_bytes": "8GiB"}}}'

vLLM builds one instance per role: SCHEDULER (in the engine core: lookups,
leases, the plan of each step; see scheduler.py) and WORKER (in each model
worker, one per tensor-parallel rank: page copies; see worker.py).  The
connector declares ``SupportsHMA``: models with several KV cache groups
(full attention plus sliding window) keep vLLM's hybrid KV cache manager on.
Settings are validated in the constructor, so a bad configuration stops vLLM
at start-up with a ConfigError naming the key.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .geometry import engine_geometry
from .metadata import KVTierConnectorMetadata
from .options import ConnectorOptions
from .scheduler import KVTierScheduler
from .shm import arena_path, host_geometry
from .stats import KVTierConnectorStats, KVTierPromMetrics
from .worker import KVTierWorker, tp_rank

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def _timed(side: str):
    """Count the time a hook spends on the engine's thread into that side's ``hook_seconds``:
    everything the connector costs the step directly (copies it waits for included)."""
    def wrap(fn):
        @functools.wraps(fn)
        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                part = getattr(self, side)
                if part is not None:
                    part.count_hook_time(time.perf_counter() - t0)
        return timed
    return wrap


class KVTierConnector(KVConnectorBase_V1, SupportsHMA):
    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig"):
        super().__init__(vllm_config, role, kv_cache_config)
        self.options = ConnectorOptions.from_extra_config(self._kv_transfer_config.kv_connector_extra_config)
        self.geometry = engine_geometry(vllm_config, kv_cache_config, self.options)
        self.scheduler: KVTierScheduler | None = None
        self.worker: KVTierWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = KVTierScheduler(vllm_config, self.geometry, self.options)
        else:
            self.worker = KVTierWorker(self.geometry, kv_cache_config.num_blocks, rank=tp_rank())

    @property
    def requires_kv_delivery(self) -> bool:
        return False               # a cache: a dropped store is a future miss, never an error

    # ---- worker side --------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)
        slot, num_slots = host_geometry(self.options.cache, self.geometry.block_bytes)
        self.worker.expect_arena(arena_path(self._kv_transfer_config.engine_id), slot * num_slots)

    def _meta(self) -> KVTierConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        return meta

    @_timed("worker")
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker is not None:
            self.worker.before_step()          # called before every forward, loads or not

    @_timed("worker")
    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._meta())

    @_timed("worker")
    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return                     # a step's new blocks are enqueued once, in wait_for_save

    @_timed("worker")
    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._meta())

    @_timed("worker")
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished()

    @_timed("worker")
    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving = self.worker.get_finished()
        failed = self.worker.take_failed_requests()
        return KVConnectorTransferResults(finished_sending=sending or set(),
                                          finished_recving=(recving or set()) | failed,
                                          failed_recving=failed)

    @_timed("worker")
    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    @_timed("worker")
    def build_connector_worker_meta(self):
        return self.worker.take_results() if self.worker is not None else None

    # ---- scheduler side -------------------------------------------------------------
    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        if self.scheduler is not None:
            self.scheduler.bind(self._kv_cache_manager)

    @_timed("scheduler")
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    @_timed("scheduler")
    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    @_timed("scheduler")
    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    @_timed("scheduler")
    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    @_timed("scheduler")
    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler.request_finished(request)
        return False, None

    @_timed("scheduler")
    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler.request_finished(request)
        return False, None

    @_timed("scheduler")
    def take_events(self):
        return self.scheduler.take_events()

    # ---- stats ------------------------------------------------------------------------
    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        if self.scheduler is not None:
            return self.scheduler.take_stats()
        return self.worker.stats.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVTierConnectorStats:
        return KVTierConnectorStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.worker is not None:
            self.worker.shutdown()
