"""RemoteTier: blocks kept by kvtier servers (``kvtier serve``), over ZeroMQ.

Keys are sharded across the servers by rendezvous (highest-random-weight)
hashing: each key ranks every server by a BLAKE2b of the key keyed by the
server's address, and lives on the top ``replication`` of them, so adding a server moves only about 1/N of
the keys and removing one moves only its own.

Each call sends batched requests of a few MiB to all the servers it needs at
once (DEALER sockets, one per request in flight, taken from a per-server
pool), consumes each reply as it arrives, and waits for the rest up to
``timeout_ms``.  With replication, a block missing on its first server is
asked of the next.  A request that times out, or whose reply does
not validate, is a miss: its socket is closed and a fresh one made next time,
so a late reply can never be taken for another request's; the server is then
skipped for a short, growing back-off.  Bytes in flight, summed over all
callers, stay under ``max_inflight_bytes``; a call that cannot get room within
its timeout is a miss too.  A server answering ``busy`` (too many bytes in
flight there) is asked again after a short back-off, a few times, and then
the request is a miss.  Payloads are sent from the caller's memory
without a copy, and every block carries the CRC32C computed here; a block
that comes back with a different checksum is a miss, never returned.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Sequence

from . import protocol as P
from ..errors import ConfigError
from ..extras import require
from ..tiers.base import Tier
from .sharding import Backoff, owners, replica_rounds, spread

log = logging.getLogger(__name__)

REQUEST_BYTES = 8 << 20          # payload bytes per request (at least one block)
WAVE_REQUESTS = 16               # requests in flight per call
BUSY_RETRIES = 3                 # a request answered busy is sent again this many times at most
BUSY_BACKOFF_S = 0.01            # first wait before sending it again; doubles each time


def _zmq():
    return require("zmq", "the remote tier (backend zmq)")

class _Budget:
    """Bytes in flight over all callers, bounded; waits at most a deadline for room."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, deadline: float) -> bool:
        n = min(n, self.limit)
        with self._cond:
            while self.used + n > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= min(n, self.limit)
            self._cond.notify_all()


class _Request:
    """One batched request to one server; ``on_reply`` consumes a valid ok reply as it arrives."""
    __slots__ = ("server", "op", "idx", "nbytes", "on_reply", "reply")

    def __init__(self, server: int, op: str, idx: list[int], nbytes: int = 0, on_reply=None):
        self.server, self.op, self.idx, self.nbytes = server, op, idx, nbytes
        self.on_reply = on_reply
        self.reply: P.Reply | None = None


