#!/usr/bin/env bash
# A multi-node run simulated on one host: two network namespaces ("nodes") joined by a veth pair,
# a hostfile with their addresses, and mpirun launching across them through Open MPI's remote
# launcher pointed at a script that enters the other namespace instead of ssh. Every byte between
# the ranks (Open MPI's TCP BTL) and between mpirun and its daemons (the TCP out-of-band channel)
# crosses the veth, as it would cross the network between machines. Checked:
#   1. DP=2 training, one rank per node, equals one rank (losses and validation losses, 1e-5);
#   2. a TP=2 serving replica across the nodes answers like a one-process replica (greedy text);
#   3. a partition (the veth taken down): a training job ends with the watchdog's line and its
#      last checkpoint loads; a TP replica, idle or in the middle of a stream, ends its streams
#      with UNAVAILABLE and exits non-zero; every process of every job (ranks, mpirun, Open MPI's
#      daemon) is gone within the collective timeout + 30 s of the cut.
#
#   multinode_test.sh BUILD_DIR
#
# TANDEM_MULTINODE_KEEP=1 keeps the scratch directory (logs, runs). Root only (network namespaces); exits 77 (ctest SKIP_RETURN_CODE) only where namespaces cannot
# be made. Everything it starts runs inside the two namespaces, so the EXIT trap ends it all
# (whatever process group it is in) and deletes the namespaces, even when a check fails.
set -uo pipefail

build="$(cd "${1:?usage: multinode_test.sh BUILD_DIR}" && pwd)"
tandem="$build/tandem"
make_tiny_checkpoint="$build/tests/make_tiny_checkpoint"
timeout_s=5                         # --parallel.timeout_s / --collective-timeout of every job
exit_limit_s=$((timeout_s + 30))    # every process gone this long after a cut
subnet=10.77.0.0/24
addr1=10.77.0.1 addr2=10.77.0.2

say() { echo "multinode: $*"; }
fail() {
  echo "multinode: FAIL: $*" >&2
  exit 1
}

if [[ $(id -u) -ne 0 ]]; then
  say "SKIP: network namespaces need root"
  exit 77
fi
for tool in ip mpirun /usr/bin/python3; do
  command -v "$tool" >/dev/null || fail "$tool not found"
done
[[ -x "$tandem" && -x "$make_tiny_checkpoint" ]] || fail "build tandem and make_tiny_checkpoint in $build first"

# Unique per run: namespace and interface names (15 characters at most) carry the pid.
ns1="tandem_mn_$$_a" ns2="tandem_mn_$$_b"
veth1="tmn$$a" veth2="tmn$$b"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/tandem_multinode.XXXXXX")"

