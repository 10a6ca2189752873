//! Rebuilding a fine-tune from its base and a delta, or a chain of deltas: to a directory
//! (`apply`), or only to check it (`verify`), in bounded windows of parallel chunk decodes.
//!
//! A chain is rebuilt in one streaming pass: each chunk of the last delta is predicted from
//! the same chunk of its parent's reconstruction, decoded on the fly from the grandparent's,
//! and so on down to the base; no intermediate model is written. A chunk a link left
//! unchanged passes through without a copy.
//!
//! - `engine`: the chain resolved level by level, windows of chunk decodes, every
//!   fingerprint checked (`engine::Ctx`, `engine::rebuild`); its `files` child resolves
//!   shard headers and other files through the chain and names what the base lacks;
//! - `sinks`: where rebuilt bytes go: files (`sinks::DirSink`) or a comparison with the
//!   fine-tune (`sinks::CompareSink`); hot swap and the additive export have their own.

mod engine;
mod sinks;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::chain::Chain;
use crate::checkpoint::{Checkpoint, OutputDir};
use crate::container::index::{AuxEntry, TensorEntry, WeightFile};
use crate::progress::Progress;
use crate::Result;

pub(crate) use engine::{plan_of, rebuild, Ctx};
pub use engine::{rebuild_tensor, ChainReader};
use sinks::{CompareSink, DirSink, MemorySink};

/// Options of [`apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// fsync every file before the directory is renamed into place.
    pub sync: bool,
    /// Directory of content-addressed auxiliary files, for deltas that keep theirs outside
    /// (see [`Chain::aux_store`]).
    pub aux_store: Option<PathBuf>,
}

/// What [`apply`] or [`verify`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    /// Safetensors files rebuilt.
    pub weight_files: usize,
    /// Other files rebuilt.
    pub aux_files: usize,
    /// Tensors rebuilt (every one matched its fingerprint, and its base tensor too).
    pub tensors: usize,
    /// Bytes of all files rebuilt.
    pub bytes: u64,
    /// Deltas applied one after another (1 without a chain).
    pub chain_length: usize,
    /// True when the rebuilt files were compared with a fine-tune (byte for byte, except
    /// lossy tensors, whose error was measured instead).
    pub compared_with_finetuned: bool,
    /// Lossy tensors' quality measured against the fine-tune (empty without one).
    pub measured: Vec<MeasuredTensor>,
    /// The model's relative RMS error measured against the fine-tune (0 if all exact).
    pub measured_error: f64,
}

/// A lossy tensor's quality: as recorded in the delta, and as measured against the fine-tune.
#[derive(Debug, Clone, Serialize)]
pub struct MeasuredTensor {
    /// Tensor name.
    pub name: String,
    /// Codec name.
    pub codec: String,
    /// Relative RMS error the delta recorded.
    pub recorded_error: f64,
    /// Relative RMS error measured now.
    pub error: f64,
    /// Largest absolute error measured now.
    pub max_abs_error: f64,
}

/// Rebuilds the fine-tune from `base` and the delta at `delta` into the directory `out`.
///
/// Every base tensor read is checked against the delta's fingerprint, every rebuilt tensor
/// and file against its own; the directory appears only when all of it is written.
pub fn apply(
    base: &Path,
    delta: &Path,
    out: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    apply_chain(base, &[delta.to_path_buf()], out, opts, progress)
}

/// Rebuilds the model of a chain of deltas (`deltas[0]` made against `base`, each next one
/// against the one before) into the directory `out`, in one streaming pass.
pub fn apply_chain(
    base: &Path,
    deltas: &[PathBuf],
    out: &Path,
    opts: &ApplyOptions,
    progress: &dyn Progress,
) -> Result<RebuildReport> {
    let mut chain = Chain::open(base, deltas)?;
    chain.aux_store = opts.aux_store.clone();
    rebuild_chain(&chain, out, opts, progress)
}

/// [`apply_chain`] for an opened chain (its own `aux_store` is used, not `opts.aux_store`).
pub fn rebuild_chain(chain: &Chain, out: &Path, opts: &ApplyOptions, progress: &dyn Progress) -> Result<RebuildReport> {
    let mut inputs = vec![("base", chain.base.root.as_path())];
    inputs.extend(chain.deltas.iter().map(|d| ("delta", d.path.as_path())));
    if let Some(store) = &chain.aux_store {
        inputs.push(("store", store.as_path()));
    }
    crate::checkpoint::check_output_disjoint(out, &inputs)?;
    let ctx = Ctx::new(chain)?;
    let top = &chain.deltas.last().expect("a chain has a delta").index;
    let written: Vec<&str> = top
        .files
        .iter()
        .map(|f| f.path.as_str())
        .chain(top.aux.iter().map(|a| a.path.as_str()))
        .collect();
    let dir = OutputDir::create_expecting(out, opts.force, Some(&written))?;
    let mut sink = DirSink::new(dir, opts.sync);
    let report = rebuild(&ctx, &mut sink, progress)?;
    sink.commit()?;
    Ok(report)
}

