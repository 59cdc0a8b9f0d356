#!/usr/bin/env bash
# Serving throughput and latency, all measured in this one run on this machine:
#   the in-process engine (bench_engine section b, 64 concurrent requests: the reference),
#   one replica (TP=1, --threads T), a 2-rank tensor-parallel replica (mpirun, T/2 threads per
#   rank) and a router over two one-process replicas (T/2 threads each),
# each loaded by `tandem bench serve` at 1, 4 and 16 requests/s and all at once (Poisson
# arrivals, 32-token prompts, 32 new tokens) on the 5.1M-parameter checkpoint of
# tests/make_tiny_checkpoint --slow (the saturated case three times, the median kept). Prints
# one table and each target's saturated throughput as a share of the in-process figure.
#   bench/bench_serve.sh [BUILD_DIR] [THREADS]     (defaults: build, 2)
set -euo pipefail
build="$(cd "${1:-build}" && pwd)"
threads="${2:-2}"
half=$(( threads > 1 ? threads / 2 : 1 ))
tandem="$build/tandem"
py=/usr/bin/python3
work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
export OMP_WAIT_POLICY=PASSIVE
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"  # functions only
tandem_mpi_flags

"$build/tests/make_tiny_checkpoint" "$work/model" --slow >/dev/null

# The reference: the in-process engine, 64 concurrent requests (batch-invariant, the default).
# Three runs, the median kept.
inproc=$(for i in 1 2 3; do
           OMP_NUM_THREADS=$threads "$build/bench/bench_engine" --checkpoint "$work/model" \
             --sections b --threads "$threads" |
             grep "batch-invariant 64 concurrent" |
             sed -E 's/.*\): ([0-9.]+) tokens\/s end to end.*/\1/'
         done | sort -g | sed -n 2p)
echo "in-process engine, 64 concurrent requests (median of 3): $inproc output tokens/s"

results="$work/results.txt"
: >"$results"
load() {  # NAME PORT
  for rate in 1 4 16 0; do
    case $rate in 1) n=16 ;; 4) n=24 ;; 16) n=32 ;; 0) n=64 ;; esac
    # Saturated: three runs, the median kept (run-to-run noise on a small machine is large).
    runs=1
    if [[ $rate == 0 ]]; then runs=3; fi
    for i in $(seq 1 $runs); do
      "$tandem" bench serve --target "127.0.0.1:$2" --rate "$rate" --num-requests "$n" \
        --prompt-len 32 --output-len 32 --seed "$i" --no-progress \
        --result-json "$work/r$i.json" >/dev/null
    done
    "$py" - "$1" "$work"/r[0-9]*.json >>"$results" <<'PY'
import json, sys
runs = sorted((json.load(open(f)) for f in sys.argv[2:]),
              key=lambda r: r["output_token_throughput"])
r = runs[len(runs) // 2]
f = lambda k, q: r[k][q + "_ms"]
print("| %s | %s | %d/%d | %.0f | %.0f / %.0f | %.1f / %.1f | %.0f / %.0f |" % (
    sys.argv[1], r["rate"], r["completed"], r["num_requests"], r["output_token_throughput"],
    f("ttft", "p50"), f("ttft", "p99"), f("tpot", "p50"), f("tpot", "p99"),
    f("e2e", "p50"), f("e2e", "p99")))
PY
    rm -f "$work"/r[0-9]*.json
  done
}
stop_all() {
  for pid in "$@"; do kill -TERM "$pid"; done
  for pid in "$@"; do wait "$pid" || true; done
  pids=()
}

# 1. One replica.
"$tandem" serve --model "$work/model" --port 0 --threads "$threads" --no-request-log \
  >"$work/tp1.log" 2>&1 &
pids+=($!)
load "one replica (TP=1, $threads threads)" "$(tandem_wait_for_port "$work/tp1.log")"
stop_all "${pids[@]}"

# 2. A 2-rank tensor-parallel replica.
mpirun "${mpi_flags[@]}" -np 2 "$tandem" serve --model "$work/model" --port 0 --threads "$half" \
  --no-request-log >"$work/tp2.log" 2>&1 &
mpirun_pid=$!
pids+=($mpirun_pid)
port=$(tandem_wait_for_port "$work/tp2.log")
load "TP=2 replica (2 ranks x $half threads)" "$port"
kill -USR1 "$mpirun_pid"  # every rank: the leader drains (SIGTERM to mpirun ends in SIGKILL)
wait "$mpirun_pid" || true
pids=()

# 3. A router over two one-process replicas.
"$tandem" serve --model "$work/model" --port 0 --threads "$half" --no-request-log \
  >"$work/a.log" 2>&1 &
pids+=($!)
"$tandem" serve --model "$work/model" --port 0 --threads "$half" --no-request-log \
  >"$work/b.log" 2>&1 &
pids+=($!)
a=$(tandem_wait_for_port "$work/a.log")
b=$(tandem_wait_for_port "$work/b.log")
"$tandem" router --replicas "127.0.0.1:$a,127.0.0.1:$b" --port 0 --no-request-log \
  >"$work/router.log" 2>&1 &
pids+=($!)
load "router over two replicas ($half threads each)" "$(tandem_wait_for_port "$work/router.log")"
stop_all "${pids[@]}"

echo
echo "| target | rate (req/s) | completed | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | E2E p50 / p99 (ms) |"
echo "|---|---|---|---|---|---|---|"
cat "$results"
echo
"$py" - "$results" "$inproc" <<'PY'
import sys
ref = float(sys.argv[2])
for line in open(sys.argv[1]):
    name, rate, _, tput = [x.strip() for x in line.strip().strip("|").split("|")][:4]
    if rate == "inf":
        print("%s, all at once: %.0f output tokens/s = %.0f%% of the in-process engine (%.0f)"
              % (name, float(tput), 100.0 * float(tput) / ref, ref))
PY
