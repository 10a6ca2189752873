//! The rebuild engine: a chain resolved level by level down to the base, windows of chunk
//! decodes in parallel, and every base tensor and rebuilt tensor checked against the
//! fingerprints the deltas record.

mod files;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::chain::Chain;
use crate::checkpoint::TensorRef;
use crate::codec::exact::DecodeError;
use crate::codec::plan::TensorPlan;
use crate::codec::{decode_chunk, decode_exact_in_place};
use crate::container::index::{Chunk, ChunkCodec, TensorEntry, WeightFile};
use crate::container::{Delta, DeltaBytes};
use crate::hash::{self, Digest};
use crate::pair::{self, Relation};
use crate::progress::Progress;
use crate::schedule::{self, Job};
use crate::{dtype, BasePart, Error, Result};

use super::{RebuildReport, Sink};

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
pub(super) struct Level<'a> {
    pub(super) delta: &'a Delta,
    tensors: Vec<(&'a TensorEntry, Option<Src<'a>>)>,
    by_name: HashMap<&'a str, usize>,
    chunk_bytes: usize,
    /// Each tensor's lossy codec and `sign-axis` scales (few and small: two vectors each).
    plans: Vec<TensorPlan>,
}

/// Bytes of a source tensor: all of them (the base's map) or a decoded stretch.
pub(super) struct Window<'a> {
    bytes: Cow<'a, [u8]>,
    /// Where `bytes` starts in the source tensor.
    offset: usize,
    /// Length of the whole source tensor.
    len: usize,
}

