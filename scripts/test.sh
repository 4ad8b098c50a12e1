#!/usr/bin/env bash
# Installs dependencies, builds, and runs the whole test suite with CTest; non-zero on any failure.
# CONFLUX_FUZZ_SECONDS=N also runs each fuzz target for N seconds (CI sets 60).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
if [ "${CONFLUX_FUZZ_SECONDS:-0}" -gt 0 ]; then
  scripts/fuzz.sh "${CONFLUX_FUZZ_SECONDS}"
fi
