//! Rebuilding a fine-tune from its base and a delta, or a chain of deltas: to a directory
//! (`apply`), or only to check it (`verify`), in bounded windows of parallel chunk decodes.
//!
//! A chain is rebuilt in one streaming pass: each chunk of the last delta is predicted from
//! the same chunk of its parent's reconstruction, decoded on the fly from the grandparent's,
//! and so on down to the base; no intermediate model is written. A chunk a link left
//! unchanged passes through without a copy.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use safetensors::Dtype;
use serde::Serialize;

use crate::chain::Chain;
use crate::checkpoint::{Checkpoint, OutputDir, TensorRef};
use crate::codec::exact::DecodeError;
use crate::codec::plan::{QualitySums, TensorPlan};
use crate::codec::{decode_chunk, decode_exact_in_place};
use crate::container::index::{AuxEntry, Blob, Chunk, ChunkCodec, TensorEntry, WeightFile};
use crate::container::Delta;
use crate::hash::{self, Digest};
use crate::pair::{self, Relation};
use crate::progress::Progress;
use crate::schedule::{self, Job};
use crate::{dtype, BasePart, Error, ExpectedBase, MissingFile, Result};

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
    let mut sink = DirSink {
        dir,
        current: None,
        sync: opts.sync,
    };
    let report = rebuild(&ctx, &mut sink, progress)?;
    sink.close_current()?;
    sink.dir.commit()?;
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
    let ctx = Ctx {
        rebuilt_hashes: true,
        ..Ctx::new(chain)?
    };
    let ft = finetuned.map(Checkpoint::open).transpose()?;
    let mut sink = CompareSink {
        ft: ft.as_ref(),
        ctx: &ctx,
        seen_files: BTreeSet::new(),
        current: None,
        aux: None,
        sums: Vec::new(),
    };
    let mut report = rebuild(&ctx, &mut sink, progress)?;
    let delta = ctx.levels[ctx.top()].delta;
    sink.finish(delta)?;
    report.compared_with_finetuned = ft.is_some();
    let (mut err, mut norm) = (0.0, 0.0);
    for (t, q) in &sink.sums {
        let rec = t.quality.map_or(0.0, |q| q.error);
        let m = q.quality(0, 1);
        err += q.err_sq;
        norm += q.delta_sq;
        report.measured.push(MeasuredTensor {
            name: t.name.clone(),
            codec: t.codec.as_ref().map_or("exact", |c| c.name()).into(),
            recorded_error: rec,
            error: m.error,
            max_abs_error: m.max_abs_error,
        });
    }
    // Exact tensors count towards the model's delta norm with zero error.
    norm += delta
        .index
        .tensors()
        .filter(|t| t.codec.is_none())
        .filter_map(|t| t.quality)
        .map(|q| q.delta_norm * q.delta_norm)
        .sum::<f64>();
    report.measured_error = if norm > 0.0 { (err / norm).sqrt() } else { 0.0 };
    Ok(report)
}

/// Rebuilds one tensor's bytes (random access into a delta or chain).
pub fn rebuild_tensor(chain: &Chain, name: &str) -> Result<Vec<u8>> {
    let ctx = Ctx::new(chain)?;
    let top = ctx.top();
    let idx = ctx.levels[top].by_name.get(name).copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "the delta {} has no tensor '{name}'",
            ctx.levels[top].delta.path.display()
        ))
    })?;
    let jobs = ctx.jobs_of(idx);
    let parts = jobs.par_iter().map(|j| ctx.decode(j)).collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(ctx.levels[top].tensors[idx].0.len() as usize);
    let (mut th, mut sh) = (Vec::new(), Vec::new());
    for (j, d) in jobs.iter().zip(parts) {
        out.extend_from_slice(&d.bytes);
        if !j.range.is_empty() {
            th.push(d.target_hash);
        }
        sh.extend(d.source_hashes);
    }
    ctx.check_tensor(top, idx, &th, &sh)?;
    Ok(out)
}

/// Random access to the tensors of the model a chain rebuilds, chunk by chunk.
///
/// Reads decode only the chunks they cover, through every link; they check payload
/// checksums but not fingerprints (a whole-tensor property): use [`verify_chain`] for that.
pub struct ChainReader<'a> {
    ctx: Ctx<'a>,
}

impl<'a> ChainReader<'a> {
    /// Prepares reading `chain` (checks that every source tensor is where the links say).
    pub fn new(chain: &'a Chain) -> Result<Self> {
        Ok(ChainReader { ctx: Ctx::new(chain)? })
    }

    /// The tensors of the rebuilt model, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = &'a TensorEntry> + '_ {
        self.ctx.levels[self.ctx.top()].tensors.iter().map(|(t, _)| *t)
    }

    /// Bytes `range` of tensor `name` of the rebuilt model.
    pub fn read(&self, name: &str, range: Range<usize>) -> Result<Cow<'a, [u8]>> {
        let top = self.ctx.top();
        let Some(&i) = self.ctx.levels[top].by_name.get(name) else {
            return Err(Error::InvalidArgument(format!("the model has no tensor '{name}'")));
        };
        let len = self.ctx.levels[top].tensors[i].0.len() as usize;
        if range.start > range.end || range.end > len {
            return Err(Error::InvalidArgument(format!(
                "range {range:?} outside tensor '{name}' of {len} bytes"
            )));
        }
        self.ctx.read(top, i, range)
    }
}

/// Hands decoded chunks to the sink in job order and checks each finished tensor.
struct Assembler<'a> {
    sink: &'a mut dyn Sink,
    files: &'a [WeightFile],
    headers: &'a [Vec<u8>],
    /// File index of every tensor.
    file_of: &'a [usize],
    next_file: usize,
    th: Vec<Digest>,
    sh: Vec<Digest>,
}

