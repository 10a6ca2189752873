//! deltapack: store fine-tuned models as compact deltas against their base model, and rebuild them.
//!
//! The modules follow the data: [`checkpoint`] reads (and writes) Hugging Face safetensors
//! checkpoints, `pair` matches fine-tune tensors with their base counterparts, the
//! `deltapack-codec` crate codes chunks of tensors, [`container`] is the delta file,
//! [`make()`] and [`apply()`] drive the whole pipeline in bounded memory.
//! [`hotswap`] holds a base in memory and switches it between fine-tunes in place.
//! `docs/ARCHITECTURE.md` is the map.
//!
//! The verbs are at the crate root (the README's example, compiled here):
//!
//! ```no_run
//! use deltapack::{apply, make, progress::NoProgress, ApplyOptions, MakeOptions};
//! use std::path::Path;
//!
//! let report = make(Path::new("base/"), Path::new("ft/"), Path::new("ft.dpk"), &MakeOptions::default(), &NoProgress)?;
//! println!("ratio {:.2}x", report.ratio);
//! apply(Path::new("base/"), Path::new("ft.dpk"), Path::new("rebuilt/"), &ApplyOptions::default(), &NoProgress)?;
//! // Random access: one tensor, without rebuilding the rest (every fingerprint checked).
//! let chain = deltapack::Chain::open(Path::new("base/"), &[Path::new("ft.dpk").to_path_buf()])?;
//! let bytes = deltapack::rebuild_tensor(&chain, "model.embed_tokens.weight")?;
//! # Ok::<(), deltapack::Error>(())
//! ```

#![warn(missing_docs)]

// The codecs live in their own leaf crate; the engine names them by their old path.
use deltapack_codec as codec;
mod dtype;
pub mod error;

pub use error::{BasePart, Error, ErrorKind, ExpectedBase, MissingFile, Result};
/// The safetensors dtype, as the options and reports name it.
pub use safetensors::Dtype;
pub mod additive;
mod apply;
mod chain;
pub mod checkpoint;
pub mod container;
mod hash;
pub mod hotswap;
pub mod import;
mod inspect;
mod lineage;
mod make;
mod pair;
pub mod progress;
mod relpath;
pub mod remote;
pub mod rescale;
mod schedule;
pub mod serve;

// The verbs, with the options they take and the reports they return.
pub use additive::{apply_additive, export_additive, AdditiveOptions, AdditiveReport, ExportOptions};
pub use apply::{
    apply, apply_chain, load_chain, rebuild_chain, rebuild_tensor, verify, verify_chain, ApplyOptions, ChainReader,
    LoadedFile, LoadedModel, LoadedTensor, MeasuredTensor, RebuildReport,
};
pub use chain::Chain;
pub use checkpoint::remove_temporaries;
pub use hotswap::Resident;
pub use import::{import_wdelta, ImportOptions};
pub use inspect::{inspect, Inspection};
pub use lineage::{make_child, make_child_from, rebase, squash};
pub use make::{base_fingerprint, make, make_from, MakeOptions, MakeReport, TensorReport};
pub use store::Store;
pub mod store;
pub mod tune;

#[cfg(test)]
mod testdata;
