#!/usr/bin/env bash
# The GPU machine's one check: install kvtier, run tests/gpu (every GPU, NVRTC, ctypes-binding and
# fake-CUDA test, not only `-m gpu`) and the embedding API's tests, then `kvtier bench gpu`
# (peaks, the vLLM-shaped step cases, every layout and mechanism).
#
#   bash bench/gpu_check.sh            # from the repository root, on a machine with CUDA
#
# For a machine without network: wheels of lmdb and pyzmq (the disk and remote
# tiers' dependencies) are taken from ./.whl when that folder exists; make it on a
# machine with network for the device's Python (3.12):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl lmdb pyzmq
# Everything is written under $OUT (default ./gpu-check-out): env.txt, install.log,
# pytest.log, bench.log, gpu.jsonl.  env.txt ends with the batch path's record
# (`batch`, `batch_failures`).  Each step has its own time limit; the whole
# script stays under 8 minutes.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start ))s)"; }
left() { local l=$(( $1 - ($(date +%s) - start) )); [ "$l" -lt 30 ] && l=30; echo "$l"; }

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 || true
  $PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
          "available", torch.cuda.is_available())' 2>&1
  echo "ulimit -l (RLIMIT_MEMLOCK): $(ulimit -l)"
  if ! $PY -c 'import cupy; print("cupy", cupy.__version__, "runtime", cupy.cuda.runtime.runtimeGetVersion())' 2>/dev/null; then
    extra=$($PY -c 'import torch; print("cuda13" if int((torch.version.cuda or "12").split(".")[0]) >= 13 else "cuda")' 2>/dev/null)
    echo "CuPy is missing: only the torch fallback runs (pip install 'kvtier[${extra:-cuda13}]' for DMA and kernels)"
  fi
} | tee "$OUT/env.txt"

if compgen -G ".whl/*.whl" >/dev/null; then
  step "wheels from .whl"
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# NVRTC for the run-time compilation test: the CUDA toolkit's, or NVIDIA's pip wheels'
if [ -z "${KVTIER_NVRTC_DIR:-}" ]; then
  site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)
  lib=$(ls -1 /usr/local/cuda/lib64/libnvrtc.so* "$site"/nvidia/*/lib/libnvrtc.so* 2>/dev/null | head -1)
  [ -n "$lib" ] && export KVTIER_NVRTC_DIR=$(dirname "$lib")
fi
echo "nvrtc: ${KVTIER_NVRTC_DIR:-not found}" | tee -a "$OUT/env.txt"

step "install"
timeout 180 $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -20 "$OUT/install.log"; }
$PY -c 'import kvtier, kvtier.native as n; print("kvtier", kvtier.__version__, "native", n.NATIVE)' 2>&1 | tee -a "$OUT/env.txt"

step "pytest tests/gpu tests/core/test_paged.py"
timeout "$(left 200)" $PY -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
  -o addopts="" -rfEs tests/gpu tests/core/test_paged.py >"$OUT/pytest.log" 2>&1
echo "pytest exit $?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -25

step "kvtier bench gpu"
rm -f "$OUT/gpu.jsonl"
timeout "$(left 450)" $PY -m kvtier bench gpu --json "$OUT/gpu.jsonl" >"$OUT/bench.log" 2>&1
echo "bench exit $?"

step "batch path"
$PY - "$OUT/gpu.jsonl" <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import json, os, sys
path = sys.argv[1] if len(sys.argv) > 1 else ""
rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
batch = [r for r in rows if "batch" in r]
errors = [r for r in rows if "error" in r]
last = batch[-1] if batch else {}
print("batch", last.get("batch"), "batch_failures", last.get("batch_failures"),
      "batch_disabled", last.get("batch_disabled"), "batch_runtime", last.get("batch_runtime"))
print("rows", len(rows), "error rows", len(errors))
for r in errors[:10]:
    print("  error:", r["case"], r["error"][:200])
EOF
step "done"
tail -60 "$OUT/bench.log"
