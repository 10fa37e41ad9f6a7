#!/usr/bin/env bash
# The GPU check: run on a machine with a CUDA GPU and its own torch (no network needed):
#   bash bench/gpu_check.sh [OUT_DIR]
# Builds the extension against that torch, runs the whole test suite on CUDA tensors (cuda and
# triton backends required), then the benchmark. Everything lands in OUT_DIR (default: $OUT, the
# device tool's output folder, else bench/results/gpu-<date>), named with the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu-$(date +%F)}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-4}
status=0

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT_DIR/gpu.txt"

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
start=$(date +%s)
FUSEDLOSS_CUDA=1 $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/build.log" 2>&1 || { tail -50 "$OUT_DIR/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
$PY -m fusedloss info | tee "$OUT_DIR/info.txt"

echo "== tests on CUDA tensors"
FUSEDLOSS_REQUIRE_BACKENDS=cuda,triton $PY -m pytest -q -ra -p no:cacheprovider -k "cuda" \
  --junitxml="$OUT_DIR/pytest-cuda.xml" tests > "$OUT_DIR/pytest-cuda.txt" 2>&1 || status=1
tail -30 "$OUT_DIR/pytest-cuda.txt"

echo "== check"
$PY -m fusedloss check > "$OUT_DIR/check.txt" 2>&1 || status=1
tail -20 "$OUT_DIR/check.txt"

echo "== bench"
$PY -m fusedloss bench --device cuda --out "$OUT_DIR" > "$OUT_DIR/bench.txt" 2>&1 || status=1
tail -40 "$OUT_DIR/bench.txt"
exit $status
