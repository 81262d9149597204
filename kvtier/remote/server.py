"""``kvtier serve``: the cache server that RemoteTier clients share over ZeroMQ.

One ROUTER socket, one thread serving requests in arrival order (docs/protocol.md).
Each namespace gets its own TieredCache (:mod:`kvtier.remote.store`), opened on
first use within its tenant's quota and the server's capacity, and released
when idle for ``--idle-release`` seconds or dropped by a ``drop`` request
(:mod:`kvtier.remote.namespaces`).

Memory is bounded before bytes are buffered (:mod:`kvtier.remote.guard`): each
frame by ``ZMQ_MAXMSGSIZE``, the requests queued per connection by the socket's
high-water marks, and the bytes held for all peers by a guard that answers
``busy`` past half of ``--max-inflight-bytes`` and drops peers past it.  At start
the server refuses a ``--capacity`` that, with these bounds, does not fit the
memory it may use.

Security: the server binds 127.0.0.1 unless told otherwise and refuses any
other address without CURVE (``--curve-secret``; ``--gen-keys DIR`` makes key
pairs).  With CURVE, a client's public key is its identity, mapped to the
tenants it acts for by ``--tenant NAME:QUOTA:KEYFILE``; ``--admin-key`` keys may
list and drop every namespace; unknown keys fail the handshake.  Without CURVE
(loopback only) a client declares its namespace, and when tenants are
configured only their namespaces exist.

Every request is validated by :mod:`kvtier.remote.protocol`; a bad one gets an error
reply and the server carries on.  SIGTERM/SIGINT stop it gracefully.
"""
from __future__ import annotations

import logging
import time
from collections import deque

from . import protocol as P
from ..errors import ConfigError
from ..extras import require
from ..metrics import Metrics
from .guard import (MARGIN_BYTES, ConnectionGuard, peer_slack_bytes, check_memory, rss_bytes, trim_heap,
                    tune_malloc)  # noqa: F401 (tune_malloc: public here too)
from .namespaces import Namespaces, Tenant, parse_tenant  # noqa: F401 (Tenant, parse_tenant: public here too)
from .store import NamespaceStore

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# A get reply copies blocks up to this size into ZeroMQ-owned frames and releases their
# leases at once.  Sending a view of the slot instead saves the copy, but pyzmq then tracks
# the frame (an Event, and a wake-up of its garbage-collector thread when libzmq lets go),
# which costs more than copying a small block and lengthens a single-block get.
COPY_BLOCK_BYTES = 256 << 10
MOVING_OPS = ("get", "put")          # the requests answered busy under back-pressure


