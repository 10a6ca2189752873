#!/usr/bin/env bash
# Hot swap benchmark: Resident::switch_to against `apply` of the same delta to a directory on
# disk, side by side in one process and one run (crates/deltapack/examples/bench_hotswap.rs).
#
# Usage: scripts/bench_hotswap.sh [WORKDIR] [REPEATS]
#   WORKDIR  deltas, the reference pair's second fine-tune and apply's output (default:
#            bench-out, git-ignored; ~3 GB with the reference pair)
#   REPEATS  rounds per measurement; medians are reported (default: 5)
# Environment:
#   MODELS   the real checkpoints (default: ../shared/models)
#   REF      the reference pair, REF/base and REF/finetuned (default: WORKDIR/ref, which
#            scripts/bench.sh generates); skipped when absent
#   TABLES=1 write the `hotswap` table of docs/BENCHMARKS.md from this run
#            (scripts/hotswap_tables.py, through scripts/update_tables.py)
#
# Pairs: (a) minilm-base-bf16 with A = ft-a-bf16 and B = ft-b-bf16-sharded, then the other way
# round; (b) the reference pair with A = its fine-tune and B = a second fine-tune of its base
# (base + N(0, 0.001) in bf16, seed 2, written once into WORKDIR/hotswap/ref-ft2). Each B is
# also made as a child of A (`make --parent`), for the switch from A to B in one link.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench-out}
REPEATS=${2:-5}
MODELS=${MODELS:-../shared/models}
REF=${REF:-$WORK/ref}
TARGET=${CARGO_TARGET_DIR:-target}
H="$WORK/hotswap"
mkdir -p "$H"
LOG="$H/bench.log" # what the runs print, for the table
: >"$LOG"
echo "# load $(cut -d' ' -f1 /proc/loadavg) $(nproc)" >>"$LOG"
cargo build --release -q -p deltapack-cli
cargo build --release -q -p deltapack --example bench_hotswap
BIN="$TARGET/release/deltapack"
BENCH="$TARGET/release/examples/bench_hotswap"

delta() { # BASE FINETUNED OUT [PARENT]
  "$BIN" make -q --force --base "$1" ${4:+--parent "$4"} --finetuned "$2" -o "$3" >/dev/null
}

if [ -d "$MODELS/minilm-base-bf16" ]; then
  delta "$MODELS/minilm-base-bf16" "$MODELS/ft-a-bf16" "$H/ft-a.dpk"
  delta "$MODELS/minilm-base-bf16" "$MODELS/ft-b-bf16-sharded" "$H/ft-b.dpk"
  delta "$MODELS/minilm-base-bf16" "$MODELS/ft-b-bf16-sharded" "$H/ft-b-on-a.dpk" "$H/ft-a.dpk"
  delta "$MODELS/minilm-base-bf16" "$MODELS/ft-a-bf16" "$H/ft-a-on-b.dpk" "$H/ft-b.dpk"
  "$BENCH" run "$MODELS/minilm-base-bf16" "$H/out" "$REPEATS" "$H/ft-a.dpk" "$H/ft-b.dpk" "$H/ft-b-on-a.dpk" | tee -a "$LOG"
  echo "# B $(stat -c %s "$H/ft-b.dpk") $(stat -c %s "$H/ft-b-on-a.dpk")" >>"$LOG"
  "$BENCH" run "$MODELS/minilm-base-bf16" "$H/out" "$REPEATS" "$H/ft-b.dpk" "$H/ft-a.dpk" "$H/ft-a-on-b.dpk" | tee -a "$LOG"
  echo "# B $(stat -c %s "$H/ft-a.dpk") $(stat -c %s "$H/ft-a-on-b.dpk")" >>"$LOG"
else
  echo "$MODELS/minilm-base-bf16 not found; real pair skipped"
fi

if [ -f "$REF/base/model.safetensors" ] && [ -f "$REF/finetuned/model.safetensors" ]; then
  [ -f "$H/ref-ft2/model.safetensors" ] || "$BENCH" perturb "$REF/base" "$H/ref-ft2" 2 0.001
  delta "$REF/base" "$REF/finetuned" "$H/ref-a.dpk"
  delta "$REF/base" "$H/ref-ft2" "$H/ref-b.dpk"
  delta "$REF/base" "$H/ref-ft2" "$H/ref-b-on-a.dpk" "$H/ref-a.dpk"
  "$BENCH" run "$REF/base" "$H/out" "$REPEATS" "$H/ref-a.dpk" "$H/ref-b.dpk" "$H/ref-b-on-a.dpk" | tee -a "$LOG"
  echo "# B $(stat -c %s "$H/ref-b.dpk") $(stat -c %s "$H/ref-b-on-a.dpk")" >>"$LOG"
else
  echo "reference pair not found in $REF (scripts/bench.sh generates it); skipped"
fi
rm -rf "$H/out"
if [ "${TABLES:-0}" = 1 ]; then
  args="scripts/bench_hotswap.sh WORKDIR $REPEATS"
  python3 scripts/hotswap_tables.py "$LOG" | python3 scripts/update_tables.py --from "$args" hotswap docs/BENCHMARKS.md
fi
