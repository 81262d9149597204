#!/usr/bin/env bash
# The GPU machine's one check: install kvtier, run tests/gpu (every GPU, NVRTC and CUDA-binding
# test), run `kvtier bench gpu`.
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# For a machine without network: wheels of lmdb and pyzmq (the disk and remote
# tiers' dependencies) are taken from ./.whl when that folder exists
# (`pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl lmdb pyzmq`).  Everything is written under $OUT (default
# ./gpu-check-out): env.txt, pytest.log, bench.log, gpu.jsonl.  Each step has
# its own time limit; the whole script stays under 8 minutes.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start ))s)"; }

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 || true
  $PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
          "available", torch.cuda.is_available())' 2>&1
  $PY -c 'import cupy; print("cupy", cupy.__version__, "runtime", cupy.cuda.runtime.runtimeGetVersion())' 2>&1 || true
} | tee "$OUT/env.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  step "wheels from .whl"
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step "install"
timeout 180 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -20 "$OUT/install.log"; }
$PY -c 'import kvtier, kvtier.native as n; print("kvtier", kvtier.__version__, "native", n.NATIVE)' 2>&1 | tee -a "$OUT/env.txt"

step "pytest tests/gpu"
timeout 240 $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  -o addopts="" -rfE tests/gpu >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; tail -15 "$OUT/pytest.log"

step "kvtier bench gpu"
rm -f "$OUT/gpu.jsonl"
left=$(( 470 - ($(date +%s) - start) )); [ "$left" -lt 60 ] && left=60
timeout "$left" $PY -m kvtier bench gpu --json "$OUT/gpu.jsonl" \
  >"$OUT/bench.log" 2>&1
echo "bench exit $?"
step "done"
cat "$OUT/bench.log" | tail -80
