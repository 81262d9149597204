"""Replay a trace through a real TieredCache, or through one policy alone.

:func:`replay` drives a :class:`~kvtier.cache.TieredCache` the way a serving
engine would, one request at a time:

    lookup(keys)                       -> the stored prefix, tier by tier
    prepare_load(prefix) / wait        -> promotion of lower-tier blocks
    complete_load                      (bytes mode: every hit block verified)
    prepare_store(rest) / complete_store
    flush()                            -> demotions land before the next request

Mode ``meta`` keeps no bytes (``HostTier(memory="none")`` for every tier): a
policy and capacity study.  Mode ``bytes`` stores real blocks (the block size
scaled down to fit the machine) through a host arena and, when asked, a disk
tier; each block's bytes are derived from its key, so every hit is checked.

:func:`simulate` replays one policy over one capacity with no cache around it
(same prefix semantics, a fraction of the cost): capacity sweeps and plots.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..config import DiskConfig, HostConfig
from ..errors import ConfigError, KVTierError
from ..policy import check_policy_name, make_policy
from ..progress import Bar
from .belady import prefix_hits
from .trace import Trace

MODES = ("meta", "bytes")
KEY_BYTES = 16


def block_key(h: int) -> bytes:
    """The 16-byte cache key of a trace hash id (deterministic)."""
    return (h & ((1 << 128) - 1)).to_bytes(KEY_BYTES, "little")


def block_bytes_of(key: bytes, nbytes: int) -> np.ndarray:
    """Deterministic content of the block with ``key``: the key and a counter, tiled."""
    pattern = np.frombuffer(key, dtype=np.uint8)
    out = np.resize(pattern, nbytes)
    out[KEY_BYTES::KEY_BYTES] ^= np.arange(1, len(out[KEY_BYTES::KEY_BYTES]) + 1, dtype=np.uint8)
    return out


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay through: tier capacities (tokens, fastest first) and how."""
    capacities_tokens: tuple[int, ...]
    policy: str = HostConfig.policy           # the tiers' defaults
    lower_policy: str = DiskConfig.policy
    mode: str = "meta"
    kv_bytes_per_token: int = 128 << 10     # logical KV size, for byte counts and load times
    block_tokens: int = 512
    stored_block_bytes: int = 16 << 10      # bytes mode: the scaled-down block actually stored
    disk_path: str | None = None            # bytes mode: directory of the disk tier (tier 2)

    def __post_init__(self) -> None:
        caps = self.capacities_tokens
        if not isinstance(caps, tuple) or not caps or len(caps) > 2:
            raise ConfigError("capacities_tokens", caps, "one or two tier capacities (host[, disk]) in tokens")
        for i, c in enumerate(caps):
            if not isinstance(c, int) or isinstance(c, bool) or c < self.block_tokens:
                raise ConfigError(f"capacities_tokens[{i}]", c,
                                  f"an int of at least one block ({self.block_tokens} tokens)")
        if self.mode not in MODES:
            raise ConfigError("mode", self.mode, "one of " + ", ".join(MODES))
        check_policy_name("policy", self.policy)
        check_policy_name("lower_policy", self.lower_policy)
        for key in ("kv_bytes_per_token", "block_tokens", "stored_block_bytes"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(key, v, "a positive int")
        if self.mode == "bytes" and len(caps) > 1 and not self.disk_path:
            raise ConfigError("disk_path", self.disk_path, "a directory for the disk tier in bytes mode")

    @property
    def tier_names(self) -> tuple[str, ...]:
        return ("host", "disk")[:len(self.capacities_tokens)]

    @property
    def num_slots(self) -> tuple[int, ...]:
        return tuple(c // self.block_tokens for c in self.capacities_tokens)

    @property
    def logical_block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_tokens


@dataclass
class ReplayResult:
    trace: str
    config: ReplayConfig
    num_requests: int = 0
    num_blocks: int = 0
    hit_blocks: dict[str, int] = field(default_factory=dict)     # served from each tier
    verified_blocks: int = 0                                     # bytes mode: hits checked byte for byte
    bad_blocks: int = 0                                          # bytes mode: hits whose bytes were wrong
    failed_loads: int = 0                                        # leased but not delivered (a miss)
    bytes_written: dict[str, int] = field(default_factory=dict)  # logical bytes stored into each tier
    bytes_read: dict[str, int] = field(default_factory=dict)     # logical bytes read out of each tier
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    # requests by where their hit blocks came from, in order, as runs: ((tier, blocks), ...)
    hit_patterns: dict[tuple[tuple[str, int], ...], int] = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return sum(self.hit_blocks.values())

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.num_blocks if self.num_blocks else 0.0

    def tier_hit_ratio(self, name: str) -> float:
        return self.hit_blocks.get(name, 0) / self.num_blocks if self.num_blocks else 0.0


def _build_cache(cfg: ReplayConfig):
    from ..cache import TieredCache
    from ..tiers.host import HostTier
    names, slots = cfg.tier_names, cfg.num_slots
    policies = [cfg.policy] + [cfg.lower_policy] * (len(names) - 1)
    if cfg.mode == "meta":
        tiers = [HostTier(n, cfg.logical_block_bytes, s, memory="none") for n, s in zip(names, slots)]
        return TieredCache(tiers, policies, lease_timeout_s=3600.0, transfer_threads=1)
    bb = cfg.stored_block_bytes
    tiers = [HostTier("host", bb, slots[0], memory="pageable")]
    if len(names) > 1:
        from ..keys import Namespace
        try:
            from ..tiers.disk.tier import DiskTier
        except ImportError as e:
            raise ConfigError("capacities_tokens", cfg.capacities_tokens,
                              f"a host capacity only: the disk tier is not available ({e})") from e
        ns = Namespace(model="trace-replay", block_tokens=cfg.block_tokens)
        dcfg = DiskConfig(path=cfg.disk_path, capacity_bytes=slots[1] * bb, policy=cfg.lower_policy,
                          admission="none", durability="none")
        tiers.append(DiskTier.from_config(dcfg, namespace=ns, block_bytes=bb))
    # staging must hold a burst of demotions: one request's worth of evictions at least.
    # One transfer thread: demotions land in eviction order, so the lower tier's policy sees
    # the same sequence as in metadata mode and the two modes give the same hits.
    return TieredCache(tiers, policies, lease_timeout_s=3600.0, staging_bytes=max(64 << 20, 2048 * bb),
                       transfer_threads=1)


def replay(trace: Trace, cfg: ReplayConfig, progress: bool = False) -> ReplayResult:
    """Replay ``trace`` through a TieredCache built from ``cfg``."""
    if trace.block_tokens != cfg.block_tokens:
        raise ConfigError("block_tokens", cfg.block_tokens, f"the trace's {trace.block_tokens}")
    res = ReplayResult(trace.name, cfg)
    names = cfg.tier_names
    res.hit_blocks = {n: 0 for n in names}
    verify = cfg.mode == "bytes"
    bb = cfg.stored_block_bytes
    keys_of: dict[int, bytes] = {}
    bar = Bar(len(trace.requests), f"replay {trace.name}", progress, unit="req")
    t0 = time.perf_counter()
    cache = _build_cache(cfg)
    try:
        for i, req in enumerate(trace.requests):
            keys = [keys_of.get(h) or keys_of.setdefault(h, block_key(h)) for h in req.blocks]
            res.num_requests += 1
            res.num_blocks += len(keys)
            if not keys:
                continue
            got = _serve(cache, keys, i, verify, bb, res)
            rest = keys[got:]
            if rest:
                h = cache.prepare_store(rest, i, start=got)
                if h is not None:
                    if verify:
                        for k, v in zip(h.keys, h.views):
                            np.frombuffer(v, dtype=np.uint8)[:] = block_bytes_of(k, bb)
                    cache.complete_store(h, True)
            cache.flush()
            if bar.enabled:
                bar.update(1, note=f"hit {res.hits / max(res.num_blocks, 1):.4f}")
        res.stats = cache.stats()
    finally:
        bar.close()
        cache.close()
    res.seconds = time.perf_counter() - t0
    lb = cfg.logical_block_bytes
    for n in names:
        res.bytes_written[n] = res.stats.get(f"{n}.stored_blocks", 0) * lb
        res.bytes_read[n] = res.hit_blocks[n] * lb
    return res


def _serve(cache, keys: list[bytes], owner: int, verify: bool, bb: int, res: ReplayResult) -> int:
    """Look up and load the stored prefix of ``keys``; returns how many blocks were delivered."""
    lk = cache.lookup(keys)
    if lk.num_blocks == 0:
        return 0
    h = cache.prepare_load(keys[:lk.num_blocks], owner)
    if h is None:
        res.failed_loads += lk.num_blocks
        return 0
    try:
        if not h.wait(timeout=60):
            raise KVTierError(f"replay: promotion for request {owner} did not finish in 60 s")
        n = h.num_ok
        if verify:
            for j in range(n):
                if np.array_equal(np.frombuffer(h.views[j], dtype=np.uint8), block_bytes_of(h.keys[j], bb)):
                    res.verified_blocks += 1
                else:
                    res.bad_blocks += 1
                    n = j
                    break
    finally:
        cache.complete_load(h, success=True)
    for t in h.tiers[:n]:
        res.hit_blocks[t] += 1
    if n:
        runs = tuple((t, len(list(g))) for t, g in itertools.groupby(h.tiers[:n]))
        res.hit_patterns[runs] = res.hit_patterns.get(runs, 0) + 1
    res.failed_loads += lk.num_blocks - n
    return n


# ---- policy-only simulation -------------------------------------------------------------
def simulate(trace: Trace, policy: str | Callable[[int], object], capacity: int) -> int:
    """Hit blocks of one policy holding ``capacity`` blocks, no cache around it.

    Same order of events as :func:`replay`: hits are accessed, then the
    request's missing blocks are admitted and inserted, evicting as needed;
    the request's own blocks are protected while it is served.
    """
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity <= 0:
        raise ConfigError("capacity", capacity, "a positive number of blocks")
    pol = make_policy(policy, capacity) if isinstance(policy, str) else policy(capacity)
    resident: set[int] = set()
    hits = 0
    for req in trace.requests:
        blocks = req.blocks
        k = prefix_hits(resident, blocks)
        hits += k
        mine = set(blocks)
        protected = mine.__contains__
        for pos, h in enumerate(blocks):
            if h in resident:
                if pos < k:
                    pol.access(h, pos)
                continue
            if not pol.admit(h, pos):
                continue
            if len(resident) >= capacity:
                out = pol.evict(1, protected)
                if not out:
                    continue
                resident.difference_update(out)
            resident.add(h)
            pol.insert(h, pos)
    return hits
