#!/usr/bin/env bash
# deltapack benchmark: ratio, speed and peak memory, measured side by side in one run.
#
# Usage: scripts/bench.sh [WORKDIR] [REPEATS]
#   WORKDIR  where the reference pair and outputs go (default: bench-out, git-ignored; needs ~5 GB)
#   REPEATS  runs per measurement; medians are reported (default: 3)
# Environment:
#   PEER_PY  a Python with zipnn 0.5.4 installed (see ../shared/PEERS.md); when set, zipnn's
#            XOR-delta compress/decompress is measured on the same pair in the same run.
#   MODELS   the real checkpoints (default: ../shared/models).
#
# The machine is shared and noisy: every number is a median, and every time is also given as
# a multiple of the I/O floor measured in the same run (cat of the inputs for make, cp of the
# fine-tune for apply), with warm page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench-out}
REPEATS=${2:-3}
MODELS=${MODELS:-../shared/models}
mkdir -p "$WORK"
[ -x /usr/bin/time ] || { echo "needs GNU time for peak RSS: apt-get install time"; exit 2; }
cargo build --release -q -p deltapack-cli
BIN=$PWD/target/release/deltapack

# median_of SETUP CMD...: runs SETUP (untimed, e.g. removing the previous output) then CMD,
# REPEATS times; prints "median_seconds max_rss_kb".
median_of() {
  local setup=$1 times=() rss=0 t m
  shift
  for _ in $(seq "$REPEATS"); do
    sh -c "$setup"
    /usr/bin/time -f "%e %M" -o "$WORK/.time" "$@" >/dev/null
    read -r t m <"$WORK/.time"
    times+=("$t")
    ((m > rss)) && rss=$m
  done
  printf '%s\n' "${times[@]}" | sort -g | awk -v r="$rss" '{a[NR]=$1} END {print a[int((NR+1)/2)], r}'
}

row() { # name seconds floor rss extra
  awk -v n="$1" -v s="$2" -v f="$3" -v r="$4" -v e="$5" \
    'BEGIN {printf "  %-34s %8.2f s  %6.1fx floor  %7.0f MB  %s\n", n, s, (f > 0 ? s / f : 0), r / 1024, e}'
}

ref="$WORK/ref"
if [ ! -f "$ref/finetuned/model.safetensors" ]; then
  echo "generating the reference pair (Qwen2.5-0.5B shapes, bf16, W~N(0,0.02), E~N(0,0.001)) in $ref"
  "$BIN" dev synth --preset reference "$ref"
fi
echo "== reference pair: order-0 entropy bounds of the integer difference (expect 2.33x and 2.57x)"
"$BIN" dev bounds --base "$ref/base" --finetuned "$ref/finetuned"
cat "$ref"/base/* "$ref"/finetuned/* >/dev/null # warm the page cache

read -r cat_s _ < <(median_of true sh -c "cat '$ref/base/model.safetensors' '$ref/finetuned/model.safetensors' >/dev/null")
read -r cp_s _ < <(median_of "rm -rf '$WORK/cp'" cp -r "$ref/finetuned" "$WORK/cp")
# Each timed make writes a new file: replacing an old one would add the kernel's teardown of
# its 370 MB of page cache to the time, which is not make's work.
read -r make_s make_rss < <(median_of "rm -f '$WORK/ref.dpk'" "$BIN" make -q --base "$ref/base" --finetuned "$ref/finetuned" -o "$WORK/ref.dpk")
read -r apply_s apply_rss < <(median_of "rm -rf '$WORK/out'" "$BIN" apply -q --base "$ref/base" "$WORK/ref.dpk" -o "$WORK/out")
read -r verify_s verify_rss < <(median_of true "$BIN" verify -q --base "$ref/base" "$WORK/ref.dpk")
cmp -s "$WORK/out/model.safetensors" "$ref/finetuned/model.safetensors" || { echo "apply output differs!"; exit 1; }
ft_bytes=$(cat "$ref"/finetuned/* | wc -c)
delta_bytes=$(stat -c %s "$WORK/ref.dpk")
ratio=$(awk -v a="$ft_bytes" -v b="$delta_bytes" 'BEGIN {printf "%.3f", a / b}')
echo "== reference pair: $ft_bytes fine-tune bytes -> $delta_bytes delta bytes: ratio ${ratio}x (medians of $REPEATS)"
row "cat base+fine-tune (make floor)" "$cat_s" "$cat_s" 0 ""
row "cp fine-tune (apply floor)" "$cp_s" "$cp_s" 0 ""
row "deltapack make" "$make_s" "$cat_s" "$make_rss" "$(awk -v s="$make_s" -v b="$ft_bytes" 'BEGIN {printf "%.0f MB/s", b / s / 1e6}')"
row "deltapack apply (verifies, writes)" "$apply_s" "$cp_s" "$apply_rss" "byte-identical"
row "deltapack verify" "$verify_s" "$cp_s" "$verify_rss" ""
if [ -n "${PEER_PY:-}" ]; then
  z=$("$PEER_PY" scripts/peer_zipnn.py "$ref/base/model.safetensors" "$ref/finetuned/model.safetensors" \
      --threads "$(nproc)" --repeat "$REPEATS" --json 2>/dev/null)
  read -r zc zd zr < <(echo "$z" | python3 -c 'import json,sys; p=json.load(sys.stdin)["peers"]["zipnn"]; print(p["compress_s"], p["decompress_s"], p["ratio"])')
  row "zipnn 0.5.4 compress (in memory)" "$zc" "$cat_s" 0 "ratio ${zr}x"
  row "zipnn 0.5.4 decompress (in memory)" "$zd" "$cp_s" 0 ""
  awk -v m="$make_s" -v a="$apply_s" -v zc="$zc" -v zd="$zd" \
    'BEGIN {printf "  make is %.2fx faster than zipnn compress; apply takes %.2fx zipnn decompress\n", zc / m, a / zd}'
else
  echo "  (set PEER_PY to a Python with zipnn to measure it side by side)"
fi

if [ -d "$MODELS/minilm-base-bf16" ]; then
  echo "== real pairs in $MODELS (medians of $REPEATS)"
  for ft in ft-a-bf16 ft-b-bf16-sharded; do
    d="$WORK/$ft.dpk"
    read -r ms mr < <(median_of "rm -f '$d'" "$BIN" make -q --base "$MODELS/minilm-base-bf16" --finetuned "$MODELS/$ft" -o "$d")
    read -r as ar < <(median_of "rm -rf '$WORK/$ft'" "$BIN" apply -q --base "$MODELS/minilm-base-bf16" "$d" -o "$WORK/$ft")
    (cd "$MODELS/$ft" && sha256sum -- *) | (cd "$WORK/$ft" && sha256sum -c --quiet -) || { echo "$ft: apply output differs!"; exit 1; }
    r=$(awk -v a="$(cat "$MODELS/$ft"/* | wc -c)" -v b="$(stat -c %s "$d")" 'BEGIN {printf "%.3f", a / b}')
    bounds=$("$BIN" dev bounds --base "$MODELS/minilm-base-bf16" --finetuned "$MODELS/$ft")
    echo "  $ft: ratio ${r}x; make ${ms} s ($((mr / 1024)) MB); apply ${as} s ($((ar / 1024)) MB); all files sha256-identical; bounds $bounds"
  done
fi
