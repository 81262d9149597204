"""integrations/kubernetes: every manifest renders, validates against the Kubernetes API
schemas, passes yamllint, and keeps the sizes and names that must agree in step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from kvtier.config import KVTierConfig, parse_size
from kvtier.integrations.vllm.options import ConnectorOptions

from .kube import (BASES, K8S, OVERLAYS, container, expand, find, flag, quantity, render, server_args,
                   server_memory_bound)

# the oldest and newest Kubernetes the manifests are checked against
KUBE_VERSIONS = ("1.29.0", "1.37.0")
# the fields of monitoring.coreos.com/v1 ServiceMonitor the manifests use (the CRD is not in
# the Kubernetes API's schemas); anything else in them is an error
SERVICE_MONITOR = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
                 "properties": {
                     "selector": {"type": "object", "additionalProperties": False, "properties": {
                         "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                     "namespaceSelector": {"type": "object"},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["port"], "additionalProperties": False,
                         "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                        "scrapeTimeout": {"type": "string"}}}}}},
    },
}
SOURCES = sorted(p for p in K8S.rglob("*.yaml"))
ALL = BASES + OVERLAYS
_ids = [str(p.relative_to(K8S)) for p in ALL]


def _validate(doc: dict) -> None:
    if doc["kind"] == "ServiceMonitor":
        jsonschema = pytest.importorskip("jsonschema", reason="jsonschema: kubernetes-validate brings it")
        jsonschema.validate(doc, SERVICE_MONITOR)
        return
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate: tools/k8s_tools.sh installs it")
    for version in KUBE_VERSIONS:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            raise AssertionError(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): "
                                 f"{'.'.join(map(str, e.path))}: {e.message}") from None


@pytest.mark.parametrize("directory", ALL, ids=_ids)
def test_rendered_manifests_validate_against_the_kubernetes_schemas(directory):
    docs = render(directory)
    assert docs
    for doc in docs:
        _validate(doc)


def test_plain_manifests_validate_too():
    """The resource files as a reader copies them, before kustomize touches them."""
    n = 0
    for path in SOURCES:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") in ("Kustomization", None) or path.name == "values.yaml":
                continue
            _validate(doc)
            n += 1
    assert n >= 7


def test_yamllint_passes():
    lint = pytest.importorskip("yamllint.config", reason="yamllint: tools/k8s_tools.sh installs it")
    from yamllint import linter
    conf = lint.YamlLintConfig(file=str(K8S / ".yamllint"))
    problems = [f"{p.relative_to(K8S)}:{e.line}: {e.message}" for p in SOURCES
                for e in linter.run(p.read_text(), conf, str(p)) if e.level == "error"]
    assert not problems, "\n".join(problems)


def test_the_dashboard_is_grafana_json():
    d = json.loads((K8S / "dashboards" / "kvtier.json").read_text())
    assert d["title"] and d["uid"] and d["panels"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["type"] in ("timeseries", "stat", "row"), p["title"]
        for t in p.get("targets", []):
            assert t["expr"] and t["refId"], p["title"]


WITH_VLLM = [d for d in ALL if d.name != "server"]


@pytest.mark.parametrize("overlay", WITH_VLLM, ids=[str(d.relative_to(K8S)) for d in WITH_VLLM])
def test_every_rendered_kvtier_config_validates(overlay, tmp_path):
    """The ConfigMap's kvtier.yaml with the ConfigMap's kv-transfer-config.json, as the pod reads them."""
    cm = find(render(overlay), "ConfigMap", "kvtier-vllm")["data"]
    (tmp_path / "kvtier.yaml").write_text(cm["kvtier.yaml"])
    KVTierConfig.from_yaml(tmp_path / "kvtier.yaml")
    transfer = json.loads(cm["kv-transfer-config.json"])
    assert transfer["kv_load_failure_policy"] == "recompute"
    extra = dict(transfer["kv_connector_extra_config"], config_file=str(tmp_path / "kvtier.yaml"))
    opts = ConnectorOptions.from_extra_config(extra)
    assert opts.cache.remote is not None


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_the_vllm_pod_has_room_for_its_tiers(overlay):
    docs = render(overlay)
    dep = find(docs, "Deployment", "vllm")
    c = container(dep, "vllm")
    cfg = yaml.safe_load(find(docs, "ConfigMap", "kvtier-vllm")["data"]["kvtier.yaml"])
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    limit = quantity(c["resources"]["limits"]["memory"])
    assert quantity(c["resources"]["requests"]["memory"]) == limit
    shm = quantity(vols["shm"]["emptyDir"]["sizeLimit"])
    host = parse_size("host.capacity_bytes", cfg["host"]["capacity_bytes"])
    assert host + shm + (16 << 30) <= limit, "pinned host tier + /dev/shm + vLLM must fit the memory limit"
    disk = parse_size("disk.capacity_bytes", cfg["disk"]["capacity_bytes"])
    assert disk <= 0.9 * quantity(vols["kvtier-disk"]["emptyDir"]["sizeLimit"])
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert any(cfg["disk"]["path"].startswith(m + "/") for m in mounts), "disk.path on the kvtier-disk volume"
    for key in ("server_public_key", "client_secret_key"):
        if cfg["remote"].get(key):
            assert cfg["remote"][key].startswith("/etc/kvtier/curve/")


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o.name != "valkey"],
                         ids=[o.name for o in OVERLAYS if o.name != "valkey"])
def test_servers_clients_and_probes_agree(overlay):
    docs = render(overlay)
    sts = find(docs, "StatefulSet", "kvtier")
    svc = find(docs, "Service", "kvtier")
    args, env = server_args(docs)
    c = container(sts, "kvtier")
    # memory: requests = limits = capacity + the server's bounded overhead
    res = c["resources"]
    assert quantity(res["limits"]["memory"]) == quantity(res["requests"]["memory"])
    assert quantity(res["limits"]["memory"]) >= server_memory_bound(env)
    assert quantity(res["limits"]["memory"]) - server_memory_bound(env) < (1 << 30), "limit far above the bound"
    # clients list every server pod by its stable name, in the server's port
    cfg = yaml.safe_load(find(docs, "ConfigMap", "kvtier-vllm")["data"]["kvtier.yaml"])
    n, name, port = sts["spec"]["replicas"], sts["metadata"]["name"], flag(args, "bind")[0].rsplit(":", 1)[1]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    assert cfg["remote"]["servers"] == [f"tcp://{name}-{i}.{svc['metadata']['name']}:{port}" for i in range(n)]
    # the clients' tenant is a server tenant whose key the vLLM pod mounts
    transfer = json.loads(find(docs, "ConfigMap", "kvtier-vllm")["data"]["kv-transfer-config.json"])
    tenants = {t.split(":")[0]: t for t in flag(args, "tenant")}
    assert transfer["kv_connector_extra_config"]["tenant"] in tenants
    assert set(tenants) == {transfer["kv_connector_extra_config"]["tenant"], "probe"}
    # Service ports, ServiceMonitor port names and probes point at what the container opens
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["zmq"] == int(port) and ports["metrics"] == int(flag(args, "metrics-port")[0])
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    mon = find(docs, "ServiceMonitor", "kvtier-server")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[1] == "/etc/kvtier/probe/probe.py" and cmd[2].endswith(":" + port)
    # the disruption budget covers the server pods, one at a time
    pdb = find(docs, "PodDisruptionBudget", "kvtier")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_the_valkey_variant_runs_no_kvtier_server():
    docs = render(K8S / "overlays" / "valkey")
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    cfg = yaml.safe_load(find(docs, "ConfigMap", "kvtier-vllm")["data"]["kvtier.yaml"])
    assert cfg["remote"]["backend"] == "redis"
    assert all(s.startswith("redis://") for s in cfg["remote"]["servers"])


def test_the_vllm_command_hands_vllm_the_transfer_config_whole(tmp_path):
    """The container's command line, expanded as the kubelet does and run by bash, with a
    stand-in `vllm` that records its arguments."""

    docs = render(K8S / "overlays" / "example")
    c = container(find(docs, "Deployment", "vllm"), "vllm")
    cm = find(docs, "ConfigMap", "kvtier-vllm")["data"]
    (tmp_path / "kv-transfer-config.json").write_text(cm["kv-transfer-config.json"])
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"json.dump(sys.argv[1:], open({str(tmp_path / 'argv')!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {e["name"]: e["value"] for e in c["env"]}
    script = expand(c["args"][0], env).replace("/etc/kvtier/kv-transfer-config.json",
                                                str(tmp_path / "kv-transfer-config.json"))
    assert c["command"] == ["bash", "-c"]
    subprocess.run(["bash", "-c", script], check=True, timeout=30,
                   env={**env, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"})
    argv = json.loads((tmp_path / "argv").read_text())
    assert argv[:2] == ["serve", env["MODEL"]]
    transfer = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert transfer == json.loads(cm["kv-transfer-config.json"])
    assert argv[-2:] == env["VLLM_ARGS"].split()


@pytest.mark.parametrize("directory", [d for d in ALL if d.name != "valkey" and d.name != "vllm"],
                         ids=[str(d.relative_to(K8S)) for d in ALL if d.name not in ("valkey", "vllm")])
def test_the_server_settings_parse(directory):
    args, env = server_args(render(directory))
    for key in ("SERVE_CAPACITY", "SERVE_QUOTA", "SERVE_MAX_REQUEST_BYTES", "SERVE_MAX_INFLIGHT_BYTES"):
        parse_size(key, env[key])
    assert parse_size("quota", env["SERVE_QUOTA"]) <= parse_size("capacity", env["SERVE_CAPACITY"])
    assert not [a for a in args if "$(" in a], "a $(VAR) the ConfigMap does not define"
