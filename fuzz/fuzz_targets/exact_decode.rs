//! Fuzzes the exact codec's decoder directly with hostile payloads.
//!
//! Input: `[dtype selector][pred_len: u16 LE][prediction bytes][payload (rest)]`. The output
//! buffer is as long as the prediction rounded down to whole elements (the prediction is
//! truncated to match, as `decode` requires equal lengths).
#![no_main]

use deltapack::codec::exact;
use deltapack::dtype;
use libfuzzer_sys::fuzz_target;

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

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let Some(dt) = dtype::parse(DTYPES[sel as usize % DTYPES.len()]) else {
        return;
    };
    let layout = dtype::layout(dt);
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
