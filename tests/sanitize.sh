#!/usr/bin/env bash
# Build llama2c's extension with AddressSanitizer + UndefinedBehaviorSanitizer in a temporary
# copy of the repository (the normal build in the work tree is left alone) and run the
# engine-facing tests under it. Any ASan/UBSan report aborts the run and fails it.
#
#   bash tests/sanitize.sh                      # the default test files below
#   bash tests/sanitize.sh tests/test_fuzz.py   # or any pytest arguments
#   L2C_FUZZ_EXAMPLES=2000 bash tests/sanitize.sh tests/test_fuzz.py   # deeper fuzzing
#
# Needs gcc (libasan, libubsan) and the build requirements (Cython, numpy, setuptools).
set -euo pipefail

ROOT="${L2C_SANITIZE_SRC:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama2c-sanitize.XXXXXX")"
if [[ -z "${KEEP_SANITIZE_BUILD:-}" ]]; then trap 'rm -rf "$WORK"' EXIT; fi
START=$(date +%s)

# copy the sources (not .git, not the normal build's objects and extension)
tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude='./llama2c/_engine*.so' \
    --exclude='*.pyc' --exclude=./.pytest_cache -cf - . | tar -C "$WORK" -xf -
cd "$WORK"
echo "== building with LLAMA2C_SANITIZE=address,undefined in $WORK"
LLAMA2C_SANITIZE=address,undefined "$PYTHON" setup.py build_ext --inplace > build.log 2>&1 \
    || { tail -50 build.log; exit 1; }
BUILT=$(date +%s)
echo "   built in $((BUILT - START)) s"

ASAN_LIB="$(gcc -print-file-name=libasan.so)"
UBSAN_LIB="$(gcc -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
    [[ -e "$lib" ]] || { echo "sanitizer runtime $lib not found (install gcc's libasan/libubsan)"; exit 1; }
done
# Python itself leaks at exit, so leak checking is off; huge (corrupt-header) allocations
# must fail like malloc does (NULL -> MemoryError / L2C_ERR_NOMEM), not abort the process.
export LD_PRELOAD="$ASAN_LIB $UBSAN_LIB"
# reports go to files (pytest captures stderr, and an abort would lose them); shown below
mkdir -p "$WORK/sanitizer-logs"
export ASAN_OPTIONS="log_path=$WORK/sanitizer-logs/asan:detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:halt_on_error=1:strict_string_checks=1:check_initialization_order=1"
export UBSAN_OPTIONS="log_path=$WORK/sanitizer-logs/ubsan:halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
export LLAMA2C_TEST_DATA="${LLAMA2C_TEST_DATA:-$ROOT/../shared}"
export PYTHONFAULTHANDLER=1

if [[ $# -gt 0 ]]; then
    ARGS=("$@")
else
    ARGS=()
    for f in tests/test_kernels.py tests/test_engine*.py tests/test_bad_inputs.py \
             tests/test_fuzz.py tests/test_threads.py tests/test_build.py \
             tests/test_llama2c_bin.py tests/test_gguf.py tests/test_reference.py; do
        [[ -e "$f" ]] && ARGS+=("$f")
    done
fi
echo "== pytest under ASan+UBSan: ${ARGS[*]}"
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider "${ARGS[@]}"
RC=$?
set -e
for log in "$WORK"/sanitizer-logs/*; do
    [[ -e "$log" ]] || continue
    echo "== sanitizer report $log"; head -60 "$log"; RC=${RC/#0/1}
done
END=$(date +%s)
echo "== sanitize.sh: pytest exit $RC; build $((BUILT - START)) s, tests $((END - BUILT)) s, total $((END - START)) s"
exit $RC