impl Window<'_> {
    pub(super) fn get(&self, r: Range<usize>) -> &[u8] {
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

/// `bytes`, copied into `dest` when there is one (and then returned empty).
fn into<'a>(dest: Option<&mut [u8]>, bytes: Cow<'a, [u8]>) -> Cow<'a, [u8]> {
    match dest {
        Some(d) => {
            d.copy_from_slice(&bytes);
            Cow::Borrowed(&[])
        }
        None => bytes,
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
    pub(super) levels: Vec<Level<'a>>,
    /// Whether each chunk of the model rebuilt is also checked against the xxh3 hash its
    /// delta records for hot swap (format 1.3): `verify` checks it, so that a delta hot swap
    /// would refuse fails it too. `apply` has the BLAKE3 fingerprints.
    pub(super) rebuilt_hashes: bool,
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

    pub(super) fn top(&self) -> usize {
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
    ///
    /// With `dest` (zero-filled, the job's length) the bytes are decoded into it and the
    /// returned `bytes` are empty: a sink keeping tensors in memory gets them with no copy.
    fn decode(&self, job: &Job, mut dest: Option<&mut [u8]>) -> Result<Decoded<'a>> {
        let top = self.top();
        let (bytes, source_hashes, source_span) = self.decode_range(
            top,
            job.tensor,
            job.chunk,
            job.range.clone(),
            job.source_chunks.clone(),
            dest.as_deref_mut(),
        )?;
        let out: &[u8] = dest.as_deref().unwrap_or(&bytes);
        let t = self.levels[top].tensors[job.tensor].0;
        let recorded = t.chunks.get(job.chunk).and_then(Chunk::rebuilt_hash);
        if let Some(q) = recorded.filter(|_| self.rebuilt_hashes) {
            if q != xxhash_rust::xxh3::xxh3_64(out) {
                // A wrong base can decode to wrong values without a decoding error: it is
                // named before the delta is blamed.
                self.check_source(top, job.tensor)?;
                let reason = format!("rebuilt chunk {} does not match its hash", job.chunk);
                return Err(self.corrupt(top, t, reason));
            }
        }
        Ok(Decoded {
            target_hash: hash::chunk(out),
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
            let (bytes, _, read) = self.decode_range(lvl, i, k, r, 0..0, None)?;
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
    pub(super) fn source_window(&self, lvl: usize, i: usize, need: Range<usize>) -> Result<Option<Window<'a>>> {
        let Some(src) = self.levels[lvl].tensors[i].1 else {
            return Ok(None);
        };
        Ok(Some(match src {
            Src::Base(s) => Window {
                bytes: Cow::Borrowed(self.chain.base.tensor_bytes(s)?),
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
    /// chunks `hashed`; returns the bytes, those hashes and the source span read. With `dest`
    /// (zero-filled, `range`'s length) the bytes go there and those returned are empty.
    fn decode_range(
        &self,
        lvl: usize,
        i: usize,
        chunk: usize,
        range: Range<usize>,
        hashed: Range<usize>,
        dest: Option<&mut [u8]>,
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
            let bytes = narrow(w.bytes, w.offset, read);
            return Ok((into(dest, bytes), hashes, need));
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
                let layout = dtype::layout(tdt);
                let decoded = match dest {
                    Some(d) => {
                        d.copy_from_slice(&bytes);
                        bytes = Vec::new();
                        decode_exact_in_place(c.codec, layout, &payload, d)
                    }
                    None => decode_exact_in_place(c.codec, layout, &payload, &mut bytes),
                };
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
        let mut fresh = Vec::new();
        let out = match dest {
            Some(d) => d,
            None => {
                fresh.resize(range.len(), 0u8);
                &mut fresh[..]
            }
        };
        let payload = match c.codec {
            ChunkCodec::Same => DeltaBytes::Mapped(&[]),
            _ => level.delta.chunk_payload(&t.name, c)?,
        };
        // Only float tensors of whole bytes per element are ever lossy (F4 packs two a byte).
        let first = (range.start / (tdt.bitsize() / 8).max(1)) as u64;
        let decoded = decode_chunk(c.codec, tdt, &level.plans[i], first, pred, &payload, out);
        decoded.or_else(|e| self.undecodable(lvl, i, chunk, e))?;
        Ok((Cow::Owned(fresh), hashes, need))
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
                .tensor_bytes(s)?
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
            let (bytes, hashes, _) =
                self.decode_range(lvl, i, job.chunk, job.range.clone(), job.source_chunks, None)?;
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
                expected: self.levels[0]
                    .delta
                    .index
                    .base
                    .expected()
                    .swapped(self.rebuilds(&b.name, &got)),
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
        expected: delta.index.base.expected().swapped(swapped),
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
            let chunks: Vec<Digest> = base.tensor_bytes(b)?.chunks(cb).map(hash::chunk).collect();
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
            let bytes = delta.range(p.offset, p.len)?;
            if crate::container::index::checksum(&bytes) != p.checksum {
                return Err(Error::CorruptDelta {
                    path: delta.path.clone(),
                    tensor: Some(t.name.clone()),
                    reason: "codec parameters do not match their checksum".into(),
                });
            }
            Ok(TensorPlan {
                codec: Some(c.clone()),
                axis: crate::codec::plan::axis_scales(c, &bytes),
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
    let _ahead = ReadAhead::on(ctx);
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
    // A sink keeping tensors in memory gets buffers that workers decode straight into: no
    // copy, and their pages are first touched by the workers, in parallel.
    let mut buffers: Vec<Vec<u8>> = match sink.keeps_tensors() {
        true => delta.index.tensors().map(|t| vec![0u8; t.len() as usize]).collect(),
        false => Vec::new(),
    };
    let direct = !buffers.is_empty();
    let slots = Slots::new(&jobs, &mut buffers);
    let mut state = Assembler {
        sink: &mut *sink,
        files,
        headers: &headers,
        file_of: &file_of,
        next_file: 0,
        direct,
        th: Vec::new(),
        sh: Vec::new(),
    };
    // Workers decode chunks while this thread checks them, and hands them to the sink, in
    // order.
    let work = |j: &Job| ctx.decode(j, slots.take(j));
    schedule::ordered(&jobs, work, |j, d| state.consume(ctx, j, d?, progress))?;
    state.finish_files()?;
    drop(slots);
    if direct {
        sink.tensors(buffers)?;
    }
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

/// Remote deltas read ahead while a whole model is rebuilt (chunks are decoded in file order),
/// and stop when it is done, whatever way it ends.
struct ReadAhead<'c>(Vec<&'c Delta>);

impl<'c> ReadAhead<'c> {
    fn on(ctx: &Ctx<'c>) -> Self {
        let deltas: Vec<&Delta> = ctx.levels.iter().map(|l| l.delta).collect();
        deltas.iter().for_each(|d| d.read_ahead(true));
        ReadAhead(deltas)
    }
}

impl Drop for ReadAhead<'_> {
    fn drop(&mut self) {
        self.0.iter().for_each(|d| d.read_ahead(false));
    }
}

/// Each job's part of the tensor buffers it decodes into, taken once by the worker that runs
/// it (empty when the sink takes bytes in order instead).
struct Slots<'b> {
    parts: Vec<std::sync::Mutex<Option<&'b mut [u8]>>>,
    /// Position in `parts` of every tensor's first job.
    first: Vec<usize>,
}

impl<'b> Slots<'b> {
    /// Cuts `buffers` (one per tensor, of its length; or none) at `jobs`' ranges.
    fn new(jobs: &[Job], buffers: &'b mut [Vec<u8>]) -> Self {
        let mut rest: Vec<&'b mut [u8]> = buffers.iter_mut().map(|b| &mut b[..]).collect();
        let (mut parts, mut first) = (Vec::new(), Vec::new());
        if rest.is_empty() {
            return Slots { parts, first };
        }
        for (k, j) in jobs.iter().enumerate() {
            if j.chunk == 0 {
                first.push(k);
            }
            let (head, tail) = std::mem::take(&mut rest[j.tensor]).split_at_mut(j.range.len());
            rest[j.tensor] = tail;
            parts.push(std::sync::Mutex::new(Some(head)));
        }
        Slots { parts, first }
    }

    /// The buffer part of `job`, if the sink keeps tensors.
    fn take(&self, job: &Job) -> Option<&'b mut [u8]> {
        let k = *self.first.get(job.tensor)? + job.chunk;
        self.parts[k].lock().unwrap_or_else(|e| e.into_inner()).take()
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
    /// Whether chunks were decoded straight into the sink's buffers (no `data` calls).
    direct: bool,
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
        if !self.direct {
            let t = ctx.levels[top].tensors[job.tensor].0;
            self.sink.data(job.tensor, t, job.range.start, &d.bytes)?;
        }
        if !job.range.is_empty() {
            self.th.push(d.target_hash);
        }
        self.sh.extend(d.source_hashes);
        ctx.release(top, job.tensor, job.chunk, d.source_span);
        progress.advance(job.range.len() as u64);
        if progress.cancelled() {
            return Err(Error::Interrupted);
        }
        if job.last {
            ctx.check_tensor(top, job.tensor, &self.th, &self.sh)?;
            self.th.clear();
            self.sh.clear();
        }
        Ok(())
    }
}

/// Random access to the tensors and files of the model a chain rebuilds.
///
/// [`ChainReader::tensor`] rebuilds one whole tensor and checks it as `apply` does (its base
/// tensor's fingerprint and its own); [`ChainReader::read`] decodes only the chunks a byte
/// range covers, checking payload checksums but not fingerprints (a whole-tensor property).
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

    /// The tensor called `name`, if the model has one.
    pub fn entry(&self, name: &str) -> Option<&'a TensorEntry> {
        let top = &self.ctx.levels[self.ctx.top()];
        top.by_name.get(name).map(|&i| top.tensors[i].0)
    }

    fn position(&self, name: &str) -> Result<usize> {
        let top = &self.ctx.levels[self.ctx.top()];
        top.by_name.get(name).copied().ok_or_else(|| {
            Error::InvalidArgument(format!("the delta {} has no tensor '{name}'", top.delta.path.display()))
        })
    }

    /// Bytes `range` of tensor `name` of the rebuilt model.
    pub fn read(&self, name: &str, range: Range<usize>) -> Result<Cow<'a, [u8]>> {
        let i = self.position(name)?;
        let top = self.ctx.top();
        let len = self.ctx.levels[top].tensors[i].0.len() as usize;
        if range.start > range.end || range.end > len {
            return Err(Error::InvalidArgument(format!(
                "range {range:?} outside tensor '{name}' of {len} bytes"
            )));
        }
        self.ctx.read(top, i, range)
    }

    /// Rebuilds tensor `name` whole, its chunks decoded in parallel, and checks its
    /// fingerprint and its base tensor's.
    pub fn tensor(&self, name: &str) -> Result<Vec<u8>> {
        let idx = self.position(name)?;
        let ctx = &self.ctx;
        let top = ctx.top();
        let jobs = ctx.jobs_of(idx);
        let parts = jobs
            .par_iter()
            .map(|j| ctx.decode(j, None))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(ctx.levels[top].tensors[idx].0.len() as usize);
        let (mut th, mut sh) = (Vec::new(), Vec::new());
        for (j, d) in jobs.iter().zip(parts) {
            out.extend_from_slice(&d.bytes);
            if !j.range.is_empty() {
                th.push(d.target_hash);
            }
            sh.extend(d.source_hashes);
            ctx.release(top, j.tensor, j.chunk, d.source_span);
        }
        ctx.check_tensor(top, idx, &th, &sh)?;
        Ok(out)
    }

    /// The `__metadata__` of the model's weight files, merged in file order.
    pub fn metadata(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let top = self.ctx.top();
        let mut merged = serde_json::Map::new();
        for f in &self.ctx.levels[top].delta.index.files {
            merged.extend(super::header_metadata(&self.ctx.header_bytes(top, f)?));
        }
        Ok(merged)
    }

    /// The paths of the model's other files (config, tokenizer, ...).
    pub fn files(&self) -> impl Iterator<Item = &'a str> + '_ {
        let top = self.ctx.levels[self.ctx.top()].delta;
        top.index.aux.iter().map(|a| a.path.as_str())
    }

    /// The contents of the model's file `path`, checked against its recorded hash.
    pub fn file(&self, path: &str) -> Result<Vec<u8>> {
        let top = self.ctx.top();
        let delta = self.ctx.levels[top].delta;
        let Some(a) = delta.index.aux.iter().find(|a| a.path == path) else {
            return Err(Error::InvalidArgument(format!(
                "the delta {} carries no file '{path}'",
                delta.path.display()
            )));
        };
        let mut out = Vec::with_capacity(a.size as usize);
        self.ctx.stream_aux(top, a, &mut |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }
}

/// Rebuilds one tensor's bytes (random access into a delta or chain), checked as
/// [`ChainReader::tensor`] checks it.
pub fn rebuild_tensor(chain: &Chain, name: &str) -> Result<Vec<u8>> {
    ChainReader::new(chain)?.tensor(name)
}
