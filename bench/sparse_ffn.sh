#!/usr/bin/env bash
# The emergent-brick (MoEfication) curve on this machine, for the shipped
# ffn_partition brick of the default model (deploy/bricks/ffn-e16, E = 16;
# its latest version, the one the server runs, unless PARTITION names a
# version folder):
#
#   engine      build/bin/kiln_bench_sparse_ffn on the 512 benchmark texts
#               (bench/make_bench_texts.py) in batches cut by the server's
#               token budget, at FFN fractions 1, 0.75, 0.5, 0.25, 0.125,
#               interleaved rounds: FFN time vs dense (median), end-to-end
#               tokens/s, counted FFN multiply-adds vs dense, mean cosine of
#               each text's embedding to its dense one.
#               Targets at 0.5: FFN time <= 0.60 x dense, cosine >= 0.97.
#               Then fractions 1 and 0.5 again with the recovery brick RECOVERY
#               (its latest version) on every sequence: what its LoRA costs.
#   retrieval   a `kiln serve` with deploy/bricks, driven by
#               tools/eval_sparse_ffn.py: MRR@10 on the three brick tasks'
#               held-out sets (tools/build_retrieval_set.py) per fraction, base
#               model and task brick. Target at 0.5: within 2 points of dense.
#               MAX_INPUTS caps queries and documents per task (default 0 = the
#               whole held-out sets, as the targets are stated; 200 is a quicker look).
#               Also the base model with the recovery brick RECOVERY (default
#               ffn-recovery-50, shipped; RECOVERY= to skip) at f < 1.
#   relu        only with RELU_MODEL (a ReLU-fied copy of the default model
#               written by tools/relufy.py --out; not shipped): the same
#               engine curve for it over its own version of the partition
#               (tools/rebase_partition.py --drop-fill, into bench/out/relu-bricks),
#               with each fraction's mean cosine to the default model's dense
#               embedding too (--reference_model); then, unless
#               SKIP_RETRIEVAL=1, MRR@10 through a second `kiln serve` running
#               it (tools/eval_sparse_ffn.py --base-only: the task bricks are
#               the GELU model's).
#
# Usage: bench/sparse_ffn.sh
# Env:   THREADS (default: nproc), ROUNDS (3), MAX_INPUTS (0 = all), SKIP_RETRIEVAL (0),
#        RECOVERY (ffn-recovery-50), PARTITION (engine part only; default: the
#        latest deploy/bricks/ffn-e16/<version>), RELU_MODEL (none)
# Output: bench/out/sparse_ffn.txt (engine), bench/out/sparse_ffn_retrieval.json,
#         with RELU_MODEL also bench/out/sparse_ffn_relu_retrieval.json
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
relu_model="${RELU_MODEL:-}"
# A relative RELU_MODEL is the caller's, not the repo's.
[[ -z "$relu_model" || "$relu_model" == /* ]] || relu_model="$PWD/$relu_model"
cd "$root"

threads="${THREADS:-$(nproc)}"
rounds="${ROUNDS:-3}"
max_inputs="${MAX_INPUTS:-0}"
model="models/all-MiniLM-L6-v2"
out="bench/out"
texts="$out/texts.txt"
log() { echo "sparse_ffn: $*" >&2; }
die() { log "$*"; exit 1; }
[[ "$threads" =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer, got '$threads'"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer, got '$rounds'"
[[ "$max_inputs" =~ ^[0-9]+$ ]] || die "MAX_INPUTS must be a non-negative integer, got '$max_inputs'"
partition="${PARTITION:-$(ls -d deploy/bricks/ffn-e16/*/ | sort -V | tail -n 1)}"
partition="${partition%/}"
[[ -f "$partition/ffn_partition.safetensors" ]] ||
  die "PARTITION must be an ffn_partition version folder, got '$partition'"
[[ -z "$relu_model" || -f "$relu_model/config.json" ]] ||
  die "RELU_MODEL must be a model folder (tools/relufy.py --out), got '$relu_model'"