def require_zmq():
    return require("zmq", "kvtier serve")


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
                 limits: P.Limits = P.Limits(), wait_s: float = 0.5,
                 max_inflight_bytes: int = 512 << 20, max_requests_per_connection: int = 2,
                 idle_release_s: float = 600.0, admin_keys: frozenset[str] = frozenset(),
                 guard_period_s: float = 0.01):
        zmq = require_zmq()
        self.zmq = zmq
        check_bind(bind, curve_secret is not None)
        self.memory_bytes = check_memory(capacity_bytes, max_inflight_bytes, limits.max_request_bytes)
        self.tenants = dict(tenants or {})
        self.capacity_bytes = capacity_bytes
        self.namespaces = Namespaces(capacity_bytes, default_quota, self.tenants, disk_dir, disk_bytes,
                                     idle_release_s)
        self.stores: dict[str, NamespaceStore] = self.namespaces.stores
        self.limits, self.wait_s = limits, wait_s
        self.max_inflight_bytes = max_inflight_bytes
        self.admin_keys = frozenset(admin_keys)
        self.metrics = Metrics("kvtier_server")
        self._describe()
        self._key_tenants: dict[str, set[str]] = {}
        for t in self.tenants.values():
            for key in t.public_keys:
                self._key_tenants.setdefault(key, set()).add(t.name)
        self.ctx = zmq.Context()
        self.auth = None
        self.guard = None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # a reply that cannot be queued (peer gone, or its queue full) raises instead of
        # vanishing, so the guard never counts bytes libzmq did not take
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.RCVHWM, max_requests_per_connection)   # more stay in the peer's TCP stream
        # replies a peer has not read yet are bounded by bytes (the guard), not by this count
        self.sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_block_bytes, P.MAX_HEADER_BYTES))
        self.curve = curve_secret is not None
        self._pending: deque = deque()          # (tracker, store, load handles) of zero-copy sends
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self._leased: tuple = (None, ())        # the current get's (store, load handles)
        if self.curve:
            self._start_curve(curve_secret)
        # what one connection may have queued: its requests, one more being received, the handshake
        per_peer = (max_requests_per_connection + 1) * limits.max_request_bytes + peer_slack_bytes()
        self.guard = ConnectionGuard(self.sock, curve=self.curve, max_peer_bytes=per_peer,
                                     max_inflight_bytes=max_inflight_bytes, rss_limit=self.rss_limit,
                                     period_s=guard_period_s)
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as e:
            self.close()
            raise ConfigError("--bind", bind, f"an address this machine can listen on ({e})") from e
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._base_rss = rss_bytes()
        for ns in self.namespaces.reopen():          # what a previous server left under --disk
            self.metrics.set("namespace_capacity_bytes", self.stores[ns].capacity_bytes, ns=ns)
        self.guard.start()
        self._running = False
        self._started = time.monotonic()

    def rss_limit(self) -> int:
        """The resident memory past which the guard drops stalled peers: what the process held at
        start, the namespaces open now (host memory and staging), the bytes in flight, the request
        being served and its reply, and a margin."""
        held = sum(st.memory_bytes for st in list(self.stores.values()))     # read from the guard's thread
        return self._base_rss + held + self.max_inflight_bytes + 2 * self.limits.max_request_bytes + MARGIN_BYTES

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
        allowed = set(self._key_tenants) | self.admin_keys

        class Keys:
            def callback(self, domain, key):
                return key.decode("ascii") in allowed

        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.start()
        self.auth.configure_curve_callback(domain="*", credentials_provider=Keys())
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True

    def _describe(self) -> None:
        m = self.metrics
        m.describe("requests_total", "counter", "requests served, by op and outcome")
        m.describe("errors_total", "counter", "error replies, by code")
        m.describe("blocks_total", "counter", "blocks, by op and outcome")
        m.describe("bytes_in_total", "counter", "payload bytes stored")
        m.describe("bytes_out_total", "counter", "payload bytes sent")
        m.describe("namespace_resident_blocks", "gauge", "blocks held in host memory, by namespace")
        m.describe("namespace_capacity_bytes", "gauge", "host bytes reserved, by namespace")
        m.describe("namespaces", "gauge", "namespaces open")
        m.describe("namespaces_released_total", "counter", "namespaces released, by reason")
        m.describe("inflight_bytes", "gauge", "bytes held for peers: received but not yet served, "
                                              "or replied but not yet acknowledged")
        m.describe("peers_dropped_total", "counter", "connections dropped for holding too many bytes")

    # ---- namespaces, identities -----------------------------------------------------
    def _user(self, frame) -> str | None:
        return frame.get("User-Id") if self.curve else None

    def _allowed(self, frame, ns: str) -> bool:
        """May this connection use namespace ``ns`` (put, get, exists, delete, drop)?"""
        tenant = self.namespaces.tenant_of(ns)
        if self.curve:
            return tenant is not None and tenant in self._key_tenants.get(self._user(frame), ())
        return not self.tenants or tenant is not None

    def _is_admin(self, frame) -> bool:
        return self.curve and self._user(frame) in self.admin_keys

    def _visible(self, frame):
        """Which namespaces a stats reply lists for this connection."""
        if not self.curve or self._is_admin(frame):
            return lambda ns: True
        own = self._key_tenants.get(self._user(frame), ())
        return lambda ns: self.namespaces.tenant_of(ns) in own

    def open_namespace(self, ns: str, block_bytes: int) -> NamespaceStore:
        new = ns not in self.stores
        st = self.namespaces.open(ns, block_bytes)
        if new:
            self.metrics.set("namespace_capacity_bytes", st.capacity_bytes, ns=ns)
            self.metrics.set("namespaces", len(self.stores))
        return st

    def release(self, ns: str, reason: str) -> int:
        freed = self.namespaces.release(ns, reason)
        if freed:
            self.metrics.inc("namespaces_released_total", reason=reason)
            self.metrics.remove("namespace_capacity_bytes", ns=ns)     # no series left per dead namespace
            self.metrics.remove("namespace_resident_blocks", ns=ns)
            self.metrics.set("namespaces", len(self.stores))
        return freed

    def release_idle(self) -> list[str]:
        """Release every namespace idle for longer than ``--idle-release``; returns their names."""
        sending = {id(st) for _, st, _ in self._pending}      # its slots are still on the wire
        idle = [ns for ns in self.namespaces.idle() if id(self.stores[ns]) not in sending]
        for ns in idle:
            self.release(ns, "idle")
        if idle:
            trim_heap()
        return idle

    # ---- requests -------------------------------------------------------------------
    def handle(self, frames) -> list:
        """Reply frames (header first) for one request's frames (identity stripped)."""
        try:
            req = P.decode_request([f.buffer for f in frames], self.limits)
            if not (self._allowed(frames[0], req.ns) or
                    (req.op in ("stats", "health", "drop") and self._is_admin(frames[0]))):
                raise P.ProtocolError(P.E_DENIED, f"this identity may not use namespace {req.ns}")
            if req.op in MOVING_OPS and self.guard.busy():
                raise P.ProtocolError(P.E_BUSY, f"over {self.max_inflight_bytes // 2} bytes in flight")
            if req.op == "stats":
                out = self._op_stats(req, self._visible(frames[0]))
            else:
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
        st = self.namespaces.get(req.ns)
        if st is not None and st.block_bytes != req.block_bytes:
            raise P.ProtocolError(P.E_BLOCK_SIZE, f"namespace {req.ns} holds blocks of {st.block_bytes} bytes")
        # a reply is no larger than a request may be: keys past that are answered as misses
        n = max(1, (self.limits.max_request_bytes - P.MAX_HEADER_BYTES) // req.block_bytes)
        keys, rest = req.keys[:n], [False] * max(0, len(req.keys) - n)
        found, crcs, payloads, handles = st.get(keys, self.wait_s) if st is not None else \
            ([False] * len(keys), [], [], [])
        found += rest
        self.metrics.inc("blocks_total", len(payloads), op="get", outcome="hit")
        self.metrics.inc("blocks_total", len(found) - len(payloads), op="get", outcome="miss")
        self.metrics.inc("bytes_out_total", len(payloads) * req.block_bytes)
        self._leased = (st, handles)
        return [P.encode_reply(req.req_id, found=found, crcs=crcs)] + payloads

    def _op_exists(self, req: P.Request) -> list:
        st = self.namespaces.get(req.ns)
        found = st.exists(req.keys) if st is not None else [False] * len(req.keys)
        return [P.encode_reply(req.req_id, found=found)]

    def _op_delete(self, req: P.Request) -> list:
        st = self.namespaces.get(req.ns)
        n = st.delete(req.keys) if st is not None else 0
        return [P.encode_reply(req.req_id, body={"deleted": n})]

    def _op_drop(self, req: P.Request) -> list:
        held = req.ns in self.stores
        freed = self.release(req.ns, "dropped")
        if held:
            trim_heap()
        return [P.encode_reply(req.req_id, body={"dropped": held, "freed_bytes": freed})]

    def _op_health(self, req: P.Request) -> list:
        return [P.encode_reply(req.req_id, body={"status": "ok", "version": P.VERSION,
                                                 "uptime_s": round(time.monotonic() - self._started, 3)})]

    def _op_stats(self, req: P.Request, visible) -> list:
        st = self.stores.get(req.ns)
        listed = self.namespaces.listing(visible)
        body = {"namespace": req.ns, "block_bytes": st.block_bytes if st else None,
                "capacity_bytes": st.capacity_bytes if st else 0,
                "resident_blocks": st.resident_blocks() if st else 0,
                "populating": st.cache.tiers[0].populating if st else False,
                "namespaces": listed,
                "num_namespaces": sum(1 for ns in self.stores if visible(ns)),
                "reserved_bytes": sum(self.stores[r["ns"]].capacity_bytes for r in listed),
                "server": {"capacity_bytes": self.capacity_bytes, "memory_bytes": self.memory_bytes,
                           "rss_bytes": rss_bytes(), "idle_release_s": self.namespaces.idle_s,
                           "released_namespaces": self.namespaces.num_released, **self.guard.stats()}}
        return [P.encode_reply(req.req_id, body=body)]

    # ---- loop -----------------------------------------------------------------------
    def _send(self, ident, reply: list, fd: int | None = None) -> None:
        zmq = self.zmq
        st, handles = self._leased
        self._leased = (None, ())
        try:
            if handles and len(reply[1]) > COPY_BLOCK_BYTES:
                # block bytes go out of the slots; leases held until zmq lets go of the last
                # frame (it releases a message's frames in order; a torn block would still
                # fail the client's checksum)
                last = zmq.Frame(reply[-1], track=True)
                self.sock.send_multipart([ident, *reply[:-1], last], zmq.NOBLOCK, copy=False)
                self._pending.append((last.tracker, st, handles))
                self.guard.given(fd, [len(f) for f in reply])
                return
            # small blocks are copied into the message here, so their leases end below
            self.sock.send_multipart([ident] + reply, zmq.NOBLOCK, copy=bool(handles))
            self.guard.given(fd, [len(f) for f in reply])
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
            try:
                fd = frames[-1].get(zmq.SRCFD)       # the connection it came from, for the guard
            except zmq.ZMQError:
                fd = None
            self.guard.taken(fd, [len(f) for f in frames[1:]])      # the identity frame is local
            if len(frames) < 2:
                continue                       # no identity or no header: nothing to answer
            ident, reply = frames[0], self.handle(frames[1:])
            del frames                         # the request's buffers go back before the reply is sent
            self._send(ident, reply, fd)
            self._reap()
        self._reap()
        return n

    def run(self) -> None:
        self._running = True
        refreshed = 0.0
        while self._running:
            self.serve_once(100)
            if time.monotonic() - refreshed > 1.0:      # housekeeping: at most once a second
                refreshed = time.monotonic()
                self.release_idle()
                for ns, st in self.stores.items():
                    self.metrics.set("namespace_resident_blocks", st.resident_blocks(), ns=ns)
                self.metrics.set("inflight_bytes", self.guard.inflight())
                dropped = self.guard.num_dropped - self.metrics.get("peers_dropped_total")
                if dropped:
                    self.metrics.inc("peers_dropped_total", dropped)

    def stop(self, *_args) -> None:
        self._running = False

    def close(self) -> None:
        deadline = time.monotonic() + 2.0
        while self._pending and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        self._reap(force=True)
        if self.guard is not None:
            self.guard.close()
        self.sock.close(linger=500)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.namespaces.close()
