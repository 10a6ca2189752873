#!/usr/bin/env bash
# Runs deltapack's cargo-fuzz targets, each for a bounded time: the engine's (fuzz/) and the
# codec crate's (fuzz/codec, built against deltapack-codec alone).
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Targets (fuzz/fuzz_targets/ and fuzz/codec/fuzz_targets/):
#   container     arbitrary bytes as a .dpk delta file: Delta::open, Delta::read_index, and
#                 exact::decode of every chunk against a zero prediction
#   exact_decode  codec::exact::decode on (dtype selector, prediction, payload) split from the input
#   header        checkpoint::header::parse with and without a file length
#   lossy_decode  codec::lossy::decode of every lossy codec on (base, payload, chunk offset) from the input
#   wdelta        import::wdelta::{verify_checksum, parse, decode} on arbitrary .wdelta files,
#                 seeded with the deltatensors fixtures of crates/deltapack/tests/data/wdelta
#
# - Installs cargo-fuzz if missing (`cargo install --locked cargo-fuzz`).
# - The toolchain is stable: RUSTC_BOOTSTRAP=1 lets cargo-fuzz use its nightly-only flags.
# - Seeds the corpora (gitignored) once: the container and header targets with the committed
#   compatibility fixtures (crates/deltapack/tests/data/compat: 23 KB deltas, under libFuzzer's
#   1 MiB max_len, and a fine-tune's safetensors header), exact_decode with exact-codec payloads
#   of several dtypes from fuzz/codec/examples/make_seeds.rs. Delete fuzz/corpus to remake them.
# - One libFuzzer process per target (no -jobs/-workers). Extra libFuzzer flags can be given
#   in FUZZ_ARGS, e.g. FUZZ_ARGS="-rss_limit_mb=4096".
# - Exits non-zero if any target fails (crash, leak, timeout, or build error); crashing
#   inputs are under fuzz/artifacts/<target>/. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz[/codec] <target> <artifact file>
set -euo pipefail

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]  (a positive integer, default 60)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
codec_dir="$root/fuzz/codec"
# target:fuzz dir
targets=(container:"$fuzz_dir" header:"$fuzz_dir" wdelta:"$fuzz_dir" exact_decode:"$codec_dir" lossy_decode:"$codec_dir")
cd "$root"

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

# Scratch space: the container target writes each input to a temp file (one per process).
work="$(mktemp -d "${TMPDIR:-/tmp}/deltapack-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Seed corpora (made once).
fixtures="$root/crates/deltapack/tests/data/compat"
if [[ ! -d "$fuzz_dir/corpus/container" ]]; then
    echo "== seeding the engine targets from $fixtures"
    mkdir -p "$fuzz_dir/corpus/container" "$fuzz_dir/corpus/header" "$fuzz_dir/corpus/wdelta"
    cp "$fixtures"/*.dpk "$fuzz_dir/corpus/container/"
    st="$fixtures/finetuned/model.safetensors"
    n=$(od -An -t u8 -N 8 "$st" | tr -d ' ')
    head -c $((8 + n)) "$st" >"$fuzz_dir/corpus/header/seed-finetuned.bin"
    cp "$root"/crates/deltapack/tests/data/wdelta/*.wdelta "$fuzz_dir/corpus/wdelta/"
fi
if [[ ! -d "$codec_dir/corpus/exact_decode" ]]; then
    echo "== making seed inputs (fuzz/codec/examples/make_seeds.rs)"
    (cd "$codec_dir" && cargo run --release --quiet --example make_seeds -- "$codec_dir/corpus")
fi

failed=()
for entry in "${targets[@]}"; do
    t=${entry%%:*} dir=${entry#*:}
    echo "== fuzzing $t for ${secs}s"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
    if ! TMPDIR="$work" cargo fuzz run --fuzz-dir "$dir" "$t" -- \
        -max_total_time="$secs" -timeout=30 -print_final_stats=1 ${FUZZ_ARGS:-}; then
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (inputs under fuzz/artifacts/<target>/ or fuzz/codec/artifacts/<target>/)" >&2
    exit 1
fi
echo "all fuzz targets ran ${secs}s without a crash"