impl Assembler<'_> {
    /// Starts every file up to and including `file` (files without tensors included).
    fn begin_files_through(&mut self, file: usize) -> Result<()> {
        while self.next_file <= file && self.next_file < self.files.len() {
            self.sink
                .begin_file(&self.files[self.next_file], &self.headers[self.next_file])?;
            self.next_file += 1;
        }
        Ok(())
    }

    fn finish_files(&mut self) -> Result<()> {
        self.begin_files_through(self.files.len())
    }

    fn consume(&mut self, ctx: &Ctx, job: &Job, d: Decoded, progress: &dyn Progress) -> Result<()> {
        let top = ctx.top();
        self.begin_files_through(self.file_of[job.tensor])?;
        self.sink.data(
            job.tensor,
            ctx.levels[top].tensors[job.tensor].0,
            job.range.start,
            &d.bytes,
        )?;
        if !job.range.is_empty() {
            self.th.push(d.target_hash);
        }
        self.sh.extend(d.source_hashes);
        ctx.release(top, job.tensor, job.chunk, d.source_span);
        progress.advance(job.range.len() as u64);
        if job.last {
            ctx.check_tensor(top, job.tensor, &self.th, &self.sh)?;
            self.th.clear();
            self.sh.clear();
        }
        Ok(())
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
}

struct Decoded<'a> {
    bytes: Cow<'a, [u8]>,
    target_hash: Digest,
    source_hashes: Vec<Digest>,
    /// Source bytes the job read, to release once consumed.
    source_span: Range<usize>,
}

/// A decoded range: its bytes, the fingerprints of the source chunks it hashed, and the
/// source bytes it read.
type DecodedRange<'a> = (Cow<'a, [u8]>, Vec<Digest>, Range<usize>);

/// Where a tensor's prediction comes from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// A tensor of the base checkpoint.
    Base(&'a TensorRef),
    /// Tensor `i` of the level below (the parent delta's reconstruction).
    Parent(usize),
}

/// One delta of the chain, its tensors resolved against the level below.
struct Level<'a> {
    delta: &'a Delta,
    tensors: Vec<(&'a TensorEntry, Option<Src<'a>>)>,
    by_name: HashMap<&'a str, usize>,
    chunk_bytes: usize,
    /// Each tensor's lossy codec and `sign-axis` scales (few and small: two vectors each).
    plans: Vec<TensorPlan>,
}

/// Bytes of a source tensor: all of them (the base's map) or a decoded stretch.
struct Window<'a> {
    bytes: Cow<'a, [u8]>,
    /// Where `bytes` starts in the source tensor.
    offset: usize,
    /// Length of the whole source tensor.
    len: usize,
}

impl Window<'_> {
    fn get(&self, r: Range<usize>) -> &[u8] {
        &self.bytes[r.start - self.offset..r.end - self.offset]
    }
}

/// Narrows a decoded stretch starting at `offset` to `r`, without a copy when it can.
fn narrow(bytes: Cow<'_, [u8]>, offset: usize, r: Range<usize>) -> Cow<'_, [u8]> {
    let (a, b) = (r.start - offset, r.end - offset);
    match bytes {
        Cow::Borrowed(s) => Cow::Borrowed(&s[a..b]),
        Cow::Owned(v) if a == 0 && b == v.len() => Cow::Owned(v),
        Cow::Owned(v) => Cow::Owned(v[a..b].to_vec()),
    }
}

/// The smallest range holding both (either may be empty).
fn span(a: Range<usize>, b: Range<usize>) -> Range<usize> {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b,
        (_, true) => a,
        _ => a.start.min(b.start)..a.end.max(b.end),
    }
}

/// A chain resolved for rebuilding: each level's tensors matched with their sources.
pub(crate) struct Ctx<'a> {
    chain: &'a Chain,
    /// `levels[0]` is made against the base; the last one is the model rebuilt.
    levels: Vec<Level<'a>>,
    /// Whether each chunk of the model rebuilt is also checked against the xxh3 hash its
    /// delta records for hot swap (format 1.3): `verify` checks it, so that a delta hot swap
    /// would refuse fails it too. `apply` has the BLAKE3 fingerprints.
    rebuilt_hashes: bool,
}

impl<'a> Ctx<'a> {
    /// Resolves every source tensor in the base or the level below, failing early on a
    /// missing or misshapen one.
    pub(crate) fn new(chain: &'a Chain) -> Result<Self> {
        let mut levels: Vec<Level<'a>> = Vec::with_capacity(chain.deltas.len());
        for delta in &chain.deltas {
            let mut tensors = Vec::new();
            for t in delta.index.tensors() {
                let src = match &t.source {
                    None => None,
                    Some(s) => Some(match levels.last() {
                        None => Src::Base(resolve_in_base(chain, delta, s)?),
                        Some(parent) => Src::Parent(resolve_in_parent(parent, delta, s)?),
                    }),
                };
                tensors.push((t, src));
            }
            let plans = tensors
                .iter()
                .map(|(t, _)| plan_of(delta, t))
                .collect::<Result<Vec<_>>>()?;
            let by_name = tensors
                .iter()
                .enumerate()
                .map(|(i, (t, _))| (t.name.as_str(), i))
                .collect();
            levels.push(Level {
                delta,
                tensors,
                by_name,
                chunk_bytes: delta.index.chunk_bytes as usize,
                plans,
            });
        }
        Ok(Ctx {
            chain,
            levels,
            rebuilt_hashes: false,
        })
    }

    fn top(&self) -> usize {
        self.levels.len() - 1
    }

    fn jobs_of(&self, i: usize) -> Vec<Job> {
        let top = self.top();
        let l = &self.levels[top];
        let src_len = self.src_meta(top, i).map_or(0, |(_, len)| len);
        schedule::jobs(i, l.tensors[i].0.len() as usize, src_len, l.chunk_bytes)
    }

    /// Dtype and byte length of a tensor's source.
    fn src_meta(&self, lvl: usize, i: usize) -> Option<(Dtype, usize)> {
        match self.levels[lvl].tensors[i].1? {
            Src::Base(s) => Some((s.dtype, s.len())),
            Src::Parent(j) => {
                let p = self.levels[lvl - 1].tensors[j].0;
                Some((dtype::parse(&p.dtype).expect("validated dtype"), p.len() as usize))
            }
        }
    }

    fn corrupt(&self, lvl: usize, t: &TensorEntry, reason: String) -> Error {
        Error::CorruptDelta {
            path: self.levels[lvl].delta.path.clone(),
            tensor: Some(t.name.clone()),
            reason,
        }
    }

