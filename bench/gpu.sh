#!/usr/bin/env bash
# The GPU checks and figures, as one script for the device machine (an H200
# here). Prepare build/device/ first with bench/gpu_bundle.sh on the build
# machine, then run this there with build/device carried.
#
#   1. the device's facts: nvidia-smi, driver, where cuBLAS was found
#   2. tests (each under `timeout 150`): device_test; the backend conformance
#      suites (backend_ops_test, star_ops_test, expert_ffn_ops_test: every
#      op, every precision, against the plain-loop references); model parity
#      (device_parity_test: every exit vs the fp32 fixture, mixed exits, mixed
#      bricks, sparse FFN vs the CPU backend; mose_parity_test: the tiny
#      ModularStarEncoder's exits)
#   3. kiln_bench_device at batch 32 and 256 x sequence length 128 and 512:
#      the engine next to the GEMM roofline of the same shapes, fp16 and
#      bf16, then the CPU backend of the same host on the same inputs
#   4. bench/gpu_serve_check.py: `kiln serve --device=cuda` next to
#      `--device=cpu`, the same Embed requests (exits, LoRA bricks,
#      ffn_fraction, mixed at once, bad input) compared vector by vector, the
#      device label in /metrics, and served texts/s of both
#
# Targets (issue 6): >= 60% of the GEMM roofline at batch 256; >= 20x the CPU
# backend's tokens/s; parity cosine >= 0.9999 fp16 / >= 0.999 bf16.
#   5. Nsight Compute (ncu), where the device has it: each kernel's time in
#      one forward at batch 256 x 128 and 512, fp16 (bench/ncu_breakdown.py
#      sums it by kernel)
#   6. only with `bench/gpu.sh ncu` (which skips steps 2-4): Nsight Compute's
#      Speed of Light for kiln's attention, epilogue and LayerNorm kernels,
#      and which cuBLAS kernel each --gemm_precision gets
# Output: $OUT/gpu/ (or bench/out/gpu/), seven files at most (the device call
# brings back eight): device.txt, tests.log, bench.jsonl, bench.log,
# serve_check.json, serve_check.log, ncu.csv. Runs in about 70 s on an H200
# (the `ncu` mode in about 30 s).
# KILN_SERVE_CHECK_DEVICE=cpu runs step 4 as cpu against cpu, to try the
# script on a machine without a GPU.
set -uo pipefail
mode="${1:-all}"  # all | ncu (steps 1, 5 and 6 only)
case "$mode" in all|ncu) ;; *) echo "usage: bench/gpu.sh [all|ncu]" >&2; exit 2 ;; esac
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

# OpenBLAS picks its kernels from CPUID, and in a virtual machine it can fall
# back to its oldest (Prescott, SSE3) while the CPU has AVX2 or AVX-512: name
# the kernels from the CPU's flags, so the CPU figures are its best.
if [[ -z "${OPENBLAS_CORETYPE:-}" ]]; then
  if grep -qw avx512bw /proc/cpuinfo; then export OPENBLAS_CORETYPE=SkylakeX
  elif grep -qw avx2 /proc/cpuinfo; then export OPENBLAS_CORETYPE=Haswell; fi
fi
echo "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-} ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-))" \
  | tee -a "$out/device.txt"

tar -C "$work" -xJf "$dev/model.tar.xz"
model="$work/model"
export KILN_TEST_MODEL_DIR="$model" KILN_SOURCE_DIR="$root" KILN_CUDA_PLUGIN="$work/lib/libkiln_cuda.so"
# The carried binaries run under the carried loader and libraries, cuBLAS
# from the device.
run=("$work/lib/ld-linux-x86-64.so.2" --library-path "$work/lib$cuda_dirs")
bench=("${run[@]}" "$work/bin/kiln_bench_device" --model="$model" --input="$dev/texts.txt")
status=0
step() { echo "== $* (at ${SECONDS}s)"; }

