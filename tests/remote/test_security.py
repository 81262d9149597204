"""Binding rules, CURVE authentication, tenant isolation, quotas, shutdown and metrics of `kvtier serve`."""
from __future__ import annotations

import signal
import urllib.request

import pytest

from kvtier.remote.client import RemoteTier

from tests.helpers import block, k
from tests.remote.servers import ServerProc, free_port

BB = 16 * 1024
SLOT = 20 * 1024            # BB + trailer rounded up to 4 KiB: what a stored block costs the server
OTHER_LOOPBACK = "127.0.0.2"   # on loopback, but not 127.0.0.1


def tier(endpoint, namespace="alice", **kw) -> RemoteTier:
    kw.setdefault("timeout_ms", 1000)
    return RemoteTier("remote", BB, [endpoint], namespace=namespace, **kw)


def dsts(n):
    return [memoryview(bytearray(BB)) for _ in range(n)]


def put(t, ids):
    keys = [k(i) for i in ids]
    return t.write(keys, [0] * len(keys), [block(x, BB) for x in keys])


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("curve")
    s = ServerProc(["--gen-keys", str(d), "--client", "alice", "--client", "bob", "--client", "mallory"])
    s.start(expect_ok=False)
    assert s.wait_exit(30) == 0, s.output
    return d


def test_refuses_a_non_loopback_bind_without_curve():
    s = ServerProc([], host=OTHER_LOOPBACK).start(expect_ok=False)
    try:
        assert s.wait_exit(30) == 2
        assert "CURVE" in s.output and "127.0.0.1" in s.output
    finally:
        s.kill()


def test_refuses_a_capacity_beyond_the_memory_it_may_use():
    """Namespaces map their whole quota when they open: a capacity over the machine's (or
    the container's) memory would end in the kernel killing the server."""
    from kvtier.remote.guard import memory_available
    limit, source = memory_available()
    assert limit is not None and limit > 0
    s = ServerProc(["--capacity", str(limit + (1 << 30))]).start(expect_ok=False)
    try:
        assert s.wait_exit(30) == 2
        for flag in ("--capacity", "--max-inflight-bytes", "--max-request-bytes"):
            assert flag in s.output
        assert "memory this server may use" in s.output and source.split()[0] in s.output
    finally:
        s.kill()


@pytest.fixture
def curve_server(keys_dir):
    s = ServerProc(["--curve-secret", str(keys_dir / "server.key_secret"),
                    "--tenant", f"alice:1MiB:{keys_dir / 'alice.key'}",
                    "--tenant", f"bob:1MiB:{keys_dir / 'bob.key'}", "--capacity", "4MiB"],
                   host=OTHER_LOOPBACK).start()
    yield s
    s.kill()


def test_curve_clients_are_authenticated(curve_server, keys_dir):
    d = keys_dir
    alice = tier(curve_server.endpoint, server_public_key=str(d / "server.key"),
                 client_secret_key=str(d / "alice.key_secret"))
    assert put(alice, range(4)) == [True] * 4
    plain = tier(curve_server.endpoint, timeout_ms=300)
    stranger = tier(curve_server.endpoint, timeout_ms=300, server_public_key=str(d / "server.key"),
                    client_secret_key=str(d / "mallory.key_secret"))
    wrong_server_key = tier(curve_server.endpoint, timeout_ms=300, server_public_key=str(d / "mallory.key"),
                            client_secret_key=str(d / "alice.key_secret"))
    for t in (plain, stranger, wrong_server_key):
        assert t.read([k(0)], [0], dsts(1)) == [False]
        assert put(t, [100]) == [False]
        assert t.stats().get("timeouts", 0) >= 1
    out = dsts(4)                                     # the server kept serving alice
    assert alice.read([k(i) for i in range(4)], [0] * 4, out) == [True] * 4
    assert [bytes(o) for o in out] == [block(k(i), BB) for i in range(4)]
    for t in (alice, plain, stranger, wrong_server_key):
        t.close()


def test_a_key_only_reaches_its_own_namespace(curve_server, keys_dir):
    d = keys_dir
    creds = dict(server_public_key=str(d / "server.key"))
    alice = tier(curve_server.endpoint, **creds, client_secret_key=str(d / "alice.key_secret"))
    alice_as_bob = tier(curve_server.endpoint, "bob", **creds, client_secret_key=str(d / "alice.key_secret"))
    bob = tier(curve_server.endpoint, "bob", **creds, client_secret_key=str(d / "bob.key_secret"))
    assert put(alice, range(3)) == [True] * 3
    assert put(bob, range(3)) == [True] * 3
    assert put(alice_as_bob, [50]) == [False]
    assert alice_as_bob.read([k(0)], [0], dsts(1)) == [False]
    alice_as_bob.discard([k(0), k(1), k(2)], [0] * 3)
    assert alice_as_bob.stats().get("server_error.denied", 0) >= 3
    assert bob.contains([k(0), k(1), k(2), k(50)]) == [True, True, True, False]
    for t in (alice, alice_as_bob, bob):
        t.close()