    /// The job of the rebuilt model's chunk: its bytes, fingerprint and source fingerprints.
    fn decode(&self, job: &Job) -> Result<Decoded<'a>> {
        let top = self.top();
        let (bytes, source_hashes, source_span) =
            self.decode_range(top, job.tensor, job.chunk, job.range.clone(), job.source_chunks.clone())?;
        let t = self.levels[top].tensors[job.tensor].0;
        let recorded = t.chunks.get(job.chunk).and_then(Chunk::rebuilt_hash);
        if let Some(q) = recorded.filter(|_| self.rebuilt_hashes) {
            if q != xxhash_rust::xxh3::xxh3_64(&bytes) {
                // A wrong base can decode to wrong values without a decoding error: it is
                // named before the delta is blamed.
                self.check_source(top, job.tensor)?;
                let reason = format!("rebuilt chunk {} does not match its hash", job.chunk);
                return Err(self.corrupt(top, t, reason));
            }
        }
        Ok(Decoded {
            target_hash: hash::chunk(&bytes),
            bytes,
            source_hashes,
            source_span,
        })
    }

    /// Bytes `range` of tensor `i` of level `lvl`'s reconstruction.
    fn read(&self, lvl: usize, i: usize, range: Range<usize>) -> Result<Cow<'a, [u8]>> {
        let cb = self.levels[lvl].chunk_bytes;
        let len = self.levels[lvl].tensors[i].0.len() as usize;
        if range.is_empty() {
            return Ok(Cow::Borrowed(&[]));
        }
        let (first, end) = (range.start / cb, range.end.div_ceil(cb));
        let chunk = |k: usize| -> Result<Cow<'a, [u8]>> {
            let r = k * cb..((k + 1) * cb).min(len);
            let (bytes, _, read) = self.decode_range(lvl, i, k, r, 0..0)?;
            self.release(lvl, i, k, read);
            Ok(bytes)
        };
        if end - first == 1 {
            return Ok(narrow(chunk(first)?, first * cb, range));
        }
        let mut out = Vec::with_capacity(range.len());
        for k in first..end {
            let bytes = chunk(k)?;
            let at = k * cb;
            let (a, b) = (range.start.max(at) - at, range.end.min(at + bytes.len()) - at);
            out.extend_from_slice(&bytes[a..b]);
        }
        Ok(Cow::Owned(out))
    }

    /// The source bytes `need` of tensor `i` of level `lvl` (None for a tensor without one).
    fn source_window(&self, lvl: usize, i: usize, need: Range<usize>) -> Result<Option<Window<'a>>> {
        let Some(src) = self.levels[lvl].tensors[i].1 else {
            return Ok(None);
        };
        Ok(Some(match src {
            Src::Base(s) => Window {
                bytes: Cow::Borrowed(self.chain.base.bytes(s)),
                offset: 0,
                len: s.len(),
            },
            Src::Parent(j) => {
                let len = self.levels[lvl - 1].tensors[j].0.len() as usize;
                // Whole chunks of the parent, so that its decoded chunks need no copying.
                let pcb = self.levels[lvl - 1].chunk_bytes;
                let (a, b) = (need.start / pcb * pcb, (need.end.div_ceil(pcb) * pcb).min(len));
                let bytes = if need.is_empty() {
                    Cow::Borrowed(&[][..])
                } else {
                    self.read(lvl - 1, j, a..b)?
                };
                Window {
                    bytes,
                    offset: if need.is_empty() { need.start } else { a },
                    len,
                }
            }
        }))
    }

    /// Decodes bytes `range` (chunk `chunk`) of tensor `i` of level `lvl`, hashing the source
    /// chunks `hashed`; returns the bytes, those hashes and the source span read.
    fn decode_range(
        &self,
        lvl: usize,
        i: usize,
        chunk: usize,
        range: Range<usize>,
        hashed: Range<usize>,
    ) -> Result<DecodedRange<'a>> {
        let level = &self.levels[lvl];
        let t = level.tensors[i].0;
        let tdt = dtype::parse(&t.dtype).expect("validated dtype");
        let (sdt, slen) = self.src_meta(lvl, i).unwrap_or((tdt, 0));
        let cb = level.chunk_bytes;
        let read = pair::source_range(t.relation, sdt, tdt, range.clone(), slen);
        let hashed_bytes = (hashed.start * cb).min(slen)..(hashed.end * cb).min(slen);
        let need = span(read.clone(), hashed_bytes);
        let win = self.source_window(lvl, i, need.clone())?;
        let hashes = match &win {
            Some(w) => hashed
                .map(|c| hash::chunk(w.get(c * cb..((c + 1) * cb).min(slen))))
                .collect(),
            None => Vec::new(),
        };
        if range.is_empty() {
            return Ok((Cow::Borrowed(&[]), hashes, need));
        }
        let c = &t.chunks[chunk];
        // An unchanged chunk of a tensor predicted byte for byte passes through uncopied.
        let verbatim = t.relation != Relation::Converted && read.len() == range.len();
        if c.codec == ChunkCodec::Same && verbatim {
            let w = win.expect("a 'same' chunk has a source");
            return Ok((narrow(w.bytes, w.offset, read), hashes, need));
        }
        // A prediction decoded for this chunk alone (by the link below, in a chain) is decoded
        // over in place: no fresh buffer to fill, no copy.
        let exact = matches!(c.codec, ChunkCodec::Exact | ChunkCodec::Changes);
        let win = match win {
            Some(Window {
                bytes: Cow::Owned(mut bytes),
                offset,
                ..
            }) if exact && verbatim && offset == read.start && bytes.len() == read.len() => {
                let payload = level.delta.chunk_payload(&t.name, c)?;
                let decoded = decode_exact_in_place(c.codec, dtype::layout(tdt), payload, &mut bytes);
                decoded.or_else(|e| self.undecodable(lvl, i, chunk, e))?;
                return Ok((Cow::Owned(bytes), hashes, need));
            }
            other => other,
        };
        let mut buf = Vec::new();
        let pred: &[u8] = match &win {
            Some(w) => pair::predict_window(t.relation, sdt, tdt, &w.bytes, w.offset, w.len, range.clone(), &mut buf),
            None => pair::predict(t.relation, sdt, tdt, &[], range.clone(), &mut buf),
        };
        let mut bytes = vec![0u8; range.len()];
        let payload = match c.codec {
            ChunkCodec::Same => &[][..],
            _ => level.delta.chunk_payload(&t.name, c)?,
        };
        // Only float tensors of whole bytes per element are ever lossy (F4 packs two a byte).
        let first = (range.start / (tdt.bitsize() / 8).max(1)) as u64;
        let decoded = decode_chunk(c.codec, tdt, &level.plans[i], first, pred, payload, &mut bytes);
        decoded.or_else(|e| self.undecodable(lvl, i, chunk, e))?;
        Ok((Cow::Owned(bytes), hashes, need))
    }

    /// The error for chunk `chunk` of tensor `i` of level `lvl` failing to decode. A wrong
    /// base predicts wrong contexts and fails to decode just like a corrupt payload does: the
    /// source is checked before the delta is blamed.
    fn undecodable(&self, lvl: usize, i: usize, chunk: usize, e: DecodeError) -> Result<()> {
        self.check_source(lvl, i)?;
        let t = self.levels[lvl].tensors[i].0;
        Err(self.corrupt(lvl, t, format!("chunk {chunk} does not decode: {}", e.0)))
    }

    /// Drops the pages a chunk's decode touched: its payload, and base bytes it read.
    fn release(&self, lvl: usize, i: usize, chunk: usize, source_span: Range<usize>) {
        let (t, src) = self.levels[lvl].tensors[i];
        if let Some(c) = t.chunks.get(chunk) {
            self.levels[lvl].delta.release(c.offset, c.len);
        }
        if let Some(Src::Base(s)) = src {
            self.chain.base.release(s, source_span);
        }
    }

    /// Rebuilds tensor `i`'s whole source and fails with the error that explains why it is
    /// not the one the delta recorded (a wrong base, or a broken link below).
    fn check_source(&self, lvl: usize, i: usize) -> Result<()> {
        let Some(src) = self.levels[lvl].tensors[i].1 else {
            return Ok(());
        };
        let hashes: Vec<Digest> = match src {
            Src::Base(s) => self
                .chain
                .base
                .bytes(s)
                .chunks(self.levels[lvl].chunk_bytes)
                .map(hash::chunk)
                .collect(),
            Src::Parent(j) => {
                self.check_rebuilt(lvl - 1, j)?;
                return Ok(());
            }
        };
        self.check_source_hashes(lvl, i, &hashes)
    }

    /// Rebuilds tensor `i` of level `lvl` whole and checks its fingerprints.
    fn check_rebuilt(&self, lvl: usize, i: usize) -> Result<()> {
        let l = &self.levels[lvl];
        let src_len = self.src_meta(lvl, i).map_or(0, |(_, len)| len);
        let (mut th, mut sh) = (Vec::new(), Vec::new());
        for job in schedule::jobs(i, l.tensors[i].0.len() as usize, src_len, l.chunk_bytes) {
            let (bytes, hashes, _) = self.decode_range(lvl, i, job.chunk, job.range.clone(), job.source_chunks)?;
            if !job.range.is_empty() {
                th.push(hash::chunk(&bytes));
            }
            sh.extend(hashes);
        }
        self.check_tensor(lvl, i, &th, &sh)
    }

    fn check_source_hashes(&self, lvl: usize, i: usize, source_hashes: &[Digest]) -> Result<()> {
        let (t, s) = self.levels[lvl].tensors[i];
        let (Some(src), Some(rec)) = (s, &t.source) else {
            return Ok(());
        };
        let (_, len) = self.src_meta(lvl, i).expect("has a source");
        let cb = self.levels[lvl].chunk_bytes as u64;
        let got = hash::hex(&hash::tensor(len as u64, cb, source_hashes));
        if got == rec.hash {
            return Ok(());
        }
        match src {
            Src::Base(b) => Err(Error::WrongBase {
                path: self.chain.base.root.clone(),
                part: BasePart::Tensor(b.name.clone()),
                reason: "has different values (fingerprint mismatch)".into(),
                expected: ExpectedBase::of(&self.levels[0].delta.index.base).swapped(self.rebuilds(&b.name, &got)),
            }),
            // The parent's rebuilt tensor is checked whole, which names the broken link.
            Src::Parent(j) => {
                self.check_rebuilt(lvl - 1, j)?;
                Err(self.corrupt(lvl, t, "its source in the parent does not match its fingerprint".into()))
            }
        }
    }

    /// Whether a delta of the chain rebuilds tensor `name` with fingerprint `fingerprint`.
    fn rebuilds(&self, name: &str, fingerprint: &str) -> bool {
        self.levels.iter().any(|l| l.delta.index.rebuilds(name, fingerprint))
    }

    fn check_tensor(&self, lvl: usize, i: usize, target_hashes: &[Digest], source_hashes: &[Digest]) -> Result<()> {
        let t = self.levels[lvl].tensors[i].0;
        let cb = self.levels[lvl].chunk_bytes as u64;
        self.check_source_hashes(lvl, i, source_hashes)?;
        if hash::hex(&hash::tensor(t.len(), cb, target_hashes)) != t.hash {
            return Err(self.corrupt(lvl, t, "rebuilt tensor does not match its fingerprint".into()));
        }
        Ok(())
    }
}

