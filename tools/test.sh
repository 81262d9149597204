#!/usr/bin/env bash
# Install everything kvtier's whole test suite needs, then run it.
#
#   bash tools/test.sh [pytest args]
#
# 1. redis-server (Debian package) for the Redis backend's tests, when missing;
# 2. a virtualenv with torch 2.13.0 (CPU), vLLM's CPU build and the test
#    dependencies, built once and reused (tools/vllm_env.sh);
# 3. kvtier itself, editable, with its C extension built in place;
# 4. kustomize and the Kubernetes schema validator for the manifests' tests
#    (tools/k8s_tools.sh; never fatal: their tests skip with the reason);
# 5. pytest over tests/.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "[test] installing redis-server" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server; } >&2 \
        || echo "[test] warning: could not install redis-server; its tests will be skipped" >&2
fi

venv=$(bash tools/vllm_env.sh | tail -n 1)
echo "[test] installing kvtier into $venv" >&2
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation \
    -c "$venv/kvtier-constraints.txt" -e '.[test]' >&2
bash tools/k8s_tools.sh "$venv" >&2 || echo "[test] warning: kubernetes tools not installed" >&2

exec "$venv/bin/python" -m pytest "$@"
