"""Redis backend faults: a dead, killed or restarted redis-server is a bounded, counted miss."""
from __future__ import annotations

import time

import pytest

from kvtier.remote.redis import RedisTier

from tests.helpers import block, k
from tests.remote.servers import RedisProc, free_port

BB = 32 * 1024

pytestmark = pytest.mark.redis


def dsts(n):
    return [memoryview(bytearray(BB)) for _ in range(n)]


def test_nothing_listening_is_a_bounded_miss():
    t = RedisTier("remote", BB, [f"redis://127.0.0.1:{free_port()}"], namespace="a", timeout_ms=200)
    start = time.monotonic()
    assert t.write([k(1)], [0], [block(k(1), BB)]) == [False]
    assert t.read([k(1)], [0], dsts(1)) == [False]
    assert t.contains([k(1)]) == [False]
    t.discard([k(1)], [0])
    assert time.monotonic() - start < 10.0          # bounded: no hang (generous for loaded CI)
    st = t.stats()
    assert st.get("errors", 0) + st.get("timeouts", 0) >= 1
    t.close()


def test_killed_and_restarted_server(tmp_path):
    r = RedisProc().start(str(tmp_path))
    try:
        t = RedisTier("remote", BB, [r.url], namespace="a", timeout_ms=500)
        keys = [k(i) for i in range(8)]
        assert t.write(keys, [0] * 8, [block(x, BB) for x in keys]) == [True] * 8
        r.kill()
        start = time.monotonic()
        assert t.read(keys, [0] * 8, dsts(8)) == [False] * 8
        assert time.monotonic() - start < 10.0          # bounded: no hang (generous for loaded CI)
        r.start(str(tmp_path))                      # same port, empty (no persistence)
        deadline = time.monotonic() + 15
        while t.write(keys, [0] * 8, [block(x, BB) for x in keys]) != [True] * 8:
            assert time.monotonic() < deadline, t.stats()
            time.sleep(0.1)
        out = dsts(8)
        assert t.read(keys, [0] * 8, out) == [True] * 8
        assert [bytes(o) for o in out] == [block(x, BB) for x in keys]
        t.close()
    finally:
        r.kill()


def test_sharded_standalone_servers_with_replicas(tmp_path):
    procs = []
    try:
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            procs.append(RedisProc().start(str(tmp_path / str(i))))
        t = RedisTier("remote", BB, [p.url for p in procs], namespace="a", timeout_ms=500, replication=2)
        keys = [k(i) for i in range(30)]
        assert t.write(keys, [0] * 30, [block(x, BB) for x in keys]) == [True] * 30
        procs[0].kill()
        out = dsts(30)
        assert t.read(keys, [0] * 30, out) == [True] * 30
        assert [bytes(o) for o in out] == [block(x, BB) for x in keys]
        t.close()
    finally:
        for p in procs:
            p.kill()


def test_cluster_mode_refuses_client_side_replication():
    from kvtier import ConfigError
    with pytest.raises(ConfigError, match="replication"):
        RedisTier("remote", BB, ["redis://127.0.0.1:1"], namespace="a", cluster=True, replication=2)
