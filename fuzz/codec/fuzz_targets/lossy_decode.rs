//! Fuzzes the lossy codecs' decoder with hostile payloads and settings.
//!
//! Input: `[codec selector][dtype selector][first: u16 LE][base_len: u16 LE][base bytes][payload (rest)]`.
//! Settings are fixed per selector (valid, as the index validation guarantees); the payload,
//! the base bytes and the chunk's place in the tensor are the fuzzer's.
#![no_main]

use deltapack_codec::lossy::{self, AxisScales, ChunkParams, Domain, TensorCodec};
use libfuzzer_sys::fuzz_target;
use safetensors::Dtype;

fn codecs(cols: u64) -> Vec<TensorCodec> {
    vec![
        TensorCodec::Quant { step: Some(1e-3), bits: None, group: 128, outliers: 0.0, domain: Domain::Ulp },
        TensorCodec::Quant { step: None, bits: Some(3), group: 16, outliers: 0.01, domain: Domain::Value },
        TensorCodec::Sparse { threshold: 1e-3, step: None },
        TensorCodec::Sparse { threshold: 0.0, step: Some(1e-4) },
        TensorCodec::Dare { keep: 0.3, seed: 1 },
        TensorCodec::Sign { scale: 1e-3, zeros: false },
        TensorCodec::Sign { scale: 1e-3, zeros: true },
        TensorCodec::SignAxis { rows: 64, cols, calibrated: false, zeros: true },
    ]
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let dtype = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64][data[1] as usize % 4];
    let width = dtype.bitsize() / 8;
    let first = u16::from_le_bytes([data[2], data[3]]) as u64;
    let want = u16::from_le_bytes([data[4], data[5]]) as usize;
    let rest = &data[6..];
    let (base, payload) = rest.split_at(want.min(rest.len()));
    let base = &base[..base.len() / width * width];
    let cols = 16u64;
    let all = codecs(cols);
    let codec = &all[data[0] as usize % all.len()];
    let rows = vec![1e-3f32; 64 * 1024];
    let col_scales = vec![1.0f32; cols as usize];
    let p = ChunkParams {
        codec,
        first,
        axis: Some(AxisScales { rows: &rows, first_row: 0, cols: &col_scales }),
    };
    let mut out = vec![0u8; base.len()];
    let _ = lossy::decode(dtype, &p, base, payload, &mut out);
});