/// Rebuilds the fine-tune in memory, chunk by chunk, checking every fingerprint; with
/// `finetuned`, also compares every rebuilt byte with that checkpoint's files.
pub fn verify(base: &Path, delta: &Path, finetuned: Option<&Path>, progress: &dyn Progress) -> Result<RebuildReport> {
    let chain = Chain::open(base, &[delta.to_path_buf()])?;
    verify_chain(&chain, finetuned, progress)
}

/// [`verify`] for an opened chain.
pub fn verify_chain(chain: &Chain, finetuned: Option<&Path>, progress: &dyn Progress) -> Result<RebuildReport> {
    let mut ctx = Ctx::new(chain)?;
    ctx.rebuilt_hashes = true;
    let ft = finetuned.map(Checkpoint::open).transpose()?;
    let mut sink = CompareSink::new(&ctx, ft.as_ref());
    let mut report = rebuild(&ctx, &mut sink, progress)?;
    sink.finish_report(&mut report)?;
    Ok(report)
}

/// One tensor of a model rebuilt in memory by [`load_chain`].
#[derive(Debug, Clone)]
pub struct LoadedTensor {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: crate::Dtype,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Its bytes, little-endian and contiguous, exactly as a safetensors file holds them.
    pub bytes: Vec<u8>,
}

/// A non-weight file (config, tokenizer, ...) of a model rebuilt in memory.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// Path relative to the model directory, with `/` separators.
    pub path: String,
    /// Its contents.
    pub bytes: Vec<u8>,
}

/// A fine-tune rebuilt in memory by [`load_chain`]: what `apply` would write, as buffers.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// Every tensor, in file order.
    pub tensors: Vec<LoadedTensor>,
    /// The other files the delta carries.
    pub files: Vec<LoadedFile>,
    /// The `__metadata__` of the weight files, merged in file order.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// What was rebuilt and checked.
    pub report: RebuildReport,
}

/// Rebuilds the model of `chain` into memory, with every check [`apply`] makes (base and
/// rebuilt fingerprints, headers, files); nothing is written.
///
/// Peak memory is the model's bytes plus the decode window, as each tensor is rebuilt
/// straight into a buffer of its exact size.
pub fn load_chain(chain: &Chain, progress: &dyn Progress) -> Result<LoadedModel> {
    let ctx = Ctx::new(chain)?;
    let mut sink = MemorySink::default();
    let report = rebuild(&ctx, &mut sink, progress)?;
    let mut metadata = serde_json::Map::new();
    for m in sink.metadata {
        metadata.extend(m);
    }
    Ok(LoadedModel {
        tensors: sink.tensors,
        files: sink.files,
        metadata,
        report,
    })
}

/// The `__metadata__` of a safetensors header (empty when it has none or it is no map of
/// strings, which the header's validation already refused).
pub(crate) fn header_metadata(header: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let json = header.get(8..).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    match v.get("__metadata__") {
        Some(serde_json::Value::Object(m)) => m.clone(),
        _ => serde_json::Map::new(),
    }
}

/// Where rebuilt bytes go.
pub(crate) trait Sink: Send {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()>;
    /// Bytes from `offset` of tensor `i` (position in the delta's tensor list) `t`.
    fn data(&mut self, i: usize, t: &TensorEntry, offset: usize, bytes: &[u8]) -> Result<()>;
    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()>;
    fn aux_data(&mut self, bytes: &[u8]) -> Result<()>;
    fn end_aux(&mut self) -> Result<()>;
    /// Whether this sink keeps every tensor in memory: the engine then decodes each chunk
    /// straight into buffers of the tensors' lengths, in parallel, and hands them over
    /// through [`Sink::tensors`] instead of calling [`Sink::data`].
    fn keeps_tensors(&self) -> bool {
        false
    }
    /// Every tensor's bytes, once all are rebuilt and checked (sinks that keep tensors).
    fn tensors(&mut self, _buffers: Vec<Vec<u8>>) -> Result<()> {
        Ok(())
    }
}