if [[ "$mode" == all ]]; then
  # Tests: one log; the summary lines (worst cosines, failures) also here.
  : > "$out/tests.log"
  for t in device_test backend_ops_test star_ops_test expert_ffn_ops_test device_parity_test mose_parity_test; do
    step "$t"
    echo "== $t" >> "$out/tests.log"
    if ! timeout 150 "${run[@]}" "$work/bin/$t" --gtest_brief=1 >> "$out/tests.log" 2>&1; then
      status=1; echo "FAILED (see tests.log)"
    fi
  done
  grep -E '^== |worst cosine|^device: |^\[  (PASSED|SKIPPED|FAILED) ' "$out/tests.log" | head -120

  step kiln_bench_device
  : > "$out/bench.jsonl"
  for p in fp16 bf16; do
    timeout 150 "${bench[@]}" --device=cuda --gemm_precision="$p" --batches=32,256 \
      --seq_lens=128,512 --repeats=5 >> "$out/bench.jsonl" 2>> "$out/bench.log" || status=1
  done
  timeout 150 "${bench[@]}" --device=cpu --batches=32,256 --seq_lens=128,512 --repeats=1 \
    >> "$out/bench.jsonl" 2>> "$out/bench.log" || status=1
  grep -v '^I ' "$out/bench.log" | head -5
  cat "$out/bench.jsonl"

  step "served: bench/gpu_serve_check.py"
  printf '#!/bin/bash\nexec %s "$@"\n' "$(printf '%q ' "${run[@]}" "$work/bin/kiln")" > "$work/kiln"
  chmod +x "$work/kiln"
  PYTHONPATH="$dev/py${PYTHONPATH:+:$PYTHONPATH}" timeout 240 python3 bench/gpu_serve_check.py --kiln="$work/kiln" \
    --model="$model" --bricks="$dev/bricks" --texts="$dev/texts.txt" --out="$out" \
    --device="${KILN_SERVE_CHECK_DEVICE:-cuda}" || status=1
fi  # mode all
# Where the engine's time goes: every kernel of one forward at batch 256,
# timed by Nsight Compute (when the device has it; it is not a pass/fail step).
ncu_bin="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
if [[ -n "$ncu_bin" ]]; then
  step "ncu: per-kernel times at batch 256, fp16"
  timeout 150 "$ncu_bin" --clock-control none --metrics gpu__time_duration.sum --csv --page raw \
    "${bench[@]}" --device=cuda --gemm_precision=fp16 --batches=256 --seq_lens=128,512 \
    --repeats=1 > "$out/ncu.csv" 2>> "$out/bench.log"
  echo "ncu exit $?, $(grep -c '^"' "$out/ncu.csv") csv lines"
  python3 bench/ncu_breakdown.py "$out/ncu.csv"
  if [[ "$mode" == ncu ]]; then
    # 6. How near each of kiln's own kernels is to the GPU's limits (Speed
    #    of Light: memory and compute throughput as % of peak), and which
    #    cuBLAS kernels each --gemm_precision gets.
    step "ncu: speed of light of kiln's kernels"
    : > "$out/ncu_sol.csv"
    for spec in "128 Attention|LinearEpilogue|LayerNorm 8" "512 Attention 1"; do
      read -r len kernels count <<< "$spec"
      timeout 100 "$ncu_bin" --clock-control none --section SpeedOfLight --csv --page details \
        -k "regex:$kernels" --launch-count "$count" "${bench[@]}" --device=cuda \
        --gemm_precision=fp16 --batches=256 --seq_lens="$len" --repeats=1 \
        2>> "$out/bench.log" | grep '^"' >> "$out/ncu_sol.csv"
    done
    python3 - "$out/ncu_sol.csv" <<'PY'
import csv, sys
for r in csv.reader(open(sys.argv[1])):
    if len(r) > 14 and r[0] != "ID":
        print(r[0], r[4].split("(")[0][-32:], r[8], r[-3], r[-2], r[-1])
PY
    for p in fp16 bf16 fp32; do
      echo "cuBLAS kernels at --gemm_precision=$p:"
      timeout 60 "$ncu_bin" --metrics gpu__time_duration.sum --csv --page raw -k regex:gemm \
        --launch-count 4 "${bench[@]}" --device=cuda --gemm_precision="$p" --batches=256 \
        --seq_lens=128 --repeats=1 2>/dev/null |
        grep '^"[0-9]' | cut -d, -f5 | sort | uniq -c
    done
  fi
fi
step "done, status $status"
exit $status
