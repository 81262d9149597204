"""The example deployment, run on loopback: three `kvtier serve` processes started with the
arguments the StatefulSet renders to, a client built from the vLLM example's
kv_connector_extra_config, a pod lost and restarted, the probe, and every metric the
Grafana dashboard queries found in live expositions.

Only what cannot be the same on one test machine differs from the rendered manifests:
addresses (loopback ports instead of pod names), key file paths (a temporary directory
instead of the Secret's mount) and sizes (MiB instead of the overlay's GiB).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from functools import partial

import pytest
import yaml

from kvtier.keys import Namespace
from kvtier.integrations.vllm.options import ConnectorOptions

from tests.helpers import ROOT
from tests.remote.servers import ServerProc, _env, free_port

from .kube import K8S, find, render, server_args

pytest.importorskip("zmq")
pytest.importorskip("prometheus_client")

EXAMPLE = K8S / "overlays" / "example"
BB = 16 << 10                   # block bytes
N = 96                          # blocks stored
SIZES = {"SERVE_CAPACITY": "32MiB", "SERVE_QUOTA": "32MiB"}


def _serve_help() -> str:
    return subprocess.run([sys.executable, "-m", "kvtier", "serve", "--help"], capture_output=True, text=True,
                          env=_env(), cwd=str(ROOT)).stdout


def _run_probe(endpoint: str, keys) -> int:
    probe = K8S / "base" / "server" / "probe.py"
    return subprocess.run([sys.executable, str(probe), endpoint, str(keys / "server.key"),
                           str(keys / "probe.key_secret"), "1000"], env=_env(), cwd=str(ROOT),
                          capture_output=True, timeout=60).returncode


class Fleet:
    def __init__(self, tmp):
        docs = render(EXAMPLE)
        self.keys = tmp / "curve"
        subprocess.run([sys.executable, "-m", "kvtier", "serve", "--gen-keys", str(self.keys),
                        "--client", "vllm", "--client", "probe"], check=True, env=_env(), cwd=str(ROOT),
                       capture_output=True)
        args, _ = server_args(docs, **SIZES)
        self.metrics_ports = []
        self.servers = []
        n = find(docs, "StatefulSet", "kvtier")["spec"]["replicas"]
        for _ in range(n):
            port = free_port()
            local = []
            for a in args:
                name = a.split("=", 1)[0]
                if name == "--bind":
                    continue                           # ServerProc binds a loopback port
                if name == "--metrics-port":
                    a = f"--metrics-port={port}"
                if name == "--metrics-host":
                    a = "--metrics-host=127.0.0.1"     # never every interface in a test
                local.append(a.replace("/etc/kvtier/curve/", f"{self.keys}/"))
            self.metrics_ports.append(port)
            self.servers.append(ServerProc(local))
        for s in self.servers:
            s.start()
        # the client: the ConfigMap's kvtier.yaml and kv-transfer-config.json, pod names mapped
        cm = find(docs, "ConfigMap", "kvtier-vllm")["data"]
        text = cm["kvtier.yaml"]
        for i, s in enumerate(self.servers):
            text = text.replace(f"tcp://kvtier-{i}.kvtier:5555", s.endpoint)
        text = text.replace("/etc/kvtier/curve/", f"{self.keys}/")
        (tmp / "kvtier.yaml").write_text(text)
        extra = dict(json.loads(cm["kv-transfer-config.json"])["kv_connector_extra_config"],
                     config_file=str(tmp / "kvtier.yaml"))
        self.opts = ConnectorOptions.from_extra_config(extra)
        self.namespace = Namespace(model="example", block_tokens=16, tenant=self.opts.tenant)

    def close(self):
        for s in self.servers:
            s.kill()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("k8s"))
    yield f
    f.close()


def _blocks(n: int, first: int = 1) -> tuple[list[bytes], list[bytes]]:
    """n keys from ``first`` on (a key names one content: tests sharing servers use their own)."""
    keys = [i.to_bytes(4, "little") * 4 for i in range(first, first + n)]
    return keys, [os.urandom(BB) for _ in keys]


def _read(tier, keys):
    dsts = [bytearray(BB) for _ in keys]
    return tier.read(keys, [0] * len(keys), dsts), dsts


def test_three_servers_from_the_manifests_survive_a_pod_loss(fleet):
    from kvtier.remote.client import make_remote_tier
    from kvtier.remote.sharding import owners
    cfg = fleet.opts.cache.remote
    assert len(cfg.servers) == len(fleet.servers) == 3 and cfg.server_public_key
    tier = make_remote_tier(cfg, fleet.namespace, BB)
    try:
        keys, data = _blocks(N)
        assert tier.write(keys, [0] * N, data) == [True] * N
        ok, got = _read(tier, keys)
        assert ok == [True] * N and [bytes(g) for g in got] == data
        # pod loss: kvtier-1 is killed; only its own keys are missed, never a wrong byte
        lost = fleet.servers[1]
        lost.kill()
        own = owners(keys, cfg.servers, cfg.replication)
        on_lost = [all(o == 1 for o in own[i]) for i in range(N)]
        assert 0 < sum(on_lost) < N // 2
        ok, got = _read(tier, keys)
        assert ok == [not x for x in on_lost]
        for i in range(N):
            if ok[i]:
                assert bytes(got[i]) == data[i]
        assert _run_probe(lost.endpoint, fleet.keys) == 1
        assert _run_probe(fleet.servers[0].endpoint, fleet.keys) == 0
        # the pod comes back (same name, same port), empty: its keys are stored again
        lost.start()
        assert _run_probe(lost.endpoint, fleet.keys) == 0
        missing = [i for i in range(N) if on_lost[i]]
        deadline = time.monotonic() + 30
        while missing and time.monotonic() < deadline:     # the client backs off a peer it saw fail
            stored = tier.write([keys[i] for i in missing], [0] * len(missing), [data[i] for i in missing])
            missing = [i for i, s in zip(missing, stored) if not s]
            time.sleep(0.2)
        assert not missing
        ok, got = _read(tier, keys)
        assert ok == [True] * N and [bytes(g) for g in got] == data
    finally:
        tier.close()


def test_serve_knows_every_flag_the_manifest_passes():
    args, _ = server_args(render(EXAMPLE))
    known = _serve_help()
    unknown = sorted({a.split("=", 1)[0] for a in args} - set(re.findall(r"--[a-z][a-z-]*", known)))
    assert not unknown


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _sample_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _vllm_exposition() -> str:
    """The connector's counters as vLLM exports them (skipped where vLLM is not installed)."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from kvtier.integrations.vllm.stats import COUNTERS, KVTierPromMetrics
    reg = CollectorRegistry()
    types = {Gauge: partial(Gauge, registry=reg), Counter: partial(Counter, registry=reg),
             Histogram: partial(Histogram, registry=reg)}
    prom = KVTierPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["model_name", "engine"],
                             {0: ["m", "0"]})
    prom.observe({k: 1 for k in COUNTERS}, engine_idx=0)
    return generate_latest(reg).decode()


