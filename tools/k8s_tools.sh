#!/usr/bin/env bash
# Tools the Kubernetes manifests' tests need (tests/integrations/test_kubernetes.py):
#
#   bash tools/k8s_tools.sh VENV
#
# 1. Python: kubernetes-validate (the Kubernetes API's JSON schemas, bundled, offline) and
#    yamllint, at pinned versions, into VENV when missing;
# 2. kustomize, to render integrations/kubernetes: a `kustomize` binary on PATH, or
#    `kubectl kustomize` (kustomize v4 or newer), installing Debian-packaged kubectl where an
#    apt source offers it.  The command found is written to ~/.cache/kvtier/k8s-tools.env
#    (KVTIER_KUSTOMIZE=...), which the tests read.
#
# Never fails the caller: what cannot be had is reported, and the tests that need it are
# skipped with that reason.
set -uo pipefail
venv=${1:?usage: k8s_tools.sh VENV}
cache=${KVTIER_CACHE:-$HOME/.cache/kvtier}
mkdir -p "$cache"
KUBERNETES_VALIDATE=1.37.0
YAMLLINT=1.38.0

if ! "$venv/bin/python" -c "import kubernetes_validate, yamllint" 2>/dev/null; then
    echo "[k8s] installing kubernetes-validate==$KUBERNETES_VALIDATE yamllint==$YAMLLINT" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE" "yamllint==$YAMLLINT" >&2 \
        || echo "[k8s] warning: could not install the schema validator or yamllint" >&2
fi

kustomize_major() {   # the major version of kustomize that "$@" runs, or 0
    local v
    v=$("$@" version 2>/dev/null | grep -o 'v[0-9][0-9]*\.' | head -n 1 | tr -dc 0-9)
    echo "${v:-0}"
}

found=""
if command -v kustomize >/dev/null 2>&1 && [ "$(kustomize_major kustomize)" -ge 4 ]; then
    found="kustomize build"
fi
if [ -z "$found" ] && ! command -v kubectl >/dev/null 2>&1; then
    echo "[k8s] installing kubectl (for kubectl kustomize)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq kubectl; } >&2 \
        || echo "[k8s] warning: no apt source offers kubectl" >&2
fi
if [ -z "$found" ] && command -v kubectl >/dev/null 2>&1; then
    v=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
    if [ "${v:-0}" -ge 4 ]; then
        found="kubectl kustomize"
    else
        echo "[k8s] warning: kubectl's kustomize is older than v4 (${v:-none}); manifests not rendered" >&2
    fi
fi
echo "KVTIER_KUSTOMIZE=\"$found\"" > "$cache/k8s-tools.env"
echo "[k8s] kustomize: ${found:-none}" >&2
