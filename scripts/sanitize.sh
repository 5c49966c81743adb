#!/usr/bin/env bash
# Builds the C++ engine with ThreadSanitizer (build-tsan/) and with AddressSanitizer+UBSan
# (build-asan/), warnings as errors, and runs its tests (ctest: semantics, concurrency, and a
# fuzz test of >= 10^5 random API calls) under each. Exits non-zero on any report.
#
#   scripts/sanitize.sh            # both
#   scripts/sanitize.sh thread     # one of: thread, address
#
# Env: JOBS (parallel compile jobs, default nproc), RSTAR_FUZZ_CALLS (default 120000).
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS=${JOBS:-$(nproc)}
export RSTAR_FUZZ_CALLS=${RSTAR_FUZZ_CALLS:-120000}
# halt_on_error: the first report fails the run (non-zero exit), so CI cannot miss one.
export TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 ${TSAN_OPTIONS:-}"
export ASAN_OPTIONS="halt_on_error=1 abort_on_error=1 detect_leaks=1 strict_string_checks=1 ${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1 ${UBSAN_OPTIONS:-}"

GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

sanitizers=("${@:-thread address}")
for san in ${sanitizers[@]}; do
  case "$san" in
    thread) dir=build-tsan ;;
    address) dir=build-asan ;;
    *) echo "unknown sanitizer '$san' (thread, address)" >&2; exit 2 ;;
  esac
  echo "== $san: configure + build ($dir)"
  start=$SECONDS
  cmake -S . -B "$dir" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Debug -DRSTAR_BUILD_PYTHON=OFF \
    -DRSTAR_BUILD_TESTS=ON -DRSTAR_SANITIZE="$san" -DRSTAR_WERROR=ON >/dev/null
  cmake --build "$dir" -j "$JOBS"
  echo "== $san: ctest"
  (cd "$dir" && ctest --output-on-failure --timeout 3000)
  echo "== $san: clean ($((SECONDS - start)) s)"
done
