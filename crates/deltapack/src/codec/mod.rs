//! Codecs: how one chunk of a fine-tune tensor is coded against its prediction.

mod bits;
pub mod exact;
pub mod rans;
mod simd;
