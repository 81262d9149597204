"""Rendering integrations/kubernetes with kustomize, and reading what it renders."""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvtier.config import parse_size

from tests.helpers import ROOT

K8S = ROOT / "integrations" / "kubernetes"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
BASES = sorted(p.parent for p in (K8S / "base").glob("*/kustomization.yaml"))
TOOLS_ENV = Path(os.environ.get("KVTIER_CACHE", Path.home() / ".cache" / "kvtier")) / "k8s-tools.env"
_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          **{u: 1 << (10 * i) for i, u in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), 1)}}


@functools.cache
def kustomize_command() -> tuple[str, ...] | None:
    """How to run kustomize here (tools/k8s_tools.sh records it), or None."""
    if TOOLS_ENV.exists():
        m = re.search(r'KVTIER_KUSTOMIZE="([^"]*)"', TOOLS_ENV.read_text())
        if m and m.group(1):
            return tuple(shlex.split(m.group(1)))
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    if shutil.which("kubectl"):
        r = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True)
        m = re.search(r"Kustomize Version: v(\d+)", r.stdout)
        if m and int(m.group(1)) >= 4:
            return ("kubectl", "kustomize")
    return None


@functools.cache
def render(directory: Path) -> tuple[dict, ...]:
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("no kustomize v4+ (kustomize, or kubectl kustomize): tools/k8s_tools.sh installs it")
    r = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"kustomize {directory}: {r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def find(docs, kind: str, name_prefix: str) -> dict:
    """The one document of ``kind`` whose name is ``name_prefix`` (plus a generator's hash)."""
    got = [d for d in docs if d["kind"] == kind and re.fullmatch(
        re.escape(name_prefix) + r"(-[a-z0-9]{10})?", d["metadata"]["name"])]
    assert len(got) == 1, f"{kind} {name_prefix}: found {len(got)}"
    return got[0]


def container(workload: dict, name: str) -> dict:
    return next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def quantity(q: str | int) -> int:
    """Bytes of a Kubernetes memory quantity ("33Gi", "512Mi", 1024)."""
    m = _QUANTITY.match(str(q))
    assert m, f"memory quantity {q!r}"
    return int(m.group(1)) * _UNITS[m.group(2)]


def expand(arg: str, env: dict[str, str]) -> str:
    """What the kubelet makes of ``$(VAR)`` in a container argument ($$ escapes a $)."""
    out, i = [], 0
    while i < len(arg):
        if arg.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        m = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)").match(arg, i)
        if m and m.group(1) in env:
            out.append(env[m.group(1)])
            i = m.end()
            continue
        out.append(arg[i])
        i += 1
    return "".join(out)


def server_args(docs, **override: str) -> tuple[list[str], dict[str, str]]:
    """The rendered `kvtier serve` arguments, expanded as the kubelet would, and the server
    ConfigMap's settings (``override`` replaces some of them first)."""
    sts = find(docs, "StatefulSet", "kvtier")
    c = container(sts, "kvtier")
    assert c["command"] == ["kvtier", "serve"]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(find(docs, "ConfigMap", "kvtier-server")["data"] if
                   src["configMapRef"]["name"].startswith("kvtier-server") else {})
    env.update(override)
    return [expand(a, env) for a in c["args"]], env


def flag(args: list[str], name: str) -> list[str]:
    """Every value of ``--name=value`` in args."""
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]


def server_memory_bound(env: dict[str, str]) -> int:
    """What a server may use: capacity, bytes held for peers, a request and its reply, and
    1GiB for the process itself (it checks that the first three and its own size fit)."""
    return (parse_size("SERVE_CAPACITY", env["SERVE_CAPACITY"])
            + parse_size("SERVE_MAX_INFLIGHT_BYTES", env["SERVE_MAX_INFLIGHT_BYTES"])
            + 2 * parse_size("SERVE_MAX_REQUEST_BYTES", env["SERVE_MAX_REQUEST_BYTES"]) + (1 << 30))
