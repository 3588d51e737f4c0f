#!/usr/bin/env bash
# Idempotent set-up: installs the Debian packages the build needs when they are
# missing, then fetches the default model. Safe to run again and again.
#
# Usage: scripts/setup.sh [--no-model]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

packages=(
  build-essential cmake pkg-config ccache git
  libabsl-dev libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  prometheus-cpp-dev libgtest-dev libgmock-dev
  libopenblas-openmp-dev libutf8proc-dev nlohmann-json3-dev libssl-dev
  python3 python3-pip
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >&2
fi

if [[ "${1:-}" != "--no-model" ]]; then
  "$root/scripts/fetch_model.sh"
fi
