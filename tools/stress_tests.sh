#!/usr/bin/env bash
# Run the statistical tests (outcome depends on training dynamics) under every CPU configuration
# CI machines may have, several seeds each, and print a configurations x tests x result summary.
#
#   bash tools/stress_tests.sh                 # or: make stress
#   STRESS_SEEDS="0 1 2 3 4" bash tools/stress_tests.sh      # calibration: 5 seeds
#   STRESS_TESTS="tests/test_trainer.py" STRESS_PYTEST_ARGS='-k "memorised or keeps"' bash tools/stress_tests.sh
#
# The first seed of each configuration runs the whole files; the other seeds run only the tests
# marked `statistical` (the ones whose fixtures read WAGLE_TEST_SEED; the rest do not depend on it).
# STRESS_ALL_SEEDS_FULL=1 runs the whole files for every seed.
#
# Axes (all values of each axis are covered):
#   ATEN_CPU_CAPABILITY  default | avx2 | avx512   (PyTorch's own CPU kernels)
#   WAGLE_CPU_ISA        default | avx2 | avx512   (our C++ kernels' SIMD path), set with ATEN's value
#   OMP_NUM_THREADS      1 | 2                     (conftest's pinned_threads honours it)
#   WAGLE_TEST_SEED      0 1 2                     (seeds of the statistical fixtures)
# A capability the CPU lacks is skipped with a note (PyTorch and our dispatch would fall back).
# Every statistic a bound checks is recorded (conftest's record_stat) into $STRESS_OUT/stats.jsonl;
# tools/calibrate_stats.py prints its min/max per test over all runs: the margins in docs/testing.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${STRESS_SEEDS:-"0 1 2"}
THREADS=${STRESS_THREADS:-"1 2"}
CAPS=${STRESS_CAPS:-"default avx2 avx512"}
TESTS=${STRESS_TESTS:-"tests/test_trainer.py tests/test_evaluation.py tests/test_objectives.py tests/test_cli.py tests/test_compact_grads.py tests/test_attacks.py"}
OUT=${STRESS_OUT:-build/stress}
mkdir -p "$OUT"
: > "$OUT/stats.jsonl"
: > "$OUT/summary.tsv"

have_cap() {  # does this CPU run the given ATen capability?
  case "$1" in
    default) return 0 ;;
    avx2) grep -qw avx2 /proc/cpuinfo ;;
    avx512) grep -qw avx512f /proc/cpuinfo && grep -qw avx512bw /proc/cpuinfo && grep -qw avx512vl /proc/cpuinfo ;;
  esac
}

eval "extra=(${STRESS_PYTEST_ARGS:-})"  # shell words: STRESS_PYTEST_ARGS='-k "a or b"' works
fail=0
start=$(date +%s)
for cap in $CAPS; do
  if ! have_cap "$cap"; then echo "skip: this CPU has no $cap"; continue; fi
  for threads in $THREADS; do
    first=1
    for seed in $SEEDS; do
      select=()
      if [ $first -eq 0 ] && [ "${STRESS_ALL_SEEDS_FULL:-0}" != 1 ]; then select=(-m statistical); fi
      first=0
      tag="cap=$cap threads=$threads seed=$seed${select:+ (statistical only)}"
      log="$OUT/cap-$cap.threads-$threads.seed-$seed.log"
      t0=$(date +%s)
      ATEN_CPU_CAPABILITY=$cap WAGLE_CPU_ISA=$cap OMP_NUM_THREADS=$threads WAGLE_TEST_SEED=$seed \
        WAGLE_STATS_FILE="$OUT/stats.jsonl" \
        "$PY" -m pytest -q -p no:cacheprovider $TESTS "${select[@]}" "${extra[@]}" >"$log" 2>&1
      rc=$?
      result=$(grep -E '^=* ?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)|(passed|failed).* in [0-9.]+s' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
      printf '%s\t%s\t%s\t%ss\n' "$tag" "$rc" "$result" "$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.tsv"
      if [ "$rc" -ne 0 ]; then
        fail=1
        grep -E '^(FAILED|ERROR)' "$log" | sed 's/^/    /'
      fi
    done
  done
done
echo
echo "== stress summary ($(( $(date +%s) - start ))s; logs in $OUT) =="
printf 'configuration\trc\tresult\ttime\n'
cat "$OUT/summary.tsv"
echo
"$PY" tools/calibrate_stats.py "$OUT/stats.jsonl"
exit $fail
