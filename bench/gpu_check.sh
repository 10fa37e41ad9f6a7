#!/usr/bin/env bash
# The GPU check: run on a machine with a CUDA GPU and its own torch (no network needed):
#   bash bench/gpu_check.sh [OUT_DIR]
#   STAGES="build test check" bash bench/gpu_check.sh      (a subset; default: build test check sanitize bench lce)
# Builds the extension against that torch, runs the whole test suite on CUDA tensors (cuda and
# triton backends required), the numerical check of every op, compute-sanitizer's memcheck on a small
# subset, then the benchmark. Everything lands in OUT_DIR (default: $OUT, the device tool's output
# folder, else bench/results/gpu-<date>), named with the GPU. Each stage runs under its own time
# limit (STAGE_LIMIT_S, default 420 s; the sanitizer SANITIZE_LIMIT_S, default 240 s) so that a slow
# stage still leaves the logs of the others. A summary table of the stages is printed last (and
# written to OUT_DIR/summary.txt).
#
# The lce stage is issue #18's race: linear cross-entropy fwd+bwd at N=8192, D=4096, V in {32000, 131072,
# 262144}, bf16 then fp32, every provider side by side (naive head, torch's chunked F.linear_cross_entropy,
# Cut Cross-Entropy "cce", Liger's LigerFusedLinearCrossEntropyLoss, our chunked cuBLAS path fusedloss-cuda
# and our fused Triton kernel fusedloss-triton), time, TFLOP/s (6 N D V) and peak memory, into
# OUT_DIR/lce-race. fp32 runs IEEE FMAs unless LCE_FP32_PRECISION=high (TF32) is set; the fused kernel's
# backward recomputes the logits ceil(D / BLOCK_DO) times (see fusedloss/triton/linear_cross_entropy.py),
# so on IEEE FMAs it takes seconds a step and minutes of autotuning: the fp32 pass leaves it out then
# (LCE_FP32_FUSED=1 keeps it). bf16 runs first, each dtype under its own limit.
#
# The peers are not on the GPU machine's image and it has no network: carry them as wheels in .whl/ (the
# device tool's `carry`), made on a machine with pip (see the device README's Notes), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform any -d .whl cut-cross-entropy liger-kernel inf-cl
# (pure-Python wheels over triton and torch, which the image has; inf-cl also needs numpy; check each wheel's
# Requires-Dist with `unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist` and add what is missing).
# This script installs whatever .whl/*.whl holds into /tmp/site (no index, no deps) before it starts.
#
# Stages beyond the default: nce (issue #17), kl (#16), hf (#19), overhead (#14); see each below. A 15-minute
# lease fits about two 10-minute commands, e.g. STAGES="build test lce" then STAGES="nce kl hf overhead"
# on the same warm machine (the build stays), with STAGE_LIMIT_S lowered to fit.
# Peers for these: inf-cl (nce), liger-kernel (kl, hf, lce), cut-cross-entropy (hf, lce), carried as above.
#
# Knobs: TEST_K (pytest -k of the test stage, default every CUDA test), TEST_WORKERS (xdist workers),
# SANITIZE_K (pytest -k of the sanitizer stage), SANITIZE_TOOLS (default "memcheck"; e.g.
# "memcheck racecheck"), BENCH_ARGS (extra arguments of the main benchmark), PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results/gpu-$(date +%F)}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
STAGES=${STAGES:-build test check sanitize bench lce}
LIMIT=${STAGE_LIMIT_S:-420}
SANITIZE_LIMIT=${SANITIZE_LIMIT_S:-240}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
export MAX_JOBS=${MAX_JOBS:-16} NVCC_THREADS=${NVCC_THREADS:-4} PYTHONUNBUFFERED=1
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

