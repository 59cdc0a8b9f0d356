#!/usr/bin/env bash
# The demo job's training, data parallel on 2 ranks of this machine (mpirun), with the same global
# batch as launch/demo.sh (2 ranks x 8 sequences = 16) and one thread per rank, so it reaches the
# same validation loss as the single-process run (to fp32 rounding).
#   launch/train-mpi.sh [--section.key=value ...]   (e.g. --parallel.zero=1)
# Ranks: TANDEM_RANKS (default 2; data.batch_size becomes 16 / ranks). Across machines, run the
# same mpirun with --hostfile FILE (see README). The run goes to runs/demo-mpi (a previous one is
# moved to runs/demo-mpi.previous unless --checkpoint.resume=true).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

bash launch/install-deps.sh
build_dir="${TANDEM_BUILD_DIR:-build}"
export CCACHE_DIR="${CCACHE_DIR:-${HOME:-/root}/.cache/ccache}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${TANDEM_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target tandem
tandem="$build_dir/tandem"

if [[ ! -f data/kjv/prepare.json ]]; then
  rm -rf data/kjv  # an interrupted earlier prepare
  bash launch/corpus.sh data/kjv.txt
  "$tandem" prepare --input data/kjv.txt --out data/kjv --train-tokenizer --vocab-size 4096
fi

ranks="${TANDEM_RANKS:-2}"
(( 16 % ranks == 0 )) || { echo "train-mpi.sh: TANDEM_RANKS must divide 16" >&2; exit 2; }
run_dir=runs/demo-mpi
resume=false
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
mpi_flags=(--oversubscribe)
if [[ $(id -u) == 0 ]]; then mpi_flags+=(--allow-run-as-root); fi
mpirun "${mpi_flags[@]}" -np "$ranks" "$tandem" train --config launch/configs/demo.json \
  --data.batch_size=$((16 / ranks)) --train.threads=1 --checkpoint.dir="$run_dir" "$@"
