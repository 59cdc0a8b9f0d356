#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs packages (idempotent), configures,
# builds and runs ctest. Extra arguments go to ctest (e.g. `launch/test.sh -L gpu`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

bash launch/install-deps.sh

build_dir="${TANDEM_BUILD_DIR:-build}"
jobs="$(nproc)"
export CCACHE_DIR="${CCACHE_DIR:-${HOME:-/root}/.cache/ccache}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${TANDEM_CMAKE_ARGS:-}
cmake --build "$build_dir" -j "$jobs"
cd "$build_dir"
ctest --output-on-failure -j "$jobs" "$@"
