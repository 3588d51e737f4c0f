#!/usr/bin/env bash
# Kiln server under load vs the Kiln engine alone, in one invocation, on the
# same inputs, on this machine.
#
#   throughput  (a) the engine alone (build/bin/kiln_bench_engine) on the 512
#               benchmark texts (bench/make_bench_texts.py: token lengths 8..256)
#               at full depth, batches cut in input order by the server's token
#               budget -- tokens/s;
#               (b) `kiln serve` on a loopback port, driven at saturation by
#               build/bin/kiln_loadgen (closed loop, CASES below) cycling over
#               the same texts -- tokens/s counted from the responses, and the
#               ratio server / engine. Target: >= 0.85.
#   latency     (c) one 8-token input ("Open the file for reading.", [CLS]/[SEP]
#               included): the engine's compute time for it alone (median of
#               LAT_REPEATS single-sequence Forward calls) vs the server's p50
#               latency with one client sending it in a closed loop. Target:
#               p50 - compute <= 1 ms.
# Both sides use THREADS compute threads. The server runs for the whole script
# and is idle while the engine is measured. Each round measures every case
# once, in turn, so a burst of load from other tenants hits one round of every
# case rather than all rounds of one; the table reports medians over rounds
# and ratios as medians of per-round ratios. Note the load generator runs on
# the same machine and takes CPU from the server (its `client_cpu_cores` is
# reported); on a 2-core host that is part of what the server pays.
#
# Usage: bench/server_vs_engine.sh
# Env:   THREADS        compute threads for engine and server (default: nproc)
#        ROUNDS         rounds (default 3)
#        DURATION_S     measured seconds of each saturation run (default 20)
#        WARMUP_S       warm-up seconds before each loadgen run (default 3)
#        CASES          saturation cases, CONCURRENCYxINPUTS_PER_REQUEST, space
#                       separated (default "32x1 8x8")
#        REPEATS        timed engine passes over the texts per round (default 1,
#                       after one warm-up pass)
#        LAT_DURATION_S measured seconds of the one-client latency run (default 10)
#        LAT_REPEATS    engine passes over the 8-token input (default 500)
#        MAX_BATCH_TOKENS  token budget of one engine batch, for both (default 2048,
#                       the server's CPU default)
# Steps: tools/setup_venv.sh, scripts/fetch_model.sh, cmake build (Release, in
#        build/) of kiln, kiln_bench_engine and kiln_loadgen, the texts, then
#        the rounds. Raw JSON results go to bench/out/server_vs_engine.jsonl,
#        the server's log to bench/out/server.log. The server gets SIGTERM on
#        any exit of this script.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

threads="${THREADS:-$(nproc)}"
rounds="${ROUNDS:-3}"
duration_s="${DURATION_S:-20}"
warmup_s="${WARMUP_S:-3}"
cases="${CASES:-32x1 8x8}"
repeats="${REPEATS:-1}"
lat_duration_s="${LAT_DURATION_S:-10}"
lat_repeats="${LAT_REPEATS:-500}"
max_batch_tokens="${MAX_BATCH_TOKENS:-2048}"
model="models/all-MiniLM-L6-v2"
out="bench/out"
texts="$out/texts.txt"
text8="$out/text8.txt"
results="$out/server_vs_engine.jsonl"
server_log="$out/server.log"
kiln_bin="build/bin/kiln"
engine_bin="build/bin/kiln_bench_engine"
loadgen_bin="build/bin/kiln_loadgen"

