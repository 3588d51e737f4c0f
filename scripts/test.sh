#!/usr/bin/env bash
# The README's test command: set-up, configure, build, then every test.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${KILN_BUILD_DIR:-$root/build}"
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
cd "$build"
ctest --output-on-failure -j"${KILN_JOBS:-$(nproc)}"
