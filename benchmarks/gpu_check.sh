#!/usr/bin/env bash
# All GPU checks of the ai.mqc runtime-ops library in one command, for a lent GPU machine that has a bare copy of
# the tree (torch with CUDA, numpy, nvcc, cmake; no network, mqc not installed, no pip install):
#
#   bash benchmarks/gpu_check.sh        # from the repository root; results in $OUT (default ./out/gpu)
#
# Carry build/ort-headers/root/usr/include/onnxruntime with the tree (ignored by git, 0.6 MB; runtime_ops/README.md,
# "Running the GPU checks"): the CMake build compiles against onnxruntime's headers and this script fetches nothing.
#
# Steps, each under `timeout`, all of them inside a 330 s budget (a hang cannot eat the device time):
#   1. nvidia-smi, nvcc and cmake versions;
#   2. build only libmqc_ops_cuda.so, for this GPU's architecture alone (nvidia-smi compute_cap, 9.0 -> sm_90a),
#      with CMake against $MQC_ORT_INCLUDE_DIR (default: the carried folder above). Without those headers, or when
#      CMake fails, nvcc compiles the CUDA kernels and their mqc_cuda_* C entry points alone, which is all the
#      benchmark calls (that library has no onnxruntime ops: a fallback, said so in the log);
#   3. python benchmarks/bench_runtime_ops.py --gpu --repeat $MQC_GPU_REPEAT with MQC_RUNTIME_OPS_DIR on the fresh
#      build: every kernel checked against float64 and timed against torch's fp16 matmul.
# Outputs: $OUT/gpu_check.log (everything) and $OUT/gpu_tables.md (the markdown tables; when the benchmark does not
# finish, the rows it printed). Exit status: the benchmark's (1: a correctness check failed) or the failed step's.
#
# Duration measured on an H200 (session 17, nine runs): 27 to 38 s in all: configure 4 s, build 14-19 s (16 cores),
# benchmark 15-19 s at the default 50 repeats (201 checks). The 330 s budget caps a slower machine or a hang.
#
# Environment: OUT, MQC_ORT_INCLUDE_DIR, MQC_CUDA_ARCHS (skips the detection, e.g. 90a), MQC_GPU_REPEAT (default
# 50), MQC_GPU_BUILD_DIR (default build/gpu_check, kept between calls on a warm machine), PYTHON.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/out/gpu}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
TABLES=$OUT/gpu_tables.md
BUILD_DIR=${MQC_GPU_BUILD_DIR:-$ROOT/build/gpu_check}
ORT_INC=${MQC_ORT_INCLUDE_DIR:-$ROOT/build/ort-headers/root/usr/include/onnxruntime}
REPEAT=${MQC_GPU_REPEAT:-50}
PY=${PYTHON:-$(command -v python3 || command -v python)}
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
BUDGET_S=330
START_S=$SECONDS

# run_step CAP_S CMD...: CMD under timeout, at most CAP_S seconds and never past the script's budget.
run_step() {
  local cap=$1 left
  shift
  left=$((BUDGET_S - (SECONDS - START_S)))
  ((left < cap)) && cap=$left
  if ((cap < 5)); then
    echo "[gpu_check] budget spent, not running: $*"
    return 124
  fi
  echo "[gpu_check] $(date -u +%H:%M:%S) (${cap} s max) $*"
  timeout -k 5 "$cap" "$@"
}

detect_arch() {
  local cap=""
  cap=$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .\r') || true
  if [[ ! $cap =~ ^[0-9]+$ ]]; then
    cap=$(timeout 60 "$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null) || true
  fi
  case $cap in
    90) echo 90a ;;                 # H100 / H200: the arch-specific target, as the default build list has it
    '' | *[!0-9]*) echo 90a ;;      # detection failed: assume Hopper
    *) echo "$cap" ;;
  esac
}

