//! FastChat-style additive deltas: a model directory whose tensors are the fine-tune minus
//! the base, computed in fp16, as published for Vicuna-style releases.
//!
//! FastChat's `make_delta` loads base and fine-tune in fp16 and subtracts tensor by tensor;
//! `apply_delta` adds the base back in fp16. [`apply_additive`] does the addition and
//! [`export_additive`] writes such a delta from a `.dpk`, both with the same fp16 arithmetic
//! (round to nearest even at every conversion, addition and subtraction), chunk by chunk from
//! memory maps. The rules, decided where FastChat only asserts:
//!
//! - Float tensors (F16, BF16, F32, F64) are converted to fp16 and written as fp16
//!   ([`AdditiveOptions::dtype`] casts applied results to BF16 or F32 instead). Integer tensors
//!   of one dtype are added or subtracted exactly, with wraparound, as PyTorch does, and keep
//!   their dtype. Other dtypes (BOOL, FP8, packed) are refused.
//! - A tensor whose first dimension grew (a vocabulary resize) gets the delta in the base's
//!   rows and the fine-tune's own values in the new rows, as FastChat's first Vicuna release
//!   did (it padded the base's embedding with zero rows). Any other shape change is an error.
//! - A tensor that only the delta (or fine-tune) has is an error: FastChat asserts that every
//!   fine-tune tensor is in the base. A tensor that only the base has is left out and
//!   reported: FastChat would assert, unless transformers drops it on load (an int64
//!   `position_ids` buffer, say).
//! - The output keeps the delta's (or the fine-tune's) file layout, tensor order and header
//!   metadata; its other files are copied, with the shard index's `total_size` updated. Other
//!   files keep their contents, so `config.json` still names the original `torch_dtype`.
//! - An exported delta is marked as one: every header's `__metadata__` gets
//!   `"deltapack_delta": "additive"`, which FastChat ignores. An applied model drops it.
//!   [`classify`] tells a difference from a model by the marker or, without it, by the
//!   magnitudes of its tensors against the base's; `apply_additive` itself adds whatever it is
//!   given, so front ends ask `classify` first.
//!
//! fp16 keeps 11 significant bits and nothing above 65504, so the result is not always the
//! fine-tune. `apply_additive` bounds the error of every element: the worst case over all
//! fine-tunes of the base's dtype from which FastChat would have made this delta. It is 0
//! where the subtraction must have been exact (fine-tune and base within a factor of two, in
//! fp16 or bf16), and otherwise half an ULP of the delta plus half an ULP of the sum, plus
//! the fine-tune's own rounding to fp16 (half an fp16 ULP for an F32 fine-tune; at most 2^-25,
//! below 2^-17, for a BF16 one). `export_additive` knows the fine-tune, so it measures
//! instead. Values that overflow fp16, or fall to its subnormal range, are counted.

mod classify;
mod fp16;

pub use classify::{
    classify, judge, Classification, TensorEvidence, Verdict, DIFFERENCE_MAX_NORM, FINE_TUNE_MAX_DISTANCE, MARKER_KEY,
    MARKER_VALUE, OTHER_MODEL_NORM,
};

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;

use crate::apply::{rebuild, Ctx, Sink};
use crate::chain::Chain;
use crate::checkpoint::{Checkpoint, OutputDir, TensorRef};
use crate::container::index::{AuxEntry, TensorEntry, WeightFile};
use crate::container::Delta;
use crate::progress::Progress;
use crate::schedule::{self, Job};
use crate::{dtype, BasePart, Error, Result};

/// Elements per unit of parallel work.
const CHUNK_ELEMS: usize = 1 << 20;
/// The shard index whose `total_size` follows the dtype written.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest shard index patched; a larger one is copied as it is.
const MAX_INDEX_LEN: u64 = 64 << 20;

/// Options of [`apply_additive`].
#[derive(Debug, Clone, Default)]
pub struct AdditiveOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// fsync every file before the directory is renamed into place.
    pub sync: bool,
    /// dtype of the float tensors written: F16 (FastChat's, the default), BF16 or F32. The
    /// sum is computed in fp16 either way; BF16 rounds it once more.
    pub dtype: Option<Dtype>,
}

/// Options of [`export_additive`].
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// fsync every file before the directory is renamed into place.
    pub sync: bool,
}

