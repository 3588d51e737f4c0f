#!/usr/bin/env bash
# Configures and builds Kiln in build/ (Release). Extra arguments go to cmake's
# configure step, e.g. scripts/build.sh -DKILN_SANITIZE=address,undefined
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${KILN_BUILD_DIR:-$root/build}"
jobs="${KILN_JOBS:-$(nproc)}"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
cmake --build "$build" -j"$jobs"