kill_namespace_processes() {
  local ns pids
  for ns in "$ns1" "$ns2"; do
    pids=$(ip netns pids "$ns" 2>/dev/null)
    # shellcheck disable=SC2086  # one word per pid
    if [[ -n "$pids" ]]; then kill -KILL $pids 2>/dev/null; fi
  done
}
cleanup() {
  local status=$?
  trap - EXIT
  kill_namespace_processes
  wait 2>/dev/null
  ip netns del "$ns1" 2>/dev/null
  ip netns del "$ns2" 2>/dev/null  # takes the veth pair with it
  ip link del "$veth1" 2>/dev/null  # a pair made but never moved into the namespaces
  if [[ $status -ne 0 && $status -ne 77 ]]; then
    for log in "$scratch"/*.log; do
      [[ -f "$log" ]] || continue
      echo "---- $(basename "$log") (last 30 lines)"
      tail -n 30 "$log"
    done
  fi
  if [[ -n "${TANDEM_MULTINODE_KEEP:-}" ]]; then
    echo "multinode: kept $scratch"
  else
    rm -rf "$scratch"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM  # (ctest's timeout): the EXIT trap still cleans up

# ---- the two nodes ------------------------------------------------------------------------
if ! ip netns add "$ns1" 2>"$scratch/netns.err"; then
  say "SKIP: cannot create a network namespace ($(head -n 1 "$scratch/netns.err"))"
  exit 77
fi
ip netns add "$ns2" || fail "cannot create a second network namespace"
ip link add "$veth1" type veth peer name "$veth2" || fail "cannot create a veth pair"
ip link set "$veth1" netns "$ns1" && ip link set "$veth2" netns "$ns2" || fail "moving the veth"
ip -n "$ns1" addr add "$addr1/24" dev "$veth1" && ip -n "$ns2" addr add "$addr2/24" dev "$veth2" ||
  fail "addressing the veth"
for ns in "$ns1" "$ns2"; do
  ip -n "$ns" link set lo up || fail "lo up in $ns"
  # mpirun and its daemons give up on a peer only when TCP gives up on a connection with data
  # in flight: after net.ipv4.tcp_retries2 retransmissions (15 by default, about 15 minutes; see
  # README "Across machines"). 5 here, per namespace: about 12.6 s, longer than the ranks' own
  # limit (the collective timeout, + 5 s for an idle worker), so the ranks still end through
  # their watchdog as they would with the default, and short enough that mpirun and its daemon
  # follow within the test's limit.
  ip netns exec "$ns" sysctl -qw net.ipv4.tcp_retries2=5 || fail "setting tcp_retries2 in $ns"
done
ip -n "$ns1" link set "$veth1" up && ip -n "$ns2" link set "$veth2" up || fail "veth up"

# The "ssh" of this cluster: Open MPI runs `agent HOST command...` to start its daemon on HOST.
agent="$scratch/agent.sh"
cat >"$agent" <<EOF
#!/bin/sh
host="\$1"
shift
case "\$host" in
  $addr1) ns=$ns1 ;;
  $addr2) ns=$ns2 ;;
  *) echo "agent: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" sh -c "\$*"
EOF
chmod +x "$agent"
hosts="$scratch/hosts"
printf '%s slots=1\n%s slots=1\n' "$addr1" "$addr2" >"$hosts"

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 \
  OMP_WAIT_POLICY=PASSIVE
# One rank per node (slots=1); TCP only (ob1 + tcp: no shared memory between the "nodes"), and
# both the BTL and the daemons' out-of-band channel on the veth's subnet only.
mpi=(mpirun --hostfile "$hosts" -np 2 --mca plm_rsh_agent "$agent" --mca pml ob1
  --mca btl "tcp,self" --mca btl_tcp_if_include "$subnet" --mca oob_tcp_if_include "$subnet"
  --mca orte_tmpdir_base "$scratch" -x OMP_NUM_THREADS -x OMP_WAIT_POLICY)

# Runs a command on node 1 (mpirun starts there; its rank 0 is local to it): "${on_node1[@]}" cmd.
# (An array, not a function: a function run in the background is a subshell, and $! would be
# that subshell's pid instead of the command's.)
on_node1=(ip netns exec "$ns1")

now_ms() { local t=${EPOCHREALTIME/./}; echo $((10#$t / 1000)); }
seconds_since() { local ms=$(($(now_ms) - $1)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }
past_limit() { (($(now_ms) - $1 > exit_limit_s * 1000)); }

# Waits for the background job $1 (mpirun) to exit, at most until $exit_limit_s after the cut at
# $2 (ms); sets $status to its exit status.
wait_job() {
  local pid=$1 cut=$2 what=$3
  while [[ -e /proc/$pid && "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]]; do
    past_limit "$cut" && fail "$what: mpirun still runs ${exit_limit_s} s after the cut"
    sleep 0.2
  done
  wait "$pid"
  status=$?
}
# Waits until no process is left on either node; fails naming them after $exit_limit_s seconds.
expect_all_gone_since() {
  local cut=$1 what=$2 left
  while :; do
    left="$(ip netns pids "$ns1"; ip netns pids "$ns2")"
    [[ -z "$left" ]] && break
    if past_limit "$cut"; then
      ps -o pid,args -p "$(echo "$left" | paste -sd,)" >&2
      fail "$what: processes left ${exit_limit_s} s after the cut (above)"
    fi
    sleep 0.2
  done
  say "   every process of the job gone $(seconds_since "$cut") s after the cut (limit $exit_limit_s s)"
}

cut_link() { ip -n "$ns1" link set "$veth1" down; }
heal_link() {
  ip -n "$ns1" link set "$veth1" up || fail "veth up"
  # Neighbour entries that failed during the cut would refuse the next job's first connections.
  ip -n "$ns1" neigh flush dev "$veth1"
  ip -n "$ns2" neigh flush dev "$veth2"
}

# ---- 1. DP=2 across the nodes equals one rank -------------------------------------------------
say "preparing data"
for i in $(seq 1 3000); do
  echo "line $i of the multinode corpus: the quick brown fox $((i * 7919 % 1000)) jumps over $((i % 13)) lazy dogs."
done >"$scratch/corpus.txt"
"$tandem" prepare --input "$scratch/corpus.txt" --out "$scratch/data" --train-tokenizer \
  --vocab-size 300 >"$scratch/prepare.log" 2>&1 || fail "prepare (prepare.log)"

# The same global batch (8 sequences x grad_accum 2) on 1 and 2 ranks, as tests/launch/mpi_train_test.
# train_args RUN_DIR BATCH_PER_RANK [more...] sets the array $train, the train command's words.
train_args() {
  local dir=$1 batch=$2
  shift 2
  train=("$tandem" train --data.dir="$scratch/data" --checkpoint.dir="$dir" --data.batch_size="$batch"
    --train.grad_accum=2 --train.steps=6 --train.threads=1 --data.seq_len=16
    --model.max_seq_len=16 --model.n_layer=2 --model.n_embd=32 --model.n_head=4
    --model.ffn_hidden=64 --optim.lr=3e-3 --optim.warmup_steps=0 --optim.schedule=constant
    --eval.every=3 --eval.batches=2 --eval.sample_tokens=0 --checkpoint.every=3
    --checkpoint.keep_last=5 --parallel.bucket_mb=0.01 "--parallel.timeout_s=$timeout_s" "$@")
}
say "1. training: one rank, then DP=2 with one rank per node"
train_args "$scratch/one" 8
timeout -s KILL 300 "${train[@]}" >"$scratch/train_one.log" 2>&1 ||
  fail "one-rank training (train_one.log)"
train_args "$scratch/two" 4
timeout -s KILL 300 "${on_node1[@]}" "${mpi[@]}" "${train[@]}" >"$scratch/train_two.log" 2>&1 || fail "DP=2 training across the nodes (train_two.log)"
/usr/bin/python3 - "$scratch/one/metrics.jsonl" "$scratch/two/metrics.jsonl" <<'EOF' || fail "DP=2 across the nodes does not match one rank"
import json, sys
def read(path):
    out = {}
    for line in open(path):
        j = json.loads(line)
        for key in ("loss", "val_loss"):
            if key in j:
                out[(key, j["step"])] = j[key]
    return out
one, two = read(sys.argv[1]), read(sys.argv[2])
assert sum(1 for k in one if k[0] == "loss") == 6, f"one rank logged {len(one)} values"
assert one.keys() == two.keys(), f"different steps logged: {sorted(one)} vs {sorted(two)}"
worst = max(abs(two[k] - v) / abs(v) for k, v in one.items())
print(f"multinode: DP=2 across the nodes vs one rank: {len(one)} losses, max relative difference {worst:.2e}")
sys.exit(0 if worst <= 1e-5 else 1)
EOF

# ---- 2. a TP=2 replica across the nodes answers like a one-process replica ---------------------
"$make_tiny_checkpoint" "$scratch/tiny" >/dev/null || fail "make_tiny_checkpoint"

# Prints the port of a server's "listening on 127.0.0.1:PORT" line in LOG once it shows (60 s).
wait_for_port() {
  local log=$1 port
  for _ in $(seq 1 600); do
    port=$(grep -ao "listening on 127\.0\.0\.1:[0-9]*" "$log" 2>/dev/null | head -n 1 | sed 's/.*://')
    if [[ -n "$port" ]]; then
      echo "$port"
      return 0
    fi
    sleep 0.1
  done
  return 1
}
# A TP=2 replica of checkpoint $1 across the nodes, logging to $2; sets $job (mpirun's pid) and
# $port (the leader listens on node 1's loopback; the clients run on node 1). Each rank's output
# is also written by its own node (--output-filename) to ranks_NAME/1/rank.R/: what node 2
# says after the cut reaches no mpirun.
start_tp_replica() {
  local floor=()
  [[ -n "${TANDEM_TEST_MIN_STEP_MS:-}" ]] && floor=(-x "TANDEM_TEST_MIN_STEP_MS=$TANDEM_TEST_MIN_STEP_MS")
  "${on_node1[@]}" "${mpi[@]}" "${floor[@]}" --output-filename "$scratch/ranks_${2%.log}" "$tandem" serve --model "$1" --port 0 --metrics-port 0 --threads 1 \
    --collective-timeout "$timeout_s" --no-request-log --drain-grace 5 >"$scratch/$2" 2>&1 &
  job=$!
  port=$(wait_for_port "$scratch/$2") || fail "the TP=2 replica did not start ($2)"
  grep -q "tensor-parallel over 2 ranks" "$scratch/$2" || fail "not a TP=2 replica ($2)"
}
ask() {  # PORT PROMPT MAX_TOKENS [more flags]: the text (the client runs on node 1)
  local p=$1 prompt=$2 n=$3
  shift 3
  "${on_node1[@]}" timeout -s KILL 120 "$tandem" generate --server "127.0.0.1:$p" --prompt "$prompt" \
    --max-new-tokens "$n" --temperature 0 "$@"
}

say "2. serving: a one-process replica and a TP=2 replica across the nodes, greedy"
"${on_node1[@]}" "$tandem" serve --model "$scratch/tiny" --port 0 --metrics-port 0 --threads 1 \
  --no-request-log --drain-grace 5 >"$scratch/serve_one.log" 2>&1 &
single=$!
single_port=$(wait_for_port "$scratch/serve_one.log") || fail "the one-process replica did not start"
start_tp_replica "$scratch/tiny" serve_tp.log
for prompt in "The quick brown fox" "In the beginning God" "Serving a model means"; do
  expected=$(ask "$single_port" "$prompt" 32 2>>"$scratch/client.log") || fail "one-process replica: $prompt"
  got=$(ask "$port" "$prompt" 32 2>>"$scratch/client.log") || fail "TP=2 replica: $prompt (client.log)"
  [[ "$got" == "$expected" ]] || fail "TP=2 across the nodes answered '$got' for '$prompt', one process '$expected'"
  [[ ${#got} -gt ${#prompt} ]] || fail "no text generated for '$prompt'"
done
say "   the TP=2 replica across the nodes gave the one-process replica's greedy text for 3 prompts"
kill -TERM "$single"
wait "$single" || fail "the one-process replica did not exit 0 on SIGTERM (serve_one.log)"
# SIGUSR1 to mpirun: the leader drains and stops the worker on node 2, and the job exits 0.
kill -USR1 "$job"
wait "$job" || fail "the TP=2 replica did not exit 0 on SIGUSR1 to mpirun (serve_tp.log)"
grep -q "tensor-parallel rank 1 stopped" "$scratch/serve_tp.log" || fail "the worker on node 2 did not stop cleanly"

# ---- 3a. a partition while training ------------------------------------------------------------
# The name of RUN_DIR's newest complete checkpoint (step_XXXXXXXX; temporaries and set-aside ones
# have other names), or nothing.
newest_checkpoint() {
  local dir name last=""
  for dir in "$1"/checkpoints/step_*; do
    name=$(basename "$dir")
    if [[ -d "$dir" && $name =~ ^step_[0-9]+$ ]]; then last=$name; fi
  done
  echo "$last"
}
say "3a. training, the link cut mid-run (--parallel.timeout_s=$timeout_s)"
train_args "$scratch/cut" 4 --train.steps=100000 --checkpoint.every=2
"${on_node1[@]}" "${mpi[@]}" --output-filename "$scratch/ranks_train_cut" "${train[@]}" \
  >"$scratch/train_cut.log" 2>&1 &
job=$!
for _ in $(seq 1 600); do
  steps=$(grep -c '"loss"' "$scratch/cut/metrics.jsonl" 2>/dev/null)
  [[ ${steps:-0} -ge 5 && -n "$(newest_checkpoint "$scratch/cut")" ]] && break
  sleep 0.1
done
[[ ${steps:-0} -ge 5 ]] || fail "the DP=2 job did not train (train_cut.log)"
cut=$(now_ms)
cut_link
wait_job "$job" "$cut" "3a training"
[[ $status -ne 0 ]] || fail "the partitioned training job exited 0"
grep -q "tandem: watchdog: rank .* did not finish within $timeout_s s" "$scratch/train_cut.log" ||
  fail "the partitioned training job did not end with the watchdog's line (train_cut.log)"
expect_all_gone_since "$cut" "3a training"
# Node 2, cut off from mpirun, ended its rank through the watchdog too.
rank1_says() { cat "$scratch"/ranks_"$1"/*/rank.1/stderr 2>/dev/null; }
rank1_says train_cut | grep -q "tandem: watchdog: rank 1: .* did not finish within $timeout_s s" ||
  fail "rank 1 (node 2) did not end through its watchdog: $(rank1_says train_cut | tail -n 3)"
