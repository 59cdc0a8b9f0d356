#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install packages (idempotent), build, then train a
# small GPT on the bundled corpus (the King James Bible from Debian's bible-kjv) with the
# validation loss evaluated in the loop, and answer a generation request from the checkpoint.
#   launch/demo.sh [--section.key=value ...]   (overrides for launch/configs/demo.json)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

bash launch/install-deps.sh
build_dir="${TANDEM_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release ${TANDEM_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$(nproc)" --target tandem
tandem="$build_dir/tandem"

# 1. Corpus -> BPE vocabulary (4096 tokens) + token shards.
if [[ ! -f data/kjv/prepare.json ]]; then
  bash launch/corpus.sh data/kjv.txt
  "$tandem" prepare --input data/kjv.txt --out data/kjv --train-tokenizer --vocab-size 4096
fi

# 2. Train with in-loop validation; a fresh run each time (the previous one is kept aside).
if [[ -d runs/demo ]]; then rm -rf runs/demo.previous; mv runs/demo runs/demo.previous; fi
"$tandem" train --config launch/configs/demo.json "$@"

# 3. Generation from the final checkpoint.
ckpt="$(ls -d runs/demo/checkpoints/step_* | tail -n 1)"
echo "tandem: generating from $ckpt"
"$tandem" generate --model "$ckpt" --prompt "In the beginning" --max-new-tokens 60 --seed 7
