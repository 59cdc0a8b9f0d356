#!/usr/bin/env bash
# Installs the build tree into a scratch prefix, then configures, builds and runs an outside
# project (tests/install/consumer) against it with find_package(Tandem).
#   install_test.sh SOURCE_DIR BUILD_DIR
set -euo pipefail
src="$1"
build="$2"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/tandem_install_test.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
test -x "$scratch/prefix/bin/tandem"
test -f "$scratch/prefix/include/tandem/runtime/transformer.h"
test -f "$scratch/prefix/lib/cmake/Tandem/TandemConfig.cmake"
"$scratch/prefix/bin/tandem" --version
cmake -S "$src/tests/install/consumer" -B "$scratch/consumer" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$scratch/prefix" >/dev/null
cmake --build "$scratch/consumer" >/dev/null
"$scratch/consumer/consumer"
