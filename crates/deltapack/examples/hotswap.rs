//! Hot swap in a few lines: a base held in memory, switched to fine-tune A, then B, then back.
//!
//! ```text
//! cargo run --release -p deltapack --example hotswap -- BASE_DIR A.dpk B.dpk
//! ```
//!
//! Make the deltas with `deltapack make --base BASE_DIR --finetuned FT_DIR -o A.dpk`. Each step
//! prints what the switch rewrote, how long it took, the memory held to revert, and a
//! fingerprint of the model's weights, so that the base's can be seen to come back.

use std::path::Path;
use std::time::Instant;

use deltapack::hotswap::Resident;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, a, b] = &args[..] else {
        return Err("usage: hotswap BASE_DIR A.dpk B.dpk".into());
    };
    let mut model = Resident::load(Path::new(base))?;
    show(&model, "base");
    for delta in [Some(a), Some(b), None] {
        let t = Instant::now();
        let report = model.switch_to(delta.map(Path::new))?;
        println!(
            "switched in {:.3} s: {} chunks of {} tensors decoded, {} reverted first",
            t.elapsed().as_secs_f64(),
            report.chunks,
            report.tensors,
            report.reverted_chunks
        );
        show(&model, delta.map_or("base", |d| d.as_str()));
    }
    Ok(())
}

/// Prints the model's tensor count, its memory held to revert and a fingerprint of all its weights.
fn show(model: &Resident, what: &str) {
    let mut h = blake3::Hasher::new();
    let mut n = 0;
    for t in model.tensors() {
        h.update(t.name.as_bytes());
        h.update(t.bytes);
        n += 1;
    }
    let print = h.finalize().to_hex();
    println!(
        "{what}: {n} tensors, undo {} bytes, weights {}",
        model.undo_bytes(),
        &print[..16]
    );
}
