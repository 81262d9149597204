"""Every example a user copies from integrations/ loads and validates, so a typo in one fails CI."""
from __future__ import annotations

import json

import pytest

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError
from kvtier.integrations.vllm.options import ConnectorOptions

from tests.helpers import ROOT

EXAMPLES = ROOT / "integrations"


def _transfer_config(config_file: str) -> dict:
    cfg = json.loads((EXAMPLES / "vllm" / "kv-transfer-config.json").read_text())
    cfg["kv_connector_extra_config"]["config_file"] = config_file     # as serve.sh does
    return cfg


def test_every_example_yaml_is_a_valid_kvtier_config():
    files = sorted(EXAMPLES.rglob("*.yaml"))
    assert files, "no example configs found"
    for path in files:
        if path.name == "kvtier.yaml":
            KVTierConfig.from_yaml(str(path))


def test_the_vllm_transfer_config_names_the_connector_and_validates():
    cfg = _transfer_config(str(EXAMPLES / "vllm" / "kvtier.yaml"))
    assert cfg["kv_connector"] == "KVTierConnector"
    assert cfg["kv_connector_module_path"] == "kvtier.integrations.vllm"
    assert cfg["kv_load_failure_policy"] == "recompute"        # the connector refuses anything else
    opts = ConnectorOptions.from_extra_config(cfg["kv_connector_extra_config"])
    assert opts.cache.host.capacity_bytes == 8 << 30           # inline key over the file's
    assert opts.cache.disk is not None and opts.cache.disk.write_mode == "through"


def test_a_typo_in_the_example_would_be_caught(tmp_path):
    bad = tmp_path / "kvtier.yaml"
    bad.write_text((EXAMPLES / "vllm" / "kvtier.yaml").read_text().replace("capacity_bytes: 200GiB",
                                                                           "capacty_bytes: 200GiB"))
    with pytest.raises(ConfigError, match="capacty_bytes"):
        ConnectorOptions.from_extra_config(_transfer_config(str(bad))["kv_connector_extra_config"])
