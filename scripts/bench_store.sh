#!/usr/bin/env bash
# The store on a training history: total size against the sum of exact deltas against the
# base, and `store get` of the 5th checkpoint through its chain against `apply` of one delta,
# side by side, medians of N runs.
#   scripts/bench_store.sh BASE HISTORY_DIR [N]
# HISTORY_DIR holds checkpoints step-0100 ... (make them with ../shared/models/make_models.py).
set -euo pipefail
base=$1; hist=$2; n=${3:-5}
cargo build --release -q -p deltapack-cli
D=$PWD/target/release/deltapack
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
steps=$(ls "$hist" | sort)
"$D" -q store init "$work/store" --base "$base" --name base >/dev/null
for s in $steps; do
  "$D" -q store add "$work/store" "$s" "$hist/$s"
  "$D" -q make --base "$base" --finetuned "$hist/$s" -o "$work/direct-$s.dpk"
done
"$D" store list "$work/store"
store=$(du -cb "$work"/store/deltas/* "$work"/store/aux/* | tail -1 | cut -f1)
direct=$(du -cb "$work"/direct-*.dpk | tail -1 | cut -f1)
python3 -c "print(f'store (deltas + aux files) {$store} B, sum of exact deltas against the base {$direct} B: {$store/$direct:.3f}x')"
fifth=$(echo "$steps" | sed -n 5p)
med() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# Alternating runs, timed to the microsecond (the commands take a tenth of a second).
secs() { local t0=$EPOCHREALTIME; "$@" >/dev/null; awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.4f\n", b - a}'; }
for i in $(seq "$n"); do
  rm -rf "$work/o1" "$work/o2"
  secs "$D" -q apply --base "$base" "$work/direct-$fifth.dpk" -o "$work/o1" >>"$work/apply.t"
  secs "$D" -q store get "$work/store" "$fifth" -o "$work/o2" >>"$work/get.t"
done
cmp "$work/o2/model.safetensors" "$hist/$fifth/model.safetensors"
a=$(med < "$work/apply.t"); g=$(med < "$work/get.t")
python3 -c "print(f'$fifth: store get through its chain {$g:.3f} s, apply of one delta {$a:.3f} s: {$g/$a:.2f}x (medians of $n)')"