# The summary: one row per stage (name, result, seconds, what it found).
SUMMARY=()
record() {  # record STAGE RESULT START_EPOCH NOTE
  SUMMARY+=("$(printf '%-9s %-8s %6s  %s' "$1" "$2" "$(( $(date +%s) - $3 ))" "$4")")
}
verdict() { [[ $1 == 0 ]] && echo ok || { [[ $1 == 124 || $1 == 137 ]] && echo TIMEOUT || echo FAIL; }; }

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || echo "wheels in .whl/ did not install"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; $PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } | tee "$OUT_DIR/gpu.txt"

if has build; then
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  start=$(date +%s)
  FUSEDLOSS_CUDA=1 timeout "$LIMIT" $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT_DIR/build.log" 2>&1 \
    || { tail -60 "$OUT_DIR/build.log"; record build FAIL "$start" "see build.log"; printf '%s\n' "${SUMMARY[@]}"; exit 1; }
  echo "built in $(( $(date +%s) - start )) s"
  record build ok "$start" "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
fi
$PY -m fusedloss info | tee "$OUT_DIR/info.txt"

if has test; then
  echo "== tests on CUDA tensors"
  xdist=$($PY -c 'import xdist' 2>/dev/null && echo "-n ${TEST_WORKERS:-6}")
  start=$(date +%s)
  FUSEDLOSS_REQUIRE_BACKENDS=cuda,triton timeout -s INT -k 30 "$LIMIT" $PY -m pytest -q -ra -p no:cacheprovider $xdist -k "${TEST_K:-cuda}" \
    --durations=15 tests > "$OUT_DIR/pytest-cuda.txt" 2>&1
  rc=$?; [[ $rc == 0 ]] || status=1
  echo "tests took $(( $(date +%s) - start )) s"
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest-cuda.txt" | head -40
  grep -E "^E  " "$OUT_DIR/pytest-cuda.txt" | sort | uniq -c | sort -rn | head -40
  tail -25 "$OUT_DIR/pytest-cuda.txt"
  record test "$(verdict $rc)" "$start" "$(grep -E '^=+ .*(passed|failed|error).* =+$' "$OUT_DIR/pytest-cuda.txt" | tail -1 | tr -d '=' | xargs)"
fi

if has check; then
  echo "== check"
  start=$(date +%s)
  timeout "$LIMIT" $PY -m fusedloss check --device cuda --no-progress > "$OUT_DIR/check.txt" 2>&1
  rc=$?; [[ $rc == 0 ]] || status=1
  grep -E "FAIL" "$OUT_DIR/check.txt" | head -30
  tail -4 "$OUT_DIR/check.txt"
  record check "$(verdict $rc)" "$start" "$(grep -E '^check: (PASS|FAIL)' "$OUT_DIR/check.txt" | tail -1)"
fi

