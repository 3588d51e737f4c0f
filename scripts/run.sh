#!/usr/bin/env bash
# The README's run command: set-up (Debian packages, default model), build,
# then `kiln serve` in the foreground with its defaults: gRPC on
# 127.0.0.1:50051, Prometheus metrics on http://127.0.0.1:9464/metrics, the
# committed bricks of deploy/bricks/ (BrickAdmin on 127.0.0.1:50052).
# Ctrl-C (SIGINT) or SIGTERM drains and exits.
#
# Extra arguments go to `kiln serve` (later flags win), e.g.
#   scripts/run.sh --port=50060 --threads=4 --brick_dir=/srv/bricks
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${KILN_BUILD_DIR:-$root/build}"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" >&2
bricks=()
[[ -d "$root/deploy/bricks" ]] && bricks=(--brick_dir="$root/deploy/bricks")
exec "$build/bin/kiln" serve --model="$root/models/all-MiniLM-L6-v2" "${bricks[@]}" "$@"