/// How far one tensor of a FastChat-style result is from the fine-tune.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRounding {
    /// Tensor name.
    pub name: String,
    /// dtype written.
    pub dtype: String,
    /// Number of elements.
    pub elements: u64,
    /// Rows beyond the base's (a vocabulary resize): they hold the fine-tune's values.
    pub added_rows: u64,
    /// Largest absolute error of a finite element.
    pub max_abs_error: f64,
    /// Root mean square of the absolute errors of the finite elements.
    pub rms_error: f64,
    /// Root mean square of the delta (fine-tune minus base) over the same elements; 0 for
    /// integer tensors, which are exact.
    pub delta_rms: f64,
    /// Elements that overflowed fp16 to infinity from finite inputs.
    pub overflowed: u64,
    /// Elements whose fp16 delta or sum is subnormal (below 2^-14, fewer significant bits).
    pub subnormal: u64,
}

/// What [`apply_additive`] or [`export_additive`] wrote, and how far it is from the fine-tune.
///
/// After `apply_additive`, the errors are worst-case bounds (the fine-tune is not at hand),
/// valid if the delta was made as FastChat makes it from a fine-tune of the base's dtype.
/// After `export_additive`, they are measured: what FastChat's `apply_delta` of the written
/// delta gives, against the fine-tune.
#[derive(Debug, Clone, Serialize)]
pub struct AdditiveReport {
    /// True when the errors are bounds, false when they were measured.
    pub bound: bool,
    /// Safetensors files written.
    pub weight_files: usize,
    /// Other files written.
    pub aux_files: usize,
    /// Bytes of the safetensors files written.
    pub bytes: u64,
    /// Largest absolute error of any finite element.
    pub max_abs_error: f64,
    /// The model's error relative to its delta, `||error|| / ||delta||` over finite elements
    /// (for a bound: the norm of the bounds over that of the delta as stored).
    pub relative_error: f64,
    /// Elements that overflowed fp16 to infinity.
    pub overflowed: u64,
    /// Elements with a subnormal fp16 delta or sum.
    pub subnormal: u64,
    /// Base tensors the delta (or fine-tune) lacks, left out.
    pub base_only: Vec<String>,
    /// Files not written: pickles, and the index of pickled shards.
    pub skipped: Vec<String>,
    /// Every tensor written, in order.
    pub tensors: Vec<TensorRounding>,
}

/// Applies a FastChat-style additive delta (a model directory of fine-tune minus base
/// tensors, or a `.safetensors` file) to `base`, in fp16 as FastChat does, and writes the
/// result into the directory `out`.
///
/// The result keeps the delta's files, tensor order and other files. The report bounds its
/// distance from the fine-tune, tensor by tensor. A base that lacks a delta tensor, or holds
/// it in a shape that does not add up, is [`Error::WrongBase`]; the directory appears only
/// when all of it is written.
pub fn apply_additive(
    base: &Path,
    additive: &Path,
    out: &Path,
    opts: &AdditiveOptions,
    progress: &dyn Progress,
) -> Result<AdditiveReport> {
    let od = opts.dtype.unwrap_or(Dtype::F16);
    if !matches!(od, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
        return Err(Error::InvalidArgument(format!(
            "an additive delta's result is written as F16, BF16 or F32, not {od}"
        )));
    }
    crate::checkpoint::check_output_disjoint(out, &[("base", base), ("additive delta", additive)])?;
    let base = Checkpoint::open(base)?;
    let delta = Checkpoint::open(additive)?;
    let (plan, base_only) = plan_apply(&base, &delta, od)?;
    let dir = OutputDir::create(out, opts.force)?;
    progress.begin("apply", delta.tensors.iter().map(|t| t.len() as u64).sum());
    let mut report = AdditiveReport::new(true, base_only, delta.skipped.iter().map(|s| s.path.clone()).collect());
    let mut sums = Vec::with_capacity(plan.len());
    let mut data_bytes = 0;
    for (s, shard) in delta.shards.iter().enumerate() {
        let tensors: Vec<&Planned> = plan.iter().filter(|p| p.delta.shard == s).collect();
        let layout: Vec<(&str, Dtype, &[usize])> = tensors
            .iter()
            .map(|p| (p.delta.name.as_str(), p.out, p.delta.shape.as_slice()))
            .collect();
        let (header, data_len) =
            crate::checkpoint::header::build(unmarked(metadata_of(shard.header_bytes())), &layout)?;
        let mut w = Writer::create(&dir, &shard.rel, header.len() as u64 + data_len)?;
        w.write(&header)?;
        for (p, s) in tensors
            .iter()
            .zip(apply_tensors(&base, &delta, &tensors, &mut w, progress)?)
        {
            report.push(p.pairing.report(&p.delta.name, p.out, &s));
            sums.push(s);
        }
        w.finish(opts.sync)?;
        report.weight_files += 1;
        report.bytes += header.len() as u64 + data_len;
        data_bytes += data_len;
    }
    progress.finish();
    copy_aux(&delta, &dir, data_bytes, opts.sync, &mut report)?;
    report.finish(&sums);
    dir.commit()?;
    Ok(report)
}

