#!/usr/bin/env bash
# Kiln engine vs ONNX Runtime on CPU, in one invocation, on the same inputs.
#
# 512 real texts (Python stdlib docstrings) whose token lengths spread evenly
# over 8..256 (bench/make_bench_texts.py) are embedded by
#   - Kiln: build/bin/kiln_bench_engine at exits 6 (full depth), 4 and 2;
#   - ONNX Runtime (PyPI onnxruntime, CPU): all-MiniLM-L6-v2 cut to 6, 4 and 2
#     layers, exported to fp32 ONNX with pooling + normalisation in the graph
#     and ORT's transformer fusions applied (tools/export_onnx.py), same thread
#     count, batches of 32 padded to the longest row -- once in input order
#     (as users run it) and once with batches sorted by length (little padding).
# Prints tokens/s (real tokens, [CLS]/[SEP] included, padding not) for each,
# the Kiln/ORT ratios, and Kiln's exit-4 and exit-2 speed-ups over its own
# full depth. Raw JSON results go to bench/out/results.jsonl.
#
# Usage: bench/engine_vs_onnxruntime.sh
# Env:   THREADS   threads for both engines (default: nproc)
#        REPEATS   timed passes per measurement; the median is reported
#                  (default 3; each engine also runs one untimed warm-up pass)
#        SKIP_KILN=1  measure only ONNX Runtime (no C++ build, no Kiln column)
# Steps: tools/setup_venv.sh, scripts/fetch_model.sh, cmake build of
#        kiln_bench_engine (Release, in build/), texts, ONNX export (cached in
#        bench/out/), then the runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

threads="${THREADS:-$(nproc)}"
repeats="${REPEATS:-3}"
skip_kiln="${SKIP_KILN:-0}"
model="models/all-MiniLM-L6-v2"
out="bench/out"
texts="$out/texts.txt"
results="$out/results.jsonl"
kiln_bin="build/bin/kiln_bench_engine"
depths=(6 4 2)

log() { echo "engine_vs_onnxruntime: $*" >&2; }
die() { log "$*"; exit 1; }
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, got '$threads'"
[[ "$repeats" =~ ^[1-9][0-9]*$ ]] || die "REPEATS must be a positive integer, got '$repeats'"
[[ "$skip_kiln" == 0 || "$skip_kiln" == 1 ]] || die "SKIP_KILN must be 0 or 1, got '$skip_kiln'"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
venv="$(tools/setup_venv.sh | tail -n 1)"
py="$venv/bin/python"
scripts/fetch_model.sh >&2

if [[ "$skip_kiln" == 1 ]]; then
  log "SKIP_KILN=1: not building or running the Kiln engine"
else
  log "building $kiln_bin (Release)"
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >&2 ||
    die "cmake configure failed (set SKIP_KILN=1 to measure ONNX Runtime alone)"
  cmake --build build -j2 --target kiln_bench_engine >&2 ||
    die "building kiln_bench_engine failed (set SKIP_KILN=1 to measure ONNX Runtime alone)"
  [[ -x "$kiln_bin" ]] ||
    die "$kiln_bin is missing after the build (set SKIP_KILN=1 to measure ONNX Runtime alone)"
fi

mkdir -p "$out"
"$py" bench/make_bench_texts.py "$texts" --model "$model"
"$py" tools/export_onnx.py --model "$model" --out_dir "$out" \
  --layers "$(IFS=,; echo "${depths[*]}")"

# Runs a command that prints one JSON line (the last line of stdout starting
# with '{'), appends it to $results and echoes it.
measure() {
  local output line rc=0
  output="$("$@")" || rc=$?
  ((rc == 0)) || die "exit status $rc from: $*"
  line="$(printf '%s\n' "$output" | grep '^{' | tail -n 1)" || true
  [[ -n "$line" ]] || die "no JSON result from: $*"
  echo "$line" >>"$results"
  echo "$line"
}

