"""One namespace of a kvtier server: a TieredCache whose blocks carry their checksum.

``kvtier serve`` (:mod:`kvtier.remote.server`) keeps one :class:`NamespaceStore` per
namespace (tenant).  Its cache has a HostTier sized by the namespace's byte
quota, and a DiskTier (write-through, no admission filter) under ``--disk``.
A stored block is the client's bytes followed by an 8-byte trailer (CRC32C,
magic), so the checksum the client computed travels with the block through
every tier and back; a block without its trailer is dropped, never served.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import time

from . import protocol as P
from ..errors import ConfigError

TRAILER = struct.Struct("<II")          # crc32c of the block, magic
MAGIC = 0x6B767431                       # "kvt1"


def disk_name(namespace: str) -> str:
    """A directory name for a namespace: readable, and distinct for distinct namespaces."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in namespace)[:64]
    return f"{safe}-{hashlib.blake2b(namespace.encode(), digest_size=6).hexdigest()}"


class NamespaceStore:
    """One namespace's blocks: a TieredCache whose blocks carry a checksum trailer."""

    def __init__(self, name: str, block_bytes: int, quota_bytes: int, disk_dir: str | None,
                 disk_bytes: int):
        from ..cache import TieredCache
        from ..config import DiskConfig, HostConfig, KVTierConfig
        from ..keys import Namespace
        from ..tiers.factory import build_tiers
        self.name = name
        self.block_bytes = block_bytes
        self.stored_bytes = block_bytes + TRAILER.size
        self.opened = self.used = time.monotonic()     # for idle release and stats
        self.disk_path: str | None = None
        disk = None
        if disk_dir:
            path = self.disk_path = os.path.join(disk_dir, disk_name(name))
            # every block goes to disk as it is stored (clients chose to store it: no admission filter),
            # so a restarted server still has it
            disk = DiskConfig(path=path, capacity_bytes=disk_bytes, admission="none", write_mode="through")
            os.makedirs(disk_dir, exist_ok=True)
            with open(path + ".json", "w", encoding="utf-8") as f:      # lets a restart reopen it
                json.dump({"namespace": name, "block_bytes": block_bytes}, f)
        # pages are mapped from a thread: populating a whole quota here would stall the
        # server's one loop (every tenant's requests) for seconds when a namespace opens
        host = HostConfig(capacity_bytes=quota_bytes, pinned="off", populate="background")
        # a host-only namespace moves no bytes in the background: no transfer thread of its own
        threads = 1 if disk_dir else 0
        cfg = KVTierConfig(host=host, disk=disk,
                           staging_bytes=min(64 << 20, quota_bytes) if disk_dir else 0, transfer_threads=1)
        ns = Namespace(model="kvtier-server", block_tokens=1, tenant=name)
        try:
            tiers, policies = build_tiers(cfg, ns, self.stored_bytes)
        except ModuleNotFoundError as e:
            raise ConfigError("--disk", disk_dir, f"a build of kvtier with a disk tier ({e})") from e
        self.cache = TieredCache(tiers, policies, lease_timeout_s=60.0, staging_bytes=cfg.staging_bytes,
                                 transfer_threads=threads, namespace=ns)
        self.capacity_bytes = tiers[0].num_slots * tiers[0].slot_bytes
        # what it holds in memory: host slots, and the staging pool of blocks on their way to disk
        self.memory_bytes = self.capacity_bytes + (cfg.staging_bytes if disk_dir else self.stored_bytes)
        self._chunk = max(1, tiers[0].num_slots // 2)     # a put larger than host memory goes in steps

    def resident_blocks(self) -> int:
        return self.cache.stats().get(f"{self.cache.tiers[0].name}.resident_blocks", 0)

    def put(self, keys, crcs, payloads) -> tuple[list[bool], int]:
        """Store blocks whose payload matches its CRC; (per-key stored, corrupt count)."""
        stored = [False] * len(keys)
        corrupt = 0
        for c in range(0, len(keys), self._chunk):
            if c and len(self.cache.tiers) > 1:
                self.cache.flush(5.0)        # backpressure: let the evicted blocks reach the disk
            corrupt += self._put(range(c, min(len(keys), c + self._chunk)), keys, crcs, payloads, stored)
        return stored, corrupt

    def _put(self, idx, keys, crcs, payloads, stored) -> int:
        """Copy blocks idx into leased slots, checksumming as they go; returns how many were corrupt."""
        sub = [keys[i] for i in idx]
        h = self.cache.prepare_store(sub, owner="put")
        taken = set(h.positions) if h is not None else set()
        bad = []
        if h is not None:
            bb = self.block_bytes
            got = P.copy_payloads([v[:bb] for v in h.views], [payloads[idx[j]] for j in h.positions])
            for view, j, crc in zip(h.views, h.positions, got):
                i = idx[j]
                if crc == crcs[i]:
                    view[bb:] = TRAILER.pack(crcs[i], MAGIC)
                    stored[i] = True
                else:            # the bytes are not what the client checksummed: never served
                    view[bb:] = TRAILER.pack(0, 0)
                    bad.append(sub[j])
            self.cache.complete_store(h, True)
            if bad:
                self.cache.discard(bad)
        for j, i in enumerate(idx):
            if j not in taken and self.cache.lookup([sub[j]]).num_blocks:
                stored[i] = True                     # already held (or a duplicate in this request)
        return len(bad)

    def get(self, keys, wait_s: float) -> tuple[list[bool], list[int], list, list]:
        """(found per key, crcs, payloads, load handles) of the stored blocks among ``keys``.

        Runs of stored keys are leased together.  Payloads are views of the leased
        host slots: complete_load every handle once they have been sent.
        """
        cache, bb = self.cache, self.block_bytes
        found, crcs, payloads, handles, drop = [False] * len(keys), [], [], [], []
        copy_out = len(cache.tiers) > 1
        i = 0
        try:
            while i < len(keys):
                h = cache.prepare_load(keys[i:], owner="get")
                if h is None:
                    i += 1
                    continue
                handles.append(h)
                if not h.ready():
                    h.wait(wait_s)
                for j, (good, view) in enumerate(zip(h.ok, h.views)):
                    if not good:
                        continue
                    crc, magic = TRAILER.unpack(view[bb:])
                    if magic != MAGIC:                 # never written whole: drop it
                        drop.append(keys[i + j])
                        continue
                    found[i + j] = True
                    crcs.append(crc)
                    # blocks promoted from disk need host slots: copy out and release at once,
                    # so one large get cannot pin the whole host tier while its reply is on the wire
                    payloads.append(bytes(view[:bb]) if copy_out else view[:bb])
                i += len(h.keys)
                if copy_out:
                    cache.complete_load(handles.pop())
        except BaseException:
            for h in handles:
                cache.complete_load(h, success=False)
            raise
        if drop:
            self.delete(drop)
        return found, crcs, payloads, handles

    def exists(self, keys) -> list[bool]:
        return [self.cache.lookup([k]).num_blocks == 1 for k in keys]

    def delete(self, keys) -> int:
        return self.cache.discard(keys)

    def close(self) -> None:
        self.cache.close()
