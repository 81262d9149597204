#!/usr/bin/env bash
# Serve MODEL with vLLM, kvtier keeping the KV blocks vLLM evicts.
#
#   MODEL=meta-llama/Llama-3.1-8B-Instruct bash serve.sh [more vllm serve flags]
#
# kv-transfer-config.json names /etc/kvtier/kvtier.yaml: copy kvtier.yaml there
# (or set KVTIER_CONFIG to another path) and size its tiers for this machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
config=${KVTIER_CONFIG:-/etc/kvtier/kvtier.yaml}
transfer=$(python3 - "$here/kv-transfer-config.json" "$config" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["kv_connector_extra_config"]["config_file"] = sys.argv[2]
print(json.dumps(cfg))
PY
)
exec vllm serve "${MODEL:?set MODEL}" --kv-transfer-config "$transfer" "$@"