/// The base tensor a first-link tensor is predicted from, checked against the record.
fn resolve_in_base<'a>(
    chain: &'a Chain,
    delta: &Delta,
    s: &crate::container::index::SourceTensor,
) -> Result<&'a TensorRef> {
    let base = &chain.base;
    let wrong = |reason: String, swapped: bool| Error::WrongBase {
        path: base.root.clone(),
        part: BasePart::Tensor(s.name.clone()),
        reason,
        expected: ExpectedBase::of(&delta.index.base).swapped(swapped),
    };
    let b = base.tensor(&s.name).ok_or_else(|| wrong("is missing".into(), false))?;
    let shape: Vec<u64> = b.shape.iter().map(|&d| d as u64).collect();
    if dtype::name(b.dtype) != s.dtype || shape != s.shape {
        let reason = format!(
            "is {} {:?}, the delta expects {} {:?}",
            dtype::name(b.dtype),
            shape,
            s.dtype,
            s.shape
        );
        // A base tensor of the fine-tune's dtype and shape (a resized or converted tensor) may
        // be the fine-tune's own: hashing this one tensor, on the way to an error, tells.
        let rebuilt_like = |d: &Delta| {
            d.index
                .tensors()
                .any(|t| t.name == s.name && t.dtype == dtype::name(b.dtype) && t.shape == shape)
        };
        let swapped = chain.deltas.iter().any(rebuilt_like) && {
            let cb = delta.index.chunk_bytes as usize;
            let chunks: Vec<Digest> = base.bytes(b).chunks(cb).map(hash::chunk).collect();
            let print = hash::hex(&hash::tensor(b.len() as u64, cb as u64, &chunks));
            base.release(b, 0..b.len());
            chain.deltas.iter().any(|d| d.index.rebuilds(&s.name, &print))
        };
        return Err(wrong(reason, swapped));
    }
    Ok(b)
}

