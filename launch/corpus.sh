#!/usr/bin/env bash
# Writes the bundled demo corpus: the King James Bible (public domain) from Debian's bible-kjv
# packages, one verse per line without the verse references. Usage: launch/corpus.sh OUT_FILE
set -euo pipefail
out="${1:?usage: launch/corpus.sh OUT_FILE}"
command -v bible >/dev/null || { echo "corpus.sh: the 'bible' program is missing (apt-get install bible-kjv)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# `bible` prints "Ge1:1 text" for a book's first verse and "  2 text" for the others.
bible -m 8192 "Gen1:1-Rev22:21" | sed -E 's/^[A-Za-z0-9]+:[0-9]+ //; s/^ +[0-9]+ //' > "$tmp"
[[ -s "$tmp" ]] || { echo "corpus.sh: 'bible' printed nothing" >&2; rm -f "$tmp"; exit 1; }
mv "$tmp" "$out"
