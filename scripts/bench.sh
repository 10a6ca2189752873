#!/usr/bin/env bash
# deltapack benchmark: ratio, speed and peak memory of the exact codec, measured side by side in
# one run, on the reference pair and on the real pairs.
#
# Usage: scripts/bench.sh [WORKDIR] [REPEATS]
#   WORKDIR  where the reference pair and outputs go (default: bench-out, git-ignored; needs ~5 GB)
#   REPEATS  runs per measurement; medians are reported (default: 3)
# Environment:
#   PEER_PY  a Python with the peers installed (see ../shared/PEERS.md); when set, the peers in
#            PEERS (default zipnn,z4ai; z4ai alone needs only numpy and zstandard, zipnn needs
#            torch) compress and decompress the same pairs in the same run, in memory, and the
#            sizes they reach are recorded in scripts/peer_sizes.csv. Peers not run here are
#            taken from that file (a peer's size does not depend on deltapack's build).
#            PEER_REPEATS (default REPEATS) runs per peer measurement.
#   MODELS   the real checkpoints (default: ../shared/models).
#   REF=0    skip the reference pair (generated, ~2 GB; most of the run's time).
#   TABLES=1 write the `headline` table of README.md and the `exact` table of
#            docs/BENCHMARKS.md (with scripts/update_tables.py) from this run.
#
# The machine is shared and noisy: every number is a median, and every time is also given as
# a multiple of the I/O floor measured in the same run (cat of the inputs for make, cp of the
# fine-tune for apply), with warm page cache.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-bench-out}
REPEATS=${2:-3}
MODELS=${MODELS:-../shared/models}
PEERS=${PEERS:-zipnn,z4ai}
mkdir -p "$WORK"
[ -x /usr/bin/time ] || { echo "needs GNU time for peak RSS: apt-get install time"; exit 2; }
cargo build --release -q -p deltapack-cli
BIN=$PWD/target/release/deltapack
RESULTS="$WORK/bench-results.jsonl" # one JSON object per measured pair, for the tables
: >"$RESULTS"

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

# peers PAIR BASE_FILE FT_FILE: runs the peers on one pair of same-layout files (PEER_PY set),
# prints their rows, records their sizes in scripts/peer_sizes.csv; prints their JSON.
peers() {
  [ -n "${PEER_PY:-}" ] || { echo '{}'; return; }
  local z
  z=$("$PEER_PY" scripts/peer_zipnn.py "$2" "$3" --peers "$PEERS" \
      --threads "$(nproc)" --repeat "${PEER_REPEATS:-$REPEATS}" --json 2>/dev/null)
  python3 - "$1" "$z" <<'PY'
import csv, datetime, json, sys
pair, report = sys.argv[1], json.loads(sys.argv[2])
path = "scripts/peer_sizes.csv"
with open(path) as f:
    rows = [r for r in csv.DictReader(f)]
fields = ["pair", "peer", "version", "input_bytes", "compressed_bytes", "ratio", "measured"]
for name, p in report["peers"].items():
    rows = [r for r in rows if not (r["pair"] == pair and r["peer"] == name)]
    rows.append({"pair": pair, "peer": name, "version": p["version"], "input_bytes": report["ft_bytes"],
                 "compressed_bytes": p["compressed_bytes"], "ratio": f'{p["ratio"]:.3f}',
                 "measured": datetime.date.today().isoformat() + " scripts/bench.sh"})
    print(f'  {name} {p["version"]}: ratio {p["ratio"]:.3f}x; compress {p["compress_s"]:.2f} s, '
          f'decompress {p["decompress_s"]:.2f} s (in memory, medians)', file=sys.stderr)
with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (r["pair"], r["peer"])))
print(json.dumps(report["peers"]))
PY
}

# record KEY=VALUE...: one JSON object per pair for the tables.
record() {
  python3 -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' "$@" >>"$RESULTS"
}

