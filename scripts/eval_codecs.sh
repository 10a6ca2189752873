#!/usr/bin/env bash
# Codec settings on a real pair: size, error and task quality of each reconstruction.
#
#   scripts/eval_codecs.sh BASE FINETUNED WORKDIR [SPEC[@MAX_ERROR] ...]
#
# For each setting: deltapack make (bits/param, ratio, error), apply, then
# scripts/eval_quality.py against FINETUNED (acc1, mrr, queries whose answer changed, embedding
# cosine). Prints a Markdown table and writes WORKDIR/eval.csv. Needs a release build (cargo
# build --release -p deltapack-cli), and PYTHON (default python3) with torch, transformers and
# safetensors; the task data is ../shared/models/data unless DATA says otherwise.
#
# Environment:
#   QUALITY=0    size and error only: no apply, no eval_quality.py, so no torch (a few minutes
#                on 2 cores for the default settings, most of it the two `auto` runs).
#   TABLE=NAME   also write the table between the NAME markers of the files in TABLE_FILES
#                (default README.md) with scripts/update_tables.py. The README's `codecs` table:
#                QUALITY=0 TABLE=codecs scripts/eval_codecs.sh ../shared/models/minilm-base-bf16 \
#                  ../shared/models/ft-a-bf16 bench-out/codecs
#                and docs/BENCHMARKS.md's `codecs-quality` table, with torch:
#                PYTHON=venv/bin/python TABLE=codecs-quality TABLE_FILES=docs/BENCHMARKS.md \
#                  scripts/eval_codecs.sh ../shared/models/minilm-base-bf16 ../shared/models/ft-a-bf16 \
#                  bench-out/codecs exact sign sign-axis sign:zeros=sign sign-axis:zeros=sign \
#                  quant:bits=2 quant:bits=3 quant:bits=4 quant@0.2 quant@0.1 quant@0.05 \
#                  sparse:keep=0.03 sparse:keep=0.1 dare:keep=0.3 auto@0.3 auto@0.1
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
base="$1" ft="$2" work="$3"
shift 3
specs=("$@")
given="${specs[*]}"
[ ${#specs[@]} -gt 0 ] || specs=(exact sign sign-axis "quant:bits=2" "quant:bits=3" "quant:bits=4" "quant@0.1" "quant@0.05" "sparse:keep=0.1" "dare:keep=0.3" "auto@0.3" "auto@0.1")
py="${PYTHON:-python3}"
data="${DATA:-$root/../shared/models/data}"
dp="${DELTAPACK:-$root/target/release/deltapack}"
quality="${QUALITY:-1}"
mkdir -p "$work"
csv="$work/eval.csv"
table="$work/table.md"
if [ "$quality" = 0 ]; then
    echo "codec,max_error,bits_per_param,error,ratio,delta_bytes" > "$csv"
    { echo "| codec | max error | bits/param | ratio | error |"
      echo "|---|---|---|---|---|"; } | tee "$table"
else
    echo "codec,max_error,bits_per_param,error,ratio,acc1,mrr,changed,emb_cos_min,emb_cos_mean" > "$csv"
    { echo "| codec | max error | bits/param | ratio | error | acc1 | mrr | changed queries | min cos |"
      echo "|---|---|---|---|---|---|---|---|---|"; } | tee "$table"
fi
for s in "${specs[@]}"; do
    spec="${s%@*}"
    budget=()
    e=""
    if [[ "$s" == *@* ]]; then e="${s#*@}"; budget=(--max-error "$e"); fi
    made="$("$dp" make -q --json --force --base "$base" --finetuned "$ft" -o "$work/d.dpk" --codec "$spec" "${budget[@]}")"
    if [ "$quality" = 0 ]; then
        line="$(python3 -c '
import json, sys
m = json.loads(sys.argv[1])
print(",".join(str(x) for x in [sys.argv[2], sys.argv[3], round(m["bits_per_param"], 4), round(m["error"], 5), round(m["ratio"], 2), sys.argv[4]]))
' "$made" "$spec" "$e" "$(stat -c %s "$work/d.dpk")")"
        echo "$line" >> "$csv"
        IFS=, read -r c me b er ra _ <<< "$line"
        printf '| `%s` | %s | %.3f | %.2fx | %.3f |\n' "$c" "${me:--}" "$b" "$ra" "$er" | tee -a "$table"
        continue
    fi
    "$dp" apply -q --force --base "$base" "$work/d.dpk" -o "$work/rebuilt"
    q="$("$py" "$here/eval_quality.py" "$work/rebuilt" --ref "$ft" --data "$data" 2>/dev/null | tail -1)"
    line="$(python3 -c '
import json, sys
m, q = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(",".join(str(x) for x in [sys.argv[3], sys.argv[4], round(m["bits_per_param"], 4), round(m["error"], 5), round(m["ratio"], 2),
      q["acc1"], round(q["mrr"], 4), q["changed"], round(q["emb_cos_min"], 5), round(q["emb_cos_mean"], 5)]))
' "$made" "$q" "$spec" "$e")"
    echo "$line" >> "$csv"
    IFS=, read -r c me b er ra a1 mr ch cmin cmean <<< "$line"
    printf '| `%s` | %s | %.3f | %.2fx | %.3f | %.4f | %.3f | %s | %.4f |\n' "$c" "${me:--}" "$b" "$ra" "$er" "$a1" "$mr" "$ch" "$cmin" | tee -a "$table"
done
if [ -n "${TABLE:-}" ]; then
    cmd="TABLE=$TABLE scripts/eval_codecs.sh"
    [ "$quality" = 0 ] && cmd="QUALITY=0 $cmd"
    # The command as a reader would type it, with the models' paths relative to the repository.
    rel() { realpath --relative-to="$root" "$1"; }
    cmd+=" $(rel "$base") $(rel "$ft") WORKDIR${given:+ $given}"
    # shellcheck disable=SC2086  # TABLE_FILES is a list of paths
    (cd "$root" && python3 scripts/update_tables.py --from "$cmd" "$TABLE" ${TABLE_FILES:-README.md} < "$table")
fi
