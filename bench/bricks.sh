#!/usr/bin/env bash
# What LoRA bricks cost on this machine, in one invocation (build/bin/kiln_bench_bricks):
#
#   throughput  the 512 benchmark texts (bench/make_bench_texts.py: token
#               lengths 8..256) in batches cut by the server's token budget,
#               with the base model alone and with BRICKS distinct rank-RANK
#               bricks (all six BERT linears of every layer) mixed in every
#               batch, alternating per round; tokens/s medians and the median
#               of per-round ratios. Target: bricks >= 0.80 x base.
#   cold load   a rank-RANK brick in PEFT's format in a temporary brick store,
#               loaded by the brick manager (read, check, upload) and unloaded,
#               COLD_LOADS times: p50 / p99. Target: p50 <= 20 ms.
#   memory      resident-set growth per brick with RESIDENT bricks resident,
#               against the brick's tensor bytes. Target: overhead <= 10%.
#
# Usage: bench/bricks.sh
# Env:   THREADS (default: nproc), ROUNDS (3), BRICKS (8), RANK (16),
#        COLD_LOADS (50), RESIDENT (24), MAX_BATCH_TOKENS (2048)
# Raw JSON lines go to bench/out/bricks.jsonl.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

threads="${THREADS:-$(nproc)}"
rounds="${ROUNDS:-3}"
bricks="${BRICKS:-8}"
rank="${RANK:-16}"
cold_loads="${COLD_LOADS:-50}"
resident="${RESIDENT:-24}"
max_batch_tokens="${MAX_BATCH_TOKENS:-2048}"
model="models/all-MiniLM-L6-v2"
out="bench/out"
texts="$out/texts.txt"
results="$out/bricks.jsonl"
bin="build/bin/kiln_bench_bricks"

log() { echo "bricks: $*" >&2; }
die() { log "$*"; exit 1; }
for v in THREADS:"$threads" ROUNDS:"$rounds" BRICKS:"$bricks" RANK:"$rank" \
  COLD_LOADS:"$cold_loads" RESIDENT:"$resident" MAX_BATCH_TOKENS:"$max_batch_tokens"; do
  [[ "${v#*:}" =~ ^[1-9][0-9]*$ ]] || die "${v%%:*} must be a positive integer, got '${v#*:}'"
done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
venv="$(tools/setup_venv.sh | tail -n 1)"
scripts/fetch_model.sh >&2
log "building kiln_bench_bricks (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >&2 || die "cmake configure failed"
cmake --build build -j2 --target kiln_bench_bricks >&2 || die "build failed"
mkdir -p "$out"
"$venv/bin/python" bench/make_bench_texts.py "$texts" --model "$model"

lines="$("$bin" --model="$model" --input="$texts" --threads="$threads" --rounds="$rounds" \
  --bricks="$bricks" --rank="$rank" --cold_loads="$cold_loads" --resident="$resident" \
  --max_batch_tokens="$max_batch_tokens" | grep '^{')"
printf '%s\n' "$lines" >"$results"

python3 - "$results" "$threads" <<'PY'
import json, os, platform, subprocess, sys, time
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[r["measure"]] = r
cpu = "unknown CPU"
try:
    for l in open("/proc/cpuinfo"):
        if l.startswith("model name"):
            cpu = l.split(":", 1)[1].strip()
            break
except OSError:
    pass
commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
t, c, m = rows["throughput"], rows["cold_load"], rows["memory"]
print(f"# Kiln bricks, all-MiniLM-L6-v2, CPU")
print(f"# machine:  {cpu}, {os.cpu_count()} online CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
print(f"# threads:  {sys.argv[2]}   date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}   commit: {commit}")
print(f"throughput ({t['texts']} texts, {t['tokens']} tokens, {t['rounds']} rounds, medians):")
print(f"  base model alone          {t['base_tokens_per_s']:10,.0f} tokens/s")
print(f"  {t['bricks']} rank-{t['rank']} bricks per batch  {t['bricks_tokens_per_s']:10,.0f} tokens/s")
ok = "MET" if t["ratio"] >= 0.80 else "NOT MET"
print(f"  ratio (median of rounds)  {t['ratio']:10.3f}   target >= 0.80: {ok}")
ok = "MET" if c["p50_ms"] <= 20 else "NOT MET"
print(f"cold load of a rank-{c['rank']} brick ({c['file_bytes']:,} bytes), {c['loads']} loads:")
print(f"  p50 {c['p50_ms']:.2f} ms   p99 {c['p99_ms']:.2f} ms   target p50 <= 20 ms: {ok}")
ok = "MET" if m["overhead"] <= 0.10 else "NOT MET"
print(f"memory with {m['bricks']} bricks resident:")
print(f"  tensor bytes per brick {m['tensor_bytes_per_brick']:,}   RSS growth per brick {m['rss_growth_per_brick']:,.0f}   "
      f"overhead {100 * m['overhead']:.1f}%   target <= 10%: {ok}")
print(f"raw results: {sys.argv[1]}")
PY
