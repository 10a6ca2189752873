//! Fuzzes the delta container reader: arbitrary bytes as a `.dpk` file.
//!
//! The reader opens paths, so each input is written to one temp file per process (reused
//! across iterations). When the file opens, every exact chunk of every tensor up to 1 MiB is
//! decoded against a zero prediction. Payloads are taken with `Delta::range`, bypassing the
//! chunk checksum, so that mutated payloads of a valid seed reach the decoder.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use deltapack::container::index::ChunkCodec;
use deltapack::container::Delta;
use deltapack_codec::exact;
use libfuzzer_sys::fuzz_target;

const MAX_TENSOR: u64 = 1 << 20;

fn path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("deltapack-fuzz-container-{}.dpk", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    let path = path();
    std::fs::write(path, data).expect("writing the fuzz input to a temp file");
    let _ = Delta::read_index(path);
    let Ok(delta) = Delta::open(path) else { return };
    let cb = delta.index.chunk_bytes;
    let mut pred = Vec::new();
    let mut out = Vec::new();
    for t in delta.index.tensors() {
        let Some(dt) = t.element_dtype() else { continue };
        let len = t.len();
        if len > MAX_TENSOR {
            continue;
        }
        let layout = deltapack_codec::layout::layout(dt);
        for (i, c) in t.chunks.iter().enumerate() {
            // Chunk `i` covers bytes [i * cb, min((i + 1) * cb, len)) of the tensor.
            let start = (i as u64).saturating_mul(cb);
            let n = len.saturating_sub(start).min(cb) as usize;
            let _ = delta.chunk_payload(&t.name, c);
            if c.codec != ChunkCodec::Exact || n % layout.width != 0 {
                continue;
            }
            let payload = delta.range(c.offset, c.len);
            pred.clear();
            pred.resize(n, 0u8);
            out.clear();
            out.resize(n, 0u8);
            let _ = exact::decode(layout, &pred, payload, &mut out);
        }
    }
});