if has sanitize; then
  # compute-sanitizer on a few CUDA tests per op (odd sizes, layouts, empty and all-ignored inputs)
  # and on `fusedloss check` of the cuda backend (every op and option once, bf16): the sanitizer runs
  # kernels 10-100x slower, so the subset is small. PYTORCH_NO_CUDA_MEMORY_CACHING=1 gives every
  # tensor its own cudaMalloc: with the caching allocator, an access past a tensor's end usually
  # lands in another block of the same segment and memcheck cannot see it.
  echo "== sanitize"
  start=$(date +%s)
  SAN=$(command -v compute-sanitizer || true)
  [[ -z $SAN && -x /usr/local/cuda/bin/compute-sanitizer ]] && SAN=/usr/local/cuda/bin/compute-sanitizer
  [[ -z $SAN && -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/compute-sanitizer ]] && SAN=$CUDA_HOME/bin/compute-sanitizer
  if [[ -z $SAN ]]; then
    echo "sanitize: SKIPPED: compute-sanitizer not found (not on PATH, nor in /usr/local/cuda/bin or \$CUDA_HOME/bin)"
    record sanitize skipped "$start" "compute-sanitizer not found"
  else
    K=${SANITIZE_K:-"cuda-cuda and (test_layouts or test_all_ignored_and_empty or test_fwd_grad_edge_rows or test_nonfinite_and_huge_logits or test_one_dim_input_and_module or test_noncontiguous_inputs or test_lse_ops_empty_sides or (test_shapes and float32 and (N257-C1023 or N3-C7 or 2-1000 or 2-3-)))"}
    notes=()
    san_rc=0
    for tool in ${SANITIZE_TOOLS:-memcheck}; do
      log="$OUT_DIR/sanitize-$tool.txt"
      half=$(( SANITIZE_LIMIT / 2 ))
      {
        echo "## pytest -k \"$K\""
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 30 "$half" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 50 \
          $PY -m pytest -q -p no:cacheprovider -x -k "$K" tests
        echo "## pytest exit $?"
        echo "## fusedloss check --device cuda --backend cuda --dtype bfloat16"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 30 "$half" "$SAN" --tool "$tool" --error-exitcode 86 --print-limit 50 \
          $PY -m fusedloss check --device cuda --backend cuda --dtype bfloat16 --quiet --no-progress
        echo "## check exit $?"
      } > "$log" 2>&1
      codes=$(grep -E "^## (pytest|check) exit" "$log" | awk '{print $4}' | xargs)
      errors=$(grep -E "ERROR SUMMARY: [0-9]+ error" "$log" | awk '{s += $4} END {print s + 0}')
      echo "$tool: exit codes (pytest, check) $codes; ERROR SUMMARY total $errors error(s); log $log"
      grep -E "^=+ .*(passed|failed|error).* =+$" "$log" | tail -1
      grep -E "^========= (Invalid|Program hit|Uninitialized|Race|Error)" "$log" | sort | uniq -c | sort -rn | head -20
      [[ $codes == "0 0" && $errors == 0 ]] || { san_rc=1; status=1; }
      [[ $codes == *124* || $codes == *137* || $codes == *130* ]] && notes+=("$tool: a part TIMED OUT")
      notes+=("$tool: $errors sanitizer error(s), exit $codes")
    done
    record sanitize "$( [[ $san_rc == 0 ]] && echo ok || echo FAIL )" "$start" "$(IFS=';'; echo "${notes[*]}")"
  fi
fi

