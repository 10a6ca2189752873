//! deltapack: store fine-tuned models as compact deltas against their base model, and rebuild them.
//!
//! The modules follow the data: [`checkpoint`] reads (and writes) Hugging Face safetensors
//! checkpoints, [`pair`] matches fine-tune tensors with their base counterparts, the
//! `deltapack-codec` crate codes chunks of tensors, [`container`] is the delta file, [`make`](mod@make) and [`apply`](mod@apply) drive the
//! whole pipeline in bounded memory.
//! [`hotswap`] holds a base in memory and switches it between fine-tunes in place.

#![warn(missing_docs)]

// The codecs live in their own leaf crate; the engine names them by their old path.
use deltapack_codec as codec;
pub mod dtype;
pub mod error;

pub use error::{BasePart, Error, ErrorKind, ExpectedBase, MissingFile, Result};
pub mod additive;
pub mod apply;
pub mod chain;
pub mod checkpoint;
pub mod container;
pub mod hash;
pub mod hotswap;
pub mod import;
pub mod make;
pub mod pair;
pub mod progress;
mod schedule;

pub use additive::{apply_additive, export_additive, AdditiveOptions, AdditiveReport, ExportOptions};
pub use apply::{apply, apply_chain, verify, verify_chain, ApplyOptions, ChainReader, MeasuredTensor, RebuildReport};
pub use chain::Chain;
pub use make::{make, MakeOptions, MakeReport, TensorReport};
pub mod stats;
pub mod store;
pub mod synth;
pub mod tune;

#[cfg(test)]
mod testdata;
