"""One regression test per bound of `kvtier serve`: busy back-pressure, frames per request,
bytes per connection, reply size, the start-up memory check and the flags' validation."""
from __future__ import annotations

import argparse
import os
import threading
import time

import pytest

from kvtier.errors import ConfigError
from kvtier.remote import protocol as P
from kvtier.remote.client import RemoteTier
from kvtier.remote.guard import check_memory, memory_available, wire_bytes

from tests.helpers import k
from tests.remote.servers import RawPeer

zmq = pytest.importorskip("zmq")

MiB = 1 << 20
BB = 64 << 10


class InProcessServer:
    """A Server whose loop runs on a thread until close()."""

    def __init__(self, **kw):
        from kvtier.remote.server import Server
        kw.setdefault("capacity_bytes", 8 * MiB)
        kw.setdefault("default_quota", 4 * MiB)
        self.srv = Server("tcp://127.0.0.1:0", **kw)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.srv.serve_once(20)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.srv.close()


def test_busy_is_a_bounded_retry_then_a_miss_and_never_wrong_bytes():
    server = InProcessServer(guard_period_s=3600.0)        # the test sets what the guard measured
    t = RemoteTier("remote", BB, [server.srv.endpoint], namespace="t", timeout_ms=5000)
    try:
        blocks = [os.urandom(BB) for _ in range(4)]
        keys = [k(i) for i in range(4)]
        assert t.write(keys, [0] * 4, blocks) == [True] * 4
        time.sleep(0.2)
        server.srv.guard.inflight_bytes = server.srv.max_inflight_bytes    # as if peers held it all
        out = [memoryview(bytearray(b"\xa5" * BB)) for _ in keys]
        started = time.monotonic()
        assert t.read(keys, [0] * 4, out) == [False] * 4                  # a miss...
        assert t.write([k(9)], [0], [blocks[0]]) == [False]
        assert time.monotonic() - started < 4.0                            # ...after a short back-off
        assert all(bytes(o) == b"\xa5" * BB for o in out)                  # nothing written
        s = t.stats()
        assert s["busy_misses"] == 2 and s["busy_retries"] == 6 and s["server_error.busy"] == 8
        assert t.contains(keys) == [True] * 4                              # cheap requests still served
        server.srv.guard.inflight_bytes = 0
        assert t.read(keys, [0] * 4, out) == [True] * 4
        assert [bytes(o) for o in out] == blocks
    finally:
        t.close()
        server.close()


def test_a_request_of_more_frames_than_keys_allow_is_too_large():
    frames = [P.encode_request("put", 1, "t", keys=[k(1)], block_bytes=1, crcs=[0])] + [b"x"] * (P.MAX_KEYS + 1)
    with pytest.raises(P.ProtocolError) as e:
        P.decode_request(frames)
    assert e.value.code == P.E_TOO_LARGE and "frames" in e.value.message


def test_a_get_reply_is_no_larger_than_a_request_may_be():
    limits = P.Limits(max_request_bytes=P.MAX_HEADER_BYTES + 4 * BB, max_block_bytes=BB)
    server = InProcessServer(limits=limits, max_inflight_bytes=64 * MiB)
    t = RemoteTier("remote", BB, [server.srv.endpoint], namespace="t", timeout_ms=5000)
    try:
        keys = [k(i) for i in range(12)]
        blocks = [os.urandom(BB) for _ in keys]
        for i in range(0, 12, 4):                                          # puts within the limit
            assert t.write(keys[i:i + 4], [0] * 4, blocks[i:i + 4]) == [True] * 4
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(server.srv.endpoint)
        s.send(P.encode_request("get", 7, "t", keys=keys, block_bytes=BB))
        assert s.poll(5000)
        rep = P.decode_reply(s.recv_multipart(), 7, "get", 12, BB)
        assert rep.found == [True] * 4 + [False] * 8
        assert [bytes(p) for p in rep.payloads] == blocks[:4]
        s.close(0)
        ctx.term()
    finally:
        t.close()
        server.close()