if has bench; then
  echo "== bench"
  start=$(date +%s)
  # The large case first: cross-entropy at 16384 x 131072 in bf16 (4.3 GB of logits), every provider
  # and mode; its own folder, so that its CSV does not overwrite the sweep's cross_entropy CSV.
  timeout "$LIMIT" $PY -m fusedloss bench --device cuda --no-plot --ops cross_entropy --dtype bfloat16 \
    --shapes "N=16384,C=131072" --out "$OUT_DIR/ce-16384x131072-bf16" > "$OUT_DIR/bench-ce-large.txt" 2>&1
  rc_large=$?
  tail -20 "$OUT_DIR/bench-ce-large.txt"
  timeout "$LIMIT" $PY -m fusedloss bench --device cuda --no-plot ${BENCH_ARGS:-} --out "$OUT_DIR" > "$OUT_DIR/bench.txt" 2>&1
  rc=$?
  tail -60 "$OUT_DIR/bench.txt"
  [[ $rc == 0 && $rc_large == 0 ]] || status=1
  csvs=$(ls "$OUT_DIR"/*.csv "$OUT_DIR"/ce-16384x131072-bf16/*.csv 2>/dev/null | wc -l)
  record bench "$(verdict $(( rc > rc_large ? rc : rc_large )))" "$start" "sweep exit $rc, CE 16384x131072 bf16 exit $rc_large; $csvs CSV file(s)"
fi

# bench_dtypes NAME OPS SHAPES LINES [PRECISION [FP32_PROVIDERS]]: `fusedloss bench` of OPS at SHAPES,
# fwd+bwd on CUDA, bf16 then fp32, each dtype under its own limit, into OUT_DIR/NAME-race-<dtype> with the
# log OUT_DIR/bench-NAME-<dtype>.txt (its last LINES lines printed); PRECISION, when given, is torch's
# float32 matmul precision ("high": TF32); FP32_PROVIDERS, when given, the providers of the fp32 pass.
# Returns the exit code of the last dtype that failed (0: none).
bench_dtypes() {
  local name=$1 ops=$2 shapes=$3 lines=$4 precision=${5:-} fp32_providers=${6:-} rc_all=0 rc dt chosen
  for dt in bfloat16 float32; do
    chosen=""; [[ $dt == float32 ]] && chosen=$fp32_providers
    FP32_PRECISION="$precision" PROVIDERS="$chosen" timeout "$LIMIT" $PY - "$ops" "$dt" "$shapes" \
      "$OUT_DIR/$name-race-$dt" > "$OUT_DIR/bench-$name-$dt.txt" 2>&1 <<'PYEOF'
import os, sys
import torch
if os.environ.get("FP32_PRECISION"):
    torch.set_float32_matmul_precision(os.environ["FP32_PRECISION"])
from fusedloss import cli
chosen = ["--providers", os.environ["PROVIDERS"]] if os.environ.get("PROVIDERS") else []
sys.exit(cli.main(["bench", "--device", "cuda", "--no-plot", "--ops", sys.argv[1], "--modes", "fwd+bwd",
                   "--dtype", sys.argv[2], "--shapes", sys.argv[3], "--out", sys.argv[4], *chosen]))
PYEOF
    rc=$?; [[ $rc == 0 ]] || { rc_all=$rc; status=1; }
    tail -"$lines" "$OUT_DIR/bench-$name-$dt.txt"
  done
  return $rc_all
}

if has lce; then
  echo "== lce (issue #18: linear cross-entropy race)"
  start=$(date +%s)
  $PY -c 'import cut_cross_entropy' 2>/dev/null || echo "lce: Cut Cross-Entropy not installed (carry it in .whl/): cce is left out"
  $PY -c 'import liger_kernel' 2>/dev/null || echo "lce: liger-kernel not installed (carry it in .whl/): liger is left out"
  # The fused kernel in IEEE fp32 (FMA units, no tensor cores; its largest BLOCK_DO there is 128) recomputes
  # the logits 2 ceil(D / 128) = 64 times in its backward: 67 x 2NDV flops a step, 1.2 PFLOP at V=262144,
  # tens of seconds at an FMA rate, times the autotuner's ~7 calls per config. Its fp32 pass is left out
  # unless TF32 is on (LCE_FP32_PRECISION=high) or LCE_FP32_FUSED=1.
  fp32_providers=""
  if [[ -z ${LCE_FP32_PRECISION:-} && -z ${LCE_FP32_FUSED:-} ]]; then
    fp32_providers="naive,torch-chunked,cce,liger,fusedloss-cuda"
    echo "lce: fp32 without fusedloss-triton (IEEE FMAs; set LCE_FP32_PRECISION=high or LCE_FP32_FUSED=1 to race it)"
  fi
  bench_dtypes lce linear_cross_entropy "N=8192,D=4096,V=32000;N=8192,D=4096,V=131072;N=8192,D=4096,V=262144" 30 \
    "${LCE_FP32_PRECISION:-}" "$fp32_providers"
  rc_lce=$?
  record lce "$(verdict $rc_lce)" "$start" "N=8192 D=4096 V=32000/131072/262144, bf16 and fp32, fwd+bwd; logs bench-lce-*.txt"
fi

# The other issues' GPU races, each a stage of its own (not in the default STAGES: pick what the lease allows).
# nce: issue #17, InfoNCE fwd+bwd at N=M in {16384, 32768}, D=256, bf16 then fp32, against PyTorch,
#   torch.compile and Inf-CL (`inf-cl` wheel in .whl/).
if has nce; then
  echo "== nce (issue #17: InfoNCE against PyTorch, torch.compile, Inf-CL)"
  start=$(date +%s)
  $PY -c 'import inf_cl' 2>/dev/null || echo "nce: inf-cl not installed (carry it in .whl/): inf-cl is left out"
  bench_dtypes nce info_nce "N=16384,M=16384,D=256;N=32768,M=32768,D=256" 20
  rc_nce=$?
  # the 16-bit rows' path (triton: raw rows, normalized in the kernels) against float64 and plain PyTorch
  # in the same dtype, with each path's peak memory
  timeout "$LIMIT" $PY bench/info_nce_16bit.py --device cuda --shapes 4096x256,16384x256 \
    > "$OUT_DIR/info_nce-16bit.txt" 2>&1 || { rc_nce=1; status=1; }
  tail -14 "$OUT_DIR/info_nce-16bit.txt"
  record nce "$(verdict $rc_nce)" "$start" "N=M=16384/32768 D=256, bf16 and fp32; logs bench-nce-*.txt, info_nce-16bit.txt"
fi

# kl: issue #16, kl_div_logits and linear_kl_div against Liger's JSD(beta=0) and fused linear JSD.
if has kl; then
  echo "== kl (issue #16: distillation against Liger)"
  start=$(date +%s)
  timeout "$LIMIT" $PY -m fusedloss bench --device cuda --no-plot --ops kl_div,linear_kl_div --modes fwd+bwd \
    --dtype bfloat16 --out "$OUT_DIR/kl" > "$OUT_DIR/bench-kl.txt" 2>&1
  rc=$?; [[ $rc == 0 ]] || status=1
  tail -30 "$OUT_DIR/bench-kl.txt"
  record kl "$(verdict $rc)" "$start" "kl_div, linear_kl_div, bf16, fwd+bwd; log bench-kl.txt"
fi

# hf: issue #19, a Llama training step at D=2048, B*T=8192, bf16, V=128256: unpatched, fusedloss's apply,
# Liger's fused linear cross-entropy and Cut Cross-Entropy (wheels in .whl/).
if has hf; then
  echo "== hf (issue #19: HuggingFace Llama step against Liger and CCE)"
  start=$(date +%s)
  timeout "$LIMIT" $PY bench/bench_hf.py --device cuda --dtype bfloat16 --hidden 2048 --batch 8 --seq 1024 \
    --vocab 128256 --reps 3 --out "$OUT_DIR/hf-llama-cuda.csv" > "$OUT_DIR/bench-hf.txt" 2>&1
  rc=$?; [[ $rc == 0 ]] || status=1
  tail -12 "$OUT_DIR/bench-hf.txt"
  record hf "$(verdict $rc)" "$start" "Llama D=2048 B*T=8192 bf16 V=128256; log bench-hf.txt"
fi

# overhead: issue #14, the per-call cost at tiny sizes against each op's PyTorch twin, on CUDA.
if has overhead; then
  echo "== overhead (issue #14: per-call cost on CUDA)"
  start=$(date +%s)
  timeout "$LIMIT" $PY bench/bench_overhead.py --device cuda --reductions mean,none --out "$OUT_DIR" \
    > "$OUT_DIR/bench-overhead.txt" 2>&1
  rc=$?; [[ $rc == 0 ]] || status=1
  tail -20 "$OUT_DIR/bench-overhead.txt"
  record overhead "$(verdict $rc)" "$start" "bench_overhead.py --device cuda; log bench-overhead.txt"
fi

{
  echo
  echo "== summary ($(head -2 "$OUT_DIR/gpu.txt" | tail -1 | cut -d, -f1))"
  printf '%-9s %-8s %6s  %s\n' stage result seconds details
  printf '%-9s %-8s %6s  %s\n' ----- ------ ------- -------
  printf "%s\n" ${SUMMARY[@]+"${SUMMARY[@]}"}
  echo "overall: $([[ $status == 0 ]] && echo PASS || echo FAIL); logs in $OUT_DIR"
} | tee "$OUT_DIR/summary.txt"
exit $status
