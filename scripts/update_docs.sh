#!/usr/bin/env bash
# Regenerates, with the current build, every numbers table of README.md and docs/BENCHMARKS.md
# that needs neither PyTorch nor a training history, and the sweep of docs/sweep-ft-a.*:
#
#   1. the README's `codecs` table: QUALITY=0 TABLE=codecs scripts/eval_codecs.sh on ft-a-bf16
#   2. docs/sweep-ft-a.csv and docs/sweep-ft-a.svg: deltapack sweep on ft-a-bf16
#   3. the README's `headline` table and docs/BENCHMARKS.md's `exact` table: TABLES=1 scripts/bench.sh
#      (PEER_PY, PEERS, PEER_REPEATS and REF=0 pass through; see its header); it generates the
#      reference pair in WORKDIR/ref (2 GB) if missing
#   4. docs/BENCHMARKS.md's `lossy-ref` table: TABLES=1 scripts/bench_lossy.sh (reference pair)
#   5. docs/BENCHMARKS.md's `hotswap` tables: TABLES=1 scripts/bench_hotswap.sh (REPEATS x 4 rounds)
#
# Usage: scripts/update_docs.sh [WORKDIR]   (default bench-out, git-ignored; ~5 GB with the
#        reference pair). About 10 to 15 minutes on 2 cores, most of it the reference pair.
# Environment: MODELS (default ../shared/models), REPEATS (default 3), SKIP="codecs sweep bench
# lossy hotswap" leaves steps out. The task-quality tables need PyTorch: see
# scripts/eval_codecs.sh. Times are only as good as the machine is quiet: bench.sh notes the
# load average in its tables.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench-out}
MODELS=${MODELS:-../shared/models}
REPEATS=${REPEATS:-3}
SKIP=" ${SKIP:-} "
[ -d "$MODELS/minilm-base-bf16" ] || { echo "no real checkpoints in $MODELS; nothing to do" >&2; exit 2; }
cargo build --release -q --locked -p deltapack-cli
BIN=target/release/deltapack
mkdir -p "$WORK"

if [[ "$SKIP" != *" codecs "* ]]; then
  echo "== codec table (README.md)"
  QUALITY=0 TABLE=codecs scripts/eval_codecs.sh "$MODELS/minilm-base-bf16" "$MODELS/ft-a-bf16" "$WORK/codecs"
fi

if [[ "$SKIP" != *" sweep "* ]]; then
  echo "== sweep of ft-a-bf16 (docs/sweep-ft-a.csv, docs/sweep-ft-a.svg)"
  rm -rf "$WORK/sweep-ft-a"
  "$BIN" sweep -q --base "$MODELS/minilm-base-bf16" --finetuned "$MODELS/ft-a-bf16" -o "$WORK/sweep-ft-a"
  cp "$WORK/sweep-ft-a/sweep.csv" docs/sweep-ft-a.csv
  cp "$WORK/sweep-ft-a/sweep.svg" docs/sweep-ft-a.svg
fi

if [[ "$SKIP" != *" bench "* ]]; then
  echo "== exact codec against the peers (README.md headline, docs/BENCHMARKS.md exact)"
  MODELS="$MODELS" TABLES=1 scripts/bench.sh "$WORK" "$REPEATS"
fi
if [[ "$SKIP" != *" lossy "* ]]; then
  echo "== lossy codecs on the reference pair (docs/BENCHMARKS.md lossy-ref)"
  TABLES=1 scripts/bench_lossy.sh "$WORK" "$REPEATS"
fi

if [[ "$SKIP" != *" hotswap "* ]]; then
  echo "== hot swap against apply (docs/BENCHMARKS.md hotswap)"
  MODELS="$MODELS" TABLES=1 scripts/bench_hotswap.sh "$WORK" $((REPEATS * 4 - 1))
fi
git --no-pager diff --stat -- README.md docs