/// Writes a FastChat-style additive delta of the fine-tune that `deltas` (a `.dpk`, or a
/// chain of them in order from the base) rebuild from `base`: every tensor as fine-tune minus
/// base in fp16, in the fine-tune's file layout, with the fine-tune's other files.
///
/// The fine-tune is rebuilt chunk by chunk, with every fingerprint checked. Its tensors must
/// all be in the base under the same name and shape (or with more rows); base tensors it
/// lacks are reported. The report measures how far FastChat's `apply_delta` of the written
/// delta lands from the fine-tune.
pub fn export_additive(
    base: &Path,
    deltas: &[PathBuf],
    out: &Path,
    opts: &ExportOptions,
    progress: &dyn Progress,
) -> Result<AdditiveReport> {
    let mut inputs = vec![("base", base)];
    inputs.extend(deltas.iter().map(|d| ("delta", d.as_path())));
    crate::checkpoint::check_output_disjoint(out, &inputs)?;
    let chain = Chain::open(base, deltas)?;
    // A wrong base is reported as such before the pairing is judged.
    let ctx = Ctx::new(&chain)?;
    let top = chain.deltas.last().expect("a chain has a delta");
    let plan = plan_export(&chain.base, top)?;
    let base_only = chain
        .base
        .tensors
        .iter()
        .filter(|b| top.index.tensors().all(|t| t.name != b.name))
        .map(|b| b.name.clone())
        .collect();
    let mut sink = ExportSink {
        base: &chain.base,
        dir: OutputDir::create(out, opts.force)?,
        sync: opts.sync,
        plan,
        next: 0,
        current: None,
        acc: Sums::default(),
        sums: Vec::new(),
        out: None,
        aux: None,
        data_bytes: 0,
        report: AdditiveReport::new(false, base_only, Vec::new()),
    };
    rebuild(&ctx, &mut sink, progress)?;
    sink.close_file()?;
    let ExportSink {
        dir, mut report, sums, ..
    } = sink;
    report.finish(&sums);
    dir.commit()?;
    Ok(report)
}

/// A tensor's element-wise pairing with its base tensor.
#[derive(Debug, Clone)]
struct Pairing {
    /// Elements in total.
    numel: usize,
    /// Leading elements with a base counterpart: all, or the base's rows of a grown tensor.
    common: usize,
    /// Rows the base lacks.
    added_rows: usize,
    /// Float (fp16 arithmetic) or integer (exact, wrapping).
    float: bool,
}

impl Pairing {
    /// How a tensor of `(td, ts)` pairs with a base tensor of `(bd, bs)` under FastChat's rules.
    fn new(bd: Dtype, bs: &[usize], td: Dtype, ts: &[usize]) -> std::result::Result<Pairing, String> {
        let float = fp16::is_float(td);
        let kinds_match = (float && fp16::is_float(bd)) || (is_integer(td) && bd == td);
        if !kinds_match {
            return Err(format!(
                "is {bd} in the base and {td} here; only float tensors, or integer tensors of one dtype, can be added"
            ));
        }
        let numel = ts.iter().product();
        let base_numel: usize = bs.iter().product();
        let grown = float && !ts.is_empty() && bs.len() == ts.len() && bs[1..] == ts[1..] && ts[0] > bs[0];
        if bs != ts && !grown {
            return Err(format!(
                "has shape {bs:?} in the base and {ts:?} here; FastChat adds tensors of one shape, or of more rows (a vocabulary resize)"
            ));
        }
        Ok(Pairing {
            numel,
            common: base_numel,
            added_rows: if grown { ts[0] - bs[0] } else { 0 },
            float,
        })
    }

    fn report(&self, name: &str, dt: Dtype, s: &Sums) -> TensorRounding {
        let n = s.n.max(1) as f64;
        TensorRounding {
            name: name.to_string(),
            dtype: dtype::name(dt),
            elements: self.numel as u64,
            added_rows: self.added_rows as u64,
            max_abs_error: s.max,
            rms_error: (s.err_sq / n).sqrt(),
            delta_rms: (s.delta_sq / n).sqrt(),
            overflowed: s.overflowed,
            subnormal: s.subnormal,
        }
    }
}

fn is_integer(dt: Dtype) -> bool {
    use Dtype::*;
    matches!(dt, I8 | U8 | I16 | U16 | I32 | U32 | I64 | U64)
}

/// The dtype a tensor is written in: `float` for float tensors, its own otherwise.
fn out_dtype(dt: Dtype, float: Dtype) -> Dtype {
    if fp16::is_float(dt) {
        float
    } else {
        dt
    }
}

