#!/usr/bin/env bash
# The GPU check: run on a machine with a CUDA GPU and its own torch (no network needed):
#   bash bench/gpu_check.sh [OUT_DIR]
#   STAGES="build test check" bash bench/gpu_check.sh      (a subset; default: build test check bench)
# Builds the extension against that torch, runs the whole test suite on CUDA tensors (cuda and
# triton backends required), the numerical check, then the benchmark. Everything lands in OUT_DIR
# (default: $OUT, the device tool's output folder, else bench/results/gpu-<date>), named with the GPU.
# Each stage runs under its own time limit (STAGE_LIMIT_S, default 420 s) so that a slow stage still
# leaves the logs of the others.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu-$(date +%F)}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
STAGES=${STAGES:-build test check bench}   # TEST_K: the tests to run (default: every CUDA test)
LIMIT=${STAGE_LIMIT_S:-420}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-4} PYTHONUNBUFFERED=1
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT_DIR/gpu.txt"

if has build; then
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  start=$(date +%s)
  FUSEDLOSS_CUDA=1 timeout "$LIMIT" $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/build.log" 2>&1 \
    || { tail -60 "$OUT_DIR/build.log"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
fi
$PY -m fusedloss info | tee "$OUT_DIR/info.txt"

if has test; then
  echo "== tests on CUDA tensors"
  xdist=$($PY -c 'import xdist' 2>/dev/null && echo "-n ${TEST_WORKERS:-6}")
  start=$(date +%s)
  FUSEDLOSS_REQUIRE_BACKENDS=cuda,triton timeout -s INT -k 30 "$LIMIT" $PY -m pytest -q -ra -p no:cacheprovider $xdist -k "${TEST_K:-cuda}" \
    --durations=15 tests > "$OUT_DIR/pytest-cuda.txt" 2>&1 || status=1
  echo "tests took $(( $(date +%s) - start )) s"
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest-cuda.txt" | head -40
  grep -E "^E  " "$OUT_DIR/pytest-cuda.txt" | sort | uniq -c | sort -rn | head -40
  tail -25 "$OUT_DIR/pytest-cuda.txt"
fi

if has check; then
  echo "== check"
  timeout "$LIMIT" $PY -m fusedloss check --device cuda > "$OUT_DIR/check.txt" 2>&1 || status=1
  tail -20 "$OUT_DIR/check.txt"
fi

if has bench; then
  echo "== bench"
  timeout "$LIMIT" $PY -m fusedloss bench --device cuda --no-plot ${BENCH_ARGS:-} --out "$OUT_DIR" > "$OUT_DIR/bench.txt" 2>&1 || status=1
  tail -60 "$OUT_DIR/bench.txt"
fi
exit $status
