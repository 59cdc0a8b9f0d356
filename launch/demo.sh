#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install packages (idempotent), build, then train a
# small GPT on the bundled corpus (the King James Bible from Debian's bible-kjv) with the
# validation loss evaluated in the loop, and answer a generation request from the checkpoint.
#   launch/demo.sh [--section.key=value ...]   (overrides for launch/configs/demo.json)
# A fresh run moves the previous runs/demo aside to runs/demo.previous (replacing an older one);
# --checkpoint.resume=true continues it instead.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

bash launch/install-deps.sh
build_dir="${TANDEM_BUILD_DIR:-build}"
export CCACHE_DIR="${CCACHE_DIR:-${HOME:-/root}/.cache/ccache}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${TANDEM_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target tandem
tandem="$build_dir/tandem"

# 1. Corpus -> BPE vocabulary (4096 tokens) + token shards.
if [[ ! -f data/kjv/prepare.json ]]; then
  rm -rf data/kjv  # an interrupted earlier prepare
  bash launch/corpus.sh data/kjv.txt
  "$tandem" prepare --input data/kjv.txt --out data/kjv --train-tokenizer --vocab-size 4096
fi

# 2. Train with in-loop validation.
run_dir=runs/demo
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
"$tandem" train --config launch/configs/demo.json "$@"

# 3. A generation request answered from the final checkpoint.
ckpt="$(ls -d "$run_dir"/checkpoints/step_* | grep -E "/step_[0-9]+$" | sort -V | tail -n 1)"
echo "tandem: generating from $ckpt"
"$tandem" generate --model "$ckpt" --prompt "In the beginning" --max-new-tokens 60 --seed 7
