"""RedisTier: the remote tier on a Redis or Valkey deployment, through redis-py.

For users who already run Redis: point ``remote.servers`` at it
(``redis://host:port``, ``rediss://`` for TLS) with ``remote.backend: redis``.
Several standalone servers are sharded by the same rendezvous hashing as the
ZeroMQ tier (with the same optional replication); ``remote.redis_cluster:
true`` hands the key space to a Redis Cluster instead (every listed server is
a start-up node, and the cluster routes each key itself).

A block is one string value: an 8-byte header (magic, CRC32C of the block)
followed by the block's bytes, under ``kvtier:<namespace>:<key>``.  The reader
verifies length, magic and checksum; anything else is a miss.  Capacity and
eviction are Redis's own (``maxmemory`` and its policy).  Connection errors
and timeouts are misses, counted; a failing server is skipped for a short,
growing back-off.  Batches go out as one pipeline per server.
"""
from __future__ import annotations

import logging
import struct
import threading
from collections import Counter
from typing import Sequence

from .. import native
from ..errors import ConfigError
from ..extras import require
from ..tiers.base import Tier
from .sharding import Backoff, owners, replica_rounds, spread

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")            # magic, crc32c
MAGIC = 0x6B767472                        # "kvtr"


def _redis():
    return require("redis", "the remote tier with backend redis")

class RedisTier(Tier):
    """Blocks in Redis/Valkey (standalone servers sharded here, or one cluster)."""

    medium = "remote"

    def __init__(self, name: str, block_bytes: int, servers: Sequence[str], *, namespace: str,
                 timeout_ms: int = 500, cluster: bool = False, replication: int = 1,
                 write_through: bool = False):
        super().__init__(name, block_bytes, None)
        redis = _redis()
        self.redis = redis
        if not servers:
            raise ConfigError(f"{name}.servers", servers, "a non-empty list of redis://host:port")
        for s in servers:
            if not s.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(f"{name}.servers", s, "redis://host:port, rediss://host:port or unix://path")
        nodes = 1 if cluster else len(servers)
        if not 1 <= replication <= nodes:
            raise ConfigError(f"{name}.replication", replication,
                              "1 with redis_cluster (the cluster replicates)" if cluster
                              else f"an int in [1, {len(servers)}]")
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        timeout = timeout_ms / 1000.0
        opts = dict(socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
        self.servers = list(servers)
        self.namespace = namespace
        self.prefix = b"kvtier:" + namespace.encode() + b":"
        self.replication = replication
        self.write_through = write_through
        self.cluster = cluster
        try:
            if cluster:
                from redis.cluster import ClusterNode, RedisCluster
                starts = []
                for s in servers:
                    c = redis.connection.parse_url(s)
                    starts.append(ClusterNode(c.get("host", "localhost"), c.get("port", 6379)))
                self._clients = [RedisCluster(startup_nodes=starts, **opts)]
            else:
                self._clients = [redis.Redis.from_url(s, **opts) for s in servers]
        except (redis.RedisError, ValueError) as e:
            raise ConfigError(f"{name}.servers", servers, f"reachable Redis servers ({e})") from e
        self._backoff = Backoff(len(self._clients))
        self._lock = threading.Lock()
        self._stats: Counter = Counter()

    def _key(self, key: bytes) -> bytes:
        return self.prefix + key

    def _owners(self, keys) -> list[list[int]]:
        if len(self._clients) == 1:           # one server, or a cluster that routes keys itself
            return [[0] for _ in keys]
        return owners(keys, self.servers, self.replication)

    def _pipeline(self, server: int, commands) -> list | None:
        """Run (method, args) commands as one pipeline; results, or None if the server failed."""
        if not self._backoff.up(server):
            self._stats["skipped_down"] += 1
            return None
        try:
            pipe = self._clients[server].pipeline(transaction=False)
            for method, args in commands:
                getattr(pipe, method)(*args)
            out = pipe.execute(raise_on_error=False)
        except (self.redis.RedisError, OSError) as e:
            self._failed(server, e)
            return None
        errors = [r for r in out if isinstance(r, Exception)]
        if errors:
            self._stats["command_errors"] += len(errors)
            log.debug("%s: %d command errors, first: %s", self.name, len(errors), errors[0])
        self._backoff.succeeded(server)
        return out

    def _failed(self, server: int, e: Exception) -> None:
        self._stats["timeouts" if isinstance(e, self.redis.TimeoutError) else "errors"] += 1
        log.debug("%s: %s failed: %s", self.name, self.servers[server], e)
        self._backoff.failed(server)

    def _rounds(self, keys, method: str, handle) -> None:
        """Ask each key's owners in turn (primary first) until ``handle`` says it is done."""
        done: set[int] = set()
        for by_server in replica_rounds(self._owners(keys), done.__contains__):
            for server, idx in by_server.items():
                out = self._pipeline(server, [(method, (self._key(keys[i]),)) for i in idx])
                if out is None:
                    continue
                for i, r in zip(idx, out):
                    if not isinstance(r, Exception) and handle(i, r):
                        done.add(i)

    # ---- Tier -----------------------------------------------------------------------
    def write(self, keys, slots, srcs) -> list[bool]:
        self._check_open("write")
        ok = [False] * len(keys)
        values = []
        for src in srcs:
            src = memoryview(src).cast("B")
            values.append(HEADER.pack(MAGIC, native.crc32c(src)) + src)
        by_server = spread(self._owners(keys))
        for server, idx in by_server.items():
            out = self._pipeline(server, [("set", (self._key(keys[i]), values[i])) for i in idx])
            if out is not None:
                for i, r in zip(idx, out):
                    ok[i] = ok[i] or r is True
        self._stats["put_blocks"] += len(keys)
        self._stats["put_stored"] += sum(ok)
        return ok

    def read(self, keys, slots, dsts) -> list[bool]:
        self._check_open("read")
        ok = [False] * len(keys)
        want = HEADER.size + self.block_bytes

        def take(i: int, value) -> bool:
            if value is None:
                return False
            if len(value) != want:
                self._stats["corrupt_blocks"] += 1
                return False
            magic, crc = HEADER.unpack_from(value)
            body = memoryview(value)[HEADER.size:]
            if magic != MAGIC:
                self._stats["corrupt_blocks"] += 1
                return False
            native.memcpy(dsts[i], body)
            if native.crc32c(dsts[i]) != crc:
                self._stats["corrupt_blocks"] += 1
                log.warning("%s: block failed its checksum: dropped", self.name)
                return False
            ok[i] = True
            return True

        self._rounds(keys, "get", take)
        self._stats["get_blocks"] += len(keys)
        self._stats["get_hits"] += sum(ok)
        return ok

    def contains(self, keys) -> list[bool]:
        self._check_open("contains")
        have = [False] * len(keys)

        def seen(i: int, r) -> bool:
            have[i] = bool(r)
            return have[i]

        self._rounds(keys, "exists", seen)
        return have

    def discard(self, keys, slots) -> None:
        for server, idx in spread(self._owners(keys)).items():
            self._pipeline(server, [("delete", (self._key(keys[i]),)) for i in idx])

    def stats(self) -> dict:
        d = super().stats()
        d.update(backend="redis", cluster=self.cluster, servers=len(self.servers), **dict(self._stats))
        return d

    def close(self) -> None:
        super().close()
        for c in self._clients:
            try:
                c.close()
            except Exception:  # closing a dead connection can fail; nothing to keep
                pass
