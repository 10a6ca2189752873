//! Codecs: how one chunk of a fine-tune tensor is coded against its prediction.

pub(crate) mod avx512;
mod bits;
pub mod changes;
pub mod exact;
pub mod float;
pub mod ints;
pub mod lossy;
pub mod rans;
mod simd;

use crate::container::index::ChunkCodec;
use crate::dtype::ElementLayout;

/// Decodes a chunk of one of the two exact chunk codecs into `out`: `changes`, or (for any
/// other `codec`, which callers keep to `exact`) the dense [`exact`] coder.
pub fn decode_exact(
    codec: ChunkCodec,
    layout: ElementLayout,
    pred: &[u8],
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), exact::DecodeError> {
    match codec {
        ChunkCodec::Changes => changes::decode(layout, pred, payload, out),
        _ => exact::decode(layout, pred, payload, out),
    }
}

/// [`decode_exact`] over the prediction itself: `buf` holds the prediction and ends as the
/// output (on error, its contents are unspecified).
pub fn decode_exact_in_place(
    codec: ChunkCodec,
    layout: ElementLayout,
    payload: &[u8],
    buf: &mut [u8],
) -> Result<(), exact::DecodeError> {
    match codec {
        ChunkCodec::Changes => changes::decode_in_place(layout, payload, buf),
        _ => exact::decode_in_place(layout, payload, buf),
    }
}
