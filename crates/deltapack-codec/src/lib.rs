//! deltapack's codecs: how one chunk of a fine-tune tensor is coded against its prediction,
//! and decoded back.
//!
//! A leaf crate: it knows element layouts and bytes, nothing of checkpoints, containers or
//! files, so the engine, its tools and the fuzz targets share one copy of the codec knowledge.

#![warn(missing_docs)]

mod bits;
pub mod changes;
pub mod exact;
pub mod float;
pub mod ints;
pub mod kernels;
pub mod layout;
pub mod lossy;
pub mod rans;
#[cfg(test)]
mod testdata;

use serde::{Deserialize, Serialize};

use crate::layout::ElementLayout;

/// How a chunk is stored: the on-disk name of its codec (the container's index stores it,
/// so its serde names are part of the format).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChunkCodec {
    /// Equal to the prediction; no payload.
    Same,
    /// The exact codec ([`exact`]).
    Exact,
    /// The exact codec for few changes ([`changes`]): positions and differences.
    Changes,
    /// The tensor's lossy codec ([`lossy`]).
    Lossy,
}

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