relu_partition="$out/relu-bricks/ffn-e16/1"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
venv="$(tools/setup_venv.sh | tail -n 1)"
scripts/fetch_model.sh >&2
log "building (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >&2 || die "cmake configure failed"
cmake --build build -j2 --target kiln_bench_sparse_ffn kiln >&2 || die "build failed"
mkdir -p "$out"
"$venv/bin/python" bench/make_bench_texts.py "$texts" --model "$model"

{
  echo "# load average at start: $(cut -d' ' -f1-3 /proc/loadavg); commit $(git describe --always --dirty); partition $partition"
  build/bin/kiln_bench_sparse_ffn --model="$model" --input="$texts" --threads="$threads" \
    --rounds="$rounds" --partition="$partition"
  recovery_dir=""
  [[ -n "${RECOVERY-ffn-recovery-50}" && -d "deploy/bricks/${RECOVERY-ffn-recovery-50}" ]] &&
    recovery_dir="$(ls -d "deploy/bricks/${RECOVERY-ffn-recovery-50}"/*/ | sort -V | tail -n 1)"
  if [[ -n "$recovery_dir" ]]; then
    build/bin/kiln_bench_sparse_ffn --model="$model" --input="$texts" --threads="$threads" \
      --rounds="$rounds" --partition="$partition" --fractions=1,0.5 --lora="${recovery_dir%/}"
  fi
  if [[ -n "$relu_model" ]]; then
    rm -rf "$out/relu-bricks"
    echo "# ReLU model $relu_model over $partition rebased onto it without its fill" \
      "(it must be the partition tools/relufy.py trained over: its --partition)"
    python3 tools/rebase_partition.py --model="$relu_model" --partition="$partition" \
      --out="$relu_partition" --drop-fill >&2
    build/bin/kiln_bench_sparse_ffn --model="$relu_model" --input="$texts" --threads="$threads" \
      --rounds="$rounds" --partition="$relu_partition" --reference_model="$model"
  fi
} | tee "$out/sparse_ffn.txt"

[[ "${SKIP_RETRIEVAL:-0}" == 1 ]] && exit 0
# Retrieval needs the held-out sets and the e2e venv (grpcio) for the client.
"$venv/bin/python" tools/build_retrieval_set.py >&2
e2e_python=".cache/e2e-venv/bin/python"
[[ -x "$e2e_python" ]] || die "no Python with grpcio: run scripts/test.sh once (it builds .cache/e2e-venv)"
port=$(( 20000 + RANDOM % 20000 ))
build/bin/kiln serve --model="$model" --brick_dir=deploy/bricks --port="$port" --metrics_port=0 \
  --admin_port=0 --threads="$threads" >"$out/sparse_ffn_server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q SERVING "$out/sparse_ffn_server.log" && break
  kill -0 "$server" 2>/dev/null || die "server exited: $(tail -5 "$out/sparse_ffn_server.log")"
  sleep 0.5
done
recovery_id="${RECOVERY-ffn-recovery-50}"
recovery=()
[[ -n "$recovery_id" && -d "deploy/bricks/$recovery_id" ]] && recovery=(--recovery "$recovery_id")
"$e2e_python" tools/eval_sparse_ffn.py --target "127.0.0.1:$port" --max-inputs "$max_inputs" \
  "${recovery[@]}" --json "$out/sparse_ffn_retrieval.json"
kill "$server" 2>/dev/null || true
wait "$server" 2>/dev/null || true

[[ -n "$relu_model" ]] || exit 0
port=$(( 20000 + RANDOM % 20000 ))
build/bin/kiln serve --model="$relu_model" --brick_dir="$out/relu-bricks" --port="$port" \
  --metrics_port=0 --admin_port=0 --threads="$threads" >"$out/sparse_ffn_relu_server.log" 2>&1 &
server=$!
for _ in $(seq 1 120); do
  grep -q SERVING "$out/sparse_ffn_relu_server.log" && break
  kill -0 "$server" 2>/dev/null || die "ReLU server exited: $(tail -5 "$out/sparse_ffn_relu_server.log")"
  sleep 0.5
done
"$e2e_python" tools/eval_sparse_ffn.py --target "127.0.0.1:$port" --max-inputs "$max_inputs" \
  --base-only --json "$out/sparse_ffn_relu_retrieval.json"
