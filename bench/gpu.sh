#!/usr/bin/env bash
# The GPU checks and figures, as one script for the device machine (an H200
# here). Prepare build/device/ first with bench/gpu_bundle.sh on the build
# machine, then run this there with build/device carried. Under 5 minutes.
#
#   1. the device's facts: nvidia-smi, driver, where cuBLAS was found
#   2. tests: device_test, the backend conformance suite (every op, every
#      precision, against the plain-loop references) and model parity (every
#      exit vs the fp32 fixture; mixed exits, mixed bricks, sparse FFN vs
#      the CPU backend)
#   3. kiln_bench_device at batch 32 and 256 x sequence length 128 and 512:
#      the engine next to the GEMM roofline of the same shapes, fp16 and
#      bf16, then the CPU backend of the same host on the same inputs
#
# Targets (issue 6): >= 60% of the GEMM roofline at batch 256; >= 20x the CPU
# backend's tokens/s; parity cosine >= 0.9999 fp16 / >= 0.999 bf16.
# Output: $OUT/gpu/ (or bench/out/gpu/): one log per step, bench.jsonl.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
dev="${KILN_DEVICE_DIR:-build/device}"
out="${OUT:-bench/out}/gpu"
mkdir -p "$out"
[[ -f "$dev/bundle.tar.xz" ]] || { echo "gpu.sh: no $dev/bundle.tar.xz: run bench/gpu_bundle.sh and carry build/device" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$dev/bundle.tar.xz"

# cuBLAS comes from the device: the toolkit, or the wheels next to PyTorch.
need="libcublas.so.13"
cuda_dirs=""
wheel_dirs="$(python3 -c 'import glob, site
print(" ".join(d for p in site.getsitepackages() for d in glob.glob(p + "/nvidia/*/lib")))' 2>/dev/null || true)"
for d in /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/lib/x86_64-linux-gnu $wheel_dirs; do
  [[ -e "$d/$need" ]] && cuda_dirs="$cuda_dirs:$d"
done
{
  date -u; uname -a; nvidia-smi 2>&1 | head -20
  echo "cuBLAS ($need) found in: ${cuda_dirs:-NOWHERE}"
} | tee "$out/device.txt"
[[ -n "$cuda_dirs" ]] || { echo "gpu.sh: $need not found on this machine; the binaries were built with CUDA 13" >&2; exit 3; }
run() { "$work/lib/"ld-linux-x86-64.so.2 --library-path "$work/lib$cuda_dirs" "$@"; }

export KILN_TEST_MODEL_DIR="$dev/model-f16" KILN_SOURCE_DIR="$root"
status=0
for t in device_test backend_ops_test expert_ffn_ops_test device_parity_test; do
  echo "== $t"
  if ! run "$work/bin/$t" --gtest_brief=1 > "$out/$t.log" 2>&1; then status=1; fi
  tail -n 25 "$out/$t.log"
done

echo "== kiln_bench_device"
: > "$out/bench.jsonl"
for p in fp16 bf16; do
  run "$work/bin/kiln_bench_device" --device=cuda --gemm_precision="$p" --model="$dev/model-f16" \
    --input="$dev/texts.txt" --batches=32,256 --seq_lens=128,512 --repeats=5 \
    >> "$out/bench.jsonl" 2>> "$out/bench.log" || status=1
done
run "$work/bin/kiln_bench_device" --device=cpu --model="$dev/model-f16" --input="$dev/texts.txt" \
  --batches=32,256 --seq_lens=128,512 --repeats=1 >> "$out/bench.jsonl" 2>> "$out/bench.log" || status=1
grep -v '^I ' "$out/bench.log" | head -5
cat "$out/bench.jsonl"
exit $status
