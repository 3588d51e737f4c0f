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
#        ROUNDS    rounds (default 3). Each round measures every engine and
#                  depth once, in turn, so a burst of load from other tenants
#                  hits one round of every configuration rather than all
#                  rounds of one; the table reports per-configuration medians
#                  over rounds, and ratios as medians of per-round ratios.
#        REPEATS   timed passes per measurement, median taken (default 1;
#                  each measurement also runs one untimed warm-up pass)
#        SKIP_KILN=1  measure only ONNX Runtime (no C++ build, no Kiln column)
# Steps: tools/setup_venv.sh, scripts/fetch_model.sh, cmake build of
#        kiln_bench_engine (Release, in build/), texts, ONNX export (cached in
#        bench/out/), then the runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

threads="${THREADS:-$(nproc)}"
rounds="${ROUNDS:-3}"
repeats="${REPEATS:-1}"
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
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$rounds'"
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
  "# threads:  $threads   rounds: $rounds (interleaved; medians)   repeats: $repeats (+1 warm-up)   batch (ORT): 32"
  "# date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  "# commit:   $commit"
  "# onnxruntime $("$py" -c 'import onnxruntime; print(onnxruntime.__version__)')"
)
printf '%s\n' "${header[@]}" >&2
: >"$results"

for ((round = 1; round <= rounds; round++)); do
  for k in "${depths[@]}"; do
    if [[ "$skip_kiln" == 0 ]]; then
      log "round $round/$rounds: kiln exit $k"
      measure "$kiln_bin" --model="$model" --input="$texts" --exit="$k" \
        --threads="$threads" --repeats="$repeats" >/dev/null
    fi
    for order in input sorted; do
      log "round $round/$rounds: onnxruntime L$k, $order order"
      measure "$py" bench/ort_bench.py --onnx "$out/minilm_L$k.onnx" --texts "$texts" \
        --model "$model" --threads "$threads" --batch 32 --order "$order" --repeats "$repeats" \
        --max_length 256 >/dev/null
    done
  done
done

# The table, computed from the collected numbers.
echo
printf '%s\n' "${header[@]}"
"$py" - "$results" "$rounds" "${depths[@]}" <<'PY'
import json, statistics, sys
results_path, rounds, depths = sys.argv[1], int(sys.argv[2]), [int(d) for d in sys.argv[3:]]
rows = [json.loads(l) for l in open(results_path)]
def series(engine, depth, order=None):
    return [r["tokens_per_s"] for r in rows
            if r["engine"] == engine and r.get("exit", r.get("layers")) == depth
            and (order is None or r.get("order") == order)]
kiln = {k: series("kiln", k) for k in depths}
ort_in = {k: series("onnxruntime", k, "input") for k in depths}
ort_sorted = {k: series("onnxruntime", k, "sorted") for k in depths}
na = "n/a"
def med(xs): return statistics.median(xs) if xs else None
def num(xs): return na if not xs else f"{med(xs):,.0f}"
def ratio(a, b):
    # median over rounds of the per-round ratio (both measured in that round)
    if not a or not b: return na
    return f"{statistics.median(x / y for x, y in zip(a, b)):.2f}x"
def spread(xs): return "" if len(xs) < 2 else f" ({min(xs):,.0f}-{max(xs):,.0f})"
print(f"{'depth':>5}  {'kiln tok/s':>24}  {'ort(input) tok/s':>24}  {'ort(sorted) tok/s':>24}  "
      f"{'kiln/ort-input':>14}  {'kiln/ort-sorted':>15}")
for k in depths:
    print(f"{k:>5}  {num(kiln[k]) + spread(kiln[k]):>24}  {num(ort_in[k]) + spread(ort_in[k]):>24}  "
          f"{num(ort_sorted[k]) + spread(ort_sorted[k]):>24}  {ratio(kiln[k], ort_in[k]):>14}  "
          f"{ratio(kiln[k], ort_sorted[k]):>15}")
full = max(depths)
for k in sorted(d for d in depths if d != full):
    print(f"kiln exit {k} speed-up over its full depth ({full}): {ratio(kiln[k], kiln[full])}"
          f"   (ort sorted L{k} over L{full}: {ratio(ort_sorted[k], ort_sorted[full])})")
print(f"tok/s: median over {rounds} rounds (min-max); ratios: median of per-round ratios")
if not any(kiln.values()):
    print("(SKIP_KILN=1: Kiln not measured)")
PY
echo "raw results: $results"