heal_link
newest=$(newest_checkpoint "$scratch/cut")
newest_step=$((10#${newest#step_}))
train_args "$scratch/cut" 8 --checkpoint.resume=true --train.steps=$((newest_step + 1))
timeout -s KILL 120 "${train[@]}" >"$scratch/train_resume.log" 2>&1 ||
  fail "resuming the partitioned job's last checkpoint (train_resume.log)"
grep -q "resumed from .*$newest" "$scratch/train_resume.log" || fail "did not resume from $newest (train_resume.log)"
say "   watchdog line: $(grep -o "tandem: watchdog: rank [0-9]*: [^(]*" "$scratch/train_cut.log" | head -n 1)"
say "   exit status $status; the last checkpoint ($newest) loads and training goes on"

# ---- 3b. a partition of an idle replica ----------------------------------------------------------
say "3b. a TP=2 replica, idle when the link is cut (--collective-timeout $timeout_s)"
start_tp_replica "$scratch/tiny" serve_idle.log
ask "$port" "The quick brown fox" 8 >/dev/null 2>>"$scratch/client.log" || fail "the replica did not answer"
sleep 7  # idle past a keepalive (every 5 s): the worker waits, it does not time out
cut=$(now_ms)
cut_link
wait_job "$job" "$cut" "3b idle replica"
[[ $status -ne 0 ]] || fail "the idle partitioned replica exited 0 (serve_idle.log)"
grep -q "tandem: watchdog: rank 0: barrier on group tp" "$scratch/serve_idle.log" ||
  fail "the idle leader did not notice its lost worker through the keepalive's barrier (serve_idle.log)"
expect_all_gone_since "$cut" "3b idle replica"
# The idle worker on node 2 waited for its next plan no longer than the timeout + a keepalive.
rank1_says serve_idle | grep -q "tandem: watchdog: rank 1: broadcast(root 0) on group tp .* did not finish within $((timeout_s + 5)) s (rank 1 was: waiting for the leader's next step plan" ||
  fail "the idle worker did not notice its lost leader: $(rank1_says serve_idle | tail -n 3)"
heal_link
say "   exit status $status; $(grep -o "tandem: watchdog: rank 0: [^(]*" "$scratch/serve_idle.log" | head -n 1)"

# ---- 3c. a partition in the middle of streams --------------------------------------------------
say "3c. a TP=2 replica with streams running when the link is cut"
# Steps of 5 ms or more (the engine's test hook), so the streams are still running at the cut
# however fast the CPU.
TANDEM_TEST_MIN_STEP_MS=5 start_tp_replica "$scratch/tiny" serve_busy.log
clients=()
for i in 1 2 3; do
  ask "$port" "request $i" 1000 --ignore-eos >"$scratch/stream_$i.out" 2>"$scratch/stream_$i.log" &
  clients+=($!)
done
for _ in $(seq 1 600); do
  [[ $(wc -c <"$scratch/stream_1.out") -gt 40 ]] && break
  sleep 0.05
done
cut=$(now_ms)
cut_link
for i in 1 2 3; do
  if wait "${clients[$((i - 1))]}"; then fail "stream $i finished despite the cut (stream_$i.log)"; fi
  grep -q "answered 14 " "$scratch/stream_$i.log" ||
    fail "stream $i did not end with UNAVAILABLE (14): $(cat "$scratch/stream_$i.log")"
done
wait_job "$job" "$cut" "3c replica mid-stream"
[[ $status -ne 0 ]] || fail "the partitioned replica exited 0 (serve_busy.log)"
expect_all_gone_since "$cut" "3c replica mid-stream"
# (In a step's collective, or between two steps waiting for the next plan.)
rank1_says serve_busy |
  grep -Eq "tandem: watchdog: rank 1: .* did not finish within ($timeout_s|$((timeout_s + 5))) s \(rank 1 was: (serving step|waiting for the leader's next step plan)" ||
  fail "the worker on node 2 did not end through its watchdog: $(rank1_says serve_busy | tail -n 3)"
say "   exit status $status; 3 streams ended UNAVAILABLE after $(wc -c <"$scratch/stream_1.out") bytes of stream 1"
say "PASS"
