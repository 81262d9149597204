"""``kvtier serve``: the cache server that RemoteTier clients share over ZeroMQ.

One ROUTER socket, one thread serving requests in arrival order (docs/protocol.md).
Each namespace (a tenant) gets its own TieredCache — a HostTier sized by the
namespace's byte quota, plus a DiskTier when ``--disk`` is given — so one
tenant's blocks can neither be read nor evicted by another's: a full namespace
evicts its own least recently used blocks.  A stored block is the client's
bytes followed by an 8-byte trailer (CRC32C, magic), so the checksum the
client computed travels with the block through every tier and back.

Security: the server binds 127.0.0.1 unless told otherwise and refuses any
other address without CURVE (``--curve-secret``; ``--gen-keys DIR`` makes key
pairs).  With CURVE, a client's public key is its identity, mapped to the
namespaces it may use by ``--tenant NAME:QUOTA:KEYFILE``; unknown keys fail the
handshake.  Without CURVE (loopback only) a client declares its namespace, and
when tenants are configured only those namespaces exist.

Every request is validated by :mod:`kvtier.remote.protocol`; a bad one gets an error
reply and the server carries on.  SIGTERM/SIGINT stop it gracefully.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass

from . import protocol as P
from ..config import parse_size
from ..errors import ConfigError
from ..extras import require
from ..metrics import Metrics
from .store import NamespaceStore, disk_name
from ..tiers.host import memory_limit

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A get reply copies blocks up to this size into ZeroMQ-owned frames and releases their
# leases at once.  Sending a view of the slot instead saves the copy, but pyzmq then tracks
# the frame (an Event, and a wake-up of its garbage-collector thread when libzmq lets go),
# which costs more than copying a small block and lengthens a single-block get.
COPY_BLOCK_BYTES = 256 << 10


@dataclass(frozen=True)
class Tenant:
    name: str
    quota_bytes: int
    public_keys: frozenset[str] = frozenset()     # z85 CURVE public keys


def require_zmq():
    return require("zmq", "kvtier serve")

def parse_tenant(spec: str, default_quota: int) -> Tenant:
    """``NAME[:QUOTA[:PUBKEY_FILE[,PUBKEY_FILE...]]]``."""
    parts = spec.split(":", 2)
    name = parts[0]
    if not name or len(name) > P.MAX_NAMESPACE_CHARS:
        raise ConfigError("--tenant", spec, f"NAME[:QUOTA[:PUBLIC_KEY_FILE,...]] with a 1..{P.MAX_NAMESPACE_CHARS} char name")
    quota = parse_size("--tenant quota", parts[1]) if len(parts) > 1 and parts[1] else default_quota
    keys = set()
    if len(parts) > 2 and parts[2]:
        require_zmq()
        from zmq.auth import load_certificate
        for path in parts[2].split(","):
            try:
                public, _ = load_certificate(path)
            except (OSError, ValueError) as e:
                raise ConfigError("--tenant key file", path, f"a readable CURVE public key file ({e})") from e
            keys.add(public.decode("ascii"))
    return Tenant(name, quota, frozenset(keys))


def check_bind(endpoint: str, curve: bool) -> str:
    """The host of a tcp:// endpoint; ConfigError for anything but loopback without CURVE."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise ConfigError("--bind", endpoint, "tcp://HOST:PORT")
    host = endpoint[6:].rsplit(":", 1)[0]
    if host != LOOPBACK and not curve:
        raise ConfigError("--bind", endpoint, f"tcp://{LOOPBACK}:PORT unless CURVE is on (--curve-secret): "
                                              "a server on another address must authenticate its clients")
    return host