/// The parent-level tensor a child tensor is predicted from: it must be the very tensor the
/// child was made against (same dtype, shape and fingerprint).
fn resolve_in_parent(parent: &Level<'_>, delta: &Delta, s: &crate::container::index::SourceTensor) -> Result<usize> {
    let wrong = |reason: String| Error::WrongParent {
        path: delta.path.clone(),
        reason: format!("tensor '{}' {reason}", s.name),
    };
    let &j = parent
        .by_name
        .get(s.name.as_str())
        .ok_or_else(|| wrong(format!("is missing from the parent {}", parent.delta.path.display())))?;
    let p = parent.tensors[j].0;
    if p.dtype != s.dtype || p.shape != s.shape || p.hash != s.hash {
        return Err(wrong(format!(
            "differs in the parent {} from the one the delta was made against",
            parent.delta.path.display()
        )));
    }
    Ok(j)
}

/// A tensor's lossy codec with its parameters, checked against their checksum.
pub(crate) fn plan_of(delta: &Delta, t: &TensorEntry) -> Result<TensorPlan> {
    match (&t.codec, &t.params) {
        (Some(c), Some(p)) => {
            let bytes = delta.range(p.offset, p.len);
            if crate::container::index::checksum(bytes) != p.checksum {
                return Err(Error::CorruptDelta {
                    path: delta.path.clone(),
                    tensor: Some(t.name.clone()),
                    reason: "codec parameters do not match their checksum".into(),
                });
            }
            Ok(TensorPlan {
                codec: Some(c.clone()),
                axis: crate::codec::plan::axis_scales(c, bytes),
            })
        }
        (codec, _) => Ok(TensorPlan {
            codec: codec.clone(),
            axis: None,
        }),
    }
}

/// Rebuilds the model of `ctx` into `sink`, checking every fingerprint on the way.
pub(crate) fn rebuild(ctx: &Ctx, sink: &mut dyn Sink, progress: &dyn Progress) -> Result<RebuildReport> {
    ctx.check_base_files()?;
    let top = ctx.top();
    let delta = ctx.levels[top].delta;
    let files = &delta.index.files;
    let headers = files
        .iter()
        .map(|f| ctx.header_bytes(top, f))
        .collect::<Result<Vec<_>>>()?;
    let file_of: Vec<usize> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| std::iter::repeat_n(i, f.tensors.len()))
        .collect();
    let jobs: Vec<Job> = (0..ctx.levels[top].tensors.len())
        .flat_map(|i| ctx.jobs_of(i))
        .collect();
    progress.begin("rebuild", delta.index.tensors().map(|t| t.len()).sum());
    let mut state = Assembler {
        sink,
        files,
        headers: &headers,
        file_of: &file_of,
        next_file: 0,
        th: Vec::new(),
        sh: Vec::new(),
    };
    // Workers decode chunks while this thread hands them to the sink in order.
    schedule::ordered(&jobs, |j| ctx.decode(j), |j, d| state.consume(ctx, j, d?, progress))?;
    state.finish_files()?;
    progress.finish();
    for a in &delta.index.aux {
        sink.begin_aux(a)?;
        ctx.stream_aux(top, a, &mut |b| sink.aux_data(b))?;
        sink.end_aux()?;
    }
    Ok(RebuildReport {
        weight_files: files.len(),
        aux_files: delta.index.aux.len(),
        tensors: ctx.levels[top].tensors.len(),
        bytes: delta.index.finetuned_bytes(),
        chain_length: ctx.levels.len(),
        compared_with_finetuned: false,
        measured: Vec::new(),
        measured_error: 0.0,
    })
}

