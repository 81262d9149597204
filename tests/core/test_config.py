"""Config loads from dict, YAML and environment; every bad value names its key."""
from __future__ import annotations

import pytest

from kvtier import ConfigError, KVTierConfig


def test_defaults_and_sizes():
    c = KVTierConfig.from_dict({"host": {"capacity_bytes": "512MiB", "policy": "s3fifo"}})
    assert c.host.capacity_bytes == 512 << 20 and c.host.policy == "s3fifo"
    assert c.disk is None and c.remote is None
    assert KVTierConfig.from_dict({"host": {"capacity_bytes": "1.5GB"}}).host.capacity_bytes == 1_500_000_000


def test_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("host:\n  capacity_bytes: 2GiB\ndisk:\n  path: /tmp/x\n  capacity_bytes: 10GiB\nlease_timeout_s: 5\n")
    c = KVTierConfig.from_yaml(p)
    assert c.disk.path == "/tmp/x" and c.disk.capacity_bytes == 10 << 30 and c.lease_timeout_s == 5


def test_env():
    env = {"KVTIER_HOST_CAPACITY_BYTES": "64MiB", "KVTIER_DISK_PATH": "/nvme/kv", "KVTIER_LEASE_TIMEOUT_S": "2.5",
           "KVTIER_REMOTE_SERVERS": "tcp://127.0.0.1:1,tcp://127.0.0.1:2", "KVTIER_REMOTE_REPLICATION": "2",
           "KVTIER_NATIVE": "auto", "HOME": "/root"}
    c = KVTierConfig.from_env(env)
    assert c.host.capacity_bytes == 64 << 20 and c.disk.path == "/nvme/kv"
    assert c.remote.servers == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2") and c.remote.replication == 2
    assert c.lease_timeout_s == 2.5


@pytest.mark.parametrize("data,key", [
    ({"host": {"capacity_bytes": 0}}, "host.capacity_bytes"),
    ({"host": {"capacity_bytes": -5}}, "host.capacity_bytes"),
    ({"host": {"capacity_bytes": "lots"}}, "host.capacity_bytes"),
    ({"host": {"policy": "mru"}}, "host.policy"),
    ({"host": {"pinned": "maybe"}}, "host.pinned"),
    ({"host": {"populate": "sometimes"}}, "host.populate"),
    ({"host": {"capacity": 5}}, "host.capacity"),
    ({"hots": {}}, "hots"),
    ({"lease_timeout_s": 0}, "lease_timeout_s"),
    ({"lease_timeout_s": "soon"}, "lease_timeout_s"),
    ({"disk": {"capacity_bytes": 5}}, "disk.path"),
    ({"disk": {"path": "/x", "durability": "yolo"}}, "disk.durability"),
    ({"remote": {"servers": []}}, "remote.servers"),
    ({"remote": {"servers": ["tcp://a:1"], "replication": 2}}, "remote.replication"),
    ({"gpu": {"mechanism": "magic"}}, "gpu.mechanism"),
    ({"host": 5}, "host"),
    ([1, 2], "config"),
])
def test_bad_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as e:
        KVTierConfig.from_dict(data)
    assert e.value.key == key
    assert key in str(e.value)


def test_bad_env_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="KVTIER_HOST_CAPACITY_BYTES"):
        KVTierConfig.from_env({"KVTIER_HOST_CAPACITY_BYTES": "big"})
    with pytest.raises(ConfigError, match="KVTIER_FROB"):
        KVTierConfig.from_env({"KVTIER_FROB": "1"})
    p = tmp_path / "bad.yaml"
    p.write_text("host: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML"):
        KVTierConfig.from_yaml(p)
    with pytest.raises(ConfigError, match="readable"):
        KVTierConfig.from_yaml(tmp_path / "missing.yaml")


def _resident_bytes() -> int:
    import os
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_host_tier_maps_its_pages_at_start_up_unless_told_not_to():
    from kvtier.tiers.host import HostTier
    size = 256 << 20
    before = _resident_bytes()
    lazy = HostTier("lazy", 1 << 20, size >> 20, memory="pageable", populate=False)
    grown_lazy = _resident_bytes() - before
    lazy.view(3)[:] = b"\x01" * (1 << 20)                 # a slot's pages map when first written
    assert bytes(lazy.view(3)[:4]) == b"\x01" * 4
    before = _resident_bytes()
    eager = HostTier("eager", 1 << 20, size >> 20, memory="pageable")
    grown_eager = _resident_bytes() - before
    assert grown_lazy < size // 8 and grown_eager > size * 3 // 4
    cfg = KVTierConfig.from_dict({"host": {"capacity_bytes": "4MiB", "populate": False}})
    assert cfg.host.populate is False
    lazy.close()
    eager.close()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc")