class RemoteTier(Tier):
    """Blocks on a set of kvtier servers; capacity is theirs to manage (num_slots None)."""

    medium = "remote"

    def __init__(self, name: str, block_bytes: int, servers: Sequence[str], *, namespace: str,
                 timeout_ms: int = 500, replication: int = 1, max_inflight_bytes: int = 256 << 20,
                 server_public_key: str = "", client_secret_key: str = "", write_through: bool = False):
        super().__init__(name, block_bytes, None)
        if not servers:
            raise ConfigError(f"{name}.servers", servers, "a non-empty list of tcp://host:port")
        if not 1 <= replication <= len(servers):
            raise ConfigError(f"{name}.replication", replication, f"an int in [1, {len(servers)}]")
        if block_bytes > P.Limits().max_block_bytes:
            raise ConfigError(f"{name}.block_bytes", block_bytes, f"at most {P.Limits().max_block_bytes}")
        zmq = _zmq()
        self.zmq = zmq
        self.servers = list(servers)
        self.namespace = namespace
        self.timeout_s = timeout_ms / 1000.0
        self.replication = replication
        self.write_through = write_through
        self._budget = _Budget(max_inflight_bytes)
        # requests of a few MiB: replies are consumed while later ones are still on the wire
        self._batch = max(1, min(P.MAX_KEYS, min(max_inflight_bytes, REQUEST_BYTES) // block_bytes))
        self._curve = self._load_curve(server_public_key, client_secret_key)
        self._ctx = zmq.Context()
        self._idle: dict[int, list] = defaultdict(list)
        self._backoff = Backoff(len(self.servers))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stats: Counter = Counter()
        self._closed = False

    def _load_curve(self, server_public_key: str, client_secret_key: str):
        if not server_public_key and not client_secret_key:
            return None
        if not (server_public_key and client_secret_key):
            raise ConfigError(f"{self.name}.client_secret_key", client_secret_key,
                              "both server_public_key and client_secret_key, or neither")
        from zmq.auth import load_certificate
        try:
            server_pub, _ = load_certificate(server_public_key)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.name}.server_public_key", server_public_key, f"a CURVE key file ({e})") from e
        try:
            pub, secret = load_certificate(client_secret_key)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.name}.client_secret_key", client_secret_key, f"a CURVE key file ({e})") from e
        if not secret:
            raise ConfigError(f"{self.name}.client_secret_key", client_secret_key, "a *.key_secret file")
        return server_pub, pub, secret

    # ---- sockets --------------------------------------------------------------------
    def _socket(self, server: int):
        with self._lock:
            if self._idle[server]:
                return self._idle[server].pop()
        zmq = self.zmq
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 50)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        s.setsockopt(zmq.MAXMSGSIZE, self.block_bytes + P.MAX_HEADER_BYTES)
        if self._curve is not None:
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = self._curve
        s.connect(self.servers[server])
        return s

    def _give_back(self, server: int, sock, healthy: bool) -> None:
        if healthy and not self._closed:
            with self._lock:
                self._idle[server].append(sock)
            self._backoff.succeeded(server)
            return
        sock.close(linger=0)
        self._backoff.failed(server)

    # ---- one round of requests ------------------------------------------------------
    def _exchange(self, reqs: list[_Request], keys, srcs=None) -> None:
        """Send ``reqs``; replies go to their ``on_reply``.  Those answered busy go again after
        a growing back-off, at most BUSY_RETRIES times; then they are misses."""
        for attempt in range(BUSY_RETRIES + 1):
            busy: list[_Request] = []
            self._waves(reqs, keys, srcs, busy)
            if not busy:
                return
            if attempt == BUSY_RETRIES:
                self._stats["busy_misses"] += len(busy)
                return
            self._stats["busy_retries"] += len(busy)
            time.sleep(BUSY_BACKOFF_S * 2 ** attempt)
            for r in busy:
                r.reply = None
            reqs = busy

    def _waves(self, reqs: list[_Request], keys, srcs, busy: list) -> None:
        """Send ``reqs`` in waves that fit the byte budget; those answered busy go to ``busy``."""
        i = 0
        while i < len(reqs):
            wave, nbytes = [reqs[i]], reqs[i].nbytes
            i += 1
            while i < len(reqs) and len(wave) < WAVE_REQUESTS and nbytes + reqs[i].nbytes <= self._budget.limit:
                wave.append(reqs[i])
                nbytes += reqs[i].nbytes
                i += 1
            deadline = time.monotonic() + self.timeout_s
            if not self._budget.acquire(nbytes, deadline):
                self._stats["inflight_full"] += len(wave)
                continue
            try:
                self._wave(wave, deadline, keys, srcs, busy)
            finally:
                self._budget.release(nbytes)

    def _frames(self, r: _Request, rid: int, keys, srcs) -> list:
        ks = [keys[i] for i in r.idx]
        if r.op != "put":
            return [P.encode_request(r.op, rid, self.namespace, keys=ks, block_bytes=self.block_bytes)]
        payloads = [srcs[i] for i in r.idx]
        crcs = P.payload_crcs(payloads)
        return [P.encode_request("put", rid, self.namespace, keys=ks, block_bytes=self.block_bytes,
                                 crcs=crcs), *payloads]

    def _wave(self, wave: list[_Request], deadline: float, keys, srcs, busy: list) -> None:
        zmq = self.zmq
        live: dict = {}                       # socket -> (request, request id)
        for r in wave:
            if not self._backoff.up(r.server):
                self._stats["skipped_down"] += 1
                continue
            rid = next(self._ids)
            frames = self._frames(r, rid, keys, srcs)
            sock = self._socket(r.server)
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:
                self._stats["send_failed"] += 1
                self._give_back(r.server, sock, False)
                continue
            live[sock] = (r, rid)
            self._stats["requests"] += 1
        poller = None
        if len(live) > 1:
            poller = zmq.Poller()
            for sock in live:
                poller.register(sock, zmq.POLLIN)
        while live:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if poller is None:          # one request (a single block, a ping): no Poller to build
                ready = zmq.zmq_poll([(next(iter(live)), zmq.POLLIN)], int(left * 1000) + 1)
            else:
                ready = poller.poll(int(left * 1000) + 1)
            for sock, _ in ready:
                r, rid = live[sock]
                frames = sock.recv_multipart(copy=False)
                try:
                    r.reply = P.decode_reply([f.buffer for f in frames], rid, r.op, len(r.idx),
                                             self.block_bytes)
                    healthy = True
                except P.ProtocolError as e:
                    if e.code == P.E_MALFORMED and P.peek_id(frames[0].buffer) not in (None, rid):
                        continue                   # a late reply to an earlier request: keep waiting
                    self._stats["bad_replies"] += 1
                    log.debug("%s: bad reply from %s: %s", self.name, self.servers[r.server], e)
                    healthy = False
                if poller is not None:
                    poller.unregister(sock)
                del live[sock]
                self._give_back(r.server, sock, healthy)
                if r.reply is None:
                    continue
                if not r.reply.ok:
                    if r.reply.err == P.E_BUSY:
                        busy.append(r)
                    self._stats[f"server_error.{r.reply.err}"] += 1
                    log.debug("%s: %s says %s: %s", self.name, self.servers[r.server], r.reply.err, r.reply.msg)
                elif r.on_reply is not None:
                    r.on_reply(r)
        for sock, (r, _) in live.items():          # no reply in time: a miss; this socket is done
            self._stats["timeouts"] += 1
            self._give_back(r.server, sock, False)

    def _requests(self, by_server: dict[int, list[int]], op: str, on_reply=None) -> list[_Request]:
        per_block = self.block_bytes if op in ("get", "put") else 0
        return [_Request(server, op, idx[j:j + self._batch], len(idx[j:j + self._batch]) * per_block, on_reply)
                for server, idx in by_server.items() for j in range(0, len(idx), self._batch)]

    def _rounds(self, keys, op: str, on_reply, done: list[bool]) -> None:
        """Ask each key's owners in turn (primary first) until ``done[i]``."""
        for by_server in replica_rounds(owners(keys, self.servers, self.replication), done.__getitem__):
            self._exchange(self._requests(by_server, op, on_reply), keys)

    # ---- Tier -----------------------------------------------------------------------
    def write(self, keys, slots, srcs) -> list[bool]:
        self._check_open("write")
        ok = [False] * len(keys)
        if not keys:
            return ok
        srcs = [memoryview(s).cast("B") for s in srcs]
        by_server = spread(owners(keys, self.servers, self.replication))

        def stored(r: _Request) -> None:
            for i, good in zip(r.idx, r.reply.stored):
                ok[i] = ok[i] or good

        self._exchange(self._requests(by_server, "put", stored), keys, srcs)
        self._stats["put_blocks"] += len(keys)
        self._stats["put_stored"] += sum(ok)
        return ok

    def read(self, keys, slots, dsts) -> list[bool]:
        self._check_open("read")
        ok = [False] * len(keys)

        def fill(r: _Request) -> None:
            rep = r.reply
            idx = [i for i, found in zip(r.idx, rep.found) if found]
            take = [j for j, i in enumerate(idx) if not ok[i]]     # not already had from a replica
            if not take:
                return
            got = P.copy_payloads([dsts[idx[j]] for j in take], [rep.payloads[j] for j in take])
            for j, crc in zip(take, got):
                if crc == rep.crcs[j]:
                    ok[idx[j]] = True
                else:
                    self._stats["corrupt_blocks"] += 1
                    log.warning("%s: block from %s failed its checksum: dropped",
                                self.name, self.servers[r.server])

        self._rounds(keys, "get", fill, ok)
        self._stats["get_blocks"] += len(keys)
        self._stats["get_hits"] += sum(ok)
        return ok

    def contains(self, keys) -> list[bool]:
        self._check_open("contains")
        have = [False] * len(keys)

        def seen(r: _Request) -> None:
            for i, found in zip(r.idx, r.reply.found):
                have[i] = have[i] or found

        self._rounds(keys, "exists", seen, have)
        return have

    def discard(self, keys, slots) -> None:
        self._exchange(self._requests(spread(owners(keys, self.servers, self.replication)), "delete"), keys)

    def ping(self, op: str = "health") -> list[dict | None]:
        """Each server's health (or stats) body, None where it did not answer."""
        bodies: list[dict | None] = [None] * len(self.servers)

        def keep(r: _Request) -> None:
            bodies[r.server] = r.reply.body

        self._exchange([_Request(s, op, [], 0, keep) for s in range(len(self.servers))], [])
        return bodies

    def drop(self) -> list[dict | None]:
        """Drop this tier's namespace, every block in it, on every server (``drop`` request);
        each server's reply body, None where it did not answer or refused."""
        self._check_open("drop")
        return self.ping("drop")

    def stats(self) -> dict:
        d = super().stats()
        d.update(servers=len(self.servers), replication=self.replication, **dict(self._stats))
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            socks = [s for lst in self._idle.values() for s in lst]
            self._idle.clear()
        for s in socks:
            s.close(linger=0)
        self._ctx.term()


def make_remote_tier(cfg, namespace, block_bytes: int) -> Tier:
    """The remote tier a :class:`~kvtier.config.RemoteConfig` describes."""
    write_through = bool(getattr(cfg, "write_through", False))
    if cfg.backend == "redis":
        from .redis import RedisTier
        return RedisTier("remote", block_bytes, cfg.servers, namespace=namespace.tenant,
                         timeout_ms=cfg.timeout_ms, cluster=cfg.redis_cluster,
                         replication=cfg.replication, write_through=write_through)
    return RemoteTier("remote", block_bytes, cfg.servers, namespace=namespace.tenant,
                      timeout_ms=cfg.timeout_ms, replication=cfg.replication,
                      max_inflight_bytes=cfg.max_inflight_bytes, server_public_key=cfg.server_public_key,
                      client_secret_key=cfg.client_secret_key, write_through=write_through)
