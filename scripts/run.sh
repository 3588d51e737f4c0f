#!/usr/bin/env bash
# The README's run command: set-up (Debian packages, default model), build,
# then `kiln serve` in the foreground with its defaults: gRPC on
# 127.0.0.1:50051, Prometheus metrics on http://127.0.0.1:9464/metrics.
# Ctrl-C (SIGINT) or SIGTERM drains and exits.
#
# Extra arguments go to `kiln serve`, e.g. scripts/run.sh --port=50052 --threads=4
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${KILN_BUILD_DIR:-$root/build}"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" >&2
exec "$build/bin/kiln" serve --model="$root/models/all-MiniLM-L6-v2" "$@"
