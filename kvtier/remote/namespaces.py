"""The namespaces of a kvtier server: who owns each, what it may reserve, and when it goes.

    Tenant                    a ``--tenant``: a name, a byte quota, the CURVE keys acting for it
    parse_tenant(spec, quota) ``NAME[:QUOTA[:PUBKEY_FILE,...]]`` -> Tenant
    Namespaces.tenant_of(ns)  namespaces ``NAME`` and ``NAME/...`` belong to tenant NAME
    Namespaces.open(ns, bb)   the namespace's store, opened on first use
    Namespaces.get(ns)        the store if open (and marks it used)
    Namespaces.release(ns)    its blocks dropped (host memory unmapped, disk files removed)
    Namespaces.idle()         the namespaces unused for ``idle_s`` seconds
    Namespaces.listing(...)   name, block size, age, idle time and size of each
    Namespaces.reopen()       the namespaces a previous server left under ``--disk``

Sizes: a namespace reserves its host memory when it opens.  The namespace
named after a tenant reserves what is left of the tenant's quota; each
``NAME/...`` namespace reserves ``--quota`` bytes, or what is left if less.  A
tenant's namespaces together stay within its quota (past it, ``no_room``), and
all namespaces within ``--capacity``.  Without ``--tenant`` options every
namespace is a tenant of its own and reserves ``--quota``.  A released namespace gives its bytes back at once; it opens again,
empty, on its next put.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

from . import protocol as P
from ..config import parse_size
from ..errors import ConfigError
from .store import NamespaceStore, disk_name

log = logging.getLogger(__name__)

MAX_LISTED = 1024          # namespaces in one stats reply (largest first); the header stays small


@dataclass(frozen=True)
class Tenant:
    name: str
    quota_bytes: int
    public_keys: frozenset[str] = frozenset()     # z85 CURVE public keys


def load_public_key(path: str, flag: str) -> str:
    """The z85 CURVE public key in a key file; ConfigError naming ``flag`` otherwise."""
    from zmq.auth import load_certificate
    try:
        public, _ = load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(flag, path, f"a readable CURVE public key file ({e})") from e
    return public.decode("ascii")


def parse_tenant(spec: str, default_quota: int) -> Tenant:
    """``NAME[:QUOTA[:PUBKEY_FILE[,PUBKEY_FILE...]]]``."""
    parts = spec.split(":", 2)
    name = parts[0]
    if not name or "/" in name or len(name) > P.MAX_NAMESPACE_CHARS:
        raise ConfigError("--tenant", spec, f"NAME[:QUOTA[:PUBLIC_KEY_FILE,...]] with a 1..{P.MAX_NAMESPACE_CHARS} "
                                            "char name without '/'")
    quota = parse_size("--tenant quota", parts[1]) if len(parts) > 1 and parts[1] else default_quota
    keys = set()
    if len(parts) > 2 and parts[2]:
        for path in parts[2].split(","):
            keys.add(load_public_key(path, "--tenant key file"))
    return Tenant(name, quota, frozenset(keys))


class Namespaces:
    """Every open namespace's store, within the tenants' quotas and the server's capacity."""

    def __init__(self, capacity_bytes: int, default_quota: int, tenants: dict[str, Tenant],
                 disk_dir: str | None, disk_bytes: int, idle_s: float):
        self.capacity_bytes, self.default_quota = capacity_bytes, default_quota
        self.tenants = tenants
        self.disk_dir, self.disk_bytes = disk_dir, disk_bytes
        self.idle_s = idle_s
        self.stores: dict[str, NamespaceStore] = {}
        self.num_released = 0

    def tenant_of(self, ns: str) -> str | None:
        """The configured tenant ``ns`` belongs to (``NAME`` or ``NAME/...``), if any."""
        name = ns.split("/", 1)[0]
        return name if name in self.tenants else None

    def reserved_bytes(self, tenant: str | None = None) -> int:
        return sum(st.capacity_bytes for ns, st in self.stores.items()
                   if tenant is None or self.tenant_of(ns) == tenant)

    def get(self, ns: str) -> NamespaceStore | None:
        st = self.stores.get(ns)
        if st is not None:
            st.used = time.monotonic()
        return st

    def open(self, ns: str, block_bytes: int) -> NamespaceStore:
        st = self.get(ns)
        if st is not None:
            if st.block_bytes != block_bytes:
                raise P.ProtocolError(P.E_BLOCK_SIZE, f"namespace {ns} holds blocks of {st.block_bytes} bytes")
            return st
        size = self.default_quota
        tenant = self.tenant_of(ns)
        if tenant is not None:
            left = self.tenants[tenant].quota_bytes - self.reserved_bytes(tenant)
            if left <= 0:
                raise P.ProtocolError(P.E_NO_ROOM, f"tenant {tenant}'s namespaces hold its whole quota")
            size = left if ns == tenant else min(size, left)
        if self.reserved_bytes() + size > self.capacity_bytes:
            raise P.ProtocolError(P.E_NO_ROOM, f"a namespace of {size} bytes exceeds the server's capacity")
        try:
            st = NamespaceStore(ns, block_bytes, size, self.disk_dir, self.disk_bytes)
        except ConfigError as e:
            raise P.ProtocolError(P.E_NO_ROOM, str(e)) from None
        self.stores[ns] = st
        log.info("namespace %s: %d-byte blocks, %d bytes of host memory", ns, block_bytes, st.capacity_bytes)
        return st

    def release(self, ns: str, why: str) -> int:
        """Drop namespace ``ns`` and every block in it; returns the host bytes given back."""
        st = self.stores.pop(ns, None)
        if st is None:
            return 0
        st.close()
        if st.disk_path is not None:
            shutil.rmtree(st.disk_path, ignore_errors=True)
            try:
                os.unlink(st.disk_path + ".json")
            except OSError:
                pass
        self.num_released += 1
        log.info("namespace %s released (%s): %d bytes of host memory returned", ns, why, st.capacity_bytes)
        return st.capacity_bytes

    def idle(self, now: float | None = None) -> list[str]:
        """The namespaces unused for ``idle_s`` seconds (none when idle_s is 0)."""
        if not self.idle_s:
            return []
        now = time.monotonic() if now is None else now
        return [ns for ns, st in self.stores.items() if now - st.used >= self.idle_s]

    def listing(self, visible=lambda ns: True) -> list[dict]:
        """The visible namespaces, largest first: name, block size, age, idle time, size."""
        now = time.monotonic()
        rows = []
        for ns, st in self.stores.items():
            if visible(ns):
                n = st.resident_blocks()
                rows.append({"ns": ns, "tenant": self.tenant_of(ns) or ns, "block_bytes": st.block_bytes,
                             "age_s": round(now - st.opened, 3), "idle_s": round(now - st.used, 3),
                             "capacity_bytes": st.capacity_bytes, "resident_blocks": n,
                             "resident_bytes": n * st.block_bytes})
        rows.sort(key=lambda r: (-r["resident_bytes"], r["ns"]))
        return rows[:MAX_LISTED]

    def reopen(self) -> list[str]:
        """Open the namespaces a previous server left under ``disk_dir`` (their blocks are
        recovered); returns their names."""
        if not self.disk_dir:
            return []
        opened = []
        for meta in sorted(glob.glob(os.path.join(glob.escape(self.disk_dir), "*.json"))):
            try:
                with open(meta, encoding="utf-8") as f:
                    d = json.load(f)
                ns, bb = d["namespace"], d["block_bytes"]
                if not isinstance(ns, str) or type(bb) is not int or \
                        meta != os.path.join(self.disk_dir, disk_name(ns) + ".json"):
                    raise ValueError("unexpected contents")
                self.open(ns, bb)
                opened.append(ns)
            except (OSError, ValueError, KeyError, TypeError, P.ProtocolError) as e:
                log.warning("%s: namespace not reopened: %s", meta, e)
        return opened

    def close(self) -> None:
        for st in self.stores.values():
            st.close()
        self.stores.clear()