/// Files: shard headers and auxiliary files, resolved through the chain.
impl Ctx<'_> {
    fn wrong_base(&self, part: BasePart, reason: String) -> Error {
        let index = &self.levels[0].delta.index;
        Error::WrongBase {
            path: self.chain.base.root.clone(),
            part,
            reason,
            expected: ExpectedBase::of(&index.base),
        }
    }

    /// The error for a file level `lvl` expects from below but does not find as recorded.
    fn wrong_below(&self, lvl: usize, part: BasePart, reason: &str) -> Error {
        match lvl {
            0 => self.wrong_base(part, reason.to_string()),
            _ => Error::WrongParent {
                path: self.levels[lvl].delta.path.clone(),
                reason: format!(
                    "{part} {reason} in the parent {}",
                    self.levels[lvl - 1].delta.path.display()
                ),
            },
        }
    }

    /// The error for base files the model rebuilt needs but the base lacks: bad input, not a
    /// wrong base, since the same tensors come in other layouts and without their files.
    fn missing_base(&self, files: Vec<MissingFile>) -> Error {
        let root = &self.chain.base.root;
        Error::MissingBaseFiles {
            path: root.clone(),
            files,
            single_file: !root.is_dir(),
        }
    }

    /// Fails, before anything is rebuilt, with every base file that the shard headers and
    /// auxiliary files of the model rebuilt need (followed through the chain) and the base
    /// lacks, so that one run names them all. Their contents are checked as they are read.
    fn check_base_files(&self) -> Result<()> {
        let top = self.top();
        let index = &self.levels[top].delta.index;
        let mut needed = BTreeSet::new();
        for f in &index.files {
            self.base_needs(top, &f.header, true, &mut needed);
        }
        for a in &index.aux {
            self.base_needs(top, &a.blob, false, &mut needed);
        }
        let base = &self.chain.base;
        let missing: Vec<MissingFile> = needed
            .into_iter()
            .filter(|(path, header)| match header {
                true => !base.shards.iter().any(|s| &s.rel == path),
                false => !(base.root.is_dir() && base.root.join(path).is_file()),
            })
            .map(|(path, header)| MissingFile { path, header })
            .collect();
        match missing.is_empty() {
            true => Ok(()),
            false => Err(self.missing_base(missing)),
        }
    }

    /// Adds to `out` the base files (path, whether only its shard header) that `blob` of level
    /// `lvl` reads: itself if identical, or its dictionary; through the levels below for a
    /// link of a chain. A file a link misses below is left to the error of reading it.
    fn base_needs(&self, lvl: usize, blob: &Blob, header: bool, out: &mut BTreeSet<(String, bool)>) {
        let path = match blob {
            Blob::SameAsBase { path } => path,
            Blob::Zstd { dict: Some(p), .. } => p,
            Blob::Zstd { dict: None, .. } | Blob::External => return,
        };
        if lvl == 0 {
            out.insert((path.clone(), header));
            return;
        }
        let below = &self.levels[lvl - 1].delta.index;
        let blob = match header {
            true => below.files.iter().find(|f| &f.path == path).map(|f| &f.header),
            false => below.aux.iter().find(|a| &a.path == path).map(|a| &a.blob),
        };
        if let Some(b) = blob {
            self.base_needs(lvl - 1, b, header, out);
        }
    }

    /// The header of shard `path` of the model below level `lvl`.
    fn parent_header(&self, lvl: usize, path: &str) -> Result<Vec<u8>> {
        if lvl == 0 {
            let shard = self.chain.base.shards.iter().find(|s| s.rel == path);
            return shard.map(|s| s.header_bytes().to_vec()).ok_or_else(|| {
                self.missing_base(vec![MissingFile {
                    path: path.to_string(),
                    header: true,
                }])
            });
        }
        let below = &self.levels[lvl - 1].delta.index;
        let f = below.files.iter().find(|f| f.path == path);
        let f = f.ok_or_else(|| self.wrong_below(lvl, BasePart::ShardHeader(path.into()), "is missing"))?;
        self.header_bytes(lvl - 1, f)
    }

    /// The whole file `path` of the model below level `lvl`.
    fn parent_file(&self, lvl: usize, path: &str) -> Result<Vec<u8>> {
        if lvl == 0 {
            let p = self.base_file(path)?;
            return std::fs::read(&p).map_err(|e| self.unreadable_base_file(path, &p, e));
        }
        let below = &self.levels[lvl - 1].delta.index;
        let a = below.aux.iter().find(|a| a.path == path);
        let a = a.ok_or_else(|| self.wrong_below(lvl, BasePart::File(path.into()), "is missing"))?;
        let mut out = Vec::with_capacity(a.size as usize);
        self.stream_aux(lvl - 1, a, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Where the base's file `p` is (checked up front by [`Ctx::check_base_files`]; a file
    /// gone since is still named as missing).
    fn base_file(&self, p: &str) -> Result<PathBuf> {
        let base = &self.chain.base;
        if !base.root.is_dir() {
            return Err(self.missing_base(vec![MissingFile {
                path: p.to_string(),
                header: false,
            }]));
        }
        Ok(base.root.join(p))
    }

    /// The error for a base file that cannot be opened: missing, or an I/O failure.
    fn unreadable_base_file(&self, rel: &str, path: &Path, e: std::io::Error) -> Error {
        match e.kind() {
            std::io::ErrorKind::NotFound => self.missing_base(vec![MissingFile {
                path: rel.to_string(),
                header: false,
            }]),
            _ => Error::io("reading", path, e),
        }
    }

    /// The header bytes of a weight file of level `lvl`, checked against the index.
    fn header_bytes(&self, lvl: usize, f: &WeightFile) -> Result<Vec<u8>> {
        let delta = self.levels[lvl].delta;
        let bytes = self.blob_bytes(lvl, &f.header, f.header_len, "a shard header", |p| {
            self.parent_header(lvl, p)
        })?;
        if hash::hex(&hash::bytes(&bytes)) != f.header_hash {
            return Err(match &f.header {
                Blob::SameAsBase { path } => self.wrong_below(
                    lvl,
                    BasePart::ShardHeader(path.clone()),
                    "differs from the one the delta expects",
                ),
                _ => Error::corrupt(
                    &delta.path,
                    format!("header of {} does not match its fingerprint", f.path),
                ),
            });
        }
        check_header(delta, f, &bytes)?;
        Ok(bytes)
    }

    /// Streams an auxiliary file of level `lvl` to `out` in pieces, then checks its size and
    /// fingerprint (an error then still discards everything written).
    fn stream_aux(&self, lvl: usize, a: &AuxEntry, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let delta = self.levels[lvl].delta;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut emit = |piece: &[u8]| -> Result<()> {
            hasher.update(piece);
            size += piece.len() as u64;
            out(piece)
        };
        match &a.blob {
            Blob::SameAsBase { path } if lvl == 0 => {
                let p = self.base_file(path)?;
                let f = std::fs::File::open(&p).map_err(|e| self.unreadable_base_file(path, &p, e))?;
                copy_pieces(f.take(a.size.saturating_add(1)), &mut emit, |e| {
                    Error::io("reading", &p, e)
                })?;
            }
            Blob::SameAsBase { path } => emit(&self.parent_file(lvl, path)?)?,
            Blob::Zstd { .. } => self.unzstd_blob(
                lvl,
                &a.blob,
                (a.size, &a.path),
                BasePart::File,
                |p| self.parent_file(lvl, p),
                &mut emit,
            )?,
            Blob::External => {
                let p = self.external_path(lvl, a)?;
                let f = std::fs::File::open(&p).map_err(|e| Error::io("reading", &p, e))?;
                copy_pieces(f.take(a.size.saturating_add(1)), &mut emit, |e| {
                    Error::io("reading", &p, e)
                })?;
            }
        }
        if size != a.size || hash::hex(hasher.finalize().as_bytes()) != a.hash {
            return Err(match &a.blob {
                Blob::SameAsBase { path } => self.wrong_below(
                    lvl,
                    BasePart::File(path.clone()),
                    "differs from the file the delta expects",
                ),
                Blob::Zstd { .. } => {
                    Error::corrupt(&delta.path, format!("file {} does not match its fingerprint", a.path))
                }
                Blob::External => Error::corrupt(
                    self.external_path(lvl, a)?,
                    format!("stored copy of {} does not match its fingerprint", a.path),
                ),
            });
        }
        Ok(())
    }

    /// Where the store keeps an external auxiliary file.
    fn external_path(&self, lvl: usize, a: &AuxEntry) -> Result<PathBuf> {
        match &self.chain.aux_store {
            Some(dir) => Ok(dir.join(&a.hash)),
            None => Err(Error::InvalidArgument(format!(
                "{}: file {} is kept in a deltapack store, not in the delta; rebuild it with `deltapack store get`",
                self.levels[lvl].delta.path.display(),
                a.path
            ))),
        }
    }

    /// The zstd dictionary a blob was compressed with (the `part` of the model below that
    /// `dict` names), checked against its recorded fingerprint.
    fn load_dict(
        &self,
        lvl: usize,
        (dict, dict_hash): (&Option<String>, &Option<String>),
        part: fn(String) -> BasePart,
        from_below: impl Fn(&str) -> Result<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        let (Some(p), Some(h)) = (dict, dict_hash) else {
            return Ok(None);
        };
        let d = from_below(p)?;
        if &hash::hex(&hash::bytes(&d)) != h {
            return Err(self.wrong_below(lvl, part(p.clone()), "differs from the one the delta was made with"));
        }
        Ok(Some(d))
    }

    fn blob_bytes(
        &self,
        lvl: usize,
        blob: &Blob,
        size: u64,
        what: &str,
        from_below: impl Fn(&str) -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        let delta = self.levels[lvl].delta;
        match blob {
            Blob::SameAsBase { path } => from_below(path),
            Blob::Zstd { .. } => {
                let mut out = Vec::new();
                self.unzstd_blob(lvl, blob, (size, what), BasePart::ShardHeader, from_below, &mut |b| {
                    out.extend_from_slice(b);
                    Ok(())
                })?;
                Ok(out)
            }
            Blob::External => Err(Error::corrupt(&delta.path, format!("{what} kept outside the delta"))),
        }
    }

    /// Decompresses a `zstd` blob of level `lvl` (`size` bytes of `what`) to `emit`, with its
    /// dictionary (a `part` of the model below, from `from_below`) checked first.
    fn unzstd_blob(
        &self,
        lvl: usize,
        blob: &Blob,
        (size, what): (u64, &str),
        part: fn(String) -> BasePart,
        from_below: impl Fn(&str) -> Result<Vec<u8>>,
        emit: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let Blob::Zstd {
            offset,
            len,
            dict,
            dict_hash,
        } = blob
        else {
            unreachable!("called for zstd blobs only");
        };
        let delta = self.levels[lvl].delta;
        let dict = self.load_dict(lvl, (dict, dict_hash), part, from_below)?;
        unzstd(delta, delta.range(*offset, *len), dict.as_deref(), size, what, emit)
    }
}

/// A stored header must list exactly the tensors the index lists.
fn check_header(delta: &Delta, f: &WeightFile, bytes: &[u8]) -> Result<()> {
    let h = crate::checkpoint::header::parse(bytes, Some(f.size))
        .map_err(|r| Error::corrupt(&delta.path, format!("stored header of {}: {r}", f.path)))?;
    let listed: Vec<(&str, String, Vec<u64>, [u64; 2])> = f
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype.clone(), t.shape.clone(), t.data_offsets))
        .collect();
    let stored: Vec<(&str, String, Vec<u64>, [u64; 2])> = h
        .tensors
        .iter()
        .map(|t| {
            let shape = t.shape.iter().map(|&d| d as u64).collect();
            (
                t.name.as_str(),
                dtype::name(t.dtype),
                shape,
                [t.data_offsets.0 as u64, t.data_offsets.1 as u64],
            )
        })
        .collect();
    if listed != stored {
        return Err(Error::corrupt(
            &delta.path,
            format!("stored header of {} disagrees with the index", f.path),
        ));
    }
    Ok(())
}