/// Error sums over a tensor's (or a chunk's) finite elements.
#[derive(Debug, Clone, Default)]
struct Sums {
    n: u64,
    max: f64,
    err_sq: f64,
    delta_sq: f64,
    overflowed: u64,
    subnormal: u64,
}

impl Sums {
    fn add(&mut self, o: &fp16::Outcome) {
        match o.class {
            fp16::Class::Overflow => self.overflowed += 1,
            fp16::Class::NonFinite => {}
            fp16::Class::Finite | fp16::Class::Subnormal => {
                self.n += 1;
                self.max = self.max.max(o.err);
                self.err_sq += o.err * o.err;
                self.delta_sq += o.delta * o.delta;
                self.subnormal += u64::from(o.class == fp16::Class::Subnormal);
            }
        }
    }

    fn merge(&mut self, o: &Sums) {
        self.n += o.n;
        self.max = self.max.max(o.max);
        self.err_sq += o.err_sq;
        self.delta_sq += o.delta_sq;
        self.overflowed += o.overflowed;
        self.subnormal += o.subnormal;
    }
}

impl AdditiveReport {
    fn new(bound: bool, base_only: Vec<String>, skipped: Vec<String>) -> Self {
        AdditiveReport {
            bound,
            weight_files: 0,
            aux_files: 0,
            bytes: 0,
            max_abs_error: 0.0,
            relative_error: 0.0,
            overflowed: 0,
            subnormal: 0,
            base_only,
            skipped,
            tensors: Vec::new(),
        }
    }

    fn push(&mut self, t: TensorRounding) {
        self.tensors.push(t);
    }

    /// The model-wide figures, from every tensor's sums.
    fn finish(&mut self, sums: &[Sums]) {
        let mut all = Sums::default();
        sums.iter().for_each(|s| all.merge(s));
        self.max_abs_error = all.max;
        self.relative_error = if all.delta_sq > 0.0 {
            (all.err_sq / all.delta_sq).sqrt()
        } else {
            0.0
        };
        self.overflowed = all.overflowed;
        self.subnormal = all.subnormal;
    }
}

/// One tensor of an additive delta, paired with its base tensor.
struct Planned<'a> {
    delta: &'a TensorRef,
    base: &'a TensorRef,
    pairing: Pairing,
    /// dtype written.
    out: Dtype,
}

impl Planned<'_> {
    /// Drops the pages of both inputs that a chunk of elements read.
    fn release(&self, base: &Checkpoint, delta: &Checkpoint, r: Range<usize>) {
        let (wd, wb) = (self.delta.dtype.bitsize() / 8, self.base.dtype.bitsize() / 8);
        delta.release(self.delta, r.start * wd..r.end * wd);
        let common = r.start.min(self.pairing.common)..r.end.min(self.pairing.common);
        base.release(self.base, common.start * wb..common.end * wb);
    }
}

/// Pairs every tensor of the delta with its base tensor; returns them and the base tensors
/// the delta lacks.
fn plan_apply<'a>(base: &'a Checkpoint, delta: &'a Checkpoint, od: Dtype) -> Result<(Vec<Planned<'a>>, Vec<String>)> {
    let mut plan = Vec::with_capacity(delta.tensors.len());
    for d in &delta.tensors {
        if !fp16::is_float(d.dtype) && !is_integer(d.dtype) {
            let why = format!("is {}; additive deltas hold float or integer tensors", d.dtype);
            return Err(Error::bad_tensor(&delta.shards[d.shard].path, &d.name, why));
        }
        let wrong = |reason: String| Error::WrongBase {
            path: base.root.clone(),
            part: BasePart::Tensor(d.name.clone()),
            reason,
            expected: Box::default(),
        };
        let b = base
            .tensor(&d.name)
            .ok_or_else(|| wrong("is missing, but the additive delta has it".into()))?;
        let pairing = Pairing::new(b.dtype, &b.shape, d.dtype, &d.shape).map_err(wrong)?;
        plan.push(Planned {
            delta: d,
            base: b,
            out: out_dtype(d.dtype, od),
            pairing,
        });
    }
    let base_only = base
        .tensors
        .iter()
        .filter(|b| delta.tensor(&b.name).is_none())
        .map(|b| b.name.clone())
        .collect();
    Ok((plan, base_only))
}

