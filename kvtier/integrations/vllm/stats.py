"""Connector counters for vLLM's stats logging and Prometheus endpoint.

Both sides count into a :class:`KVTierConnectorStats` (plain ints and floats,
so it serializes from worker to logger); vLLM aggregates them per interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

COUNTERS = (
    "lookup_blocks",        # blocks asked about (scheduler)
    "hit_blocks",           # of those, found in kvtier
    "load_blocks",          # blocks copied into engine pages (worker)
    "load_failed_blocks",   # blocks promised but recomputed: corrupt, lost, timed out, copy error
    "store_blocks",         # blocks copied out of engine pages (worker)
    "store_failed_blocks",
    "load_bytes",
    "store_bytes",
    "load_seconds",         # worker time spent copying
    "store_seconds",
    "hook_seconds",         # engine-thread time inside the connector's calls, each side: all it costs a
                            # step directly (copies it waits for included)
    "store_fence_seconds",  # time a step waited, before its forward, for the previous step's stores
    "load_unwaited_ops",    # synchronous loads the forward read without waiting for: recomputed
    "plan_recomputed_blocks",   # hit blocks the load plan chose to recompute (slower to load)
)
TIMINGS = ("hook_seconds", "store_fence_seconds")
# The load plan's live measurements (scheduler side): gauges, the latest value wins.
GAUGES = (
    "plan_prefill_s_per_token",     # the engine's measured prefill compute per token
    "plan_host_load_gbps",          # each tier's load bandwidth as the plan sees it now
    "plan_disk_load_gbps",
    "plan_remote_load_gbps",
    "plan_disk_inflight_bytes",     # bytes being loaded from the tier now
    "plan_remote_inflight_bytes",
)


def plan_gauges(planner_stats: dict) -> dict[str, float]:
    """The GAUGES a LoadPlanner's stats() supplies (tiers never loaded from are left out)."""
    out = {}
    if "prefill.s_per_token" in planner_stats:
        out["plan_prefill_s_per_token"] = planner_stats["prefill.s_per_token"]
    for tier in ("host", "disk", "remote"):
        if f"{tier}.load_gbps" in planner_stats:
            out[f"plan_{tier}_load_gbps"] = planner_stats[f"{tier}.load_gbps"]
        if tier != "host" and f"{tier}.inflight_bytes" in planner_stats:
            out[f"plan_{tier}_inflight_bytes"] = planner_stats[f"{tier}.inflight_bytes"]
    return out


@dataclass
class KVTierConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        for k in COUNTERS:
            self.data.setdefault(k, 0)

    def add(self, key: str, n: float) -> None:
        self.data[key] = self.data.get(key, 0) + n

    def reset(self) -> None:
        for k in COUNTERS:
            self.data[k] = 0

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = v if k in GAUGES else self.data.get(k, 0) + v
        return self

    def set_gauges(self, values: dict[str, float]) -> None:
        self.data.update({k: v for k, v in values.items() if k in GAUGES})

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: self.data.get(k, 0) for k in COUNTERS}
        out.update({k: self.data[k] for k in GAUGES if k in self.data})
        asked = out["lookup_blocks"]
        out["hit_rate"] = round(out["hit_blocks"] / asked, 4) if asked else 0.0
        for side in ("load", "store"):
            s = out[f"{side}_seconds"]
            out[f"{side}_gbps"] = round(out[f"{side}_bytes"] / s / 1e9, 3) if s else 0.0
        return out

    def is_empty(self) -> bool:
        """Nothing looked up, copied or failed (time spent in calls alone does not count)."""
        return not any(self.data.get(k) for k in COUNTERS if k not in TIMINGS)

    def take(self) -> "KVTierConnectorStats | None":
        """A copy holding what was counted since the last take, or None if nothing was."""
        if self.is_empty():
            return None
        out = KVTierConnectorStats(data=dict(self.data))
        self.reset()
        return out


class KVTierPromMetrics(KVConnectorPromMetrics):
    """``vllm:kvtier_<counter>_total`` counters and ``vllm:kvtier_plan_*`` gauges, one per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for key in COUNTERS:
            counter = self._counter_cls(name=f"vllm:kvtier_{key}_total",
                                        documentation=f"kvtier connector: {key.replace('_', ' ')}",
                                        labelnames=labelnames)
            self._counters[key] = {idx: counter.labels(*values)
                                   for idx, values in per_engine_labelvalues.items()}
        self._gauges: dict[str, dict[int, Any]] = {}
        for key in GAUGES:
            gauge = self._gauge_cls(name=f"vllm:kvtier_{key}",
                                    documentation=f"kvtier load plan: {key[5:].replace('_', ' ')}",
                                    labelnames=labelnames, multiprocess_mode="mostrecent")
            self._gauges[key] = {idx: gauge.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            v = transfer_stats_data.get(key, 0)
            if v:
                per_engine[engine_idx].inc(v)
        for key, per_engine in self._gauges.items():
            if key in transfer_stats_data:
                per_engine[engine_idx].set(transfer_stats_data[key])
