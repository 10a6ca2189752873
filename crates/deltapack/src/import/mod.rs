//! Importing deltas made by other tools as deltapack deltas.
//!
//! [`import_wdelta`] turns a deltatensors `.wdelta` file into a `.dpk`: it rebuilds the
//! fine-tune exactly as deltatensors' loader would, tensor by tensor, into a temporary
//! checkpoint beside the output, then makes an exact delta of it against the same base. The
//! result is an ordinary delta: `apply`, `verify` and `inspect` treat it like any other, and
//! applying it rebuilds deltatensors' values bit for bit.

mod convert;
mod parent;
pub mod wdelta;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::checkpoint::{check_output_disjoint, check_overwrite, Checkpoint, ScratchDir, TensorRef};
use crate::progress::Progress;
use crate::{make, BasePart, Error, MakeOptions, MakeReport, Result};

/// Options of [`import_wdelta`].
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Where the base comes from (`ORG/NAME@REVISION`), recorded in the delta.
    pub base_id: Option<String>,
    /// Overwrite an existing output.
    pub force: bool,
    /// fsync the output before renaming it into place.
    pub sync: bool,
    /// Refuse a base that does not hash to the `parent_hash` the `.wdelta` records (see
    /// [`import_wdelta`] for the hashes tried). Turn off only for a base known to be right
    /// whose arrays deltatensors was given in another form.
    pub check_base_hash: bool,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            base_id: None,
            force: false,
            sync: false,
            check_base_hash: true,
        }
    }
}

/// A `.wdelta` file, memory-mapped, checksummed and parsed.
pub struct Wdelta {
    /// The file.
    pub path: PathBuf,
    /// Its validated header and record index.
    pub layout: wdelta::Layout,
    map: Mmap,
}

impl Wdelta {
    /// Opens and validates a `.wdelta` file: magic, version, SHA-256 trailer, header, records.
    pub fn open(path: &Path, progress: &dyn Progress) -> Result<Wdelta> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        // SAFETY: read-only map; a file truncated while we read it raises SIGBUS, the
        // documented limit of mapping inputs (as for checkpoints).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("memory-mapping", path, e))?;
        progress.begin("check", map.len() as u64);
        let checked = wdelta::verify_checksum(&map, &mut |n| progress.advance(n as u64));
        progress.finish();
        checked.map_err(|r| Error::corrupt(path, r))?;
        let layout = wdelta::parse(&map).map_err(|r| Error::corrupt(path, r))?;
        Ok(Wdelta {
            path: path.to_path_buf(),
            layout,
            map,
        })
    }

    /// Decodes one tensor's float32 delta into `delta`.
    pub fn delta(&self, t: &wdelta::Tensor, delta: &mut Vec<f32>) -> Result<()> {
        wdelta::decode(&self.map, t, delta).map_err(|reason| Error::CorruptDelta {
            path: self.path.clone(),
            tensor: Some(t.name.clone()),
            reason,
        })
    }
}

/// Imports a deltatensors `.wdelta` file made against `base` as the delta `out`.
///
/// Every tensor the `.wdelta` holds is rebuilt as deltatensors 0.2.0's `load_delta` does it
/// (base as float32 plus the decoded float32 delta, in its operation order) and stored in the
/// base tensor's dtype, since the `.wdelta` does not record the fine-tune's: bf16 and f16 round
/// to nearest-even as PyTorch and numpy do, integers truncate toward zero as numpy's `astype`
/// does (a value out of range is an error). Base tensors the `.wdelta` does not cover, and the
/// base's other files, are kept unchanged. The delta is exact, so applying it to `base`
/// rebuilds those values bit for bit.
///
/// The base must hash to the `.wdelta`'s `parent_hash` (unless
/// [`ImportOptions::check_base_hash`] is off). deltatensors hashes the arrays it was given, so
/// the base's tensors are hashed, in sorted name order, as stored (its file API and numpy
/// arrays), all as float32, and with only bf16 widened to float32 (torch state dicts made
/// numpy-compatible); and, for a sharded base, as stored in deltatensors' shard order.
///
/// At most one tensor is held in memory. The fine-tune is written to a temporary directory
/// beside `out`, removed whatever happens.
pub fn import_wdelta(
    wdelta: &Path,
    base: &Path,
    out: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    check_output_disjoint(out, &[("delta", wdelta), ("base", base)])?;
    check_overwrite(out, opts.force)?;
    let w = Wdelta::open(wdelta, progress)?;
    let base_ck = Checkpoint::open(base)?;
    let targets = match_base(&w, &base_ck)?;
    if opts.check_base_hash {
        parent::check(&w, &base_ck, progress)?;
    }
    let scratch = ScratchDir::beside(out)?;
    write_finetune(&w, &base_ck, &targets, scratch.path(), progress)?;
    let make_opts = MakeOptions {
        base_id: opts.base_id.clone(),
        force: opts.force,
        sync: opts.sync,
        ..MakeOptions::default()
    };
    make::make(base, scratch.path(), out, &make_opts, progress)
}

