#!/usr/bin/env bash
# make, apply and hot swap of two builds side by side, interleaved run by run, on the real
# pairs: the "same speed" check of a refactor against a reference commit.
#
#   scripts/bench_compare.sh OLD_ROOT NEW_ROOT [RUNS] [MODELS]
#
# OLD_ROOT and NEW_ROOT are checkouts whose release builds are done:
#   cargo build --release -p deltapack-cli && cargo build --release -p deltapack --example prof_switch
# (e.g. `git worktree add --detach /tmp/old 6915cbf` for the old one). RUNS (default 11)
# interleaved runs of each step. With REF=DIR (a pair from `deltapack dev synth DIR`, 2 GB),
# make and apply of the reference pair too.
# MODELS defaults to ../shared/models. Prints, per pair and
# step, the median seconds of each build and new/old. The deltas are made by the old build
# and used by both, so apply and the switch read the same files.
set -euo pipefail
old=$1 new=$2 runs=${3:-11}
models=${4:-$(cd "$(dirname "$0")/.." && pwd)/../shared/models}
base="$models/minilm-base-bf16"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Seconds one command takes (its output discarded).
seconds() {
  local t0=$EPOCHREALTIME
  "$@" >/dev/null 2>&1
  awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.4f\n", b - a}'
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }

report() { # label old-times-file new-times-file
  local o n
  o=$(median <"$2") n=$(median <"$3")
  awk -v l="$1" -v o="$o" -v n="$n" 'BEGIN {printf "| %s | %.4f s | %.4f s | %.3f |\n", l, o, n, n / o}'
}

echo "| step | old | new | new/old |"
echo "|---|---|---|---|"
pairs=(ft-a-bf16 ft-b-bf16-sharded)
[ -n "${REF:-}" ] && pairs+=(reference)
for ft in "${pairs[@]}"; do
  base="$models/minilm-base-bf16" fdir="$models/$ft"
  [ "$ft" = reference ] && base="$REF/base" fdir="$REF/finetuned"
  [ -d "$fdir" ] || continue
  "$old/target/release/deltapack" make -q --base "$base" --finetuned "$fdir" -o "$work/$ft.dpk" >/dev/null
  for step in make apply; do
    : >"$work/old.t"
    : >"$work/new.t"
    for ((i = 0; i < runs; i++)); do
      for b in old new; do
        root=${!b}
        case $step in
          make) seconds "$root/target/release/deltapack" make -q --force --base "$base" --finetuned "$fdir" -o "$work/$b.dpk" >>"$work/$b.t" ;;
          apply)
            rm -rf "$work/out"
            seconds "$root/target/release/deltapack" apply -q --base "$base" "$work/$ft.dpk" -o "$work/out" >>"$work/$b.t"
            ;;
        esac
      done
    done
    report "$ft $step" "$work/old.t" "$work/new.t"
  done
  rm -rf "$work/out" "$work/old.dpk" "$work/new.dpk"
  [ "$ft" = reference ] && continue # hot swap of the reference pair: scripts/bench_hotswap.sh
  # Hot swap: each build's own loop reports the median of its switches; interleave the loops.
  : >"$work/old.t"
  : >"$work/new.t"
  : >"$work/old.r"
  : >"$work/new.r"
  for ((i = 0; i < (runs + 1) / 2; i++)); do
    for b in old new; do
      root=${!b}
      line=$("$root/target/release/examples/prof_switch" "$base" "$work/$ft.dpk" 5)
      awk '{print $2}' <<<"$line" >>"$work/$b.t"
      awk '{print $5}' <<<"$line" >>"$work/$b.r"
    done
  done
  report "$ft hot swap base -> A" "$work/old.t" "$work/new.t"
  report "$ft hot swap A -> base" "$work/old.r" "$work/new.r"
done
echo
echo "Medians of $runs interleaved runs (hot swap: of $(((runs + 1) / 2)) runs of 5 switches each), load average $(cut -d' ' -f1-3 /proc/loadavg)."
