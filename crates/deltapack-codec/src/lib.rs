//! deltapack's codecs: how one chunk of a fine-tune tensor is coded against its prediction,
//! and decoded back.
//!
//! A leaf crate: it knows element layouts and bytes, nothing of checkpoints, containers or
//! files, so the engine, its tools and the fuzz targets share one copy of the codec knowledge.

#![warn(missing_docs)]

mod bits;
pub mod changes;
mod dispatch;
mod error;
pub mod exact;
pub mod float;
pub mod ints;
pub mod kernels;
pub mod layout;
pub mod lossy;
pub mod packed;
pub mod plan;
pub mod rans;
pub mod replay;
#[cfg(test)]
mod testdata;

use serde::{Deserialize, Serialize};

pub use dispatch::{decode_chunk, decode_exact, decode_exact_in_place, encode_exact_chunk};

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
