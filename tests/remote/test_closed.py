"""Remote tiers refuse use after close() with CacheClosedError, and closing twice is harmless."""
from __future__ import annotations

import shutil

import pytest

from kvtier.errors import CacheClosedError

BB = 4096


def test_zeromq_tier_refuses_use_after_close():
    pytest.importorskip("zmq")
    from kvtier.remote.client import RemoteTier
    t = RemoteTier("remote", BB, ["tcp://127.0.0.1:9"], namespace="t", timeout_ms=200)
    t.close()
    t.close()
    key = b"\x01" * 16
    for call in (lambda: t.write([key], [0], [bytes(BB)]), lambda: t.read([key], [0], [bytearray(BB)]),
                 lambda: t.contains([key]), t.drop):
        with pytest.raises(CacheClosedError, match="after close"):
            call()
    assert t.closed


@pytest.mark.redis
def test_redis_tier_refuses_use_after_close():
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    from kvtier.remote.redis import RedisTier
    t = RedisTier("redis", BB, ["redis://127.0.0.1:9"], namespace="t")
    t.close()
    with pytest.raises(CacheClosedError):
        t.contains([b"\x01" * 16])
