"""Optional dependencies: ``require(module, needed_for)`` imports one or names the pip extra that brings it.

kvtier's core needs torch, numpy, msgpack and PyYAML. Everything else is an
extra, imported only where a configuration asks for it, and always through
:func:`require`, so a missing one is a :class:`MissingDependencyError` that
says what to install instead of a bare ImportError from deep inside a tier.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module -> (the package that provides it, the kvtier extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "lmdb": ("lmdb", "disk"),
    "zmq": ("pyzmq", "remote"),
    "redis": ("redis", "redis"),
    "cupy": ("cupy", "cuda"),
    "matplotlib": ("matplotlib", "bench"),
    "safetensors": ("safetensors", "bench"),
    "vllm": ("vllm", "vllm"),
    "prometheus_client": ("prometheus-client", "metrics"),
    "tqdm": ("tqdm", "progress"),
}


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (a name in :data:`EXTRAS`, or a submodule of one).

    Raises MissingDependencyError naming the package and the extra when it is
    not installed (or hidden through ``sys.modules[module] = None``).
    """
    top = module.split(".", 1)[0]
    try:
        package, extra = EXTRAS[top]
    except KeyError:
        raise ValueError(f"{module!r} is not one of kvtier's optional dependencies ({', '.join(EXTRAS)})") from None
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(package, extra, needed_for) from e
