"""The connector's settings, parsed once from ``kv_connector_extra_config``.

Everything under ``kv_connector_extra_config`` is either a connector option
(below) or a section of :class:`kvtier.config.KVTierConfig` (``host``,
``disk``, ``remote``, ``gpu``, ``lease_timeout_s``, ``staging_bytes``,
``transfer_threads``).  ``config_file`` names a kvtier YAML file whose
settings the inline ones override.  Every mistake is a
:class:`~kvtier.errors.ConfigError` whose key starts with
``kv_connector_extra_config.``, raised while vLLM starts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Mapping

from ...config import KVTierConfig
from ...errors import ConfigError

PREFIX = "kv_connector_extra_config"
LOAD_MODES = ("auto", "async", "sync")
_CACHE_KEYS = {f.name for f in dataclasses.fields(KVTierConfig)}
# Which optional module each tier needs, and the pip extra that brings it.
_DEPS = {"disk": ("lmdb", "disk"), "remote": ("zmq", "remote")}


@dataclass(frozen=True)
class ConnectorOptions:
    """How the connector behaves; ``cache`` is the kvtier cache it builds."""

    cache: KVTierConfig
    load_mode: str = "auto"       # async: load between steps (WAITING_FOR_REMOTE_KVS); sync: inside the step;
                                  # auto: inside the step when the hit is all in host memory and small
    inline_load_bytes: int | str = 256 << 20   # auto: the largest hit copied inside the step
    load_timeout_s: float = 10.0  # longest wait for a promotion from disk/remote before giving up (a miss)
    tenant: str = "default"
    revision: str = ""            # model revision, part of the namespace (default: vLLM's --revision)
    min_load_blocks: int = 1      # fewer matched blocks than this are not worth a load
    load_plan: Any = None         # kvtier.load_plan.LoadPlanConfig settings (load only what beats
                                  # recomputing it); False: load every hit

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "ConnectorOptions":
        extra = dict(extra or {})
        own = {f.name for f in dataclasses.fields(cls)} - {"cache"}
        for key in extra:
            if key not in own and key not in _CACHE_KEYS and key != "config_file":
                allowed = sorted(own | _CACHE_KEYS | {"config_file"})
                raise ConfigError(f"{PREFIX}.{key}", extra[key], "a known key: " + ", ".join(allowed))
        cache = _cache_config(extra)
        kwargs = {k: extra[k] for k in own if k in extra}
        opts = cls(cache=cache, **kwargs)
        opts._validate()
        return opts

    def _validate(self) -> None:
        if self.load_mode not in LOAD_MODES:
            raise ConfigError(f"{PREFIX}.load_mode", self.load_mode, "one of " + ", ".join(map(repr, LOAD_MODES)))
        t = self.load_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ConfigError(f"{PREFIX}.load_timeout_s", t, "a positive number of seconds")
        for key in ("tenant", "revision"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{PREFIX}.{key}", getattr(self, key), "a string")
        if not self.tenant:
            raise ConfigError(f"{PREFIX}.tenant", self.tenant, "a non-empty string")
        from ...config import parse_size
        inline = parse_size(f"{PREFIX}.inline_load_bytes", self.inline_load_bytes)
        if inline < 0:
            raise ConfigError(f"{PREFIX}.inline_load_bytes", inline, "a size >= 0")
        object.__setattr__(self, "inline_load_bytes", inline)
        from ...load_plan import LoadPlanConfig
        if self.load_plan is not False:          # False: load every hit, whatever it costs
            try:
                plan = LoadPlanConfig.from_dict(self.load_plan or {})
            except ConfigError as e:
                key = f"{PREFIX}.load_plan.{e.key}".removesuffix(".load_plan")
                raise ConfigError(key, e.value, e.allowed) from e
            object.__setattr__(self, "load_plan", plan)
        m = self.min_load_blocks
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"{PREFIX}.min_load_blocks", m, "an int >= 1")
        for section, (module, extra) in _DEPS.items():
            if getattr(self.cache, section) is not None and importlib.util.find_spec(module) is None:
                raise ConfigError(f"{PREFIX}.{section}", "configured",
                                  f"a tier whose dependency is installed: the {section} tier needs the "
                                  f"'{module}' package (pip install 'kvtier[{extra}]')")
        if self.cache.gpu is not None:
            raise ConfigError(f"{PREFIX}.gpu", "configured",
                              "no gpu section: vLLM owns the device KV pool; kvtier starts at the host tier")

    @property
    def is_async(self) -> bool:
        """Whether every load is asynchronous (``auto`` decides per request)."""
        return self.load_mode == "async"


def _cache_config(extra: dict[str, Any]) -> KVTierConfig:
    data: dict[str, Any] = {}
    path = extra.get("config_file")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{PREFIX}.config_file", path, "a path to a kvtier YAML file")
        data = KVTierConfig.from_yaml(path).to_dict()
        data = {k: v for k, v in data.items() if v is not None}
    for key in _CACHE_KEYS:
        if key in extra:
            data[key] = extra[key]
    try:
        return KVTierConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{PREFIX}.{e.key}", e.value, e.allowed) from e
