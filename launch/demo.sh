#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install packages (idempotent), build, then train a
# small GPT on the bundled corpus (the King James Bible from Debian's bible-kjv) with the
# validation loss evaluated in the loop, plot its curves (runs/demo/plot.png), answer a
# generation request from the checkpoint, then serve it over gRPC as a 2-rank tensor-parallel
# replica (mpirun) behind a router, answer a request through the router and shut down.
#   launch/demo.sh [--section.key=value ...]   (overrides for launch/configs/demo.json)
# A fresh run moves the previous runs/demo aside to runs/demo.previous (replacing an older one);
# --checkpoint.resume=true continues it instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

source launch/common.sh
tandem_build

# 1. Corpus -> BPE vocabulary (4096 tokens) + token shards.
tandem_prepare_kjv

# 2. Train with in-loop validation.
tandem_fresh_run_dir runs/demo "$@"
"$tandem" train --config launch/configs/demo.json "$@"
"$tandem" plot "$run_dir"   # the loss curves: $run_dir/plot.png (+ plot.svg)

# 3. A generation request answered from the final checkpoint.
ckpt="$(ls -d "$run_dir"/checkpoints/step_* | grep -E "/step_[0-9]+$" | sort -V | tail -n 1)"
echo "tandem: generating from $ckpt"
"$tandem" generate --model "$ckpt" --prompt "In the beginning" --max-new-tokens 60 --seed 7

# 4. Serve the checkpoint over gRPC as a tensor-parallel replica on 2 ranks (mpirun: the weights
# and the KV cache split by heads), put a router in front, answer a request through the router,
# then shut both down cleanly (SIGUSR1 to mpirun, SIGTERM to the router: drain, exit 0).
serve_log="$run_dir/serve.log"
router_log="$run_dir/router.log"
pids=()
stop_servers() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}
trap stop_servers EXIT
tandem_mpi_flags
mpirun "${mpi_flags[@]}" -np 2 "$tandem" serve --model "$ckpt" --port 0 --metrics-port 0 \
  >"$serve_log" 2>&1 &
mpirun_pid=$!
pids+=($mpirun_pid)
replica_port=$(tandem_wait_for_port "$serve_log")
"$tandem" router --replicas "127.0.0.1:$replica_port" --port 0 >"$router_log" 2>&1 &
router_pid=$!
pids+=($router_pid)
router_port=$(tandem_wait_for_port "$router_log")
echo "tandem: 2-rank tensor-parallel replica on 127.0.0.1:$replica_port, router on 127.0.0.1:$router_port"
echo "tandem: asking the router (gRPC tandem.v1.Generation/GenerateStream):"
"$tandem" generate --server "127.0.0.1:$router_port" --prompt "And God said" --max-new-tokens 40 \
  --seed 7 --timeout 120
status=0
# SIGUSR1 to mpirun reaches every rank (the leader drains, then stops the other rank) and lets
# the job end by itself; a SIGTERM to mpirun would be followed by its SIGKILL a second later.
kill -USR1 "$mpirun_pid"
kill -TERM "$router_pid"
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
pids=()
trap - EXIT
if [[ $status -ne 0 ]]; then
  echo "tandem: demo: a server exited with status $status (logs: $serve_log, $router_log)" >&2
  exit 1
fi
echo "tandem: servers drained and exited cleanly"
