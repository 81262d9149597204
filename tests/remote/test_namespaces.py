"""Namespace lifecycle of `kvtier serve`: idle release, tenant quotas, drop requests, stats."""
from __future__ import annotations

import time

import pytest

from kvtier.remote.client import RemoteTier

from tests.helpers import block, k
from tests.remote.servers import ServerProc

pytest.importorskip("zmq")

BB = 16 * 1024
SLOT = 20 * 1024            # BB + trailer rounded up to 4 KiB: what a stored block costs the server
KiB, MiB = 1 << 10, 1 << 20
OTHER_LOOPBACK = "127.0.0.2"


def tier(endpoint, namespace, **kw) -> RemoteTier:
    kw.setdefault("timeout_ms", 5000)
    return RemoteTier("remote", BB, [endpoint], namespace=namespace, **kw)


def put(t, ids) -> list[bool]:
    keys = [k(i) for i in ids]
    return t.write(keys, [0] * len(keys), [block(x, BB) for x in keys])


def read_back(t, ids) -> bool:
    keys = [k(i) for i in ids]
    out = [memoryview(bytearray(BB)) for _ in keys]
    return t.read(keys, [0] * len(keys), out) == [True] * len(keys) and \
        [bytes(o) for o in out] == [block(x, BB) for x in keys]


def wait_for(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.1)


@pytest.mark.slow
def test_idle_namespaces_are_released_and_their_memory_serves_a_new_tenant(kvservers):
    """1,000 namespaces opened by short-lived clients and left idle; once released, their
    memory is back and a tenant that needs it is served."""
    idle_s = 20
    ns_bytes = 3 * SLOT
    srv = kvservers(1, "--tenant", "churn:64MiB", "--tenant", "big:64MiB", "--quota", str(ns_bytes),
                    "--capacity", "80MiB", "--idle-release", str(idle_s))[0]
    for i in range(1000):                           # one short-lived client each
        t = tier(srv.endpoint, f"churn/{i}", timeout_ms=20_000)
        assert put(t, [i]) == [True], (i, t.stats())
        t.close()
    watcher = tier(srv.endpoint, "churn")
    big = tier(srv.endpoint, "big")
    stats = watcher.ping("stats")[0]
    if stats["server"]["released_namespaces"] == 0:      # all still open (the usual case)
        assert stats["num_namespaces"] == 1000 and len(stats["namespaces"]) == 1000
        assert stats["reserved_bytes"] == 1000 * ns_bytes
        assert put(big, [1]) == [False]                   # 1,000 x 60 KiB leave no room for 64 MiB
        assert big.stats().get("server_error.no_room", 0) == 1
        assert big.drop()[0] == {"dropped": False, "freed_bytes": 0}
    for row in stats["namespaces"]:
        assert row["tenant"] == "churn" and row["block_bytes"] == BB and row["capacity_bytes"] == ns_bytes
        assert row["resident_blocks"] == 1 and row["resident_bytes"] == BB
        assert 0 <= row["idle_s"] <= row["age_s"]
    rss_full = stats["server"]["rss_bytes"]
    stats = wait_for(lambda: (lambda s: s if s["num_namespaces"] == 0 else None)(watcher.ping("stats")[0]),
                     idle_s + 20)
    assert stats is not None, "idle namespaces were not released"
    assert stats["reserved_bytes"] == 0 and stats["server"]["released_namespaces"] >= 1000
    assert stats["server"]["rss_bytes"] < rss_full - 32 * MiB     # the pages went back to the kernel
    print(f"\nRSS with 1,000 namespaces {rss_full >> 20} MiB, after their release {stats['server']['rss_bytes'] >> 20} MiB")
    assert put(big, range(100, 164)) == [True] * 64                # a new tenant, in the memory freed
    assert read_back(big, range(100, 164))
    assert big.ping("stats")[0]["capacity_bytes"] == 64 * MiB // SLOT * SLOT
    big.close()
    watcher.close()