/// Pairs every fine-tune tensor of a `.dpk` with the base tensor of the same name, from what
/// the delta records (the base itself is checked against it when the fine-tune is rebuilt).
fn plan_export(base: &Checkpoint, delta: &Delta) -> Result<Vec<Pairing>> {
    let refuse = |t: &TensorEntry, why: String| {
        Error::InvalidArgument(format!(
            "{}: tensor '{}' {why}; a FastChat-style delta needs every fine-tune tensor in the base under the same name",
            delta.path.display(),
            t.name
        ))
    };
    let dims = |s: &[u64]| s.iter().map(|&d| d as usize).collect::<Vec<_>>();
    delta
        .index
        .tensors()
        .map(|t| {
            let td = dtype::parse(&t.dtype).expect("validated dtype");
            let b = base
                .tensor(&t.name)
                .ok_or_else(|| refuse(t, "has no counterpart in the base".into()))?;
            Pairing::new(b.dtype, &b.shape, td, &dims(&t.shape)).map_err(|why| refuse(t, why))
        })
        .collect()
}

/// Applies the delta to `tensors` in order, chunks in parallel, writing each to `w`; returns
/// every tensor's error sums.
fn apply_tensors(
    base: &Checkpoint,
    delta: &Checkpoint,
    tensors: &[&Planned],
    w: &mut Writer,
    progress: &dyn Progress,
) -> Result<Vec<Sums>> {
    let jobs: Vec<Job> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, p)| schedule::jobs(i, p.pairing.numel, 0, CHUNK_ELEMS))
        .collect();
    let (mut sums, mut acc) = (Vec::with_capacity(tensors.len()), Sums::default());
    let work = |j: &Job| apply_range(base, delta, tensors[j.tensor], j.range.clone());
    schedule::ordered(&jobs, work, |j, (bytes, part)| {
        let p = tensors[j.tensor];
        w.write(&bytes)?;
        acc.merge(&part);
        p.release(base, delta, j.range.clone());
        progress.advance((j.range.len() * p.delta.dtype.bitsize() / 8) as u64);
        if j.last {
            sums.push(std::mem::take(&mut acc));
        }
        Ok::<(), Error>(())
    })?;
    Ok(sums)
}

/// Applies the delta to elements `range` of one tensor: the bytes written and their error sums.
fn apply_range(base: &Checkpoint, delta: &Checkpoint, p: &Planned, range: Range<usize>) -> (Vec<u8>, Sums) {
    let (bd, dd, od) = (p.base.dtype, p.delta.dtype, p.out);
    let (wb, wd, wo) = (bd.bitsize() / 8, dd.bitsize() / 8, od.bitsize() / 8);
    let (b, d) = (base.bytes(p.base), delta.bytes(p.delta));
    let mut out = vec![0u8; range.len() * wo];
    let mut sums = Sums::default();
    for (o, i) in out.chunks_exact_mut(wo).zip(range) {
        let di = &d[i * wd..(i + 1) * wd];
        if !p.pairing.float {
            // Integer tensors pair only with a base tensor of their own shape.
            wrapping(&b[i * wb..(i + 1) * wb], di, o, false);
            continue;
        }
        let bi = (i < p.pairing.common).then(|| &b[i * wb..(i + 1) * wb]);
        sums.add(&fp16::apply_one(bd, bi, dd, di, od, o));
    }
    (out, sums)
}

/// The fine-tune minus base of `ft`, elements `first..` of a fine-tune tensor of dtype `td`,
/// with `base` the whole base tensor: the delta's bytes and the error sums of applying it.
fn export_range(p: &Pairing, td: Dtype, ft: &[u8], first: usize, bd: Dtype, base: &[u8]) -> (Vec<u8>, Sums) {
    let (wt, wb) = (td.bitsize() / 8, bd.bitsize() / 8);
    let wo = if p.float { 2 } else { wt };
    let mut out = vec![0u8; ft.len() / wt * wo];
    let mut sums = Sums::default();
    for (k, (o, f)) in out.chunks_exact_mut(wo).zip(ft.chunks_exact(wt)).enumerate() {
        let i = first + k;
        if !p.float {
            wrapping(f, &base[i * wb..(i + 1) * wb], o, true);
            continue;
        }
        let bi = (i < p.common).then(|| &base[i * wb..(i + 1) * wb]);
        sums.add(&fp16::export_one(td, f, bd, bi, o));
    }
    (out, sums)
}

/// `a + b` or `a - b` of two little-endian integers of one width, wrapping around as
/// PyTorch's integer arithmetic does (the bits are the same for signed and unsigned).
fn wrapping(a: &[u8], b: &[u8], out: &mut [u8], subtract: bool) {
    let load = |x: &[u8]| {
        let mut v = [0u8; 8];
        v[..x.len()].copy_from_slice(x);
        u64::from_le_bytes(v)
    };
    let (x, y) = (load(a), load(b));
    let r = if subtract { x.wrapping_sub(y) } else { x.wrapping_add(y) };
    out.copy_from_slice(&r.to_le_bytes()[..out.len()]);
}

