#!/usr/bin/env bash
# Compile-check every torch-free CUDA source (csrc/cuda/*.cu) for sm_80 and sm_90 with the
# machine's nvcc, warnings as errors, into a temporary directory (nothing is kept). This is how
# CUDA code is checked on CPU-only machines (docs/kernels.md 7.4); csrc/cuda/bindings.cpp includes
# torch CUDA headers and is only built in CUDA builds (setup.py, WAGLE_CUDA).
#
# Usage: tools/check_cuda_compile.sh [file.cu ...]      (default: all of csrc/cuda/*.cu)
# Env:   NVCC (default: nvcc on PATH), JOBS (parallel files, default 2), PYTHON (a python with
#        torch, default python3; used for the bindings syntax check below), CXX (default g++).
#
# With no file arguments it also syntax-checks csrc/cuda/bindings.cpp (g++ -fsyntax-only, -Wall
# -Wextra -Werror on our code) against the installed torch's headers: a CPU torch wheel ships the
# ATen/c10 CUDA headers but not the cuBLAS/cuSPARSE/cuSOLVER headers or c10's generated CUDA macros
# they include, so tiny stubs declaring only the opaque handle types are put on the include path.
# This catches type and signature errors in the launchers; it cannot link or run them.
# Exit:  0 all compiled; 1 a file failed; 77 nvcc not found (the "skipped" code of automake).
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
JOBS="${JOBS:-2}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: SKIPPED: '$NVCC' not found on PATH (install the CUDA toolkit or the" \
       "nvidia-cuda-nvcc/-runtime/-cccl wheels and put nvcc on PATH)" >&2
  exit 77
fi
if [ "$#" -gt 0 ]; then files=("$@"); else files=("$ROOT"/csrc/cuda/*.cu); fi
if [ ! -e "${files[0]}" ]; then
  echo "check_cuda_compile: no .cu files found" >&2
  exit 1
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# Both architectures in one nvcc call per file (one front-end pass); files run JOBS at a time.
FLAGS=(-std=c++17 -O3 -Werror all-warnings -Xcompiler -Wall,-Werror
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 -I "$ROOT/csrc")
echo "check_cuda_compile: $("$NVCC" --version | tail -1)"
compile_one() {
  local f="$1" out log start
  out="$TMP/$(basename "$f").o"
  log="$TMP/$(basename "$f").log"
  start=$(date +%s%N)
  if "$NVCC" "${FLAGS[@]}" -c "$f" -o "$out" >"$log" 2>&1; then
    local ms=$(( ($(date +%s%N) - start) / 1000000 ))
    printf 'check_cuda_compile: ok   %-28s %d.%01d s\n' "$(basename "$f")" $((ms / 1000)) $(((ms % 1000) / 100))
  else
    printf 'check_cuda_compile: FAIL %s\n' "$f"
    cat "$log"
    return 1
  fi
}
status=0
pids=()
for f in "${files[@]}"; do
  compile_one "$f" &
  pids+=($!)
  if [ "${#pids[@]}" -ge "$JOBS" ]; then
    wait "${pids[0]}" || status=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" -eq 0 ] && echo "check_cuda_compile: all ${#files[@]} files compiled for sm_80 + sm_90"

if [ "$#" -eq 0 ] && [ -f "$ROOT/csrc/cuda/bindings.cpp" ]; then
  PYTHON="${PYTHON:-python3}"
  TORCH_INC="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' 2>/dev/null)"
  CUDA_INC="$(dirname "$(command -v "$NVCC")")/../include"
  [ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC="${CUDA_HOME:-/usr/local/cuda}/include"
  if [ -z "$TORCH_INC" ] || [ ! -d "$TORCH_INC/ATen/cuda" ] || [ ! -f "$CUDA_INC/cuda_runtime.h" ]; then
    echo "check_cuda_compile: bindings.cpp syntax check SKIPPED (no torch headers via '$PYTHON' or no cuda_runtime.h)"
  else
    STUB="$TMP/stub"
    mkdir -p "$STUB/c10/cuda/impl"
    echo '#pragma once' >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
    printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' >"$STUB/cusparse.h"
    printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' >"$STUB/cublas_v2.h"
    printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' >"$STUB/cublasLt.h"
    printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\n' >"$STUB/cusolverDn.h"
    printf '#pragma once\ntypedef int cusolverStatus_t;\n' >"$STUB/cusolver_common.h"
    start=$(date +%s%N)
    # A real CUDA toolkit's headers (if present) win over the stubs: stubs come last.
    if "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -Wextra -Werror -isystem "$CUDA_INC" \
        -isystem "$TORCH_INC" -isystem "$TORCH_INC/torch/csrc/api/include" -isystem "$STUB" \
        -I "$ROOT/csrc" "$ROOT/csrc/cuda/bindings.cpp" >"$TMP/bindings.log" 2>&1; then
      ms=$(( ($(date +%s%N) - start) / 1000000 ))
      printf 'check_cuda_compile: ok   %-28s %d.%01d s (syntax only, stubbed CUDA library headers)\n' \
        bindings.cpp $((ms / 1000)) $(((ms % 1000) / 100))
    else
      echo "check_cuda_compile: FAIL csrc/cuda/bindings.cpp (syntax check)"
      cat "$TMP/bindings.log"
      status=1
    fi
  fi
fi
exit "$status"