def test_a_tenants_namespaces_count_against_its_quota_and_drop_frees_them(kvservers):
    srv = kvservers(1, "--tenant", f"acme:{4 * SLOT}", "--quota", f"{2 * SLOT}", "--capacity", "1MiB")[0]
    a, b, c = (tier(srv.endpoint, f"acme/{x}") for x in "abc")
    assert put(a, [1]) == [True] and put(b, [2]) == [True]
    assert put(c, [3]) == [False] and c.stats().get("server_error.no_room", 0) == 1
    whole = tier(srv.endpoint, "acme")
    assert put(whole, [4]) == [False]                 # the tenant's own namespace too: no quota left
    assert a.drop()[0] == {"dropped": True, "freed_bytes": 2 * SLOT}
    assert a.contains([k(1)]) == [False]              # its blocks went with it
    assert put(c, [3]) == [True] and read_back(c, [3])
    assert read_back(b, [2])
    stats = c.ping("stats")[0]
    assert sorted(r["ns"] for r in stats["namespaces"]) == ["acme/b", "acme/c"]
    assert stats["capacity_bytes"] == 2 * SLOT and stats["reserved_bytes"] == 4 * SLOT
    outsider = tier(srv.endpoint, "other")
    assert outsider.drop() == [None] and outsider.stats().get("server_error.denied", 0) == 1
    for t in (a, b, c, whole, outsider):
        t.close()


def test_a_loopback_client_drops_any_namespace_without_tenants(kvservers):
    """Without CURVE nothing authenticates a client: a loopback server without --tenant lets
    every client use (and so drop) every namespace, as it lets it delete every block."""
    srv = kvservers(1, "--quota", f"{4 * SLOT}", "--capacity", "1MiB", "--idle-release", "0")[0]
    owner, other = tier(srv.endpoint, "alice"), tier(srv.endpoint, "bob")
    assert put(owner, [1, 2]) == [True, True]
    as_alice = tier(srv.endpoint, "alice")
    assert as_alice.drop()[0]["dropped"] is True
    assert owner.contains([k(1), k(2)]) == [False, False]
    assert other.ping("stats")[0]["server"]["idle_release_s"] == 0
    for t in (owner, other, as_alice):
        t.close()


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("curve")
    s = ServerProc(["--gen-keys", str(d), "--client", "alice", "--client", "bob", "--client", "ops"])
    s.start(expect_ok=False)
    assert s.wait_exit(30) == 0, s.output
    return d


def test_with_curve_only_an_admin_key_drops_and_lists_others_namespaces(keys_dir):
    d = keys_dir
    srv = ServerProc(["--curve-secret", str(d / "server.key_secret"),
                      "--tenant", f"alice:1MiB:{d / 'alice.key'}", "--tenant", f"bob:1MiB:{d / 'bob.key'}",
                      "--admin-key", str(d / "ops.key"), "--capacity", "4MiB"], host=OTHER_LOOPBACK).start()
    creds = dict(server_public_key=str(d / "server.key"))
    alice = tier(srv.endpoint, "alice", **creds, client_secret_key=str(d / "alice.key_secret"))
    bob = tier(srv.endpoint, "bob", **creds, client_secret_key=str(d / "bob.key_secret"))
    bob_as_alice = tier(srv.endpoint, "alice", **creds, client_secret_key=str(d / "bob.key_secret"))
    ops_on_alice = tier(srv.endpoint, "alice", **creds, client_secret_key=str(d / "ops.key_secret"))
    ops_on_bob = tier(srv.endpoint, "bob", **creds, client_secret_key=str(d / "ops.key_secret"))
    try:
        assert put(alice, [1, 2]) == [True, True] and put(bob, [3]) == [True]
        assert put(ops_on_alice, [9]) == [False]                  # an admin lists and drops; it stores nothing
        assert ops_on_alice.stats().get("server_error.denied", 0) == 1
        assert bob_as_alice.drop() == [None]                      # refused: not bob's namespace
        assert bob_as_alice.stats().get("server_error.denied", 0) == 1
        assert alice.contains([k(1), k(2)]) == [True, True]
        assert [r["ns"] for r in bob.ping("stats")[0]["namespaces"]] == ["bob"]      # only its own
        assert sorted(r["ns"] for r in ops_on_alice.ping("stats")[0]["namespaces"]) == ["alice", "bob"]
        assert ops_on_alice.drop()[0] == {"dropped": True, "freed_bytes": MiB // SLOT * SLOT}
        assert alice.contains([k(1), k(2)]) == [False, False]
        assert read_back(bob, [3])
        assert bob.drop()[0]["dropped"] is True                   # a tenant drops its own
        assert ops_on_bob.ping("stats")[0]["namespaces"] == []
        assert put(alice, [5]) == [True] and read_back(alice, [5])   # a dropped namespace opens again
    finally:
        for t in (alice, bob, bob_as_alice, ops_on_alice, ops_on_bob):
            t.close()
        srv.kill()