/// The `__metadata__` of a safetensors header (already validated), if it has one.
fn metadata_of(header: &[u8]) -> Option<serde_json::Value> {
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header.get(8..)?).ok()?;
    json.get("__metadata__").cloned()
}

/// The `__metadata__` of an exported delta: the fine-tune's, with the marker that tells
/// [`classify`] it is a difference. A header that had none gets `"format": "pt"` beside the
/// marker, as every file PyTorch's `save_file` writes has: transformers refuses to load a
/// safetensors file whose metadata lacks a `format` it knows, and FastChat's `apply_delta`
/// loads the delta with transformers. The values stay strings, as the safetensors
/// format requires of `__metadata__`.
fn marked(metadata: Option<serde_json::Value>) -> serde_json::Value {
    let mut m = match metadata {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    m.entry("format").or_insert_with(|| "pt".into());
    m.insert(MARKER_KEY.into(), MARKER_VALUE.into());
    serde_json::Value::Object(m)
}

/// The `__metadata__` of an applied model: the delta's without the marker, which would make
/// the model pass for a difference if it were given to `apply_additive` in turn.
fn unmarked(metadata: Option<serde_json::Value>) -> Option<serde_json::Value> {
    let mut metadata = metadata?;
    if let Some(m) = metadata.as_object_mut() {
        m.remove(MARKER_KEY);
    }
    Some(metadata)
}

/// The shard index with `metadata.total_size` set to `total`, or `None` when it already says
/// so or has no such field (it is then copied as it is).
fn patched_index(bytes: &[u8], total: u64) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let size = v.get_mut("metadata")?.get_mut("total_size")?;
    if size.as_u64() == Some(total) {
        return None;
    }
    *size = total.into();
    let mut out = serde_json::to_vec_pretty(&v).ok()?;
    out.push(b'\n');
    Some(out)
}

/// The index of pickled shards, which the output does not have.
fn is_pickle_index(rel: &str) -> bool {
    rel.ends_with(".bin.index.json")
}

/// Copies the additive delta's other files into the output, patching the shard index.
fn copy_aux(
    delta: &Checkpoint,
    dir: &OutputDir,
    data_bytes: u64,
    sync: bool,
    report: &mut AdditiveReport,
) -> Result<()> {
    for a in &delta.aux {
        if is_pickle_index(&a.rel) {
            report.skipped.push(a.rel.clone());
            continue;
        }
        let read = |e| Error::io("reading", &a.path, e);
        let patched = if a.rel == INDEX_FILE && a.size <= MAX_INDEX_LEN {
            patched_index(&std::fs::read(&a.path).map_err(read)?, data_bytes)
        } else {
            None
        };
        let size = patched.as_ref().map_or(a.size, |p| p.len() as u64);
        let mut w = Writer::create(dir, &a.rel, size)?;
        match patched {
            Some(p) => w.write(&p)?,
            None => w.copy_from(&a.path)?,
        }
        w.finish(sync)?;
        report.aux_files += 1;
    }
    Ok(())
}

/// One output file, checked to reach its announced size.
struct Writer {
    file: BufWriter<File>,
    path: PathBuf,
    expected: u64,
    written: u64,
}