# Prints the value of KEY in the JSON object $2.
field() { "$py" -c 'import json,sys; print(json.loads(sys.argv[2])[sys.argv[1]])' "$1" "$2"; }

commit="$(git rev-parse --short HEAD 2>/dev/null || echo none)"
if [[ "$commit" != none ]] && [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then
  commit+="-dirty"
fi
cpu="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
header=(
  "# Kiln engine vs ONNX Runtime, all-MiniLM-L6-v2, CPU"
  "# machine:  ${cpu:-unknown}, $(nproc) online CPUs ($(lscpu | sed -n 's/^Core(s) per socket:[[:space:]]*//p' | head -n 1) cores/socket, $(lscpu | sed -n 's/^Socket(s):[[:space:]]*//p' | head -n 1) sockets)"
  "# threads:  $threads   repeats: $repeats (median; +1 warm-up)   batch (ORT): 32"
  "# date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  "# commit:   $commit"
  "# onnxruntime $("$py" -c 'import onnxruntime; print(onnxruntime.__version__)')"
)
printf '%s\n' "${header[@]}" >&2
: >"$results"

declare -A kiln ort_in ort_sorted
for k in "${depths[@]}"; do
  if [[ "$skip_kiln" == 0 ]]; then
    log "kiln exit $k"
    r="$(measure "$kiln_bin" --model="$model" --input="$texts" --exit="$k" \
      --threads="$threads" --repeats="$repeats")"
    kiln[$k]="$(field tokens_per_s "$r")"
  fi
  for order in input sorted; do
    log "onnxruntime L$k, $order order"
    r="$(measure "$py" bench/ort_bench.py --onnx "$out/minilm_L$k.onnx" --texts "$texts" \
      --model "$model" --threads "$threads" --batch 32 --order "$order" --repeats "$repeats" \
      --max_length 256)"
    if [[ "$order" == input ]]; then ort_in[$k]="$(field tokens_per_s "$r")"; else ort_sorted[$k]="$(field tokens_per_s "$r")"; fi
  done
done

# The table, computed from the collected numbers.
echo
printf '%s\n' "${header[@]}"
"$py" - "$skip_kiln" "${depths[@]}" <<PY
import sys
skip = sys.argv[1] == "1"
depths = [int(d) for d in sys.argv[2:]]
kiln = {$(for k in "${depths[@]}"; do [[ "$skip_kiln" == 0 ]] && printf '%s: %s, ' "$k" "${kiln[$k]}"; done)}
ort_in = {$(for k in "${depths[@]}"; do printf '%s: %s, ' "$k" "${ort_in[$k]}"; done)}
ort_sorted = {$(for k in "${depths[@]}"; do printf '%s: %s, ' "$k" "${ort_sorted[$k]}"; done)}
na = "n/a"
def num(x): return na if x is None else f"{x:,.0f}"
def ratio(a, b): return na if a is None or b is None else f"{a / b:.2f}x"
print(f"{'depth':>5}  {'kiln tok/s':>11}  {'ort(input) tok/s':>16}  {'ort(sorted) tok/s':>17}  "
      f"{'kiln/ort-input':>14}  {'kiln/ort-sorted':>15}")
for k in depths:
    kv = kiln.get(k)
    print(f"{k:>5}  {num(kv):>11}  {num(ort_in[k]):>16}  {num(ort_sorted[k]):>17}  "
          f"{ratio(kv, ort_in[k]):>14}  {ratio(kv, ort_sorted[k]):>15}")
full = max(depths)
for k in sorted(d for d in depths if d != full):
    print(f"kiln exit {k} speed-up over its full depth ({full}): {ratio(kiln.get(k), kiln.get(full))}"
          f"   (ort sorted L{k} over L{full}: {ratio(ort_sorted[k], ort_sorted[full])})")
if skip:
    print("(SKIP_KILN=1: Kiln not measured)")
PY
echo "raw results: $results"
