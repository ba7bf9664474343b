#!/usr/bin/env bash
# First minutes on a machine with an NVIDIA GPU (issue 20): install a CUDA build of torch, build the
# extension with the CUDA kernels (WAGLE_CUDA=1), run the GPU tests (pytest -m cuda) and the GPU
# benches (bench/*.py --device cuda), and print one summary table. Every step logs to $LOG_DIR.
#
# Usage: tools/gpu_first_run.sh                 (from anywhere; works in the repository root)
# Env:   TORCH_VERSION   torch version to install (default 2.13.0, the version CI pins)
#        CUDA_TAG        wheel flavour on the PyTorch index (default cu130; e.g. cu128, cu126)
#        TORCH_INDEX     index URL (default https://download.pytorch.org/whl/$CUDA_TAG)
#        WHEEL_DIR       install offline from this folder of wheels instead (pip --no-index);
#                        needed where the GPU machine cannot reach the internet
#        VENV            virtual environment to create/use (default .venv-gpu; reused if its torch is
#                        already torch==$TORCH_VERSION with CUDA)
#        PYTHON          interpreter for a new venv (default python3)
#        LOG_DIR         logs (default gpu-first-run-logs/<date-time>)
#        BENCH_TIMEOUT   seconds per bench (default 900)
#        SKIP_INSTALL=1  use the interpreter $PYTHON as it is (no venv, no pip)
# Exit:  0 when the build, the GPU tests and every bench passed; 1 otherwise (the table says which).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
CUDA_TAG="${CUDA_TAG:-cu130}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/${CUDA_TAG}}"
WHEEL_DIR="${WHEEL_DIR:-}"
VENV="${VENV:-$ROOT/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
LOG_DIR="${LOG_DIR:-$ROOT/gpu-first-run-logs/$(date +%Y%m%d-%H%M%S)}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-900}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
mkdir -p "$LOG_DIR"

STEPS=()     # "name|status|seconds|detail|log" rows of the summary
FAILED=0

# run_step NAME LOGFILE CMD... : runs CMD with output to LOGFILE, records status and time; never exits.
run_step() {
  local name="$1" log="$2" start end rc
  shift 2
  echo "== $name (log: $log)"
  start=$(date +%s)
  if "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
  end=$(date +%s)
  local status="ok"
  if [ "$rc" -ne 0 ]; then
    status="FAIL($rc)"
    [ "$rc" -eq 124 ] && status="TIMEOUT"
    FAILED=1
    tail -n 20 "$log" | sed 's/^/   | /'
  fi
  STEPS+=("$name|$status|$((end - start))|${STEP_DETAIL:-}|$log")
  STEP_DETAIL=""
  return 0
}

summary() {
  echo
  echo "================================ gpu_first_run summary ================================"
  printf '%-34s %-10s %7s  %s\n' "step" "status" "seconds" "detail"
  printf '%-34s %-10s %7s  %s\n' "----" "------" "-------" "------"
  local row name status secs detail log
  for row in "${STEPS[@]}"; do
    IFS='|' read -r name status secs detail log <<<"$row"
    printf '%-34s %-10s %7s  %s\n' "$name" "$status" "$secs" "$detail"
  done
  echo "logs: $LOG_DIR"
  echo "========================================================================================"
}
trap summary EXIT

# ---- 0. the machine ------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_first_run: nvidia-smi not found: this machine has no NVIDIA driver" >&2
  STEPS+=("preflight|FAIL|0|no nvidia-smi|-")
  exit 1
