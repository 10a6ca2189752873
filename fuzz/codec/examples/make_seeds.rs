//! Writes the seed inputs of the codec fuzz targets:
//! `cargo run --release --example make_seeds -- <corpus dir>` (in `fuzz/codec`).
//!
//! - `exact_decode/seed-<dtype>.bin`: `[selector][pred_len u16][prediction][payload]` with a
//!   real `exact::encode` payload, one per dtype family.
//!
//! The engine targets' seeds (a valid delta, a safetensors header) are committed test
//! fixtures: `scripts/fuzz.sh` copies them.

use std::path::{Path, PathBuf};

use deltapack_codec::exact::{self, Scratch};
use deltapack_codec::layout::layout;
use safetensors::Dtype;

/// Must match the selector table in `fuzz_targets/exact_decode.rs`.
const DTYPES: &[Dtype] = &[
    Dtype::BOOL,
    Dtype::F4,
    Dtype::F6_E2M3,
    Dtype::F6_E3M2,
    Dtype::U8,
    Dtype::I8,
    Dtype::F8_E5M2,
    Dtype::F8_E4M3,
    Dtype::F8_E8M0,
    Dtype::F8_E4M3FNUZ,
    Dtype::F8_E5M2FNUZ,
    Dtype::I16,
    Dtype::U16,
    Dtype::F16,
    Dtype::BF16,
    Dtype::I32,
    Dtype::U32,
    Dtype::F32,
    Dtype::C64,
    Dtype::F64,
    Dtype::I64,
    Dtype::U64,
];

/// The dtypes seeded, one of each element width and float family.
const SEEDED: &[(&str, Dtype)] = &[
    ("U8", Dtype::U8),
    ("F8_E4M3", Dtype::F8_E4M3),
    ("I16", Dtype::I16),
    ("F16", Dtype::F16),
    ("BF16", Dtype::BF16),
    ("I32", Dtype::I32),
    ("F32", Dtype::F32),
    ("I64", Dtype::I64),
    ("F64", Dtype::F64),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = PathBuf::from(std::env::args().nth(1).ok_or("usage: make_seeds <corpus dir>")?);
    std::fs::create_dir_all(corpus.join("exact_decode"))?;
    exact_seeds(&corpus)
}

fn exact_seeds(corpus: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // A deterministic pseudo-random prediction and a target that differs from it a little.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (name, dtype) in SEEDED {
        let sel = DTYPES.iter().position(|d| d == dtype).ok_or("dtype not in table")? as u8;
        let layout = layout(*dtype);
        let n = 256 * layout.width;
        let pred: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        let mut target = pred.clone();
        for e in target.chunks_exact_mut(layout.width) {
            // Nudge the low byte of about half the elements.
            let r = next();
            if r & 1 == 1 {
                e[0] = e[0].wrapping_add((r >> 8) as u8 % 7);
            }
        }
        let payload = exact::encode(layout, &pred, &target, &mut Scratch::default());
        let mut check = vec![0u8; n];
        exact::decode(layout, &pred, &payload, &mut check).map_err(|e| e.0)?;
        assert_eq!(check, target, "round trip of the {name} seed");
        let mut input = vec![sel];
        input.extend_from_slice(&(n as u16).to_le_bytes());
        input.extend_from_slice(&pred);
        input.extend_from_slice(&payload);
        std::fs::write(corpus.join(format!("exact_decode/seed-{name}.bin")), input)?;
    }
    Ok(())
}
