# Shared steps of the launch scripts (demo.sh, train-mpi.sh); source it from the repository root.
#   tandem_build           install packages (idempotent), configure and build; sets $tandem
#   tandem_prepare_kjv     the King James Bible -> data/kjv (4096-token BPE + shards), once, and
#                          the next-line task data/kjv/next_line.jsonl from its held-out end
#   tandem_fresh_run_dir DEFAULT ARGS...
#                          sets $run_dir (DEFAULT, or --checkpoint.dir=... among ARGS) and, unless
#                          ARGS hold --checkpoint.resume=true, moves an existing run to
#                          $run_dir.previous (replacing an older one)
#   tandem_mpi_flags       sets the array $mpi_flags for mpirun on this machine (oversubscribed;
#                          allowed as root)
#   tandem_wait_for_port LOG
#                          prints the port of a server's "listening on 127.0.0.1:PORT" line
#                          once it appears in LOG (60 s at most; then the log and status 1)

tandem_build() {
  bash launch/install-deps.sh
  local build_dir="${TANDEM_BUILD_DIR:-build}"
  export CCACHE_DIR="${CCACHE_DIR:-${HOME:-/root}/.cache/ccache}"
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${TANDEM_CMAKE_ARGS:-} >/dev/null
  cmake --build "$build_dir" -j "$(nproc)" --target tandem
  tandem="$build_dir/tandem"
}

tandem_prepare_kjv() {
  if [[ ! -f data/kjv/prepare.json ]]; then
    rm -rf data/kjv  # an interrupted earlier prepare
    bash launch/corpus.sh data/kjv.txt
    "$tandem" prepare --input data/kjv.txt --out data/kjv --train-tokenizer --vocab-size 4096
  fi
  if [[ ! -f data/kjv/next_line.jsonl ]]; then
    # 200 questions from the last 3% of the lines: inside the validation split (the last 5% of
    # the tokens, prepare's default --val-fraction), so never trained on.
    "$tandem" make-task --input data/kjv.txt --out data/kjv/next_line.jsonl --questions 200 \
      --holdout 0.03
  fi
}

tandem_fresh_run_dir() {
  run_dir="$1"
  shift
  local resume=false arg
  for arg in "$@"; do
    case "$arg" in
      --checkpoint.dir=*) run_dir="${arg#--checkpoint.dir=}" ;;
      --checkpoint.resume=true) resume=true ;;
    esac
  done
  if [[ $resume == false && -d "$run_dir" ]]; then
    rm -rf "$run_dir.previous"
    mv "$run_dir" "$run_dir.previous"
    echo "tandem: moved the previous run to $run_dir.previous"
  fi
}

tandem_mpi_flags() {
  mpi_flags=(--oversubscribe)
  if [[ $(id -u) -eq 0 ]]; then mpi_flags+=(--allow-run-as-root); fi
}

tandem_wait_for_port() {
  local port
  for _ in $(seq 1 600); do
    port=$(grep -ao "listening on 127\.0\.0\.1:[0-9]*" "$1" 2>/dev/null | head -n 1 | sed 's/.*://')
    if [[ -n "$port" ]]; then echo "$port"; return 0; fi
    sleep 0.1
  done
  echo "tandem: a server did not start, see $1:" >&2
  cat "$1" >&2
  return 1
}
