//! Writes seed inputs for the fuzz targets: `cargo run --release --example make_seeds -- <corpus dir>`.
//!
//! - `container/seed-tiny.dpk`: a valid delta of a tiny synthetic pair (two shards, vocabulary
//!   resize, untied head, 4 KiB chunks), small enough to stay under libFuzzer's max_len.
//! - `header/seed-tiny.bin`: the header (8-byte length and JSON) of one of its safetensors files.
//! - `exact_decode/seed-<dtype>.bin`: `[selector][pred_len u16][prediction][payload]` with a
//!   real `exact::encode` payload, one per dtype family.

use std::path::{Path, PathBuf};

use deltapack::dtype;
use deltapack::synth::{self, Spec};
use deltapack_codec::exact::{self, Scratch};

/// Must match the selector table in `fuzz_targets/exact_decode.rs`.
const DTYPES: &[&str] = &[
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "U8",
    "I8",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "I16",
    "U16",
    "F16",
    "BF16",
    "I32",
    "U32",
    "F32",
    "C64",
    "F64",
    "I64",
    "U64",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let corpus = PathBuf::from(std::env::args().nth(1).ok_or("usage: make_seeds <corpus dir>")?);
    for d in ["container", "header", "exact_decode"] {
        std::fs::create_dir_all(corpus.join(d))?;
    }
    container_seed(&corpus)?;
    exact_seeds(&corpus)?;
    Ok(())
}

fn container_seed(corpus: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let work = std::env::temp_dir().join(format!("deltapack-seeds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let spec = Spec {
        layers: 1,
        hidden: 32,
        intermediate: 64,
        kv_dim: 16,
        vocab: 128,
        added_tokens: 4,
        untie_lm_head: true,
        weight_std: 0.02,
        delta_std: 0.0001,
        seed: 7,
    };
    let (base, ft, out) = (work.join("base"), work.join("finetuned"), work.join("tiny.dpk"));
    synth::write_model(&spec, &base, false, 1)?;
    synth::write_model(&spec, &ft, true, 2)?;
    let opts = deltapack::MakeOptions {
        chunk_bytes: 1 << 12,
        force: true,
        ..Default::default()
    };
    deltapack::make(&base, &ft, &out, &opts, &deltapack::progress::NoProgress)?;
    std::fs::copy(&out, corpus.join("container/seed-tiny.dpk"))?;
    let mut shards: Vec<_> = std::fs::read_dir(&ft)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    let bytes = std::fs::read(&shards[0])?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    std::fs::write(corpus.join("header/seed-tiny.bin"), &bytes[..8 + n])?;
    std::fs::remove_dir_all(&work)?;
    Ok(())
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
    for name in ["U8", "F8_E4M3", "I16", "F16", "BF16", "I32", "F32", "I64", "F64"] {
        let sel = DTYPES.iter().position(|d| *d == name).ok_or("dtype not in table")? as u8;
        let layout = dtype::layout(dtype::parse(name).ok_or("unknown dtype")?);
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
