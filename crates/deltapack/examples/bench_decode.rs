//! Decoder speed on a real delta's exact chunks, one thread, nothing else running: what every
//! `apply` and hot swap pays per element, without the I/O, hashing and scheduling around it.
//!
//! ```text
//! cargo run --release -p deltapack --example bench_decode -- BASE_DIR DELTA.dpk [REPEATS]
//! ```
//!
//! Prints medians over REPEATS rounds (default 21) of decoding every chunk of the delta once:
//! - dense `exact` chunks with the decoder the CPU runs (AVX-512, else AVX2) and with the
//!   portable one, in ns an element;
//! - `changes` chunks: decoding their positions and differences, then adding them in place,
//!   in ns a changed value.
//!
//! Chunks whose base tensor has another length (rows added to a vocabulary) are left out.

use std::error::Error;
use std::path::Path;
use std::time::Instant;

use deltapack::checkpoint::Checkpoint;
use deltapack::container::index::ChunkCodec;
use deltapack::container::Delta;
use deltapack_codec::changes::Changes;
use deltapack_codec::layout::{layout, ElementLayout};
use deltapack_codec::{decode_exact, exact};

/// One coded chunk: its codec, element layout, base bytes and payload.
struct Job<'a> {
    codec: ChunkCodec,
    layout: ElementLayout,
    pred: &'a [u8],
    payload: deltapack::container::DeltaBytes<'a>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (base, delta, repeats) = match &args[..] {
        [b, d] => (b, d, 21),
        [b, d, r] => (b, d, r.parse()?),
        _ => return Err("usage: bench_decode BASE_DIR DELTA.dpk [REPEATS]".into()),
    };
    let base = Checkpoint::open(Path::new(base))?;
    let delta = Delta::open(Path::new(delta))?;
    let jobs = jobs(&base, &delta)?;
    let dense: Vec<&Job> = jobs.iter().filter(|j| j.codec == ChunkCodec::Exact).collect();
    let sparse: Vec<&Job> = jobs.iter().filter(|j| j.codec == ChunkCodec::Changes).collect();
    let elements: usize = dense.iter().map(|j| j.pred.len() / j.layout.width).sum();
    let mut out = vec![0u8; delta.index.chunk_bytes as usize];
    let vector = median(repeats, || {
        for j in &dense {
            decode_exact(j.codec, j.layout, j.pred, &j.payload, &mut out[..j.pred.len()]).expect("decodes");
        }
    });
    let portable = median(repeats, || {
        for j in &dense {
            exact::decode_portable(j.layout, j.pred, &j.payload, &mut out[..j.pred.len()]).expect("decodes");
        }
    });
    println!(
        "exact: {} chunks, {elements} elements: {:.3} ns an element ({:.3} portable)",
        dense.len(),
        vector * 1e9 / elements as f64,
        portable * 1e9 / elements as f64
    );
    changes(&sparse, repeats);
    Ok(())
}

/// The delta's exact and `changes` chunks whose base tensor has the fine-tune's length.
fn jobs<'a>(base: &'a Checkpoint, delta: &'a Delta) -> Result<Vec<Job<'a>>, Box<dyn Error>> {
    let cb = delta.index.chunk_bytes as usize;
    let mut jobs = Vec::new();
    for t in delta.index.files.iter().flat_map(|f| &f.tensors) {
        let Some(bt) = base.tensor(&t.name) else { continue };
        let pred = base.bytes(bt);
        if pred.len() as u64 != t.data_offsets[1] - t.data_offsets[0] {
            continue;
        }
        let layout = layout(t.element_dtype().ok_or("unknown dtype")?);
        for (k, c) in t.chunks.iter().enumerate() {
            if matches!(c.codec, ChunkCodec::Exact | ChunkCodec::Changes) {
                jobs.push(Job {
                    codec: c.codec,
                    layout,
                    pred: &pred[k * cb..((k + 1) * cb).min(pred.len())],
                    payload: delta.chunk_payload(&t.name, c)?,
                });
            }
        }
    }
    Ok(jobs)
}

/// `changes` chunks: decoding, then adding in place (on a copy of the base, made untimed).
fn changes(jobs: &[&Job], repeats: usize) {
    let mut c = Changes::default();
    let mut bufs: Vec<Vec<u8>> = jobs.iter().map(|j| j.pred.to_vec()).collect();
    let (mut decode, mut add, mut count) = (Vec::new(), Vec::new(), 0);
    for _ in 0..repeats {
        let (mut d, mut a) = (0.0, 0.0);
        count = 0;
        for (j, b) in jobs.iter().zip(&mut bufs) {
            b.copy_from_slice(j.pred);
            let t = Instant::now();
            c.decode(j.layout, b, &j.payload).expect("decodes");
            d += t.elapsed().as_secs_f64();
            count += c.positions.len();
            let t = Instant::now();
            c.add_to(j.layout, b);
            a += t.elapsed().as_secs_f64();
        }
        decode.push(d);
        add.push(a);
    }
    let per = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e9 / count.max(1) as f64
    };
    println!(
        "changes: {} chunks, {count} changed values: decode {:.2} ns, add {:.2} ns a value",
        jobs.len(),
        per(&mut decode),
        per(&mut add)
    );
}

/// The median time of `repeats` runs of `f`, in seconds.
fn median(repeats: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