log() { echo "server_vs_engine: $*" >&2; }
die() { log "$*"; exit 1; }
posint() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
posnum() {
  if [[ ! "$2" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || [[ "$2" =~ ^0*\.?0*$ ]]; then
    die "$1 must be a positive number, got '$2'"
  fi
}
posint THREADS "$threads"
posint ROUNDS "$rounds"
posint REPEATS "$repeats"
posint LAT_REPEATS "$lat_repeats"
posint MAX_BATCH_TOKENS "$max_batch_tokens"
posnum DURATION_S "$duration_s"
posnum LAT_DURATION_S "$lat_duration_s"
[[ "$warmup_s" =~ ^[0-9]+\.?[0-9]*$ ]] || die "WARMUP_S must be a number >= 0, got '$warmup_s'"
read -r -a case_list <<<"$cases"
((${#case_list[@]})) || die "CASES is empty"
for c in "${case_list[@]}"; do
  [[ "$c" =~ ^[1-9][0-9]*x[1-9][0-9]*$ ]] || die "CASES entries look like 32x1, got '$c'"
done

# ------------------------------------------------------------ the server's life
server_pid=""
stop_server() {
  [[ -n "$server_pid" ]] || return 0
  local pid="$server_pid" i
  server_pid=""
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 150; i++)); do  # up to 15 s to drain and exit
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "server (pid $pid) still running 15 s after SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  local rc=0
  wait "$pid" 2>/dev/null || rc=$?
  log "server stopped (exit status $rc after SIGTERM)"
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------ set-up and build
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
venv="$(tools/setup_venv.sh | tail -n 1)"
py="$venv/bin/python"
scripts/fetch_model.sh >&2

log "building kiln, kiln_bench_engine, kiln_loadgen (Release)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >&2 || die "cmake configure failed"
cmake --build build -j2 --target kiln kiln_bench_engine kiln_loadgen >&2 || die "build failed"
for b in "$kiln_bin" "$engine_bin" "$loadgen_bin"; do
  [[ -x "$b" ]] || die "$b is missing after the build"
done

mkdir -p "$out"
"$py" bench/make_bench_texts.py "$texts" --model "$model"
# One 8-token input (6 word pieces + [CLS]/[SEP]); checked below.
echo "Open the file for reading." >"$text8"

# Runs a command that prints one JSON line (the last line of stdout starting
# with '{'), appends {"case":CASE,"round":R,"result":LINE} to $results and
# echoes the line. Usage: measure CASE ROUND CMD...
measure() {
  local case="$1" round="$2" output line rc=0
  shift 2
  output="$("$@")" || rc=$?
  ((rc == 0)) || die "exit status $rc from: $*"
  line="$(printf '%s\n' "$output" | grep '^{' | tail -n 1)" || true
  [[ -n "$line" ]] || die "no JSON result from: $*"
  echo "{\"case\":\"$case\",\"round\":$round,\"result\":$line}" >>"$results"
  echo "$line"
}
field() { "$py" -c 'import json,sys; print(json.loads(sys.argv[2])[sys.argv[1]])' "$1" "$2"; }

tok8="$(field tokens "$(measure check 0 "$engine_bin" --model="$model" --input="$text8" \
  --threads="$threads" --repeats=1)")"
[[ "$tok8" == 8 ]] || die "$text8 has $tok8 tokens, not 8"

# ------------------------------------------------------------ start the server
# Two free loopback ports (both sockets held open until both are known).
read -r port metrics_port < <("$py" -c '
import socket
a, b = socket.socket(), socket.socket()
a.bind(("127.0.0.1", 0)); b.bind(("127.0.0.1", 0))
print(a.getsockname()[1], b.getsockname()[1])')
target="127.0.0.1:$port"
log "starting $kiln_bin serve on $target (metrics port $metrics_port, $threads threads)"
"$kiln_bin" serve --model="$model" --host=127.0.0.1 --port="$port" \
  --metrics_port="$metrics_port" --threads="$threads" --max_batch_tokens="$max_batch_tokens" \
  >"$server_log" 2>&1 &
server_pid=$!
# Ready = health SERVING and one Embed answered; bounded at 60 s.
ready=0
give_up=$((SECONDS + 60))
while ((SECONDS < give_up)); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    server_pid=""
    tail -n 20 "$server_log" >&2 || true
    die "the server exited during start-up (log above, in $server_log)"
  fi
  if timeout 10 "$loadgen_bin" --target="$target" --input="$text8" --concurrency=1 \
    --warmup_s=0 --duration_s=0.5 --health_timeout_s=1 >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 1
done
((ready)) || { tail -n 20 "$server_log" >&2; die "the server was not serving within 60 s"; }
log "server is serving (pid $server_pid)"

# ------------------------------------------------------------ header and rounds
commit="$(git rev-parse --short HEAD 2>/dev/null || echo none)"
if [[ "$commit" != none ]] && [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then
  commit+="-dirty"
fi
cpu="$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
header=(
  "# Kiln server vs engine, all-MiniLM-L6-v2, full depth, CPU"
  "# machine:  ${cpu:-unknown}, $(nproc) online CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
  "# threads:  $threads (engine and server)   max_batch_tokens: $max_batch_tokens   rounds: $rounds (interleaved; medians)"
  "# load:     kiln_loadgen on the same host, loopback, cases $cases (clients x inputs/request),"
  "#           ${warmup_s} s warm-up + ${duration_s} s measured; latency: 1 client, ${lat_duration_s} s"
  "# date:     $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  "# commit:   $commit"
)
printf '%s\n' "${header[@]}" >&2
: >"$results"

for ((round = 1; round <= rounds; round++)); do
  log "round $round/$rounds: engine alone, texts"
  measure engine "$round" "$engine_bin" --model="$model" --input="$texts" \
    --threads="$threads" --repeats="$repeats" --max_batch_tokens="$max_batch_tokens" >/dev/null
  for c in "${case_list[@]}"; do
    log "round $round/$rounds: server, $c"
    measure "server_$c" "$round" "$loadgen_bin" --target="$target" --input="$texts" \
      --concurrency="${c%x*}" --inputs_per_request="${c#*x}" --warmup_s="$warmup_s" \
      --duration_s="$duration_s" --allow_errors >/dev/null
  done
  log "round $round/$rounds: engine alone, one 8-token input"
  measure engine8 "$round" "$engine_bin" --model="$model" --input="$text8" \
    --threads="$threads" --repeats="$lat_repeats" >/dev/null
  log "round $round/$rounds: server, one client, one 8-token input"
  measure server8 "$round" "$loadgen_bin" --target="$target" --input="$text8" \
    --concurrency=1 --inputs_per_request=1 --warmup_s=1 --duration_s="$lat_duration_s" \
    --allow_errors >/dev/null
done
stop_server

# ------------------------------------------------------------ the table
echo
printf '%s\n' "${header[@]}"
"$py" - "$results" "${case_list[@]}" <<'PY'
import json, statistics, sys
results_path, cases = sys.argv[1], sys.argv[2:]
rows = [json.loads(l) for l in open(results_path)]
def per_round(case, key):
    return {r["round"]: r["result"][key] for r in rows if r["case"] == case}
def med(d): return statistics.median(d.values()) if d else float("nan")
def rng(d, fmt):
    return "" if len(d) < 2 else f"({fmt.format(min(d.values()))}-{fmt.format(max(d.values()))})"
def ratio(a, b):  # median over rounds of the per-round ratio
    common = sorted(set(a) & set(b))
    return statistics.median(a[r] / b[r] for r in common) if common else float("nan")

engine = per_round("engine", "tokens_per_s")
print("throughput at saturation (512 texts, 8..256 tokens):")
print(f"  {'run':<32} {'tokens/s':>9} {'(min-max)':<17} {'req/s':>7} {'p50 ms':>8} "
      f"{'p99 ms':>8} {'client cores':>12} {'server/engine':>13}")
print(f"  {'engine alone':<32} {med(engine):>9,.0f} {rng(engine, '{:,.0f}'):<17}")
verdicts = []
for c in cases:
    k = f"server_{c}"
    tps = per_round(k, "tokens_per_s")
    n, per = c.split("x")
    r = ratio(tps, engine)
    verdicts.append(r)
    label = f"server, {n} clients x {per} input(s)"
    print(f"  {label:<32} {med(tps):>9,.0f} {rng(tps, '{:,.0f}'):<17} "
          f"{med(per_round(k, 'requests_per_s')):>7.1f} {med(per_round(k, 'p50_ms')):>8.1f} "
          f"{med(per_round(k, 'p99_ms')):>8.1f} {med(per_round(k, 'client_cpu_cores')):>12.2f} "
          f"{r:>12.2f}x")
best = max(verdicts)
print(f"  target: server >= 0.85x engine at saturation -> best case {best:.2f}x: "
      f"{'MET' if best >= 0.85 else 'NOT MET'}")

# Engine compute for the 8-token input: seconds per pass = tokens / tokens_per_s
# (seconds_median is printed to 0.1 ms only; tokens_per_s carries more digits).
e8 = {r: 8 / v * 1e3 for r, v in per_round("engine8", "tokens_per_s").items()}
p50 = per_round("server8", "p50_ms")
diff = {r: p50[r] - e8[r] for r in sorted(set(p50) & set(e8))}
print()
print("latency, one client, one 8-token input:")
print(f"  engine compute (median of passes)      {med(e8):8.3f} ms {rng(e8, '{:.3f}')}")
print(f"  server p50 / p90 / p99                 {med(p50):8.3f} / "
      f"{med(per_round('server8', 'p90_ms')):.3f} / {med(per_round('server8', 'p99_ms')):.3f} ms"
      f" {rng(p50, '{:.3f}')}")
print(f"  server-reported compute p50            "
      f"{med(per_round('server8', 'server_compute_p50_ms')):8.3f} ms, queue p50 "
      f"{med(per_round('server8', 'server_queue_p50_ms')):.3f} ms")
outside = {r: p50[r] - c for r, c in per_round("server8", "server_compute_p50_ms").items()
           if r in p50}
print(f"  server p50 - its own compute p50       {med(outside):8.3f} ms "
      f"{rng(outside, '{:.3f}')}   (gRPC, queueing, hand-offs: time outside Forward)")
d = med(diff)
print(f"  p50 - engine compute                   {d:8.3f} ms {rng(diff, '{:.3f}')}   "
      f"target <= 1 ms: {'MET' if d <= 1.0 else 'NOT MET'}")
errors = {}
for r in rows:
    for code, n in r["result"].get("errors_by_code", {}).items():
        key = f"{r['case']} {code}"
        errors[key] = errors.get(key, 0) + n
print("errors: " + (", ".join(f"{k}: {n}" for k, n in sorted(errors.items())) or "none")
      + " (the server runs are made with --allow_errors; see raw results)")
print("medians over rounds (min-max); ratios and differences: medians of per-round values")
PY
echo "raw results: $results   server log: $server_log"