impl Writer {
    fn create(dir: &OutputDir, rel: &str, expected: u64) -> Result<Writer> {
        let file = dir.create_file(rel)?;
        Ok(Writer {
            file: BufWriter::with_capacity(1 << 20, file),
            path: dir.target().join(rel),
            expected,
            written: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.written += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(|e| Error::io("writing", &self.path, e))
    }

    /// Appends the contents of the file at `src`.
    fn copy_from(&mut self, src: &Path) -> Result<()> {
        let mut f = File::open(src).map_err(|e| Error::io("reading", src, e))?;
        let n = std::io::copy(&mut f, &mut self.file).map_err(|e| Error::io("copying", src, e))?;
        self.written += n;
        Ok(())
    }

    fn finish(self, sync: bool) -> Result<()> {
        let f = self
            .file
            .into_inner()
            .map_err(|e| Error::io("writing", &self.path, e.into_error()))?;
        let len = f.metadata().map_err(|e| Error::io("writing", &self.path, e))?.len();
        if len != self.expected || self.written != self.expected {
            let why = format!("wrote {len} bytes, expected {}", self.expected);
            return Err(Error::io("writing", &self.path, std::io::Error::other(why)));
        }
        if sync {
            f.sync_all().map_err(|e| Error::io("syncing", &self.path, e))?;
        }
        Ok(())
    }
}

/// How an auxiliary file of the fine-tune is being written.
enum AuxOut {
    /// Streamed to the output as it is.
    Copy(Writer),
    /// The shard index, kept until complete to patch its `total_size`.
    Index(Vec<u8>),
    /// Not written.
    Skip,
}

/// Turns the rebuilt fine-tune into fine-tune minus base, chunk by chunk, into a directory.
struct ExportSink<'a> {
    base: &'a Checkpoint,
    dir: OutputDir,
    sync: bool,
    /// Every fine-tune tensor's pairing, in rebuild order.
    plan: Vec<Pairing>,
    next: usize,
    /// The tensor being written: its index in `plan` and base tensor.
    current: Option<(usize, &'a TensorRef)>,
    acc: Sums,
    sums: Vec<Sums>,
    out: Option<Writer>,
    aux: Option<(AuxOut, String)>,
    /// Bytes of tensor data written (the shard index's `total_size`).
    data_bytes: u64,
    report: AdditiveReport,
}

impl ExportSink<'_> {
    fn close_file(&mut self) -> Result<()> {
        match self.out.take() {
            Some(w) => w.finish(self.sync),
            None => Ok(()),
        }
    }

    /// Starts the next fine-tune tensor.
    fn begin_tensor(&mut self, t: &TensorEntry) -> Result<()> {
        let b = self.base.tensor(&t.name).ok_or_else(|| Error::WrongBase {
            path: self.base.root.clone(),
            part: BasePart::Tensor(t.name.clone()),
            reason: "is missing".into(),
            expected: Box::default(),
        })?;
        self.current = Some((self.next, b));
        self.next += 1;
        Ok(())
    }
}

impl Sink for ExportSink<'_> {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()> {
        self.close_file()?;
        let dims: Vec<Vec<usize>> = f
            .tensors
            .iter()
            .map(|t| t.shape.iter().map(|&d| d as usize).collect())
            .collect();
        let layout: Vec<(&str, Dtype, &[usize])> = f
            .tensors
            .iter()
            .zip(&dims)
            .map(|(t, s)| {
                let dt = dtype::parse(&t.dtype).expect("validated dtype");
                (t.name.as_str(), out_dtype(dt, Dtype::F16), s.as_slice())
            })
            .collect();
        let (header, data_len) = crate::checkpoint::header::build(Some(marked(metadata_of(header))), &layout)?;
        let mut w = Writer::create(&self.dir, &f.path, header.len() as u64 + data_len)?;
        w.write(&header)?;
        self.out = Some(w);
        self.data_bytes += data_len;
        self.report.weight_files += 1;
        self.report.bytes += header.len() as u64 + data_len;
        Ok(())
    }

    fn data(&mut self, _: usize, t: &TensorEntry, offset: usize, bytes: &[u8]) -> Result<()> {
        if offset == 0 {
            self.begin_tensor(t)?;
        }
        let (i, b) = self.current.expect("a tensor starts at offset 0");
        let p = &self.plan[i];
        let td = dtype::parse(&t.dtype).expect("validated dtype");
        let wt = td.bitsize() / 8;
        let base = self.base.bytes(b);
        // Slices of whole elements: chunks are a power of two of at least 4 KiB.
        let piece = (1 << 16) * wt;
        let parts: Vec<(Vec<u8>, Sums)> = bytes
            .par_chunks(piece)
            .enumerate()
            .map(|(k, ft)| export_range(p, td, ft, (offset + k * piece) / wt, b.dtype, base))
            .collect();
        let w = self.out.as_mut().expect("a file is open");
        for (out, s) in &parts {
            w.write(out)?;
            self.acc.merge(s);
        }
        let wb = b.dtype.bitsize() / 8;
        let (e0, e1) = (offset / wt, (offset + bytes.len()) / wt);
        self.base.release(b, e0.min(p.common) * wb..e1.min(p.common) * wb);
        if (offset + bytes.len()) as u64 == t.len() {
            let s = std::mem::take(&mut self.acc);
            self.report.push(p.report(&t.name, out_dtype(td, Dtype::F16), &s));
            self.sums.push(s);
        }
        Ok(())
    }

    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()> {
        self.close_file()?;
        let out = if is_pickle_index(&a.path) {
            self.report.skipped.push(a.path.clone());
            AuxOut::Skip
        } else if a.path == INDEX_FILE && a.size <= MAX_INDEX_LEN {
            AuxOut::Index(Vec::new())
        } else {
            AuxOut::Copy(Writer::create(&self.dir, &a.path, a.size)?)
        };
        self.aux = Some((out, a.path.clone()));
        Ok(())
    }

    fn aux_data(&mut self, bytes: &[u8]) -> Result<()> {
        match self.aux.as_mut() {
            Some((AuxOut::Copy(w), _)) => w.write(bytes),
            Some((AuxOut::Index(buf), _)) => {
                buf.extend_from_slice(bytes);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn end_aux(&mut self) -> Result<()> {
        let Some((out, path)) = self.aux.take() else {
            return Ok(());
        };
        let w = match out {
            AuxOut::Skip => return Ok(()),
            AuxOut::Copy(w) => w,
            AuxOut::Index(buf) => {
                let bytes = patched_index(&buf, self.data_bytes).unwrap_or(buf);
                let mut w = Writer::create(&self.dir, &path, bytes.len() as u64)?;
                w.write(&bytes)?;
                w
            }
        };
        w.finish(self.sync)?;
        self.report.aux_files += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairing_follows_fastchat() {
        use Dtype::*;
        let p = Pairing::new(BF16, &[4, 3], F16, &[4, 3]).unwrap();
        assert_eq!((p.numel, p.common, p.added_rows, p.float), (12, 12, 0, true));
        let grown = Pairing::new(F16, &[4, 3], F16, &[6, 3]).unwrap();
        assert_eq!((grown.numel, grown.common, grown.added_rows), (18, 12, 2));
        assert!(
            Pairing::new(F16, &[6, 3], F16, &[4, 3]).is_err(),
            "a vocabulary that shrank"
        );
        assert!(Pairing::new(F16, &[4, 3], F16, &[4, 4]).is_err(), "more columns");
        assert!(Pairing::new(I64, &[4], I64, &[6]).is_err(), "integers do not grow");
        assert!(Pairing::new(I64, &[4], I32, &[4]).is_err());
        assert!(Pairing::new(F32, &[4], I64, &[4]).is_err());
        assert!(!Pairing::new(I64, &[4], I64, &[4]).unwrap().float);
    }

    #[test]
    fn integers_wrap_around() {
        let mut out = [0u8; 2];
        wrapping(&0xFFFFu16.to_le_bytes(), &2u16.to_le_bytes(), &mut out, false);
        assert_eq!(u16::from_le_bytes(out), 1);
        wrapping(&1u16.to_le_bytes(), &2u16.to_le_bytes(), &mut out, true);
        assert_eq!(i16::from_le_bytes(out), -1);
        let mut out = [0u8; 8];
        wrapping(&(-5i64).to_le_bytes(), &7i64.to_le_bytes(), &mut out, false);
        assert_eq!(i64::from_le_bytes(out), 2);
    }

    #[test]
    fn headers_parse_back_with_their_metadata() {
        let meta = serde_json::json!({"format": "pt"});
        let tensors: [(&str, Dtype, &[usize]); 2] = [("b\"odd", Dtype::F16, &[3, 2]), ("a", Dtype::I64, &[5])];
        let (h, len) = crate::checkpoint::header::build(Some(meta.clone()), &tensors).unwrap();
        assert_eq!((len, h.len() % 8), (12 + 40, 0));
        let parsed = crate::checkpoint::header::parse(&h, Some(h.len() as u64 + len)).unwrap();
        let names: Vec<_> = parsed.tensors.iter().map(|t| (t.name.as_str(), t.dtype)).collect();
        assert_eq!(names, [("b\"odd", Dtype::F16), ("a", Dtype::I64)]);
        assert_eq!(metadata_of(&h), Some(meta));
    }

    #[test]
    fn exports_are_marked_and_applied_models_are_not() {
        use serde_json::json;
        assert_eq!(
            marked(None),
            json!({"format": "pt", "deltapack_delta": "additive"}),
            "transformers needs a format beside the marker"
        );
        assert_eq!(
            marked(Some(json!({"format": "np", "x": "y"}))),
            json!({"format": "np", "x": "y", "deltapack_delta": "additive"})
        );
        assert_eq!(unmarked(Some(marked(None))), Some(json!({"format": "pt"})));
        assert_eq!(unmarked(None), None);
    }

    #[test]
    fn the_shard_index_follows_the_size_written() {
        let index = br#"{"metadata": {"total_size": 100}, "weight_map": {"w": "a.safetensors"}}"#;
        let patched: serde_json::Value = serde_json::from_slice(&patched_index(index, 50).unwrap()).unwrap();
        assert_eq!(patched["metadata"]["total_size"], 50);
        assert_eq!(patched["weight_map"]["w"], "a.safetensors");
        assert_eq!(patched_index(index, 100), None, "already right: copied as it is");
        assert_eq!(patched_index(br#"{"weight_map": {}}"#, 100), None);
    }
}