fi
run_step "preflight: nvidia-smi" "$LOG_DIR/00-nvidia-smi.log" nvidia-smi
NVCC_BIN="$(command -v nvcc || true)"
if [ -z "$NVCC_BIN" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
  NVCC_BIN="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
fi
if [ -z "$NVCC_BIN" ]; then
  echo "gpu_first_run: nvcc not found (set CUDA_HOME or put nvcc on PATH): the CUDA kernels cannot be built" >&2
  STEPS+=("preflight: nvcc|FAIL|0|no nvcc|-")
  exit 1
fi
export CUDA_HOME="${CUDA_HOME:-$(cd "$(dirname "$NVCC_BIN")/.." && pwd)}"
STEP_DETAIL="$("$NVCC_BIN" --version | tail -1)"
run_step "preflight: nvcc" "$LOG_DIR/01-nvcc.log" "$NVCC_BIN" --version

# ---- 1. a CUDA torch -----------------------------------------------------------------------------
if [ "$SKIP_INSTALL" = "1" ]; then
  PY="$PYTHON"
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  PY="$VENV/bin/python"
  have="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0], torch.version.cuda)' 2>/dev/null || true)"
  if [ "${have%% *}" = "$TORCH_VERSION" ] && [ "${have##* }" != "None" ]; then
    STEP_DETAIL="already torch $have"
    run_step "install: torch (kept)" "$LOG_DIR/10-torch.log" true
  elif [ -n "$WHEEL_DIR" ]; then
    STEP_DETAIL="offline from $WHEEL_DIR"
    run_step "install: torch==$TORCH_VERSION" "$LOG_DIR/10-torch.log" \
      "$PY" -m pip install --no-index --find-links "$WHEEL_DIR" "torch==$TORCH_VERSION"
  else
    STEP_DETAIL="$TORCH_INDEX"
    run_step "install: torch==$TORCH_VERSION" "$LOG_DIR/10-torch.log" \
      "$PY" -m pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"
  fi
  # Test dependencies (pinned by requirements/test.lock; torch itself is not in it).
  if [ -n "$WHEEL_DIR" ]; then
    run_step "install: test deps" "$LOG_DIR/11-deps.log" \
      "$PY" -m pip install --no-index --find-links "$WHEEL_DIR" -r requirements/test.txt -c requirements/test.lock
  else
    run_step "install: test deps" "$LOG_DIR/11-deps.log" \
      "$PY" -m pip install -r requirements/test.txt -c requirements/test.lock
  fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' \
    >"$LOG_DIR/12-torch-check.log" 2>&1; then
  STEP_DETAIL="torch.version.cuda / cuda.is_available() false"
  STEPS+=("check: CUDA torch|FAIL|0|$STEP_DETAIL|$LOG_DIR/12-torch-check.log")
  exit 1
fi
ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
STEP_DETAIL="$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'), sm ${ARCH/./}"
run_step "check: CUDA torch" "$LOG_DIR/12-torch-check.log" "$PY" -c 'import torch; print(torch.__config__.show())'

# ---- 2. build with the CUDA kernels --------------------------------------------------------------
STEP_DETAIL="TORCH_CUDA_ARCH_LIST=$ARCH"
run_step "build: WAGLE_CUDA=1" "$LOG_DIR/20-build.log" \
  env WAGLE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PY" setup.py build_ext --inplace
BACKENDS="$("$PY" -c 'import wagle_ext; i = wagle_ext.backend_info(); print("cuda=%s cuda_default=%s" % (i["cuda"], i["cuda_default"]))' 2>&1 | tail -1)"
STEP_DETAIL="$BACKENDS"
run_step "check: CUDA back end loads" "$LOG_DIR/21-backend.log" \
  "$PY" -c 'import wagle_ext, sys; i = wagle_ext.backend_info(); print(i); sys.exit(0 if i["cuda"] else 1)'

# ---- 3. tests ------------------------------------------------------------------------------------
# The GPU tests, then the host-side contract and the compile check once more with this toolkit.
pytest_counts() {  # "N passed, M failed, ..." from a pytest log
  grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$1" | tail -1 | sed 's/=//g; s/^ *//; s/ in [0-9.]*s.*//' || true
}
run_step "pytest -m cuda" "$LOG_DIR/30-pytest-cuda.log" \
  env WAGLE_CUDA_SYNC_CHECKS=1 "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider tests
STEPS[-1]="$(echo "${STEPS[-1]}" | awk -F'|' -v d="$(pytest_counts "$LOG_DIR/30-pytest-cuda.log")" 'BEGIN{OFS="|"}{$4=d; print}')"
run_step "pytest -m cuda (no sync checks)" "$LOG_DIR/31-pytest-cuda-nosync.log" \
  "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider tests/test_cuda.py tests/test_masked_adamw_op.py \
  tests/test_gather_masked.py
STEPS[-1]="$(echo "${STEPS[-1]}" | awk -F'|' -v d="$(pytest_counts "$LOG_DIR/31-pytest-cuda-nosync.log")" 'BEGIN{OFS="|"}{$4=d; print}')"
run_step "pytest contract + compile" "$LOG_DIR/32-pytest-contract.log" \
  "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_cuda_contract.py tests/test_cuda_compile.py
STEPS[-1]="$(echo "${STEPS[-1]}" | awk -F'|' -v d="$(pytest_counts "$LOG_DIR/32-pytest-contract.log")" 'BEGIN{OFS="|"}{$4=d; print}')"

# ---- 4. benches on the GPU -----------------------------------------------------------------------
# bench_score / bench_select / bench_adamw run their GPU twins (bench/*_gpu.py) under --device cuda.
mkdir -p "$LOG_DIR/bench"
for b in bench_score bench_select bench_adamw; do
  run_step "bench: $b --device cuda" "$LOG_DIR/bench/$b.log" \
    timeout "$BENCH_TIMEOUT" "$PY" "bench/$b.py" --device cuda
  STEPS[-1]="$(echo "${STEPS[-1]}" | awk -F'|' -v d="$(tail -n 1 "$LOG_DIR/bench/$b.log" | cut -c1-60 | tr '|' '/')" 'BEGIN{OFS="|"}{$4=d; print}')"
done

exit "$FAILED"