ref="$WORK/ref"
if [ "${REF:-1}" != 0 ]; then
  if [ ! -f "$ref/finetuned/model.safetensors" ]; then
    echo "generating the reference pair (Qwen2.5-0.5B shapes, bf16, W~N(0,0.02), E~N(0,0.001)) in $ref"
    "$BIN" dev synth --preset reference "$ref"
  fi
  load=$(cut -d' ' -f1 /proc/loadavg)
  echo "== reference pair: order-0 entropy bounds of the integer difference (expect 2.33x and 2.57x)"
  bounds=$("$BIN" dev bounds --base "$ref/base" --finetuned "$ref/finetuned")
  echo "  $bounds"
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
  p=$(peers reference "$ref/base/model.safetensors" "$ref/finetuned/model.safetensors")
  [ -n "${PEER_PY:-}" ] || echo "  (set PEER_PY to a Python with the peers to measure them side by side)"
  record pair=reference ft_bytes="$ft_bytes" weight_bytes="$(cat "$ref"/finetuned/*.safetensors | wc -c)" \
    delta_bytes="$delta_bytes" make_s="$make_s" apply_s="$apply_s" verify_s="$verify_s" cat_s="$cat_s" cp_s="$cp_s" \
    make_rss="$make_rss" apply_rss="$apply_rss" verify_rss="$verify_rss" bounds="$bounds" peers="$p" load="$load" peer_repeats="${PEER_REPEATS:-$REPEATS}"
fi

if [ -d "$MODELS/minilm-base-bf16" ]; then
  echo "== real pairs in $MODELS (medians of $REPEATS)"
  for ft in ft-a-bf16 ft-b-bf16-sharded; do
    d="$WORK/$ft.dpk"
    load=$(cut -d' ' -f1 /proc/loadavg)
    cat "$MODELS/minilm-base-bf16"/* "$MODELS/$ft"/* >/dev/null
    read -r cat_s _ < <(median_of true sh -c "cat '$MODELS/minilm-base-bf16'/*.safetensors '$MODELS/$ft'/*.safetensors >/dev/null")
    read -r cp_s _ < <(median_of "rm -rf '$WORK/cp'" cp -r "$MODELS/$ft" "$WORK/cp")
    read -r ms mr < <(median_of "rm -f '$d'" "$BIN" make -q --base "$MODELS/minilm-base-bf16" --finetuned "$MODELS/$ft" -o "$d")
    read -r as ar < <(median_of "rm -rf '$WORK/$ft'" "$BIN" apply -q --base "$MODELS/minilm-base-bf16" "$d" -o "$WORK/$ft")
    read -r vs vr < <(median_of true "$BIN" verify -q --base "$MODELS/minilm-base-bf16" "$d")
    (cd "$MODELS/$ft" && sha256sum -- *) | (cd "$WORK/$ft" && sha256sum -c --quiet -) || { echo "$ft: apply output differs!"; exit 1; }
    ft_bytes=$(cat "$MODELS/$ft"/* | wc -c)
    r=$(awk -v a="$ft_bytes" -v b="$(stat -c %s "$d")" 'BEGIN {printf "%.3f", a / b}')
    bounds=$("$BIN" dev bounds --base "$MODELS/minilm-base-bf16" --finetuned "$MODELS/$ft")
    echo "  $ft: ratio ${r}x; make ${ms} s ($((mr / 1024)) MB); apply ${as} s ($((ar / 1024)) MB); verify ${vs} s; all files sha256-identical; bounds $bounds"
    p='{}'
    # The peers need files of the same layout: one model.safetensors on both sides.
    if [ -f "$MODELS/$ft/model.safetensors" ]; then
      p=$(peers "$ft" "$MODELS/minilm-base-bf16/model.safetensors" "$MODELS/$ft/model.safetensors")
    fi
    record pair="$ft" ft_bytes="$ft_bytes" weight_bytes="$(cat "$MODELS/$ft"/*.safetensors | wc -c)" \
      delta_bytes="$(stat -c %s "$d")" make_s="$ms" apply_s="$as" verify_s="$vs" cat_s="$cat_s" cp_s="$cp_s" \
      make_rss="$mr" apply_rss="$ar" verify_rss="$vr" bounds="$bounds" peers="$p" load="$load" peer_repeats="${PEER_REPEATS:-$REPEATS}"
  done
fi

[ "${TABLES:-0}" = 1 ] || exit 0
args="scripts/bench.sh WORKDIR $REPEATS"
[ -n "${PEER_PY:-}" ] && args="PEER_PY=... PEERS=$PEERS PEER_REPEATS=${PEER_REPEATS:-$REPEATS} $args"
[ "${REF:-1}" = 0 ] && args="REF=0 $args"
python3 scripts/bench_tables.py "$RESULTS" headline | python3 scripts/update_tables.py --from "$args" headline README.md
python3 scripts/bench_tables.py "$RESULTS" exact | python3 scripts/update_tables.py --from "$args" exact docs/BENCHMARKS.md
