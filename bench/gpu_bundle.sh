#!/usr/bin/env bash
# Prepares build/device/ for bench/gpu.sh, here (the device machine has CUDA,
# CMake and PyTorch but none of Debian's gRPC, abseil, OpenBLAS or GoogleTest,
# and reaches no registry):
#
#   bundle.tar.xz  the GPU test and benchmark binaries and the CUDA plugin
#                  (libkiln_cuda.so, found through the loader's path) with every shared
#                  library they load (ldd closure, glibc and its loader
#                  included, so they run whatever the device's distribution),
#                  except the CUDA driver and cuBLAS, which are the device's
#                  own (cuBLAS alone is ~600 MB; kiln loads it at run time and
#                  gpu.sh checks that the device has it)
#   model-f16/     the default model with its weights stored as fp16 (45 MB
#                  instead of 90: the device call carries at most 64 MiB);
#                  the engine reads F16 into fp32. tests/engine/model/
#                  device_parity_test.cc measures what this costs against the
#                  fp32 fixture on the CPU too, so the GPU figures can be read
#                  net of it.
#   texts.txt      the 512 benchmark texts (bench/make_bench_texts.py)
#
# Usage: bench/gpu_bundle.sh   (after scripts/build.sh, with KILN_CUDA on)
# Then:  device run, carry ["build/device"], command "bench/gpu.sh"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${BUILD_DIR:-build}"
dev="$build/device"
model="models/all-MiniLM-L6-v2"

bins=("$build/bin/kiln_bench_device" "$build/tests/backend_ops_test"
      "$build/tests/device_test" "$build/tests/device_parity_test" "$build/tests/expert_ffn_ops_test")
for b in "${bins[@]}"; do
  [[ -x "$b" ]] || { echo "gpu_bundle: $b is missing: build first (scripts/build.sh)" >&2; exit 2; }
done

plugin="$build/lib/libkiln_cuda.so"
if [[ ! -f "$plugin" ]]; then
  echo "gpu_bundle: $build was built without the CUDA backend (KILN_CUDA=OFF or no nvcc)" >&2
  exit 2
fi
rm -rf "$dev" && mkdir -p "$dev"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib"
for b in "${bins[@]}"; do
  cp "$b" "$stage/bin/" && strip --strip-unneeded "$stage/bin/$(basename "$b")"
done
cp "$plugin" "$stage/lib/" && strip --strip-unneeded "$stage/lib/libkiln_cuda.so"
# Every library the binaries and the CUDA plugin load, but not the GPU
# driver's or the toolkit's.
for b in "${bins[@]}" "$plugin"; do ldd "$b"; done |
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u |
  grep -Ev '/(libcuda|libcublas|libcublasLt|libcudart|libnvidia)[.-]' |
  while read -r lib; do cp -L "$lib" "$stage/lib/"; done
tar -C "$stage" -cJf "$dev/bundle.tar.xz" bin lib

mkdir -p "$dev/model-f16"
cp -r "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt,modules.json,sentence_bert_config.json,1_Pooling} "$dev/model-f16/"
.venv/bin/python - "$model/model.safetensors" "$dev/model-f16/model.safetensors" <<'PY'
import sys
import numpy as np
from safetensors.numpy import load_file, save_file
tensors = load_file(sys.argv[1])
save_file({k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()},
          sys.argv[2])
PY
[[ -f bench/out/texts.txt ]] || .venv/bin/python bench/make_bench_texts.py bench/out/texts.txt --model "$model"
cp bench/out/texts.txt "$dev/texts.txt"
du -sh "$dev" "$dev"/*
