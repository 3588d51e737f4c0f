#!/usr/bin/env bash
# The README's run command: set-up, build, fetch the default model, start Kiln.
#
# Until the gRPC server lands (issue "Serving"), Kiln runs as `kiln embed`:
# type or pipe one text per line, get one JSON embedding per line.
# Extra arguments go to `kiln embed`, e.g. scripts/run.sh --exit=2
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${KILN_BUILD_DIR:-$root/build}"
"$root/scripts/setup.sh"
"$root/scripts/build.sh" >&2
echo "run: kiln embed --model=models/all-MiniLM-L6-v2 $* (one text per line on stdin)" >&2
exec "$build/bin/kiln" embed --model="$root/models/all-MiniLM-L6-v2" "$@"
