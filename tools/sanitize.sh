#!/usr/bin/env bash
# Build the C++ extension with AddressSanitizer + UndefinedBehaviorSanitizer (setup.py,
# WAGLE_SANITIZE=1: -fsanitize=address,undefined -fno-omit-frame-pointer -g -O1) OUT OF TREE, and
# run the C++ op tests against it. The in-tree wagle_ext/_C.abi3.so of the editable install is not
# touched: the sanitized package is assembled under build/sanitize/lib (a copy of wagle_ext/'s
# Python files plus the sanitized _C.abi3.so) and put first on PYTHONPATH for the test run.
#
# Usage: tools/sanitize.sh [extra pytest args]        (or `make sanitize PYTEST_ARGS=...`)
# Env:   PYTHON   python with torch + pytest (default .venv/bin/python)
#        MAX_JOBS compile jobs (default 2)
#        SANITIZE_TESTS  test files/ids to run (default: the five C++ op test modules below)
#        SANITIZE_SKIP_BUILD=1  reuse build/sanitize/lib as it is
#
# Why LD_PRELOAD: the ASan runtime must be the first library in the process, so that it interposes
# malloc/free/memcpy/... before anything else is loaded; python itself is not sanitized, and
# dlopen()ing a sanitized _C.so into it fails with "ASan runtime does not come first in initial
# library list" (the process aborts). Preloading libasan.so fixes that without rebuilding python
# or torch; libubsan.so (-fsanitize=undefined links the extension against it) would otherwise come in
# as a dependency of the .so and works either way, it is preloaded too so both runtimes start first. Only our code is
# instrumented; torch's and python's heap blocks are still tracked by the interposed allocator, so
# an out-of-bounds access by our kernels past the end of a tensor's storage is caught.
#
# Exit status is pytest's: any ASan report aborts the process (abort_on_error / halt_on_error), and
# the test run fails. Suppressions: tools/sanitizers/*.supp (third-party frames only, explained
# there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="$ROOT/build/sanitize"
LIB="$OUT/lib"
SUPP="$ROOT/tools/sanitizers"
# shellcheck disable=SC2206  # word splitting intended
TESTS=(${SANITIZE_TESTS:-tests/test_attribution_score.py tests/test_select_topk.py tests/test_bits.py
       tests/test_masked_adamw_op.py tests/test_gather_masked.py})

CXX_FOR_RT="${CXX:-g++}"
ASAN_RT="$("$CXX_FOR_RT" -print-file-name=libasan.so)"
UBSAN_RT="$("$CXX_FOR_RT" -print-file-name=libubsan.so)"
for rt in "$ASAN_RT" "$UBSAN_RT"; do
  if [ ! -e "$rt" ]; then
    echo "sanitize: $rt not found (install the compiler's libasan/libubsan, e.g. libgcc-12-dev)" >&2
    exit 1
  fi
done
# Resolve the linker-script/symlink to the real shared object for LD_PRELOAD.
ASAN_RT="$(readlink -f "$ASAN_RT")"
UBSAN_RT="$(readlink -f "$UBSAN_RT")"

t0=$(date +%s)
if [ "${SANITIZE_SKIP_BUILD:-0}" != "1" ]; then
  echo "sanitize: building the ASan+UBSan extension into $LIB"
  mkdir -p "$LIB" "$OUT/tmp"
  # build_ext without --inplace writes only to --build-lib; the source tree's .so is untouched.
  WAGLE_SANITIZE=1 WAGLE_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext \
    --build-lib "$LIB" --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1 \
    || { tail -50 "$OUT/build.log" >&2; echo "sanitize: build failed ($OUT/build.log)" >&2; exit 1; }
fi
# The Python side: a fresh copy of the package, minus any in-tree extension and caches.
mkdir -p "$LIB/wagle_ext"
find "$LIB/wagle_ext" -type f ! -name '_C*.so' -delete
(cd "$ROOT/wagle_ext" && find . -name __pycache__ -prune -o -type f ! -name '*.so' -print0 |
  xargs -0 cp --parents -t "$LIB/wagle_ext")
SO="$(ls "$LIB"/wagle_ext/_C*.so)"
if ! readelf -d "$SO" | grep -q 'libasan'; then
  echo "sanitize: $SO is not linked against libasan (stale build? rm -rf $OUT)" >&2
  exit 1
fi
t1=$(date +%s)
echo "sanitize: build $((t1 - t0)) s; extension $SO"

# A pytest plugin that refuses to run unless the sanitized package and .so are the ones loaded.
cat >"$LIB/_wagle_sanitize_check.py" <<EOF
import os


def pytest_configure(config):
    import wagle_ext
    from wagle_ext import ops
    want = os.path.realpath("$LIB/wagle_ext")
    got = os.path.dirname(os.path.realpath(wagle_ext.__file__))
    assert got == want, f"sanitize: imported wagle_ext from {got}, not {want}"
    assert ops.HAS_CPP, f"sanitize: C++ extension did not load: {ops._CPP_ERROR}"
    maps = open("/proc/self/maps").read()
    assert os.path.realpath("$SO") in maps, "sanitize: the sanitized _C .so is not mapped"
    assert "$ASAN_RT" in maps, "sanitize: libasan is not loaded"
    assert os.path.join(os.path.realpath("$ROOT"), "wagle_ext", "_C") not in maps, \\
        "sanitize: the in-tree (unsanitized) _C .so is mapped too"
    print(f"sanitize: wagle_ext from {got}; _C = {os.path.realpath('$SO')}")
EOF

# detect_leaks=0: CPython (interned objects, module state, arenas) and torch (static registries,
# the op library, thread pools) deliberately never free at exit, so LeakSanitizer would report
# thousands of "leaks" that are not ours. Leaks in our ops would show up as unbounded growth, not
# at exit; the extension allocates only through torch.
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
ASAN_OPTIONS+=":suppressions=$SUPP/asan.supp:print_suppressions=1"
ASAN_OPTIONS+=":check_initialization_order=1:detect_stack_use_after_return=1"
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:suppressions=$SUPP/ubsan.supp"
export ASAN_OPTIONS UBSAN_OPTIONS
export LD_PRELOAD="$ASAN_RT $UBSAN_RT${LD_PRELOAD:+ $LD_PRELOAD}"
export PYTHONPATH="$LIB${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
# Run pytest through a script in $LIB: a script's own directory (the sanitized package) becomes
# sys.path[0], whereas `python -m pytest` would put the cwd (and its in-tree wagle_ext) there.
# --capture=sys: pytest's default fd-level capture would swallow a sanitizer report (written to
# fd 2 by the runtime just before it aborts the process).
# The __main__ guard matters: mp.spawn children (test_select_topk's gloo test) re-import __main__.
printf 'import sys\nimport pytest\nif __name__ == "__main__":\n    sys.exit(pytest.main())\n' \
  >"$LIB/_wagle_pytest.py"
set +e
# Only our C++ is instrumented: the Triton (interpreter) and CUDA cases of the per-op modules add
# time and no coverage here, so they are deselected.
"$PY" "$LIB/_wagle_pytest.py" -p _wagle_sanitize_check -p no:cacheprovider --capture=sys -q \
  -m "not cuda" -k "not triton" "${TESTS[@]}" "$@"
rc=$?
set -e
t2=$(date +%s)
echo "sanitize: tests $((t2 - t1)) s (rc=$rc); total $((t2 - t0)) s"
exit $rc
