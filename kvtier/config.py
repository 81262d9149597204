"""Configuration: frozen dataclasses, parsed once at the edge.

Load with :meth:`KVTierConfig.from_dict`, :meth:`KVTierConfig.from_yaml` or
:meth:`KVTierConfig.from_env` (``KVTIER_<SECTION>_<FIELD>``, e.g.
``KVTIER_HOST_CAPACITY_BYTES=4GiB``, ``KVTIER_LEASE_TIMEOUT_S=30``).  Every bad
value raises :class:`~kvtier.errors.ConfigError` naming the key, the value and
what is allowed; unknown keys are errors too.  Sizes accept ints or strings
such as ``"512MiB"``, ``"4GB"``, ``"1.5GiB"``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Mapping

from .errors import ConfigError

_UNITS = {"": 1, "b": 1,                                   # K, KB, KiB .. E, EB, EiB
          **{p + s: 10**(3 * i) for i, p in enumerate("kmgtpe", 1) for s in ("", "b")},
          **{p + "ib": 2**(10 * i) for i, p in enumerate("kmgtpe", 1)}}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(key: str, value: object) -> int:
    """Bytes from an int or a string like '4GiB'; ConfigError otherwise."""
    if isinstance(value, bool):
        raise ConfigError(key, value, "a byte size such as 1073741824 or '1GiB' "
                          "(units B, KB..EB, KiB..EiB)")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and m.group(2).lower() in _UNITS:
            return int(Fraction(m.group(1)) * _UNITS[m.group(2).lower()])   # exact, unlike float
    raise ConfigError(key, value, "a byte size such as 1073741824 or '1GiB' "
                      "(units B, KB..EB, KiB..EiB)")


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of " + ", ".join(map(repr, allowed)))


def _positive(key: str, value: object, *, zero_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, value, "a non-negative number" if zero_ok else "a positive number")


@dataclass(frozen=True)
class HostConfig:
    """The pinned host-memory tier."""
    capacity_bytes: int = 1 << 30
    policy: str = "adaptive"      # prefix-aware, falls back to LRU where LRU does better (README, Trace replay)
    pinned: str = "auto"          # auto: pinned when CUDA is available; on: required; off: never
    populate: bool | str = True   # map every page at start-up (pageable memory), so no store faults;
                                  # "background": from a thread, while the tier is in use

    def validate(self, p: str) -> None:
        _positive(f"{p}.capacity_bytes", self.capacity_bytes)
        _choice(f"{p}.pinned", self.pinned, ("auto", "on", "off"))
        if not (isinstance(self.populate, bool) or self.populate == "background"):
            raise ConfigError(f"{p}.populate", self.populate, 'true, false or "background"')


@dataclass(frozen=True)
class DiskConfig:
    """The local NVMe tier (slab files + LMDB index)."""
    path: str = ""
    capacity_bytes: int = 16 << 30
    policy: str = "lru"
    durability: str = "data"      # none: no fsync; data: fdatasync before index commit; full: + index sync
    admission: str = "tinylfu"    # none | tinylfu (keep one-hit blocks off the SSD)
    write_mode: str = "back"      # back: write on eviction from host; through: write on every store
    o_direct: str = "auto"        # auto | on | off
    io_threads: int = 4
    slab_bytes: int = 1 << 30

    def validate(self, p: str) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"{p}.path", self.path, "a directory path")
        _positive(f"{p}.capacity_bytes", self.capacity_bytes)
        _positive(f"{p}.slab_bytes", self.slab_bytes)
        _positive(f"{p}.io_threads", self.io_threads)
        _choice(f"{p}.durability", self.durability, ("none", "data", "full"))
        _choice(f"{p}.admission", self.admission, ("none", "tinylfu"))
        _choice(f"{p}.write_mode", self.write_mode, ("back", "through"))
        _choice(f"{p}.o_direct", self.o_direct, ("auto", "on", "off"))


@dataclass(frozen=True)
class RemoteConfig:
    """Remote peers: kvtier servers over ZeroMQ, or a Redis/Valkey cluster."""
    backend: str = "zmq"          # zmq | redis
    servers: tuple[str, ...] = ()  # zmq: tcp://host:port ; redis: redis://host:port
    timeout_ms: int = 500
    replication: int = 1
    max_inflight_bytes: int = 256 << 20
    server_public_key: str = ""   # CURVE: path to the server's public key file
    client_secret_key: str = ""   # CURVE: path to this client's secret key file
    redis_cluster: bool = False
    write_through: bool = False   # copy every store to the remote tier (not only evictions)

    def validate(self, p: str) -> None:
        _choice(f"{p}.backend", self.backend, ("zmq", "redis"))
        if not self.servers or not all(isinstance(s, str) and s for s in self.servers):
            raise ConfigError(f"{p}.servers", self.servers, "a non-empty list of addresses")
        _positive(f"{p}.timeout_ms", self.timeout_ms)
        _positive(f"{p}.max_inflight_bytes", self.max_inflight_bytes)
        if not isinstance(self.replication, int) or not 1 <= self.replication <= len(self.servers):
            raise ConfigError(f"{p}.replication", self.replication,
                              f"an int in [1, {len(self.servers)}] (the number of servers)")


@dataclass(frozen=True)
class GpuConfig:
    """An HBM pool tier above the host tier (custom serving stacks)."""
    capacity_bytes: int = 1 << 30
    device: int = 0
    policy: str = "lru"
    mechanism: str = "auto"       # auto | dma | kernel

    def validate(self, p: str) -> None:
        _positive(f"{p}.capacity_bytes", self.capacity_bytes)
        _positive(f"{p}.device", self.device, zero_ok=True)
        _choice(f"{p}.mechanism", self.mechanism, ("auto", "dma", "kernel"))


_SECTIONS = {"host": HostConfig, "disk": DiskConfig, "remote": RemoteConfig, "gpu": GpuConfig}


@dataclass(frozen=True)
class KVTierConfig:
    """The whole configuration. Tiers run gpu → host → disk → remote; host is required."""
    host: HostConfig = field(default_factory=HostConfig)
    disk: DiskConfig | None = None
    remote: RemoteConfig | None = None
    gpu: GpuConfig | None = None
    lease_timeout_s: float = 30.0
    staging_bytes: int | None = None   # bound of the pool for blocks in flight between tiers
                                       # (grown on demand); None: a quarter of the top tier, >= 64 MiB
    staging_full: str = "wait"         # wait: back-pressure, no demotion lost; drop: drop and count
    transfer_threads: int = 2

    def __post_init__(self) -> None:
        for name in _SECTIONS:
            sec = getattr(self, name)
            if sec is not None:
                sec.validate(name)
        _positive("lease_timeout_s", self.lease_timeout_s)
        if self.staging_bytes is not None:
            _positive("staging_bytes", self.staging_bytes, zero_ok=True)
        _choice("staging_full", self.staging_full, ("wait", "drop"))
        _positive("transfer_threads", self.transfer_threads)
        from .policy import check_policy_name
        for name in ("host", "disk", "gpu"):
            sec = getattr(self, name)
            if sec is not None:
                check_policy_name(f"{name}.policy", sec.policy)

    # ---- loaders -------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "KVTierConfig":
        if not isinstance(data, Mapping):
            raise ConfigError("config", type(data).__name__, "a mapping of settings")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in _SECTIONS:
                if value is None:
                    kwargs[key] = None
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(key, value, "a mapping of settings")
                kwargs[key] = _build(_SECTIONS[key], value, key)
            else:
                kwargs[key] = _convert(cls, key, value, key)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "KVTierConfig":
        import yaml
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError("config file", str(path), f"a readable file ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise ConfigError("config file", str(path), f"valid YAML ({e})") from e
        return cls.from_dict(data or {})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = "KVTIER_") -> "KVTierConfig":
        """``KVTIER_LEASE_TIMEOUT_S=10``, ``KVTIER_HOST_CAPACITY_BYTES=4GiB``, ``KVTIER_DISK_PATH=/nvme``."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        top = {f.name for f in dataclasses.fields(cls)} - set(_SECTIONS)
        for var, raw in env.items():
            if not var.startswith(prefix) or var in _ENV_IGNORED:
                continue
            name = var[len(prefix):].lower()
            section = next((s for s in _SECTIONS if name.startswith(s + "_")), None)
            if section is not None:
                data.setdefault(section, {})[name[len(section) + 1:]] = raw
            elif name in top:
                data[name] = raw
            else:
                raise ConfigError(var, raw, "a known setting: KVTIER_<SECTION>_<FIELD> with section in "
                                  + ", ".join(_SECTIONS) + " or one of " + ", ".join(sorted(top)))
        try:
            return cls.from_dict(data)
        except ConfigError as e:            # name the variable the user actually set
            raise ConfigError(prefix + e.key.replace(".", "_").upper(), e.value, e.allowed) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Environment variables that steer other parts of kvtier, not the cache config.
_ENV_IGNORED = {"KVTIER_NATIVE", "KVTIER_LOG", "KVTIER_VENV", "KVTIER_CONFIG"}


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", data[key], "a known key: " + ", ".join(sorted(names)))
    return cls(**{k: _convert(cls, k, v, f"{prefix}.{k}") for k, v in data.items()})


def _convert(cls: type, name: str, value: Any, key: str) -> Any:
    """Coerce one raw value (possibly a string from the environment) to the field's type."""
    hints = typing.get_type_hints(cls)
    if name not in hints:
        known = [f.name for f in dataclasses.fields(cls)]
        raise ConfigError(key, value, "a known key: " + ", ".join(sorted(known)))
    hint = hints[name]
    if name == "staging_bytes" and value in (None, "auto"):
        return None
    if name.endswith("_bytes"):
        return parse_size(key, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(key, value, "true or false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(key, value, f"a {hint.__name__}")
        if isinstance(value, str):
            try:
                value = hint(value)
            except ValueError:
                raise ConfigError(key, value, f"a {hint.__name__}") from None
        if hint is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, float)) or (hint is int and not isinstance(value, int)):
            raise ConfigError(key, value, f"a {hint.__name__}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, value, "a list of strings")
        return tuple(value)
    return value
