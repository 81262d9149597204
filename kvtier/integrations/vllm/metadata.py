"""What the scheduler side tells the worker each step, and what comes back.

Scheduler → worker (:class:`KVTierConnectorMetadata`, one per step):
    loads    copy host slots into engine blocks (before the forward when
             synchronous, after it when asynchronous); ``failed_block_ids``
             are blocks the scheduler already knows it cannot supply
    stores   copy engine blocks into host slots after the forward
    arena    where the shared host arena is, so the worker can map it

Engine block ids travel per KV cache group (``block_ids[g][i]`` is group
``g``'s block at the op's ``i``-th position, ``-1`` where vLLM holds no page
for that group, e.g. outside a sliding window); ``slots[i]`` is the host slot
of position ``i``, shared by all groups and all tensor-parallel ranks.

Worker → scheduler (:class:`KVTierWorkerMetadata`): the outcome of every op,
per tensor-parallel rank, so the scheduler publishes a store or releases a
load lease only once every rank has reported (and any rank's failure fails
the op for all).
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
    block_ids: list[list[int]]    # per group: engine blocks to fill, in order (-1: none)
    slots: list[int]              # host slots holding them, one per position
    failed_block_ids: list[int]   # engine blocks promised to vLLM that cannot be filled
    is_async: bool


@dataclass
class StoreOp:
    op_id: int
    req_id: str
    block_ids: list[list[int]]    # per group, as in LoadOp
    slots: list[int]


@dataclass
class ArenaInfo:
    path: str
    nbytes: int
    slot_bytes: int
    identity: tuple[int, int] | None = None   # (st_dev, st_ino) of the file the scheduler created


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    arena: ArenaInfo | None = None
    loads: list[LoadOp] = field(default_factory=list)
    stores: list[StoreOp] = field(default_factory=list)


@dataclass
class KVTierWorkerMetadata(KVConnectorWorkerMetadata):
    """Per op ``{op_id: {rank: ok}}``; ``attached``: the ranks that have mapped the arena."""

    load_results: dict[int, dict[int, bool]] = field(default_factory=dict)
    store_results: dict[int, dict[int, bool]] = field(default_factory=dict)
    attached: set[int] = field(default_factory=set)

    def report(self, kind: str, op_id: int, rank: int, ok: bool) -> None:
        table = self.load_results if kind == "load" else self.store_results
        table.setdefault(op_id, {})[rank] = ok

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVTierWorkerMetadata)
        out = KVTierWorkerMetadata(attached=set(self.attached) | set(other.attached))
        for src in (self, other):
            for op_id, ranks in src.load_results.items():
                out.load_results.setdefault(op_id, {}).update(ranks)
            for op_id, ranks in src.store_results.items():
                out.store_results.setdefault(op_id, {}).update(ranks)
        return out

    def empty(self) -> bool:
        return not (self.load_results or self.store_results or self.attached)


class RankTally:
    """Collects per-rank results until every rank has reported an op.

    ``add`` returns the ops that are now complete, each with success only if it
    succeeded on every rank; an op some rank has not reported yet stays open.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._open: dict[int, dict[int, bool]] = {}

    def add(self, results: dict[int, dict[int, bool]]) -> list[tuple[int, bool]]:
        done = []
        for op_id, ranks in results.items():
            seen = self._open.setdefault(op_id, {})
            seen.update(ranks)
            if len(seen) >= self.world_size:
                del self._open[op_id]
                done.append((op_id, all(seen.values())))
        return done

    def __len__(self) -> int:
        return len(self._open)
