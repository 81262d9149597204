"""The server's memory stays within --capacity plus its configured bounds, whatever peers send.

Oversized frames, requests of many frames, requests split over many connections
and requests of many empty frames are sent from several clients at once to a
`kvtier serve` process whose resident memory is sampled throughout; well-behaved
clients are served during the attack (or told busy: a miss, never wrong bytes)
and after it.  Loopback only; every attack is bounded in bytes and time.
"""
from __future__ import annotations

import threading
import time

import pytest

from kvtier.remote import protocol as P
from kvtier.remote.client import RemoteTier
from kvtier.remote.guard import MARGIN_BYTES

from tests.helpers import block, k
from tests.remote.servers import RawPeer

zmq = pytest.importorskip("zmq")

MiB = 1 << 20
CAPACITY = 64 * MiB
QUOTA = 16 * MiB
MAX_REQUEST = 4 * MiB
MAX_FRAME = 1 * MiB
MAX_INFLIGHT = 32 * MiB
BOUND = MAX_INFLIGHT + 2 * MAX_REQUEST + MARGIN_BYTES      # what the server may hold beyond --capacity
SAMPLING = 64 * MiB         # what may arrive between two samples of the guard on a loaded machine
ARGS = ("--capacity", str(CAPACITY), "--quota", str(QUOTA), "--max-request-bytes", str(MAX_REQUEST),
        "--max-frame-bytes", str(MAX_FRAME), "--max-inflight-bytes", str(MAX_INFLIGHT),
        "--max-requests-per-connection", "2")
BB = 64 << 10
ATTACK_S = 12.0


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """The peak VmRSS of a process, sampled every 5 ms until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples = pid, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.peak = max(self.peak, rss(self.pid))
                self.samples += 1
            except OSError:
                return
            self.done.wait(0.005)


def header(n: int, bb: int) -> bytes:
    return P.encode_request("put", 1, "mallory", keys=[k(i) for i in range(n)], block_bytes=bb, crcs=[0] * n)


def oversized_frames(endpoint, stop):
    """Frames twice --max-frame-bytes: libzmq disconnects the peer before buffering them."""
    big = b"\1" * (2 * MAX_FRAME)
    while not stop.is_set():
        p = RawPeer(endpoint)
        p.frame(header(1, len(big)))
        p.frame(big, more=False)
        stop.wait(0.2)
        p.close()


def many_frames(endpoint, stop):
    """A request of 400 frames of 512 KiB (200 MiB): each frame is allowed, the whole is not."""
    frame = b"\2" * (512 << 10)
    while not stop.is_set():
        p = RawPeer(endpoint)
        p.frame(header(400, len(frame)))
        for _ in range(400):
            if stop.is_set() or not p.frame(frame):
                break
        p.close()
        stop.wait(0.1)


def empty_frames(endpoint, stop):
    """A request of millions of empty frames: 2 bytes each on the wire, 64 inside libzmq."""
    chunk = b"\x01\x00" * (1 << 16)
    while not stop.is_set():
        p = RawPeer(endpoint)
        p.frame(header(1, BB))
        for _ in range(64):                  # 4M frames
            if stop.is_set():
                break
            try:
                p.sock.sendall(chunk)
            except OSError:
                break
        p.close()
        stop.wait(0.1)


def many_connections(endpoint, stop):
    """40 connections, each holding an unfinished request of 3 MiB (within --max-request-bytes)."""
    part = b"\3" * (512 << 10)
    while not stop.is_set():
        peers = [RawPeer(endpoint) for _ in range(40)]
        for p in peers:
            p.frame(header(6, len(part)))
            for _ in range(6):
                if not p.frame(part):                # the last frame never comes
                    break
        stop.wait(1.0)
        for p in peers:
            p.close()


def good_client(endpoint, stop, counts, namespace):
    """Stores and reads back blocks; any block it reads must be exactly what it stored."""
    t = RemoteTier("remote", BB, [endpoint], namespace=namespace, timeout_ms=3000)
    i = 0
    try:
        while not stop.is_set():
            keys = [k(i * 8 + j) for j in range(8)]
            blocks = [block(x, BB) for x in keys]
            stored = t.write(keys, [0] * 8, blocks)
            out = [memoryview(bytearray(b"\xa5" * BB)) for _ in keys]
            got = t.read(keys, [0] * 8, out)
            for g, o, b in zip(got, out, blocks):
                assert not g or bytes(o) == b, "wrong bytes"
            counts["stored"] += sum(stored)
            counts["read"] += sum(got)
            counts["rounds"] += 1
            i += 1
    finally:
        counts.update({f"client.{x}": v for x, v in t.stats().items() if isinstance(v, int)})
        t.close()


@pytest.mark.slow
def test_rss_stays_within_capacity_and_bounds_under_attack(kvservers):
    srv = kvservers(1, *ARGS)[0]
    pid = srv.proc.pid
    warm = RemoteTier("remote", BB, [srv.endpoint], namespace="warm", timeout_ms=5000)
    assert warm.write([k(1)], [0], [block(k(1), BB)]) == [True]
    time.sleep(0.5)                                      # the namespace's memory mapped in
    base = rss(pid)
    limit = base + CAPACITY + BOUND + SAMPLING
    sampler = Sampler(pid)
    sampler.start()
    stop = threading.Event()
    counts = [dict.fromkeys(("stored", "read", "rounds"), 0) for _ in range(2)]
    threads = [threading.Thread(target=f, args=(srv.endpoint, stop), daemon=True)
               for f in (oversized_frames, many_frames, many_frames, empty_frames, many_connections)]
    threads += [threading.Thread(target=good_client, args=(srv.endpoint, stop, c, f"good{i}"), daemon=True)
                for i, c in enumerate(counts)]
    try:
        for t in threads:
            t.start()
        time.sleep(ATTACK_S)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert srv.proc.poll() is None, srv.output
    during = [dict(c) for c in counts]
    # after the attack: served in full
    t = RemoteTier("remote", BB, [srv.endpoint], namespace="after", timeout_ms=5000)
    keys = [k(900_000 + i) for i in range(32)]
    assert t.write(keys, [0] * 32, [block(x, BB) for x in keys]) == [True] * 32
    out = [memoryview(bytearray(BB)) for _ in keys]
    assert t.read(keys, [0] * 32, out) == [True] * 32
    assert [bytes(o) for o in out] == [block(x, BB) for x in keys]
    stats = t.ping("stats")[0]
    sampler.done.set()
    sampler.join(5)
    t.close()
    warm.close()
    print(f"\ncapacity {CAPACITY >> 20} MiB, bound {BOUND >> 20} MiB, margin {SAMPLING >> 20} MiB, "
          f"start RSS {base >> 20} MiB, "
          f"peak RSS {sampler.peak >> 20} MiB (limit {limit >> 20} MiB, {sampler.samples} samples), "
          f"peers dropped {stats['server']['dropped_peers']}, clients {during}")
    assert sampler.samples > 100
    assert sampler.peak <= limit, (sampler.peak, limit)
    assert stats["server"]["dropped_peers"] > 0
    for c in during:                     # served during the attack (some requests may be busy or late)
        assert c["rounds"] > 0 and c["read"] > 0, during