build_cmake() {
  local generator=()
  if [[ ! -f $ORT_INC/onnxruntime_cxx_api.h ]]; then
    echo "[gpu_check] no onnxruntime headers in '$ORT_INC' (carry build/ort-headers/root/usr/include/onnxruntime)"
    return 1
  fi
  command -v cmake >/dev/null || { echo "[gpu_check] cmake not found"; return 1; }
  command -v ninja >/dev/null && [[ ! -f $BUILD_DIR/CMakeCache.txt ]] && generator=(-G Ninja)
  run_step 90 cmake -S runtime_ops -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
    -DMQC_ORT_INCLUDE_DIR="$(cd "$ORT_INC" && pwd)" -DMQC_CUDA_ARCHS="$ARCH" -DCMAKE_CUDA_COMPILER="$NVCC" &&
    run_step 150 cmake --build "$BUILD_DIR" --target mqc_ops_cuda -j "$(nproc)" &&
    [[ -f $BUILD_DIR/libmqc_ops_cuda.so ]] && LIB_DIR=$BUILD_DIR
}

# The kernels, the shared validators and the mqc_cuda_* entry points only (no onnxruntime header): enough for the
# benchmark.
build_nvcc_only() {
  mkdir -p "$BUILD_DIR/nvcc_only"
  run_step 150 "$NVCC" -shared -Xcompiler -fPIC -std=c++17 -O3 --expt-relaxed-constexpr -Xptxas=-O3 \
    -arch="sm_${ARCH%%;*}" -I runtime_ops/src runtime_ops/src/cuda/quant_linear.cu runtime_ops/src/cuda/hadamard.cu \
    runtime_ops/src/cuda/norm_quant.cu runtime_ops/src/cuda/c_api.cu runtime_ops/src/validate.cc \
    -o "$BUILD_DIR/nvcc_only/libmqc_ops_cuda.so" &&
    LIB_DIR=$BUILD_DIR/nvcc_only
}

main() {
  local rc=0 bench_out
  echo "[gpu_check] tree $ROOT, results in $OUT, repeat $REPEAT, python $PY"
  if git rev-parse HEAD 2>/dev/null; then git status --short 2>/dev/null | head -n 20 || true; else echo "(no git metadata)"; fi
  run_step 20 nvidia-smi || echo "[gpu_check] nvidia-smi failed (rc $?)"
  run_step 10 "$NVCC" --version || echo "[gpu_check] nvcc failed (rc $?)"
  run_step 10 cmake --version || echo "[gpu_check] cmake failed (rc $?)"
  ARCH=${MQC_CUDA_ARCHS:-$(detect_arch)}
  echo "[gpu_check] CUDA architecture: sm_$ARCH"

  LIB_DIR=""
  local t0=$SECONDS
  if ! build_cmake; then
    echo "[gpu_check] CMake build failed or impossible: FALLBACK to nvcc on the CUDA sources alone"
    build_nvcc_only || { echo "[gpu_check] the nvcc build failed too"; return 2; }
  fi
  echo "[gpu_check] built $LIB_DIR/libmqc_ops_cuda.so in $((SECONDS - t0)) s"

  bench_out=$BUILD_DIR/bench_output.txt
  rm -f "$TABLES"
  t0=$SECONDS
  export MQC_RUNTIME_OPS_DIR=$LIB_DIR  # library_path() looks here first
  run_step 300 "$PY" -u benchmarks/bench_runtime_ops.py --gpu --repeat "$REPEAT" \
    --tables "$TABLES" 2>&1 | tee "$bench_out" || rc=${PIPESTATUS[0]}
  echo "[gpu_check] benchmark exit status $rc after $((SECONDS - t0)) s"
  if [[ ! -s $TABLES ]]; then
    { echo "Partial: the benchmark did not finish (exit status $rc); the rows it printed, columns as in run_gpu:"
      echo
      grep -E '^\|' "$bench_out" || true; } >"$TABLES"
  fi
  echo "[gpu_check] total $((SECONDS - START_S)) s; tables in $TABLES"
  return "$rc"
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