def test_every_metric_the_dashboard_queries_is_exported(fleet):
    from kvtier.cache import TieredCache
    from kvtier.config import HostConfig, KVTierConfig
    from kvtier.metrics import CacheExporter, serve_http
    from kvtier.remote.client import RemoteTier
    # traffic for the servers: puts, hits, misses, one error reply
    cfg = fleet.opts.cache
    cache = TieredCache.from_config(
        KVTierConfig(host=HostConfig(capacity_bytes=8 * BB, pinned="off", populate=False), remote=cfg.remote,
                     transfer_threads=1),
        fleet.namespace, BB)
    exporter = CacheExporter(cache)
    httpd = serve_http(exporter, "127.0.0.1", 0)
    try:
        keys, data = _blocks(24, first=1000)
        for k, d in zip(keys, data):
            h = cache.prepare_store([k], "w")
            h.views[0][:] = d
            cache.complete_store(h, True)
        cache.flush(30)
        for k, d in zip(keys, data):
            t0 = time.perf_counter()
            h = cache.prepare_load([k], "r")
            if h is None:
                continue
            assert h.wait(30)
            if h.ok[0]:
                assert bytes(h.views[0]) == d
            exporter.observe_load(time.perf_counter() - t0, tier=h.tiers[0])
            cache.complete_load(h)
        wrong = RemoteTier("remote", 2 * BB, cfg.remote.servers, namespace=fleet.namespace.tenant,
                           timeout_ms=2000, server_public_key=cfg.remote.server_public_key,
                           client_secret_key=cfg.remote.client_secret_key)
        wrong.write(keys[:3], [0] * 3, [b"x" * (2 * BB)] * 3)     # the namespace holds BB blocks: an error
        wrong.close()
        time.sleep(1.5)                    # the servers refresh their gauges once a second
        names = _sample_names(_scrape(httpd.server_port))
        for port in fleet.metrics_ports:
            names |= _sample_names(_scrape(port))
        names |= _sample_names(_vllm_exposition())
    finally:
        httpd.shutdown()
        cache.close()
    dashboard = json.loads((K8S / "dashboards" / "kvtier.json").read_text())
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            queried |= set(re.findall(r"\b((?:vllm:)?kvtier_[a-z_]+|process_[a-z_]+)\b", target["expr"]))
    assert len(queried) >= 15
    missing = sorted(queried - names)
    assert not missing, f"the dashboard queries metrics no exposition has: {missing}"
    # docs/metrics.md lists every kvtier metric any of these expositions has
    table = (ROOT / "docs" / "metrics.md").read_text()
    exported = {re.sub(r"_(bucket|sum|count)$", "", n) if f"`{n}`" not in table else n
                for n in names if re.match(r"(vllm:)?kvtier_", n) and not n.endswith("_created")}
    undocumented = sorted(n for n in exported if f"`{n}`" not in table)
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"