/// Decompresses a stored blob to `emit` in pieces, reading at most one byte more than the
/// `size` promised, so that a hostile stream cannot run on forever.
fn unzstd(
    delta: &Delta,
    data: &[u8],
    dict: Option<&[u8]>,
    size: u64,
    what: &str,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let corrupt = |e: std::io::Error| Error::corrupt(&delta.path, format!("stored {what} does not decompress: {e}"));
    let dec = match dict {
        Some(d) => zstd::stream::Decoder::with_dictionary(data, d),
        None => zstd::stream::Decoder::with_buffer(data),
    }
    .map_err(corrupt)?;
    copy_pieces(dec.take(size.saturating_add(1)), emit, corrupt)
}

/// Feeds `src` to `emit` in pieces of 1 MiB.
fn copy_pieces(
    mut src: impl Read,
    emit: &mut dyn FnMut(&[u8]) -> Result<()>,
    err: impl Fn(std::io::Error) -> Error,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).map_err(&err)?;
        if n == 0 {
            return Ok(());
        }
        emit(&buf[..n])?;
    }
}

/// Writes rebuilt files into a staging directory.
struct DirSink {
    dir: OutputDir,
    current: Option<(BufWriter<std::fs::File>, String, u64)>,
    sync: bool,
}

impl DirSink {
    fn close_current(&mut self) -> Result<()> {
        let Some((w, rel, expected)) = self.current.take() else {
            return Ok(());
        };
        let path = self.dir.target().join(&rel);
        let f = w
            .into_inner()
            .map_err(|e| Error::io("writing", &path, e.into_error()))?;
        let len = f.metadata().map_err(|e| Error::io("writing", &path, e))?.len();
        if len != expected {
            return Err(Error::io(
                "writing",
                &path,
                std::io::Error::other(format!("wrote {len} bytes, expected {expected}")),
            ));
        }
        if self.sync {
            f.sync_all().map_err(|e| Error::io("syncing", &path, e))?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let (w, rel, _) = self.current.as_mut().expect("a file is open");
        w.write_all(bytes)
            .map_err(|e| Error::io("writing", self.dir.target().join(rel.as_str()), e))
    }
}

impl Sink for DirSink {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()> {
        self.close_current()?;
        let file = self.dir.create_file(&f.path)?;
        self.current = Some((BufWriter::with_capacity(1 << 20, file), f.path.clone(), f.size));
        self.write(header)
    }

