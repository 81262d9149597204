"""The memory peers can make ``kvtier serve`` hold, bounded: the start-up check and the guard.

libzmq hands a multipart message to the application only once every frame of
it has arrived, and its one limit is per frame (``ZMQ_MAXMSGSIZE``, which
drops a peer that exceeds it).  What a peer has sent but the server has not
yet taken, and what the server has replied but the peer has not yet
acknowledged, therefore sits in libzmq where no request handler can see it.
The :class:`ConnectionGuard` measures it from outside, per connection:

    bytes held for a peer = (TCP bytes received - wire bytes of the requests taken)
                          + (wire bytes of the replies handed over - TCP bytes acknowledged)

The TCP counters are the kernel's (``TCP_INFO``), read on the connection's
file descriptor (which the socket monitor reports as peers connect); the
wire bytes are exact, ZMTP framing and CURVE boxes included, so the
difference cannot drift.  A peer holding bytes that has completed no request
for ``STALL_S`` is *stalled* (an unfinished request, or a very slow sender).
A thread samples every connection every ``period_s`` and drops

    a peer holding more than ``max_peer_bytes``     its queued requests, one more being
                                                    received and its kernel buffer: a request
                                                    over the byte or frame limits, or a flood
    stalled peers, largest first, while the total   an unfinished request does not make the
    passes half of ``max_inflight_bytes``           server busy for everyone else
    the largest holders while the total passes ``max_inflight_bytes``
    stalled peers once the RSS passes ``rss_limit()`` less half the bound, and every peer
    that completed nothing since the last sample once it passes ``rss_limit()``
                                                    (libzmq keeps each frame in a 64-byte
                                                    slot: many empty frames cost up to 32
                                                    times their wire bytes)

by shutting its TCP socket down, which makes libzmq discard what it buffered
for that peer; the freed heap is then handed back to the kernel.  While the
bytes held for peers that are not stalled pass half the bound,
:meth:`ConnectionGuard.busy` tells the server to answer ``busy`` instead of
serving puts and gets: back-pressure before any drop.

:func:`check_memory` refuses at start a configuration whose capacity and
bounds do not fit the memory the process may use.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import socket
import struct
import threading
import time

from ..errors import ConfigError

log = logging.getLogger(__name__)

TCPI_COUNTERS = struct.Struct("<QQ")      # tcpi_bytes_acked, tcpi_bytes_received (Linux >= 4.1)
TCPI_COUNTERS_AT = 120
PEER_SLACK_BYTES = 64 << 10               # handshake and ZMTP commands: not requests
STALL_S = 0.5                             # holding bytes this long without completing a request
MARGIN_BYTES = 64 << 20                   # interpreter objects, index maps, one guard period of input
CURVE_BOX_BYTES = 33                      # "\x07MESSAGE", short nonce, MAC, flags


def peer_slack_bytes() -> int:
    """What a well-behaved peer may have in flight beyond its requests: the handshake, and
    what the kernel's receive buffer of its connection holds (``tcp_rmem``'s maximum)."""
    rmem = 6 << 20
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem", encoding="ascii") as f:
            rmem = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        pass
    return PEER_SLACK_BYTES + rmem


def wire_bytes(n: int, curve: bool) -> int:
    """Bytes one frame of ``n`` bytes takes on a ZMTP 3 connection."""
    if curve:
        n += CURVE_BOX_BYTES
    return n + (2 if n <= 255 else 9)


# ---- the start-up check ----------------------------------------------------------------
def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):      # "max" (no limit), absent, unreadable
        return None


def _status_bytes(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int:
    """This process's resident memory."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def memory_available() -> tuple[int | None, str]:
    """The most memory this process may grow to, and which limit says so.

    The least of: its cgroup's ``memory.max`` less what the rest of the cgroup
    uses, ``RLIMIT_AS`` less the address space not resident, and
    ``MemAvailable`` plus what the process holds already.
    """
    rss = rss_bytes()
    found: list[tuple[int, str]] = []
    cgroup = ""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            for line in f:
                if line.startswith("0::"):
                    cgroup = line[3:].strip().lstrip("/")
    except OSError:
        pass
    for base in {os.path.join("/sys/fs/cgroup", cgroup), "/sys/fs/cgroup"}:
        cap = _read_int(os.path.join(base, "memory.max"))
        if cap is not None:
            used = _read_int(os.path.join(base, "memory.current")) or rss
            found.append((cap - max(0, used - rss), f"cgroup {os.path.join(base, 'memory.max')}"))
    v1 = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    if v1 is not None and v1 < 1 << 60:
        found.append((v1, "cgroup memory.limit_in_bytes"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append((soft - max(0, (_status_bytes("VmSize") or rss) - rss), "RLIMIT_AS"))
    avail = _status_bytes("MemAvailable", "/proc/meminfo")
    if avail is not None:
        found.append((avail + rss, "MemAvailable"))
    if not found:
        return None, "no limit found"
    return min(found)


def memory_needed(capacity_bytes: int, max_inflight_bytes: int, max_request_bytes: int) -> int:
    """What the server may hold: namespaces, bytes in flight, the request being served and
    its reply, and the process itself."""
    return capacity_bytes + max_inflight_bytes + 2 * max_request_bytes + rss_bytes() + MARGIN_BYTES


def check_memory(capacity_bytes: int, max_inflight_bytes: int, max_request_bytes: int) -> int:
    """The bytes the server needs; ConfigError naming the flags if they do not fit."""
    need = memory_needed(capacity_bytes, max_inflight_bytes, max_request_bytes)
    limit, source = memory_available()
    if limit is not None and need > limit:
        raise ConfigError("--capacity", capacity_bytes,
                          f"--capacity + --max-inflight-bytes ({max_inflight_bytes}) + 2 x --max-request-bytes "
                          f"({max_request_bytes}) + the process itself ({need - capacity_bytes - max_inflight_bytes - 2 * max_request_bytes}) "
                          f"must fit in the memory this server may use: {limit} bytes ({source})")
    return need


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
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):      # not glibc
        return False


_libc = None


def trim_heap() -> None:
    """Hand freed heap memory back to the kernel (glibc); a no-op elsewhere."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the guard -------------------------------------------------------------------------
class Peer:
    """One accepted connection: what the server took from it and gave it, and the kernel's counts."""
    __slots__ = ("fd", "addr", "taken", "given", "held_in", "held_out", "last_taken", "progress_at", "stalled")

    def __init__(self, fd: int, addr):
        self.fd, self.addr = fd, addr
        self.taken = self.given = self.held_in = self.held_out = self.last_taken = 0
        self.progress_at = time.monotonic()
        self.stalled = False

    @property
    def held(self) -> int:
        return self.held_in + self.held_out


def _with_socket(fd: int, addr, fn):
    """fn(socket) on ``fd`` if it is still the connection to ``addr``; None otherwise.

    The descriptor belongs to libzmq, which may have closed it (and the kernel
    reused the number) since the monitor reported it: the peer address tells.
    """
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        if addr is not None and s.getpeername() != addr:
            return None
        return fn(s)
    except OSError:
        return None
    finally:
        s.detach()


def _peer_addr(fd: int):
    return _with_socket(fd, None, lambda s: s.getpeername())


def _counters(s) -> tuple[int, int]:
    raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_COUNTERS_AT + TCPI_COUNTERS.size)
    return TCPI_COUNTERS.unpack_from(raw, TCPI_COUNTERS_AT)


