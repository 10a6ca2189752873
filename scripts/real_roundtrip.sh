#!/usr/bin/env bash
# Round trip of every fine-tune in the shared real checkpoints through the deltapack binary:
# make -> inspect -> apply -> verify --finetuned, then sha256 of every rebuilt file against the
# fine-tune's. Prints ratio, seconds and peak RSS of each step.
#
# Usage: scripts/real_roundtrip.sh [MODELS_DIR]   (default: ../shared/models)
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${1:-../shared/models}
BASE="$MODELS/minilm-base-bf16"
[ -d "$BASE" ] || { echo "no base at $BASE; nothing to do"; exit 0; }
cargo build --release -q -p deltapack-cli
BIN=$PWD/target/release/deltapack
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step() { # label command...
  local label=$1; shift
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" >"$WORK/out.txt"
    read -r s kb <"$WORK/time"
    printf '  %-8s %6.2f s  %6d MB\n' "$label" "$s" "$((kb / 1024))"
  else # GNU time (Debian package `time`) missing: seconds only, from bash's own timer.
    local t0=$EPOCHREALTIME
    "$@" >"$WORK/out.txt"
    awk -v a="$t0" -v b="$EPOCHREALTIME" -v l="$label" 'BEGIN {printf "  %-8s %6.2f s  (peak RSS needs /usr/bin/time)\n", l, b - a}'
  fi
}

for dir in "$MODELS"/*/; do
  ft=$(basename "$dir")
  [ "$ft" = minilm-base-bf16 ] && continue
  ls "$dir"/*.safetensors >/dev/null 2>&1 || continue
  echo "== $ft against minilm-base-bf16"
  step make "$BIN" make -q --base "$BASE" --finetuned "$dir" -o "$WORK/$ft.dpk" --base-id "sentence-transformers/all-MiniLM-L6-v2 (bf16)"
  step inspect "$BIN" inspect "$WORK/$ft.dpk"
  step apply "$BIN" apply -q --base "$BASE" "$WORK/$ft.dpk" -o "$WORK/$ft"
  step verify "$BIN" verify -q --base "$BASE" "$WORK/$ft.dpk" --finetuned "$dir"
  (cd "$dir" && find . -type f -not -name '*.bin' -print0 | sort -z | xargs -0 sha256sum) >"$WORK/want"
  (cd "$WORK/$ft" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$WORK/got"
  diff "$WORK/want" "$WORK/got" >/dev/null || { echo "  rebuilt files differ from $dir"; exit 1; }
  total=$(find "$dir" -type f -not -name '*.bin' -print0 | xargs -0 cat | wc -c)
  size=$(stat -c %s "$WORK/$ft.dpk")
  awk -v a="$total" -v b="$size" 'BEGIN {printf "  ratio    %.2fx (%d -> %d bytes); every rebuilt file sha256-identical\n", a / b, a, b}'
done
