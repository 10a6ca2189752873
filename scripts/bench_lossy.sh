#!/usr/bin/env bash
# Lossy codecs on the reference pair (Qwen2.5-0.5B shapes, bf16, delta ~ N(0, 0.001)),
# side by side with the exact codec in the same run.
#
#   scripts/bench_lossy.sh WORKDIR [REPS]
#
# Makes the pair with `deltapack dev synth` if WORKDIR/ref is missing. For each codec
# setting: bits/param, model error and the Gaussian bounds (Shannon 2^-R, ideal entropy-coded
# scalar quantizer 1.17 x 2^-R); for the fixed settings also the median make time over REPS
# runs (default 3) and its ratio to the exact codec's median, runs interleaved so that a
# noisy machine slows both alike. Peak RSS with GNU time when available. SKIP_BUDGETS=1
# leaves out the (slow) budgeted settings. TABLES=1 writes the `lossy-ref` table of
# docs/BENCHMARKS.md from the run (with scripts/update_tables.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
work="$1"
reps="${2:-3}"
dp="${DELTAPACK:-$root/target/release/deltapack}"
ref="$work/ref"
[ -d "$ref/base" ] || "$dp" dev synth --preset reference "$ref"
load="$(cut -d' ' -f1 /proc/loadavg)"
timer=()
if /usr/bin/time -f %M true 2>/dev/null; then timer=(/usr/bin/time -f "%e %M" -o "$work/time"); fi
run() { # codec [max-error] -> prints "bits error seconds rss"
    local budget=()
    [ -n "${2:-}" ] && budget=(--max-error "$2")
    local start end out
    start=$(date +%s.%N)
    out="$("${timer[@]}" "$dp" make -q --json --force --base "$ref/base" --finetuned "$ref/finetuned" \
        -o "$work/lossy.dpk" --codec "$1" "${budget[@]}")"
    end=$(date +%s.%N)
    local rss="-"
    [ ${#timer[@]} -gt 0 ] && rss="$(awk '{print $2}' "$work/time")"
    python3 -c 'import json,sys; m=json.loads(sys.argv[1]); print(m["bits_per_param"], m["error"], float(sys.argv[2]) - float(sys.argv[3]), sys.argv[4])' \
        "$out" "$end" "$start" "$rss"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
fixed=(exact "sign:zeros=sign" "sign-axis:zeros=sign" "quant:bits=4" "quant:bits=5" "sparse:keep=0.1" "dare:keep=0.1")
declare -A times rss bits err
for ((r = 0; r < reps; r++)); do
    for c in "${fixed[@]}"; do
        read -r b e s m < <(run "$c")
        times[$c]+="$s "
        rss[$c]="$m" bits[$c]="$b" err[$c]="$e"
    done
done
exact_t="$(echo ${times[exact]} | tr ' ' '\n' | median)"
table="$work/lossy-ref.md"
{ echo "| codec | max error | bits/param | error | Shannon bound | ideal scalar quantizer | make | x exact | peak RSS |"
  echo "|---|---|---|---|---|---|---|---|---|"; } >"$table"
# row CODEC MAX_ERROR BITS ERROR SECONDS EXACT_SECONDS RSS_KB: a line printed and a table row.
row() {
    python3 - "$@" "$table" <<'PY'
import sys
c, me, b, e, t, x, m, table = sys.argv[1:]
b, e, t = float(b), float(e), float(t)
d = me or "-"
rel = f"{t / float(x):.2f}x" if x else "-"
print(f"{c:<24} {d:>9} {b:9.3f} {e:9.4f} {2**-b:9.4f} {1.17*2**-b:10.4f} {t:9.2f} {rel:>8}")
print(f"    peak RSS {m} KB")
rss = f"{int(m) // 1024} MB" if m.isdigit() else "-"
with open(table, "a") as f:
    f.write(f"| `{c}` | {d} | {b:.3f} | {e:.3f} | {2**-b:.3f} | {1.17*2**-b:.3f} | {t:.2f} s | {rel} | {rss} |\n")
PY
}
printf "%-24s %9s %9s %9s %9s %10s %9s %8s\n" codec max_err bits/par error shannon ideal_sq "make s" "x exact"
for c in "${fixed[@]}"; do
    t="$(echo ${times[$c]} | tr ' ' '\n' | median)"
    row "$c" "" "${bits[$c]}" "${err[$c]}" "$t" "$exact_t" "${rss[$c]}"
done
if [ -z "${SKIP_BUDGETS:-}" ]; then
    for cb in "quant 0.045" "quant 0.1" "quant:domain=value 0.045" "quant:domain=value 0.1" "sparse 0.5" "auto 0.1"; do
        set -- $cb
        read -r b e s m < <(run "$1" "$2")
        row "$1" "$2" "$b" "$e" "$s" "" "$m"
    done
fi
if [ "${TABLES:-0}" = 1 ]; then
    echo "" >>"$table"
    echo "Fixed settings: make time as the median of $reps runs interleaved with the exact codec's; budgeted settings: one run each. Load average $load at the start, on $(nproc) cores." >>"$table"
    cmd="scripts/bench_lossy.sh WORKDIR $reps"
    [ -n "${SKIP_BUDGETS:-}" ] && cmd="SKIP_BUDGETS=1 $cmd"
    (cd "$root" && python3 scripts/update_tables.py --from "$cmd" lossy-ref docs/BENCHMARKS.md <"$table")
fi
