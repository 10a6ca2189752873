#!/usr/bin/env bash
# Runs deltapack's cargo-fuzz targets (fuzz/), each for a bounded time.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Targets (fuzz/fuzz_targets/):
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
# - Seeds fuzz/corpus/<target>/ (gitignored) once, with fuzz/examples/make_seeds.rs: a valid
#   13 KB delta of a tiny synthetic pair (the 1.8 MB `deltapack demo` delta would exceed
#   libFuzzer's 1 MiB max_len and be truncated), a safetensors header, and exact-codec
#   payloads of several dtypes. Delete fuzz/corpus/container/seed-tiny.dpk to remake them.
# - One libFuzzer process per target (no -jobs/-workers). Extra libFuzzer flags can be given
#   in FUZZ_ARGS, e.g. FUZZ_ARGS="-rss_limit_mb=4096".
# - Exits non-zero if any target fails (crash, leak, timeout, or build error); crashing
#   inputs are under fuzz/artifacts/<target>/. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]  (a positive integer, default 60)" >&2
    exit 2
fi

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz_dir="$root/fuzz"
targets=(container exact_decode header lossy_decode wdelta)
cd "$root"

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

# Scratch space: the container target writes each input to a temp file (one per process).
work="$(mktemp -d "${TMPDIR:-/tmp}/deltapack-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Seed corpus (made once): a valid tiny delta, a safetensors header and real exact-codec
# payloads, written by fuzz/examples/make_seeds.rs (a normal build, not a fuzz target).
if [[ ! -e "$fuzz_dir/corpus/container/seed-tiny.dpk" ]]; then
    echo "== making seed inputs (fuzz/examples/make_seeds.rs)"
    (cd "$fuzz_dir" && cargo run --release --quiet --example make_seeds -- "$fuzz_dir/corpus")
fi

if [[ ! -d "$fuzz_dir/corpus/wdelta" ]]; then
    mkdir -p "$fuzz_dir/corpus/wdelta"
    cp "$root"/crates/deltapack/tests/data/wdelta/*.wdelta "$fuzz_dir/corpus/wdelta/"
fi

failed=()
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${secs}s"
    # shellcheck disable=SC2086  # FUZZ_ARGS is a list of flags
    if ! TMPDIR="$work" cargo fuzz run --fuzz-dir "$fuzz_dir" "$t" -- \
        -max_total_time="$secs" -timeout=30 -print_final_stats=1 ${FUZZ_ARGS:-}; then
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]} (inputs under fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "all fuzz targets ran ${secs}s without a crash"
