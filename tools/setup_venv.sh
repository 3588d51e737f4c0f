#!/usr/bin/env bash
# Makes the offline Python environment used to produce reference fixtures and
# run benchmarks (tools/, bench/). CI never needs it: fixtures are committed.
#
# Debian's python3-torch runs only under Debian's own interpreter, so the venv
# is made by /usr/bin/python3 with --system-site-packages and then checked to
# import that torch (PyPI's torch would pull gigabytes of CUDA wheels).
#
# Usage: tools/setup_venv.sh            (idempotent; prints the venv path)
# Env:   KILN_VENV (default .venv at the repository root)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${KILN_VENV:-$root/.venv}"

need=()
for pkg in python3-torch python3-venv python3-numpy; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  echo "setup_venv: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi

if [[ ! -x "$venv/bin/python" ]]; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.kiln-requirements"
# transformers 4.46 is the last line that supports torch 1.13 (Debian's torch
# reports 1.13.0a0); tokenizers is pinned to the range it accepts; accelerate
# 1.0 still accepts torch >= 1.10 (later lines want torch 2).
reqs="transformers==4.46.3 tokenizers==0.20.3 safetensors huggingface_hub<1.0 onnx==1.17.0 onnxruntime==1.20.1 accelerate==1.0.1 regex requests tqdm pyyaml filelock packaging"
# peft (LoRA brick fixtures) declares torch>=1.13.0, which pip reads as
# excluding 1.13.0a0 and answers by pulling PyPI's torch; its other
# dependencies are all in $reqs, so it goes in without dependency resolution.
nodeps="peft==0.13.2"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$reqs; $nodeps" ]]; then
  # shellcheck disable=SC2086
  "$py" -m pip install -q --disable-pip-version-check $reqs >&2
  # shellcheck disable=SC2086
  "$py" -m pip install -q --disable-pip-version-check --no-deps $nodeps >&2
  echo "$reqs; $nodeps" >"$stamp"
fi
"$py" - <<'PY'
import sys, torch
import peft  # noqa: F401  (fails here, not in a fixture script, if its deps are off)
if not torch.__file__.startswith("/usr/lib/python3/dist-packages/"):
    sys.exit(f"setup_venv: torch comes from {torch.__file__}, not Debian's python3-torch")
PY
echo "$venv"
