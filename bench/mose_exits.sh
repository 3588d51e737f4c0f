#!/usr/bin/env bash
# ModularStarEncoder's compute column, measured: Kiln's tokens/s and time per
# request at exits 4/9/18/27/36 of a random model of the published shape (36
# layers, hidden 1024, 16 heads, 4 key/value heads, FFN 12288; ~1B
# parameters stored as BF16/F16), next to the paper's relative FLOPs
# (11/25/50/75/100%). Same inputs at every exit, run in interleaved rounds
# (exit 4, 9, ..., 36, then again) so machine noise hits every exit alike;
# the median round counts.
#
#   model    tools/make_mose_fixture.py --full-shape (the parity fixture's
#            architecture and tokenizer, real size, random weights), made
#            once into .cache/mose-bench/ (~2 GB; Kiln holds it as ~4 GB of
#            fp32 on the CPU)
#   inputs   TEXTS functions of Debian's Python standard library, each cut to
#            its first MAX_CHARS characters (deterministic)
#   engine   build/bin/kiln_bench_engine --device=$DEVICE, the server's token
#            budget, one warm-up pass per exit and round; "ms/input" is the
#            time of the batch of all inputs divided by their number (the
#            time per request amortised over one batch)
#
# Usage: bench/mose_exits.sh
# Env:   TEXTS (4), MAX_CHARS (240), ROUNDS (3), THREADS (nproc), DEVICE (cpu;
#        cuda on a machine with a GPU: the same figures for it),
#        GEMM_PRECISION (fp16, CUDA only)
# Output: a table on stdout, and bench/out/mose_exits.jsonl (one line per run)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

texts_n="${TEXTS:-4}"
max_chars="${MAX_CHARS:-240}"
rounds="${ROUNDS:-3}"
threads="${THREADS:-$(nproc)}"
device="${DEVICE:-cpu}"
precision="${GEMM_PRECISION:-fp16}"
log() { echo "mose_exits: $*" >&2; }
die() { log "$*"; exit 1; }
for v in texts_n max_chars rounds threads; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v} must be a positive integer, got '${!v}'"
done

model=".cache/mose-bench"
out="bench/out"
mkdir -p "$out"
bench_bin="build/bin/kiln_bench_engine"
if [[ ! -x "$bench_bin" ]]; then
  log "building kiln_bench_engine"
  scripts/build.sh >&2
fi
if [[ ! -f "$model/model.safetensors" ]]; then
  venv="$(tools/setup_venv.sh | tail -n 1)"
  log "writing a random full-shape model to $model (once; ~2 GB)"
  "$venv/bin/python" tools/make_mose_fixture.py --full-shape --out "$model" >&2
fi

inputs="$out/mose_exits_texts.txt"
# The same snippets tools/check_mose_checkpoint.py compares with (standard
# library only, so Debian's python3 runs it without the venv).
python3 -c 'import sys; sys.path.insert(0, "tools"); import check_mose_checkpoint as c
print("\n".join(c.snippets(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[2]) // 2)))' \
  "$texts_n" "$max_chars" > "$inputs"
log "$(wc -l < "$inputs") inputs of up to $max_chars characters; $rounds rounds; device $device; $threads threads"

exits=(4 9 18 27 36)
paper=(11 25 50 75 100)
: > "$out/mose_exits.jsonl"
: > "$out/mose_exits.log"
for ((r = 1; r <= rounds; ++r)); do
  for e in "${exits[@]}"; do
    "$bench_bin" --model="$model" --input="$inputs" --exit="$e" --threads="$threads" \
      --repeats=1 --device="$device" --gemm_precision="$precision" 2>>"$out/mose_exits.log" |
      sed "s/^{/{\"round\":$r,/" >> "$out/mose_exits.jsonl" ||
      die "kiln_bench_engine failed at exit $e; see $out/mose_exits.log"
  done
  log "round $r of $rounds done"
done

python3 - "$out/mose_exits.jsonl" "${paper[*]}" <<'EOF'
import json, statistics, sys, platform
rows = [json.loads(l) for l in open(sys.argv[1])]
paper = [int(x) for x in sys.argv[2].split()]
exits = sorted({r["exit"] for r in rows})
med = {e: statistics.median(r["seconds_median"] for r in rows if r["exit"] == e) for e in exits}
first = rows[0]
full = med[exits[-1]]
print(f"# ModularStarEncoder shape (36 layers, hidden 1024, 16/4 heads, FFN 12288), random weights")
print(f"# device: {first['device']}; {first['texts']} inputs, {first['tokens']} tokens; "
      f"median of {len(rows) // len(exits)} rounds; {platform.machine()}, {platform.node()}")
print(f"{'exit':>4}  {'tokens/s':>9}  {'ms/input':>8}  {'time vs exit 36':>15}  {'paper FLOPs':>11}")
for e, p in zip(exits, paper):
    s = med[e]
    print(f"{e:>4}  {first['tokens'] / s:>9.1f}  {1000 * s / first['texts']:>8.1f}  "
          f"{100 * s / full:>14.0f}%  {p:>10}%")
EOF
