"""Trace replay: Mooncake-format traces through a TieredCache, offline bounds, reports."""
from .belady import belady_hits, infinite_hits
from .sim import ReplayConfig, ReplayResult, replay, simulate
from .trace import Request, Trace, load_trace

__all__ = ["Request", "Trace", "load_trace", "ReplayConfig", "ReplayResult", "replay", "simulate",
           "belady_hits", "infinite_hits"]