class ConnectionGuard:
    """Bytes held for each peer of one ROUTER socket, measured and bounded (module docstring)."""

    def __init__(self, zsock, *, curve: bool, max_peer_bytes: int, max_inflight_bytes: int,
                 rss_limit, period_s: float = 0.01):
        import zmq
        self.zmq = zmq
        self.curve = curve
        self.max_peer_bytes, self.max_inflight_bytes = max_peer_bytes, max_inflight_bytes
        self.rss_limit = rss_limit
        self.period_s = period_s
        self.peers: dict[int, Peer] = {}
        self.num_dropped = 0
        self.inflight_bytes = self.stalled_bytes = 0
        self._dropped_since_trim = False
        self._given_total = self._given_sampled = 0
        self._monitor = zsock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-serve-guard", daemon=True)

    def start(self) -> "ConnectionGuard":
        if hasattr(socket, "TCP_INFO"):
            self._thread.start()
        else:                                # not Linux: per-frame and per-connection limits only
            log.warning("no TCP_INFO on this platform: bytes in flight are not measured")
        return self

    # ---- the serving thread's side ----------------------------------------------------
    def taken(self, fd: int | None, sizes) -> None:
        """The server took a request of frames of ``sizes`` bytes from connection ``fd``."""
        p = self.peers.get(fd)
        if p is not None:
            p.taken += sum(wire_bytes(n, self.curve) for n in sizes)

    def given(self, fd: int | None, sizes) -> None:
        """The server handed libzmq a reply of frames of ``sizes`` bytes for connection ``fd``."""
        n = sum(wire_bytes(s, self.curve) for s in sizes)
        self._given_total += n
        p = self.peers.get(fd)
        if p is not None:
            p.given += n

    def inflight(self) -> int:
        """Bytes held for peers: the last sample, plus the replies handed over since."""
        return self.inflight_bytes + self._given_total - self._given_sampled

    def busy(self) -> bool:
        """True while the bytes held for peers that are not stalled pass half the bound."""
        return self.inflight() - self.stalled_bytes > self.max_inflight_bytes // 2

    def stats(self) -> dict:
        return {"peers": len(self.peers), "inflight_bytes": self.inflight(),
                "max_inflight_bytes": self.max_inflight_bytes, "dropped_peers": self.num_dropped}

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._monitor.close(linger=0)

    # ---- the guard thread -------------------------------------------------------------
    def _run(self) -> None:
        from zmq.utils.monitor import parse_monitor_message
        zmq = self.zmq
        wait_ms = int(min(self.period_s, 0.1) * 1000)      # close() is never kept waiting long
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                while self._monitor.poll(0 if self.peers else wait_ms):
                    ev = parse_monitor_message(self._monitor.recv_multipart())
                    self._event(ev["event"], int(ev["value"]))
                self.relieve()               # one read of /proc first: memory can grow fast
                self.sample()
            except zmq.ZMQError:               # the context is going away
                return
            except Exception:  # the guard must outlive any one sample
                log.exception("connection guard")
            # with thousands of connections a sample takes a while: the serving thread keeps
            # at least four fifths of the interpreter
            self._stop.wait(max(self.period_s, 4 * (time.monotonic() - started)))

    def _event(self, event: int, fd: int) -> None:
        if event == self.zmq.EVENT_ACCEPTED:
            addr = _peer_addr(fd)
            if addr is not None:
                self.peers[fd] = Peer(fd, addr)
        elif event == self.zmq.EVENT_DISCONNECTED:
            self.peers.pop(fd, None)

    def sample(self) -> None:
        """Measure every peer; drop those over a bound (module docstring)."""
        given, now = self._given_total, time.monotonic()
        total = stalled = 0
        live = []
        for p in list(self.peers.values()):
            got = _with_socket(p.fd, p.addr, _counters)
            if got is None:                  # closed (a failed handshake, say): nothing held any more
                if self.peers.get(p.fd) is p:
                    del self.peers[p.fd]
                continue
            acked, received = got
            p.held_in = max(0, received - p.taken)
            p.held_out = max(0, p.given - acked)
            if p.taken != p.last_taken or not p.held_in:
                p.progress_at, p.last_taken = now, p.taken
            p.stalled = now - p.progress_at >= STALL_S
            if p.held_in > self.max_peer_bytes:
                self._drop(p, f"{p.held_in} bytes unread, more than one connection may queue "
                              f"({self.max_peer_bytes})")
                continue
            if p.held:
                live.append(p)
                total += p.held
                stalled += p.held_in if p.stalled else 0
        live.sort(key=lambda q: (q.stalled, q.held), reverse=True)     # stalled first, largest first
        for p in live:
            # past the bound: the largest holders go; past half of it: the stalled ones
            if total <= self.max_inflight_bytes // 2 or (total <= self.max_inflight_bytes and not p.stalled):
                break
            total -= p.held
            stalled -= p.held_in if p.stalled else 0
            self._drop(p, f"{total + p.held} bytes in flight, bound {self.max_inflight_bytes}")
        self.inflight_bytes, self.stalled_bytes, self._given_sampled = total, stalled, given
        self.relieve()
        if self._dropped_since_trim:
            self._dropped_since_trim = False
            trim_heap()

    def relieve(self) -> None:
        """Drop peers by resident memory, on what the last sample measured.

        libzmq may hold far more than the wire bytes (a 64-byte slot per frame): past
        ``rss_limit()`` less half the bound, stalled holders go; past the limit itself,
        every holder that completed no request since the last sample."""
        if self.rss_limit is None or not self.peers:
            return
        rss, limit = rss_bytes(), self.rss_limit()
        if rss <= limit - self.max_inflight_bytes // 2:
            return
        for p in [p for p in self.peers.values() if p.held_in and
                  (p.stalled or (rss > limit and p.taken == p.last_taken))]:
            self._drop(p, f"resident memory {rss} bytes, limit {limit}")
        if self._dropped_since_trim:
            self._dropped_since_trim = False
            trim_heap()

    def _drop(self, p: Peer, why: str) -> None:
        if _with_socket(p.fd, p.addr, lambda s: s.shutdown(socket.SHUT_RDWR) or True):
            self.num_dropped += 1
            self._dropped_since_trim = True
            log.warning("dropped peer %s:%d: %s", p.addr[0], p.addr[1], why)
        self.peers.pop(p.fd, None)
