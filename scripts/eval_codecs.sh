#!/usr/bin/env bash
# Codec settings on a real pair: size, error and task quality of each reconstruction.
#
#   scripts/eval_codecs.sh BASE FINETUNED WORKDIR [SPEC[@MAX_ERROR] ...]
#
# For each setting: deltapack make (bits/param, error), apply, then scripts/eval_quality.py
# against FINETUNED (acc1, mrr, queries whose answer changed, embedding cosine). Prints a
# Markdown table and writes WORKDIR/eval.csv. Needs a release build (cargo build --release),
# and PYTHON (default python3) with torch, transformers and safetensors; the task data is
# ../shared/models/data unless DATA says otherwise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
base="$1" ft="$2" work="$3"
shift 3
specs=("$@")
[ ${#specs[@]} -gt 0 ] || specs=(exact sign sign-axis "quant:bits=3" "quant:bits=4" "quant@0.1" "quant@0.05" "sparse:keep=0.1" "dare:keep=0.3" "auto@0.1")
py="${PYTHON:-python3}"
data="${DATA:-$root/../shared/models/data}"
dp="${DELTAPACK:-$root/target/release/deltapack}"
mkdir -p "$work"
csv="$work/eval.csv"
echo "codec,max_error,bits_per_param,error,ratio,acc1,mrr,changed,emb_cos_min,emb_cos_mean" > "$csv"
echo "| codec | max error | bits/param | error | ratio | acc1 | mrr | changed queries | min cos |"
echo "|---|---|---|---|---|---|---|---|---|"
for s in "${specs[@]}"; do
    spec="${s%@*}"
    budget=()
    e=""
    if [[ "$s" == *@* ]]; then e="${s#*@}"; budget=(--max-error "$e"); fi
    made="$("$dp" make -q --json --force --base "$base" --finetuned "$ft" -o "$work/d.dpk" --codec "$spec" "${budget[@]}")"
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
    echo "| $c | ${me:--} | $b | $er | ${ra}x | $a1 | $mr | $ch | $cmin |"
done
