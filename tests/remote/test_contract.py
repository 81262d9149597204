"""The remote-tier contract, run against every backend: kvtier servers over ZeroMQ,
standalone redis-server, and a (one-node) Redis Cluster."""
from __future__ import annotations

import pytest

from kvtier import ConfigError, KVTierConfig, Namespace, TieredCache
from kvtier.tiers.host import HostTier
from kvtier.remote.client import RemoteTier, make_remote_tier
from kvtier.remote.sharding import rank_servers

from tests.helpers import block, k
from tests.remote.servers import RedisProc

BB = 64 * 1024 + 100
POISON = 0xA5

BACKENDS = ["zmq", pytest.param("redis", marks=pytest.mark.redis),
            pytest.param("redis-cluster", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
def make_tier(request, kvservers, tmp_path):  # noqa: F811
    """Factory for remote tiers of one backend, sharing one set of servers."""
    if request.param == "zmq":
        servers = [s.endpoint for s in kvservers(2, "--quota", "16MiB", "--capacity", "64MiB")]
        cfg = dict(backend="zmq", servers=servers, replication=1)
    else:
        r = RedisProc(cluster=request.param == "redis-cluster").start(str(tmp_path))
        request.addfinalizer(r.kill)
        cfg = dict(backend="redis", servers=[r.url], redis_cluster=request.param == "redis-cluster")
    tiers = []

    def make(tenant="alice", **over):
        c = KVTierConfig.from_dict({"remote": {**cfg, "timeout_ms": 2000, **over}})
        t = make_remote_tier(c.remote, Namespace("m", 16, tenant=tenant), BB)
        tiers.append(t)
        return t

    make.backend = request.param
    yield make
    for t in tiers:
        t.close()


def poisoned(n):
    return [memoryview(bytearray([POISON]) * BB) for _ in range(n)]


def verify(keys, dsts, ok):
    for key, dst, good in zip(keys, dsts, ok):
        if good:
            assert bytes(dst) == block(key, BB)


def test_write_read_roundtrip(make_tier):
    t = make_tier()
    keys = [k(i) for i in range(40)]
    assert t.num_slots is None and t.medium == "remote"
    assert t.write(keys, t.allocate(40), [block(x, BB) for x in keys]) == [True] * 40
    dsts = poisoned(41)
    ok = t.read(keys + [k(999)], [0] * 41, dsts)
    assert ok == [True] * 40 + [False]
    verify(keys, dsts, ok)
    assert bytes(dsts[40]) == bytes([POISON]) * BB        # a miss leaves the buffer alone


def test_read_with_misses_between_hits(make_tier):
    t = make_tier()
    keys = [k(i) for i in range(12)]
    assert all(t.write(keys, [0] * 12, [block(x, BB) for x in keys]))
    mixed = [k(900), *keys[:5], k(901), k(902), *keys[5:], k(903)]
    dsts = poisoned(len(mixed))
    ok = t.read(mixed, [0] * len(mixed), dsts)
    assert ok == [False] + [True] * 5 + [False, False] + [True] * 7 + [False]
    verify(mixed, dsts, ok)
    assert all(bytes(d) == bytes([POISON]) * BB for d, good in zip(dsts, ok) if not good)


def test_contains_and_discard(make_tier):
    t = make_tier()
    keys = [k(i) for i in range(10)]
    t.write(keys, [0] * 10, [block(x, BB) for x in keys])
    assert t.contains(keys + [k(50)]) == [True] * 10 + [False]
    t.discard(keys[:4], [0] * 4)
    assert t.contains(keys) == [False] * 4 + [True] * 6
    assert t.read(keys[:5], [0] * 5, poisoned(5)) == [False] * 4 + [True]


def test_another_client_sees_the_blocks(make_tier):
    a, b = make_tier(), make_tier()
    keys = [k(i) for i in range(8)]
    a.write(keys, [0] * 8, [block(x, BB) for x in keys])
    dsts = poisoned(8)
    assert b.read(keys, [0] * 8, dsts) == [True] * 8
    verify(keys, dsts, [True] * 8)


def test_tenants_do_not_share_blocks(make_tier):
    alice, bob = make_tier("alice"), make_tier("bob")
    keys = [k(i) for i in range(6)]
    alice.write(keys, [0] * 6, [block(x, BB) for x in keys])
    assert bob.contains(keys) == [False] * 6
    assert bob.read(keys, [0] * 6, poisoned(6)) == [False] * 6
    bob.discard(keys, [0] * 6)
    assert alice.contains(keys) == [True] * 6


def test_tiered_cache_demotes_to_remote_and_promotes_back(make_tier):
    ns = Namespace("m", 16, tenant="alice")
    remote = make_tier()
    cache = TieredCache([HostTier("host", BB, 4, memory="pageable"), remote], ["lru", "lru"],
                        transfer_threads=1, namespace=ns)
    keys = [k(i) for i in range(12)]
    for key in keys:                                 # 12 blocks through 4 host slots: 8 demoted
        h = cache.prepare_store([key], "o")
        h.views[0][:] = block(key, BB)
        cache.complete_store(h, True)
    assert cache.flush(30)
    assert cache.stats().get("remote.stored_blocks", 0) == 8
    cache.close()
    # a fresh cache on another "node" finds them through contains() and promotes them
    other = TieredCache([HostTier("host", BB, 16, memory="pageable"), make_tier()], ["lru", "lru"],
                        transfer_threads=1, namespace=ns)
    found = other.lookup(keys[:8])
    assert found.num_blocks == 8 and set(found.tiers) == {"remote"}
    h = other.prepare_load(keys[:8], "r")
    assert h.wait(30) and h.num_ok == 8
    for key, view in zip(h.keys, h.views):
        assert bytes(view) == block(key, BB)
    other.complete_load(h)
    other.close()


def test_write_through_copies_every_store(make_tier):
    assert make_tier().write_through is False
    remote = make_tier(write_through=True)
    cache = TieredCache([HostTier("host", BB, 8, memory="pageable"), remote], ["lru", "lru"],
                        transfer_threads=1, namespace=Namespace("m", 16, tenant="alice"))
    keys = [k(i) for i in range(3)]
    h = cache.prepare_store(keys, "o")
    for key, view in zip(h.keys, h.views):
        view[:] = block(key, BB)
    cache.complete_store(h, True)
    assert cache.flush(30)
    assert make_tier().contains(keys) == [True] * 3        # on the servers while still in host memory
    assert cache.lookup(keys).tiers == ("host",) * 3
    cache.close()


def test_corrupt_block_is_a_miss(make_tier):
    t = make_tier()
    key = k(7)
    t.write([key], [0], [block(key, BB)])
    if make_tier.backend == "zmq":
        # a put whose bytes do not match its checksum (torn on the wire) is refused, never served
        import zmq
        from kvtier.remote import protocol as P
        from kvtier.native import crc32c
        bad = bytearray(block(k(8), BB))
        crc = crc32c(bad)
        bad[100] ^= 0xFF
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.connect(t.servers[rank_servers(k(8), t.servers)[0]])
        s.send_multipart([P.encode_request("put", 1, "alice", keys=[k(8)], block_bytes=BB, crcs=[crc]), bad])
        assert s.poll(10_000)
        rep = P.decode_reply([memoryview(f) for f in s.recv_multipart()], 1, "put", 1, BB)
        s.close(0)
        ctx.term()
        assert rep.ok and rep.stored == [False]
        assert t.read([k(8)], [0], poisoned(1)) == [False]
        assert t.contains([k(8)]) == [False]
        return
    c = t._clients[0]
    raw = bytearray(c.get(t._key(key)))
    raw[100] ^= 0xFF
    c.set(t._key(key), bytes(raw))
    assert t.read([key], [0], poisoned(1)) == [False]
    assert t.stats()["corrupt_blocks"] == 1
    c.set(t._key(key), b"short")
    assert t.read([key], [0], poisoned(1)) == [False]


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError):
        KVTierConfig.from_dict({"remote": {"servers": []}})
    with pytest.raises(ConfigError):
        KVTierConfig.from_dict({"remote": {"servers": ["tcp://127.0.0.1:1"], "replication": 2}})
    with pytest.raises(ConfigError, match="client_secret_key"):
        RemoteTier("remote", BB, ["tcp://127.0.0.1:1"], namespace="a", server_public_key="x")


def test_missing_dependencies_name_their_extra(monkeypatch):
    from kvtier import MissingDependencyError
    from kvtier.remote import redis
    monkeypatch.setitem(__import__("sys").modules, "zmq", None)
    with pytest.raises(MissingDependencyError, match=r"kvtier\[remote\]"):
        RemoteTier("remote", BB, ["tcp://127.0.0.1:1"], namespace="a")
    monkeypatch.setitem(__import__("sys").modules, "redis", None)
    with pytest.raises(MissingDependencyError, match=r"kvtier\[redis\]"):
        redis.RedisTier("remote", BB, ["redis://127.0.0.1:1"], namespace="a")


def test_from_config_builds_the_remote_tier(make_tier):
    remote = make_tier()                       # the backend's servers, through the factory
    cfg = KVTierConfig.from_dict({"host": {"capacity_bytes": 4 * 69632, "pinned": "off"},
                                  "remote": {"backend": "redis" if make_tier.backend != "zmq" else "zmq",
                                             "servers": list(remote.servers),
                                             "redis_cluster": make_tier.backend == "redis-cluster"}})
    cache = TieredCache.from_config(cfg, Namespace("m", 16, tenant="alice"), BB)
    assert [t.medium for t in cache.tiers] == ["host", "remote"]
    keys = [k(i) for i in range(10)]
    for key in keys:
        h = cache.prepare_store([key], "o")
        h.views[0][:] = block(key, BB)
        cache.complete_store(h, True)
    assert cache.flush(30)
    assert remote.contains(keys[:6]) == [True] * 6      # evicted from host, now on the servers
    cache.close()