def test_loopback_tenants_are_isolated_and_undeclared_ones_denied(kvservers):  # noqa: F811
    srv = kvservers(1, "--tenant", "alice:1MiB", "--tenant", "bob:1MiB", "--capacity", "4MiB")[0]
    alice, bob, eve = (tier(srv.endpoint, ns) for ns in ("alice", "bob", "eve"))
    assert put(alice, range(5)) == [True] * 5
    assert bob.contains([k(i) for i in range(5)]) == [False] * 5
    bob.discard([k(i) for i in range(5)], [0] * 5)
    assert alice.contains([k(i) for i in range(5)]) == [True] * 5
    assert put(eve, [1]) == [False] and eve.stats().get("server_error.denied", 0) == 1
    for t in (alice, bob, eve):
        t.close()


def test_quota_evicts_only_the_tenants_own_blocks(kvservers):  # noqa: F811
    srv = kvservers(1, "--tenant", f"alice:{8 * SLOT}", "--tenant", f"bob:{8 * SLOT}", "--capacity", "1MiB")[0]
    alice, bob = tier(srv.endpoint, "alice"), tier(srv.endpoint, "bob")
    assert put(bob, range(1000, 1006)) == [True] * 6
    for i in range(40):                               # five times alice's quota
        assert put(alice, [i]) == [True]
    have = alice.contains([k(i) for i in range(40)])
    assert sum(have) == 8 and have[-8:] == [True] * 8   # her most recent blocks, no more
    stats = alice.ping("stats")[0]
    assert stats["resident_blocks"] == 8 and stats["capacity_bytes"] == 8 * SLOT
    assert bob.contains([k(i) for i in range(1000, 1006)]) == [True] * 6
    out = dsts(6)
    assert bob.read([k(i) for i in range(1000, 1006)], [0] * 6, out) == [True] * 6
    assert [bytes(o) for o in out] == [block(k(i), BB) for i in range(1000, 1006)]
    for t in (alice, bob):
        t.close()


def test_capacity_bounds_the_namespaces(kvservers):  # noqa: F811
    srv = kvservers(1, "--quota", f"{8 * SLOT}", "--capacity", f"{20 * SLOT}")[0]
    tiers = [tier(srv.endpoint, f"t{i}") for i in range(3)]
    assert put(tiers[0], [1]) == [True] and put(tiers[1], [1]) == [True]
    assert put(tiers[2], [1]) == [False]
    assert tiers[2].stats().get("server_error.no_room", 0) == 1
    for t in tiers:
        t.close()


def test_sigterm_stops_gracefully_and_metrics_are_exposed(kvservers):  # noqa: F811
    mport = free_port()
    srv = kvservers(1, "--metrics-port", str(mport))[0]
    t = tier(srv.endpoint)
    assert put(t, range(3)) == [True] * 3
    t.read([k(0), k(9)], [0, 0], dsts(2))
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    assert 'kvtier_server_blocks_total{op="put",outcome="stored"} 3' in text
    assert 'kvtier_server_blocks_total{op="get",outcome="hit"} 1' in text
    assert "# TYPE kvtier_server_requests_total counter" in text
    t.close()
    srv.kill(signal.SIGTERM)
    assert srv.proc.returncode == 0


def test_oversized_requests_and_frames_are_refused(kvservers):  # noqa: F811
    import zmq
    from kvtier.remote import protocol as P
    srv = kvservers(1, "--max-request-bytes", "1MiB", "--quota", "8MiB")[0]
    bb = 768 * 1024
    t = RemoteTier("remote", bb, [srv.endpoint], namespace="alice", timeout_ms=5000)
    keys = [k(1), k(2)]
    assert t.write(keys, [0, 0], [b"\1" * bb, b"\2" * bb]) == [False, False]   # one 1.5 MiB request
    assert t.stats().get("server_error.too_large", 0) == 1
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(srv.endpoint)                      # a frame over the 64 MiB limit: the peer is dropped
    s.send_multipart([P.encode_request("put", 9, "alice", keys=[k(3)], block_bytes=bb, crcs=[0]),
                      b"\0" * ((64 << 20) + 1)])
    assert not s.poll(1000)
    s.close(0)
    ctx.term()
    assert t.write([k(4)], [0], [b"\4" * bb]) == [True]                        # others still served
    out = [memoryview(bytearray(bb))]
    assert t.read([k(4)], [0], out) == [True] and bytes(out[0]) == b"\4" * bb
    t.close()