def test_a_connection_sending_past_its_bound_is_dropped_and_others_are_served(kvservers):
    srv = kvservers(1, "--max-request-bytes", "1MiB", "--max-frame-bytes", "512KiB",
                    "--max-requests-per-connection", "1", "--max-inflight-bytes", "1GiB")[0]
    t = RemoteTier("remote", BB, [srv.endpoint], namespace="t", timeout_ms=5000)
    try:
        peer = RawPeer(srv.endpoint)
        frame = b"\0" * (512 << 10)
        peer.frame(P.encode_request("put", 1, "t", keys=[k(1)], block_bytes=len(frame), crcs=[0]))
        sent = 0
        while sent < 1 << 30 and peer.frame(frame):          # a request that never ends
            sent += len(frame)
        assert peer.closed_by_server(10.0)
        peer.close()
        assert t.write([k(2)], [0], [b"\2" * BB]) == [True]
        server = t.ping("stats")[0]["server"]
        assert server["dropped_peers"] == 1
        assert sent < 1 << 30                                 # dropped long before a GiB
    finally:
        t.close()


def test_frames_are_counted_as_they_travel():
    assert [wire_bytes(n, False) for n in (0, 255, 256)] == [2, 257, 265]
    assert [wire_bytes(n, True) for n in (0, 222, 223)] == [35, 257, 265]


def test_the_start_up_check_names_the_flags_and_the_limit():
    limit, source = memory_available()
    assert limit is not None and source
    assert check_memory(1 * MiB, 2 * MiB, 1 * MiB) > 4 * MiB
    with pytest.raises(ConfigError) as e:
        check_memory(limit, 512 * MiB, 256 * MiB)
    for word in ("--capacity", "--max-inflight-bytes", "--max-request-bytes", str(limit), source):
        assert word in str(e.value)


def _args(*argv: str) -> argparse.Namespace:
    from kvtier.cli.serve import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("argv, flag", [
    (("--max-frame-bytes", "1GiB"), "--max-frame-bytes"),
    (("--max-request-bytes", "100KiB"), "--max-request-bytes"),
    (("--max-inflight-bytes", "300MiB"), "--max-inflight-bytes"),
    (("--max-requests-per-connection", "0"), "--max-requests-per-connection"),
    (("--idle-release", "-1"), "--idle-release"),
    (("--admin-key", "ops.key"), "--admin-key"),
])
def test_bad_bounds_are_refused_naming_the_flag(argv, flag):
    from kvtier.cli.serve import bounds
    with pytest.raises(ConfigError) as e:
        bounds(_args(*argv))
    assert e.value.key == flag


def test_default_bounds_are_consistent():
    from kvtier.cli.serve import bounds
    b = bounds(_args())
    assert b["limits"].max_block_bytes == 64 * MiB and b["limits"].max_request_bytes == 256 * MiB
    assert b["max_inflight_bytes"] == 512 * MiB and b["idle_release_s"] == 600
    assert bounds(_args("--max-request-bytes", "1MiB"))["limits"].max_block_bytes == MiB - P.MAX_HEADER_BYTES


def test_a_released_namespace_leaves_no_metric_series_behind():
    """A server that sees many short-lived namespaces must not export one dead series per
    namespace forever: its gauges go with it."""
    from kvtier.remote.server import Server
    srv = Server("tcp://127.0.0.1:0", capacity_bytes=8 * MiB, default_quota=4 * MiB)
    try:
        for ns in ("gone", "kept"):
            srv.open_namespace(ns, BB)
        srv.metrics.set("namespace_resident_blocks", 3, ns="gone")
        assert srv.release("gone", "drop") > 0
        series = srv.metrics.snapshot()
        assert not any("ns=gone" in name for name in series), series
        assert series["namespace_capacity_bytes{ns=kept}"] > 0
        assert series["namespaces"] == 1
        assert series["namespaces_released_total{reason=drop}"] == 1
    finally:
        srv.close()