    fn data(&mut self, _i: usize, _t: &TensorEntry, _offset: usize, bytes: &[u8]) -> Result<()> {
        self.write(bytes)
    }

    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()> {
        self.close_current()?;
        let file = self.dir.create_file(&a.path)?;
        self.current = Some((BufWriter::with_capacity(1 << 20, file), a.path.clone(), a.size));
        Ok(())
    }

    fn aux_data(&mut self, bytes: &[u8]) -> Result<()> {
        self.write(bytes)
    }

    fn end_aux(&mut self) -> Result<()> {
        self.close_current()
    }
}

/// Compares rebuilt bytes with a fine-tune's files, or only lets the fingerprints be checked.
struct CompareSink<'a> {
    ft: Option<&'a Checkpoint>,
    /// The chain, to measure lossy tensors' changes against their prediction.
    ctx: &'a Ctx<'a>,
    /// Error sums of each lossy tensor, in order.
    sums: Vec<(TensorEntry, QualitySums)>,
    seen_files: BTreeSet<String>,
    current: Option<usize>,
    /// The fine-tune's auxiliary file being compared, and its path.
    aux: Option<(std::io::BufReader<std::fs::File>, String)>,
}

impl CompareSink<'_> {
    fn mismatch(ft: &Checkpoint, path: &str, tensor: Option<&str>, reason: &str) -> Error {
        Error::Mismatch {
            path: ft.root.join(path),
            tensor: tensor.map(str::to_string),
            reason: reason.to_string(),
        }
    }

    /// Every file of the fine-tune must have been rebuilt.
    fn finish(&self, delta: &Delta) -> Result<()> {
        let Some(ft) = self.ft else { return Ok(()) };
        let skipped: BTreeSet<&str> = delta.index.skipped.iter().map(|s| s.path.as_str()).collect();
        let theirs = ft
            .shards
            .iter()
            .map(|s| s.rel.as_str())
            .chain(ft.aux.iter().map(|a| a.rel.as_str()));
        for p in theirs {
            if !self.seen_files.contains(p) && !skipped.contains(p) {
                return Err(Self::mismatch(ft, p, None, "is in the fine-tune but not in the delta"));
            }
        }
        Ok(())
    }
}

impl CompareSink<'_> {
    /// Adds a lossy chunk's error against the fine-tune to its tensor's sums.
    fn measure(
        &mut self,
        ft: &Checkpoint,
        theirs: &TensorRef,
        (i, t): (usize, &TensorEntry),
        range: std::ops::Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        let shard = &ft.shards[theirs.shard].rel;
        let dt = dtype::parse(&t.dtype).expect("validated dtype");
        let Some(target) = ft.bytes(theirs).get(range.clone()) else {
            return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has another size"));
        };
        if theirs.dtype != dt {
            return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has another dtype"));
        }
        // Lossy tensors are direct: their prediction is the same bytes of their source.
        let pred = match self.ctx.source_window(self.ctx.top(), i, range.clone())? {
            Some(w) => w.get(range.clone()).to_vec(),
            None => return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has no source")),
        };
        let q = QualitySums::chunk(dt, &pred, target, bytes);
        if self.sums.last().is_none_or(|(x, _)| x.name != t.name) {
            self.sums.push((t.clone(), QualitySums::default()));
        }
        self.sums.last_mut().expect("just pushed").1.add(&q);
        ft.release(theirs, range);
        Ok(())
    }
}

impl Sink for CompareSink<'_> {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()> {
        self.seen_files.insert(f.path.clone());
        let Some(ft) = self.ft else { return Ok(()) };
        let i = ft.shards.iter().position(|s| s.rel == f.path);
        let i = i.ok_or_else(|| Self::mismatch(ft, &f.path, None, "is in the delta but not in the fine-tune"))?;
        if ft.shards[i].header_bytes() != header {
            return Err(Self::mismatch(ft, &f.path, None, "header differs"));
        }
        self.current = Some(i);
        Ok(())
    }

    fn data(&mut self, i: usize, t: &TensorEntry, offset: usize, bytes: &[u8]) -> Result<()> {
        let Some(ft) = self.ft else { return Ok(()) };
        let shard = self.current.expect("file begun");
        let theirs = ft.tensor(&t.name).filter(|x| x.shard == shard);
        let theirs =
            theirs.ok_or_else(|| Self::mismatch(ft, &ft.shards[shard].rel, Some(&t.name), "tensor missing"))?;
        let ours = offset..offset + bytes.len();
        if t.codec.is_some() {
            return self.measure(ft, theirs, (i, t), ours, bytes);
        }
        if ft.bytes(theirs).get(ours.clone()) != Some(bytes) {
            return Err(Self::mismatch(
                ft,
                &ft.shards[shard].rel,
                Some(&t.name),
                "rebuilt bytes differ",
            ));
        }
        ft.release(theirs, ours);
        Ok(())
    }

    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()> {
        self.seen_files.insert(a.path.clone());
        let Some(ft) = self.ft else { return Ok(()) };
        let theirs = ft.aux.iter().find(|x| x.rel == a.path);
        let theirs =
            theirs.ok_or_else(|| Self::mismatch(ft, &a.path, None, "is in the delta but not in the fine-tune"))?;
        let f = std::fs::File::open(&theirs.path).map_err(|e| Error::io("reading", &theirs.path, e))?;
        self.aux = Some((std::io::BufReader::new(f), a.path.clone()));
        Ok(())
    }

    fn aux_data(&mut self, bytes: &[u8]) -> Result<()> {
        let (Some(ft), Some((theirs, path))) = (self.ft, self.aux.as_mut()) else {
            return Ok(());
        };
        let mut buf = vec![0u8; bytes.len()];
        let same = theirs.read_exact(&mut buf).is_ok() && buf == bytes;
        if !same {
            return Err(Self::mismatch(ft, path, None, "rebuilt file differs"));
        }
        Ok(())
    }

    fn end_aux(&mut self) -> Result<()> {
        let (Some(ft), Some((mut theirs, path))) = (self.ft, self.aux.take()) else {
            return Ok(());
        };
        let mut rest = [0u8; 1];
        if theirs
            .read(&mut rest)
            .map_err(|e| Error::io("reading", ft.root.join(&path), e))?
            != 0
        {
            return Err(Self::mismatch(ft, &path, None, "the fine-tune's file is longer"));
        }
        Ok(())
    }
}