def test_sigterm_stops_a_server_like_a_pod_deletion(fleet):
    s = fleet.servers[2]
    s.kill(signal.SIGTERM)
    assert s.proc.returncode == 0
    s.start()


@pytest.mark.redis
def test_the_valkey_variant_stores_and_loads_through_a_cluster(tmp_path):
    """overlays/valkey's client config against a one-node cluster (redis-server speaks Valkey's
    protocol): its start-up node list mapped to the local node."""
    pytest.importorskip("redis")
    from kvtier.remote.client import make_remote_tier
    from tests.remote.servers import RedisProc
    docs = render(K8S / "overlays" / "valkey")
    cm = find(docs, "ConfigMap", "kvtier-vllm")["data"]
    node = RedisProc(cluster=True).start(str(tmp_path))
    try:
        cfg = yaml.safe_load(cm["kvtier.yaml"])
        assert cfg["remote"]["redis_cluster"] is True
        cfg["remote"]["servers"] = [node.url]
        (tmp_path / "kvtier.yaml").write_text(yaml.safe_dump(cfg))
        extra = dict(json.loads(cm["kv-transfer-config.json"])["kv_connector_extra_config"],
                     config_file=str(tmp_path / "kvtier.yaml"))
        opts = ConnectorOptions.from_extra_config(extra)
        tier = make_remote_tier(opts.cache.remote, Namespace(model="example", block_tokens=16,
                                                             tenant=opts.tenant), BB)
        try:
            keys, data = _blocks(32, first=5000)
            assert tier.write(keys, [0] * 32, data) == [True] * 32
            ok, got = _read(tier, keys)
            assert ok == [True] * 32 and [bytes(g) for g in got] == data
        finally:
            tier.close()
    finally:
        node.kill()
