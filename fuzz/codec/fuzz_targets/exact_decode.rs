//! Fuzzes the exact codec's decoder directly with hostile payloads.
//!
//! Input: `[dtype selector][pred_len: u16 LE][prediction bytes][payload (rest)]`. The output
//! buffer is as long as the prediction rounded down to whole elements (the prediction is
//! truncated to match, as `decode` requires equal lengths).
#![no_main]

use deltapack_codec::exact;
use deltapack_codec::layout::layout;
use libfuzzer_sys::fuzz_target;
use safetensors::Dtype;

// In the order of the safetensors names the seeds were made with.
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

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let layout = layout(DTYPES[sel as usize % DTYPES.len()]);
    if rest.len() < 2 {
        return;
    }
    let want = u16::from_le_bytes([rest[0], rest[1]]) as usize;
    let rest = &rest[2..];
    let pred_len = want.min(rest.len());
    let (pred, payload) = rest.split_at(pred_len);
    let n = pred.len() / layout.width * layout.width;
    let pred = &pred[..n];
    let mut out = vec![0u8; n];
    let _ = exact::decode(layout, pred, payload, &mut out);
});
