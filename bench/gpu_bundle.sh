#!/usr/bin/env bash
# Prepares build/device/ for bench/gpu.sh, here (the device machine has CUDA,
# CMake and PyTorch but none of Debian's gRPC, abseil, OpenBLAS or GoogleTest,
# and reaches no registry; one call carries at most 64 MiB, the repository's
# tracked files included):
#
#   bundle.tar.xz  the GPU test binaries, kiln_bench_device, the kiln server
#                  and the CUDA plugin (libkiln_cuda.so, found through
#                  $KILN_CUDA_PLUGIN) with every shared library they load (ldd
#                  closure, glibc and its loader included, so they run
#                  whatever the device's distribution), except the CUDA
#                  driver and cuBLAS, which are the device's own (cuBLAS alone
#                  is ~600 MB; kiln loads it at run time and gpu.sh checks
#                  that the device has it)
#   model.tar.xz   the default model with its weights stored as fp16 (the
#                  engine reads F16 into fp32) and the word-embedding rows of
#                  tokens that no device input uses set to zero, so that it
#                  packs to ~23 MB instead of 90: kept are ids 0-999 (the
#                  special and unused tokens) and every token of the parity
#                  fixture and of the bench texts. The rows kept are exact fp16
#                  copies, and device_parity_test feeds the fixture's own
#                  input_ids, so its fixture comparisons see exactly the fp16
#                  model (the other device tests compare GPU with CPU on one
#                  model, where the cut plays no part).
#                  tests/engine/model/device_parity_test.cc measures what fp16
#                  costs on the CPU too.
#   bricks/        for gpu_serve_check.py: ffn-e16/1 made anew for this model by
#                  `kiln bricks split-ffn` (a brick names its model's
#                  fingerprint, and fp16 weights are another file), and
#                  ffn-e16/2 (the shipped partition with its fill, served as
#                  the latest version) and the py-docstring and
#                  deb-description LoRA bricks with that fingerprint
#   py/            kiln_pb2 / kiln_pb2_grpc for gpu_serve_check.py (the device
#                  has grpcio and protobuf but not grpcio-tools)
#   texts.txt      the 512 benchmark texts (bench/make_bench_texts.py)
#
# Usage: bench/gpu_bundle.sh   (after scripts/build.sh, with KILN_CUDA on, and
#                               scripts/test.sh's e2e venv for the stubs)
# Then:  device run, carry ["build/device"], command "bench/gpu.sh"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${BUILD_DIR:-build}"
dev="$build/device"
model="models/all-MiniLM-L6-v2"

bins=("$build/bin/kiln" "$build/bin/kiln_bench_device" "$build/tests/device_test"
      "$build/tests/backend_ops_test" "$build/tests/star_ops_test" "$build/tests/expert_ffn_ops_test"
      "$build/tests/device_parity_test" "$build/tests/mose_parity_test")
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

[[ -f bench/out/texts.txt ]] || .venv/bin/python bench/make_bench_texts.py bench/out/texts.txt --model "$model"
cp bench/out/texts.txt "$dev/texts.txt"

m16="$stage/model"
mkdir -p "$m16"
cp -r "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt,modules.json,sentence_bert_config.json,1_Pooling} "$m16/"
.venv/bin/python - "$model" "$m16/model.safetensors" tests/engine/model/testdata/minilm_exits.json "$dev/texts.txt" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer
model, out, fixture, texts = sys.argv[1:]
keep = set(range(1000))
for ids in json.load(open(fixture))["input_ids"]:
    keep.update(ids)
tok = Tokenizer.from_file(model + "/tokenizer.json")
tok.no_truncation()
for enc in tok.encode_batch(open(texts, encoding="utf-8").read().splitlines()):
    keep.update(enc.ids)
tensors = load_file(model + "/model.safetensors")
half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()}
(name,) = [k for k in half if k.endswith("word_embeddings.weight")]
rows = half[name]
cut = np.setdiff1d(np.arange(rows.shape[0]), np.fromiter(keep, dtype=np.int64))
rows[cut] = 0
save_file(half, out)
print(f"gpu_bundle: {name}: kept {rows.shape[0] - len(cut)} of {rows.shape[0]} rows")
PY
tar -C "$stage" -cJf "$dev/model.tar.xz" model

# The bricks gpu_serve_check.py serves, for the fp16 model's fingerprint.
mkdir -p "$dev/bricks"
"$build/bin/kiln" bricks split-ffn --model="$m16" --experts=16 --out="$dev/bricks" >/dev/null
fp="$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["base_model"]["fingerprint"])' \
      "$dev/bricks/ffn-e16/1/brick.json")"
# ffn-e16/2: the shipped partition with its fill (the version served), so
# the served check runs the fill on both devices.
cp -r deploy/bricks/ffn-e16/2 "$dev/bricks/ffn-e16/2"
for b in py-docstring/1 deb-description/1 ffn-e16/2; do
  mkdir -p "$dev/bricks/${b%/*}"
  [[ -d "$dev/bricks/$b" ]] || cp -r "deploy/bricks/$b" "$dev/bricks/$b"
  .venv/bin/python - "$dev/bricks/$b/brick.json" "$fp" <<'PY'
import json, sys
path, fp = sys.argv[1:]
m = json.load(open(path))
m["base_model"]["fingerprint"] = fp
json.dump(m, open(path, "w"), indent=2)
PY
done

# Python stubs for gpu_serve_check.py.
e2e_python=".cache/e2e-venv/bin/python"
[[ -x "$e2e_python" ]] || { echo "gpu_bundle: $e2e_python is missing: run scripts/test.sh once" >&2; exit 2; }
mkdir -p "$dev/py"
"$e2e_python" -m grpc_tools.protoc -Iproto --python_out="$dev/py" --grpc_python_out="$dev/py" proto/kiln/v1/kiln.proto
touch "$dev/py/kiln/__init__.py" "$dev/py/kiln/v1/__init__.py"
du -sh "$dev" "$dev"/*