/// Maps each base tensor the `.wdelta` covers to its `.wdelta` tensor, checking that the base
/// has every one, with the same shape and a dtype that can hold the result.
fn match_base<'a>(w: &'a Wdelta, base: &Checkpoint) -> Result<HashMap<String, &'a wdelta::Tensor>> {
    let mut targets = HashMap::new();
    for t in &w.layout.tensors {
        let wrong = |reason: String| Error::WrongBase {
            path: base.root.clone(),
            part: BasePart::Tensor(t.name.clone()),
            reason,
            expected: Box::default(),
        };
        let b = base
            .tensor(&t.name)
            .ok_or_else(|| wrong(format!("is missing, but {} holds a delta for it", w.path.display())))?;
        if b.shape != t.shape {
            return Err(wrong(format!(
                "has shape {:?}, but the delta in {} has shape {:?}",
                b.shape,
                w.path.display(),
                t.shape
            )));
        }
        if !convert::supported(b.dtype) {
            return Err(Error::bad_tensor(
                &base.root,
                &t.name,
                format!("dtype {} cannot hold the float32 values deltatensors rebuilds", b.dtype),
            ));
        }
        targets.insert(b.name.clone(), t);
    }
    Ok(targets)
}

/// Writes the fine-tune into `dir`: the base's shards with the same headers, each covered
/// tensor rebuilt and the others copied, and the base's other files.
fn write_finetune(
    w: &Wdelta,
    base: &Checkpoint,
    targets: &HashMap<String, &wdelta::Tensor>,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    progress.begin("import", base.weight_bytes());
    let mut delta = Vec::new();
    for (i, shard) in base.shards.iter().enumerate() {
        let path = dir.join(&shard.rel);
        let mut out = create(&path)?;
        let write =
            |out: &mut BufWriter<File>, bytes: &[u8]| out.write_all(bytes).map_err(|e| Error::io("writing", &path, e));
        write(&mut out, shard.header_bytes())?;
        progress.advance(shard.prefix_len as u64);
        for t in base.tensors.iter().filter(|t| t.shard == i) {
            match targets.get(&t.name) {
                Some(wt) => {
                    w.delta(wt, &mut delta)?;
                    rebuild(w, base, t, &delta, &mut |bytes| write(&mut out, bytes))?;
                }
                None => copy(base, t, &mut |bytes| write(&mut out, bytes))?,
            }
            progress.advance(t.len() as u64);
        }
        out.flush().map_err(|e| Error::io("writing", &path, e))?;
    }
    progress.finish();
    for a in &base.aux {
        let to = dir.join(&a.rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
        }
        std::fs::copy(&a.path, &to).map_err(|e| Error::io("copying", &a.path, e))?;
    }
    Ok(())
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    let f = File::create(path).map_err(|e| Error::io("creating", path, e))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

/// Elements converted per step, so the output buffer stays small.
const STEP: usize = 1 << 16;

/// Streams `base + delta`, stored in the base tensor's dtype, to `sink`.
fn rebuild(
    w: &Wdelta,
    base: &Checkpoint,
    t: &TensorRef,
    delta: &[f32],
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let width = t.dtype.bitsize() / 8;
    let bytes = base.bytes(t);
    let mut buf = Vec::with_capacity(STEP * width);
    for (k, (b, d)) in bytes.chunks(STEP * width).zip(delta.chunks(STEP)).enumerate() {
        buf.clear();
        convert::add_and_store(t.dtype, b, d, &mut buf).map_err(|reason| Error::CorruptDelta {
            path: w.path.clone(),
            tensor: Some(t.name.clone()),
            reason,
        })?;
        sink(&buf)?;
        let start = k * STEP * width;
        base.release(t, start..start + b.len());
    }
    Ok(())
}

/// Streams a base tensor's bytes unchanged to `sink`.
fn copy(base: &Checkpoint, t: &TensorRef, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let bytes = base.bytes(t);
    for (k, piece) in bytes.chunks(1 << 20).enumerate() {
        sink(piece)?;
        base.release(t, k << 20..(k << 20) + piece.len());
    }
    Ok(())
}
