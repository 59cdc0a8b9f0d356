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

source launch/common.sh
tandem_build
tandem_prepare_kjv

ranks="${TANDEM_RANKS:-2}"
(( 16 % ranks == 0 )) || { echo "train-mpi.sh: TANDEM_RANKS must divide 16" >&2; exit 2; }
tandem_fresh_run_dir runs/demo-mpi "$@"
tandem_mpi_flags
mpirun "${mpi_flags[@]}" -np "$ranks" "$tandem" train --config launch/configs/demo.json \
  --data.batch_size=$((16 / ranks)) --train.threads=1 --checkpoint.dir="$run_dir" "$@"
