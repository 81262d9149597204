"""What the scheduler side tells the worker each step, and what comes back.

Scheduler → worker (:class:`KVTierConnectorMetadata`, one per step):
    loads    copy host slots into engine blocks (before the forward when
             synchronous, after it when asynchronous); ``failed_block_ids``
             are blocks the scheduler already knows it cannot supply
    stores   copy engine blocks into host slots after the forward
    arena    where the shared host arena is, so the worker can map it

Worker → scheduler (:class:`KVTierWorkerMetadata`): the outcome of every op,
so the scheduler can publish stores and release load leases.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class LoadOp:
    op_id: int
    req_id: str
    block_ids: list[int]          # engine blocks to fill, in order
    slots: list[int]              # host slots holding them
    failed_block_ids: list[int]   # engine blocks promised to vLLM that cannot be filled
    is_async: bool


@dataclass
class StoreOp:
    op_id: int
    req_id: str
    block_ids: list[int]
    slots: list[int]


@dataclass
class ArenaInfo:
    path: str
    nbytes: int
    slot_bytes: int


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    arena: ArenaInfo | None = None
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    load_results: dict[int, bool] = field(default_factory=dict)
    store_results: dict[int, bool] = field(default_factory=dict)
    attached: bool = False

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVTierWorkerMetadata)
        # With several workers an op succeeded only if it succeeded everywhere.
        loads = dict(self.load_results)
        for k, v in other.load_results.items():
            loads[k] = loads.get(k, True) and v
        stores = dict(self.store_results)
        for k, v in other.store_results.items():
            stores[k] = stores.get(k, True) and v
        return KVTierWorkerMetadata(loads, stores, self.attached and other.attached)
