#!/usr/bin/env bash
# Configures and builds the release tree in build/ (after installing what the build needs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCONFLUX_WERROR=ON >/dev/null
cmake --build build -j"$(nproc)"