class Server:
    """The request loop. ``run()`` serves until ``stop()`` (or a signal)."""

    def __init__(self, bind: str, *, capacity_bytes: int, default_quota: int,
                 tenants: dict[str, Tenant] | None = None, curve_secret: str | None = None,
                 disk_dir: str | None = None, disk_bytes: int = 16 << 30,
                 limits: P.Limits = P.Limits(), wait_s: float = 0.5):
        zmq = require_zmq()
        self.zmq = zmq
        check_bind(bind, curve_secret is not None)
        limit = memory_limit()
        if limit is not None and capacity_bytes > limit:
            # namespaces map their whole quota when they open: more than the memory there is
            # would end in the kernel killing the server, not in a miss
            raise ConfigError("--capacity", capacity_bytes, f"at most the memory this server may use ({limit} bytes)")
        self.tenants = dict(tenants or {})
        self.capacity_bytes = capacity_bytes
        self.default_quota = default_quota
        self.disk_dir, self.disk_bytes = disk_dir, disk_bytes
        self.limits, self.wait_s = limits, wait_s
        self.stores: dict[str, NamespaceStore] = {}
        self.metrics = Metrics("kvtier_server")
        self._describe()
        self._key_tenants: dict[str, set[str]] = {}
        for t in self.tenants.values():
            for key in t.public_keys:
                self._key_tenants.setdefault(key, set()).add(t.name)
        self.ctx = zmq.Context()
        self.auth = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.setsockopt(zmq.RCVHWM, 64)            # bounds what clients can queue here
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_block_bytes, P.MAX_HEADER_BYTES))
        self.curve = curve_secret is not None
        self._pending: deque = deque()          # (tracker, store, load handles) of zero-copy sends
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._leased: tuple = (None, ())        # the current get's (store, load handles)
        if self.curve:
            self._start_curve(curve_secret)
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise ConfigError("--bind", bind, f"an address this machine can listen on ({e})") from e
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if disk_dir:
            self._reopen(disk_dir)
        self._running = False
        self._started = time.monotonic()

    def _start_curve(self, secret_file: str) -> None:
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator
        try:
            public, secret = load_certificate(secret_file)
        except (OSError, ValueError) as e:
            raise ConfigError("--curve-secret", secret_file, f"a CURVE secret key file ({e})") from e
        if not secret:
            raise ConfigError("--curve-secret", secret_file, "a *.key_secret file holding a secret key")
        if not self._key_tenants:
            raise ConfigError("--tenant", "", "at least one NAME:QUOTA:PUBLIC_KEY_FILE when CURVE is on")
        allowed = self._key_tenants

        class Keys:
            def callback(self, domain, key):
                return key.decode("ascii") in allowed

        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=Keys())
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True

    def _reopen(self, disk_dir: str) -> None:
        """Open the namespaces a previous server left on disk (their blocks are recovered)."""
        for meta in sorted(glob.glob(os.path.join(glob.escape(disk_dir), "*.json"))):
            try:
                with open(meta, encoding="utf-8") as f:
                    d = json.load(f)
                ns, bb = d["namespace"], d["block_bytes"]
                if not isinstance(ns, str) or type(bb) is not int or meta != os.path.join(disk_dir, disk_name(ns) + ".json"):
                    raise ValueError("unexpected contents")
                self.open_namespace(ns, bb)
            except (OSError, ValueError, KeyError, TypeError, P.ProtocolError) as e:
                log.warning("%s: namespace not reopened: %s", meta, e)

    def _describe(self) -> None:
        m = self.metrics
        m.describe("requests_total", "counter", "requests served, by op and outcome")
        m.describe("errors_total", "counter", "error replies, by code")
        m.describe("blocks_total", "counter", "blocks, by op and outcome")
        m.describe("bytes_in_total", "counter", "payload bytes stored")
        m.describe("bytes_out_total", "counter", "payload bytes sent")
        m.describe("namespace_resident_blocks", "gauge", "blocks held in host memory, by namespace")
        m.describe("namespace_capacity_bytes", "gauge", "host bytes reserved, by namespace")

    # ---- namespaces, identities -----------------------------------------------------
    def _allowed(self, frame, ns: str) -> bool:
        if self.curve:
            user = frame.get("User-Id")
            return ns in self._key_tenants.get(user, ())
        return not self.tenants or ns in self.tenants

    def open_namespace(self, ns: str, block_bytes: int) -> NamespaceStore:
        st = self.stores.get(ns)
        if st is not None:
            if st.block_bytes != block_bytes:
                raise P.ProtocolError(P.E_BLOCK_SIZE, f"namespace {ns} holds blocks of {st.block_bytes} bytes")
            return st
        quota = self.tenants[ns].quota_bytes if ns in self.tenants else self.default_quota
        used = sum(s.capacity_bytes for s in self.stores.values())
        if used + quota > self.capacity_bytes:
            raise P.ProtocolError(P.E_NO_ROOM, f"a namespace of {quota} bytes exceeds the server's capacity")
        try:
            st = NamespaceStore(ns, block_bytes, quota, self.disk_dir, self.disk_bytes)
        except ConfigError as e:
            raise P.ProtocolError(P.E_NO_ROOM, str(e)) from None
        self.stores[ns] = st
        self.metrics.set("namespace_capacity_bytes", st.capacity_bytes, ns=ns)
        log.info("namespace %s: %d-byte blocks, %d bytes of host memory", ns, block_bytes, st.capacity_bytes)
        return st

    # ---- requests -------------------------------------------------------------------
    def handle(self, frames) -> list:
        """Reply frames (header first) for one request's frames (identity stripped)."""
        try:
            req = P.decode_request([f.buffer for f in frames], self.limits)
            if not self._allowed(frames[0], req.ns):
                raise P.ProtocolError(P.E_DENIED, f"this identity may not use namespace {req.ns}")
            out = getattr(self, "_op_" + req.op)(req)
            self.metrics.inc("requests_total", op=req.op, outcome="ok")
            return out
        except P.ProtocolError as e:
            self.metrics.inc("errors_total", code=e.code)
            return [P.encode_error(P.peek_id(frames[0].buffer) if frames else None, e.code, e.message)]
        except Exception as e:  # the loop must outlive any one request
            log.exception("request failed")
            self.metrics.inc("errors_total", code=P.E_INTERNAL)
            return [P.encode_error(P.peek_id(frames[0].buffer), P.E_INTERNAL, type(e).__name__)]

    def _op_put(self, req: P.Request) -> list:
        st = self.open_namespace(req.ns, req.block_bytes)
        stored, corrupt = st.put(req.keys, req.crcs, req.payloads)
        n = sum(stored)
        self.metrics.inc("blocks_total", n, op="put", outcome="stored")
        self.metrics.inc("blocks_total", len(stored) - n, op="put", outcome="rejected")
        self.metrics.inc("blocks_total", corrupt, op="put", outcome="corrupt")
        self.metrics.inc("bytes_in_total", n * req.block_bytes)
        return [P.encode_reply(req.req_id, stored=stored)]

    def _op_get(self, req: P.Request) -> list:
        st = self.stores.get(req.ns)
        if st is not None and st.block_bytes != req.block_bytes:
            raise P.ProtocolError(P.E_BLOCK_SIZE, f"namespace {req.ns} holds blocks of {st.block_bytes} bytes")
        found, crcs, payloads, handles = st.get(req.keys, self.wait_s) if st is not None else \
            ([False] * len(req.keys), [], [], [])
        self.metrics.inc("blocks_total", len(payloads), op="get", outcome="hit")
        self.metrics.inc("blocks_total", len(found) - len(payloads), op="get", outcome="miss")
        self.metrics.inc("bytes_out_total", len(payloads) * req.block_bytes)
        self._leased = (st, handles)
        return [P.encode_reply(req.req_id, found=found, crcs=crcs)] + payloads

    def _op_exists(self, req: P.Request) -> list:
        st = self.stores.get(req.ns)
        found = st.exists(req.keys) if st is not None else [False] * len(req.keys)
        return [P.encode_reply(req.req_id, found=found)]

    def _op_delete(self, req: P.Request) -> list:
        st = self.stores.get(req.ns)
        n = st.delete(req.keys) if st is not None else 0
        return [P.encode_reply(req.req_id, body={"deleted": n})]

    def _op_health(self, req: P.Request) -> list:
        return [P.encode_reply(req.req_id, body={"status": "ok", "version": P.VERSION,
                                                 "uptime_s": round(time.monotonic() - self._started, 3)})]

    def _op_stats(self, req: P.Request) -> list:
        st = self.stores.get(req.ns)
        body = {"namespace": req.ns, "block_bytes": st.block_bytes if st else None,
                "capacity_bytes": st.capacity_bytes if st else 0,
                "resident_blocks": st.resident_blocks() if st else 0,
                "populating": st.cache.tiers[0].populating if st else False}
        return [P.encode_reply(req.req_id, body=body)]

    # ---- loop -----------------------------------------------------------------------
    def _send(self, ident, reply: list) -> None:
        zmq = self.zmq
        st, handles = self._leased
        self._leased = (None, ())
        try:
            if handles and len(reply[1]) > COPY_BLOCK_BYTES:
                # block bytes go out of the slots; leases held until zmq lets go of the last
                # frame (it releases a message's frames in order; a torn block would still
                # fail the client's checksum)
                last = zmq.Frame(reply[-1], track=True)
                self.sock.send_multipart([ident, *reply[:-1], last], copy=False)
                self._pending.append((last.tracker, st, handles))
                return
            # small blocks are copied into the message here, so their leases end below
            self.sock.send_multipart([ident] + reply, copy=bool(handles))
        except Exception as e:  # a reply that cannot go out is the client's timeout, not our crash
            log.debug("reply not sent: %s", e)
        for h in handles:
            st.cache.complete_load(h)

    def _reap(self, force: bool = False) -> None:
        while self._pending and (force or self._pending[0][0].done):
            _, st, handles = self._pending.popleft()
            for h in handles:
                st.cache.complete_load(h)

    def serve_once(self, timeout_ms: int = 100) -> int:
        """Serve the requests waiting now (or that arrive within timeout_ms); returns how many."""
        zmq = self.zmq
        n = 0
        if not self._poller.poll(timeout_ms):
            self._reap()
            return 0
        sock = self.sock
        while n < 256 and sock.get(zmq.EVENTS) & zmq.POLLIN:   # no exception per drained queue
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            n += 1
            self._leased = (None, ())
            if len(frames) < 2:
                continue                       # no identity or no header: nothing to answer
            self._send(frames[0], self.handle(frames[1:]))
            self._reap()
        self._reap()
        return n

    def run(self) -> None:
        self._running = True
        refreshed = 0.0
        while self._running:
            self.serve_once(100)
            if time.monotonic() - refreshed > 1.0:      # gauges: at most once a second
                refreshed = time.monotonic()
                for ns, st in self.stores.items():
                    self.metrics.set("namespace_resident_blocks", st.resident_blocks(), ns=ns)

    def stop(self, *_args) -> None:
        self._running = False

    def close(self) -> None:
        deadline = time.monotonic() + 2.0
        while self._pending and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        self._reap(force=True)
        self.sock.close(linger=500)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        for st in self.stores.values():
            st.close()
        self.stores.clear()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3      # glibc mallopt parameters


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Serve large ZeroMQ message buffers from the heap instead of fresh mmaps.

    libzmq allocates a buffer per received frame; above glibc's mmap threshold
    each one is a new mapping whose pages fault in as the kernel copies into
    them, which costs about as much CPU as the copy itself.  Raising the
    threshold (and the trim threshold, so freed buffers are kept) lets the
    buffers be reused.  Process-wide, so only for processes kvtier owns (the
    server, benchmarks); an engine can set ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` in its environment for the same effect.
    Returns False where there is no glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):      # not glibc
        return False