def test_background_populate_maps_pages_without_touching_stored_bytes():
    import time
    from kvtier.tiers.host import HostTier
    size = 256 << 20
    before = _resident_bytes()
    t = HostTier("bg", 1 << 20, size >> 20, memory="pageable", populate="background")
    # stores race the populating thread: their bytes must come through it unchanged
    stamps = {slot: bytes([slot % 251 + 1]) * (1 << 20) for slot in range(0, size >> 20, 7)}
    for slot, data in stamps.items():
        t.view(slot)[:] = data
    deadline = time.monotonic() + 30
    while _resident_bytes() - before < size * 3 // 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    t._populating.join(30)
    grown = _resident_bytes() - before
    kernel_has_it = grown > size * 3 // 4
    assert all(bytes(t.view(slot)) == data for slot, data in stamps.items())
    assert not bytes(t.view(1)).strip(b"\0")          # a slot nobody wrote still reads as zeros
    t.close()
    cfg = KVTierConfig.from_dict({"host": {"capacity_bytes": "4MiB", "populate": "background"}})
    assert cfg.host.populate == "background"
    with pytest.raises(ConfigError, match="populate"):
        HostTier("bad", 1 << 20, 4, memory="pageable", populate="sometimes")
    if not kernel_has_it:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14): pages map on first use")


def test_host_tier_refuses_more_memory_than_the_process_may_use():
    """An arena over the machine's (or the container's) memory would end in an OOM kill."""
    from kvtier.tiers.host import HostTier, memory_limit
    limit = memory_limit()
    assert limit is not None and limit > 0
    slots = limit // (1 << 20) + 1024
    with pytest.raises(ConfigError, match=r"big\.capacity_bytes.*memory this process may use"):
        HostTier("big", 1 << 20, slots, memory="pageable")
    HostTier("fits", 1 << 20, 4, memory="pageable").close()


@pytest.mark.parametrize("text,size", [
    ("1PiB", 2**50), ("1EiB", 2**60), ("8EiB", 2**63), ("2PB", 2 * 10**15), ("1EB", 10**18),
    ("3tib", 3 * 2**40), ("1.5PiB", 3 * 2**49), ("1 E", 10**18), ("123456789123456789", 123456789123456789),
])
def test_sizes_parse_up_to_exbibytes(text, size):
    from kvtier.config import parse_size
    assert parse_size("host.capacity_bytes", text) == size
    assert KVTierConfig.from_dict({"host": {"capacity_bytes": text}}).host.capacity_bytes == size


@pytest.mark.parametrize("text", ["1ZiB", "1YB", "1PiBs", "PiB", "-1PiB"])
def test_unknown_size_units_name_the_key(text):
    with pytest.raises(ConfigError) as e:
        KVTierConfig.from_dict({"host": {"capacity_bytes": text}})
    assert e.value.key == "host.capacity_bytes" and "EiB" in str(e.value)


@pytest.mark.parametrize("pinned", ["off", "on", "auto"])
def test_a_petabyte_host_tier_is_a_config_error_not_a_memory_error(pinned):
    """Issue 19: the slot bookkeeping was allocated before the memory check, so
    1 PiB of 4 KiB slots ended in a bare MemoryError."""
    from kvtier import TieredCache
    from kvtier.keys import Namespace
    from kvtier.tiers.host import memory_limit
    cfg = KVTierConfig.from_dict({"host": {"capacity_bytes": "1PiB", "pinned": pinned}})
    with pytest.raises(ConfigError) as e:
        TieredCache.from_config(cfg, Namespace("m", 16), 4096)
    assert e.value.key == "host.capacity_bytes" and e.value.value == 2**50
    assert f"host.capacity_bytes={2**50}" in str(e.value)
    assert f"({memory_limit()} bytes" in str(e.value)


@pytest.mark.parametrize("memory", ["pageable", "pinned", "auto", "none"])
def test_host_tier_checks_capacity_before_allocating_anything(memory):
    from kvtier.tiers.host import HostTier
    with pytest.raises(ConfigError, match=r"huge\.capacity_bytes=1125899906842624 .*memory this process"):
        HostTier("huge", 4096, 2**38, memory=memory)
