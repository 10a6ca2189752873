//! Codecs: how one chunk of a fine-tune tensor is coded against its prediction.

mod bits;
pub mod changes;
pub mod exact;
pub mod float;
pub mod ints;
pub mod lossy;
pub mod rans;
mod simd;
