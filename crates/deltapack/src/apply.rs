//! Rebuilding a fine-tune from its base and a delta: to a directory (`apply`), or only to
//! check it (`verify`), in bounded windows of parallel chunk decodes.

use std::collections::BTreeSet;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::checkpoint::{Checkpoint, OutputDir, TensorRef};
use crate::codec::{exact, lossy};
use crate::container::index::{AuxEntry, Blob, ChunkCodec, TensorEntry, WeightFile};
use crate::container::Delta;
use crate::hash::{self, Digest};
use crate::pair;
use crate::progress::Progress;
use crate::schedule::{self, Job};
use crate::tune::{QualitySums, TensorPlan};
use crate::{dtype, Error, Result};

/// Options of [`apply`].
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Replace an existing output directory.
    pub force: bool,
    /// fsync every file before the directory is renamed into place.
    pub sync: bool,
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
    let delta = Delta::open(delta)?;
    let base = Checkpoint::open(base)?;
    let dir = OutputDir::create(out, opts.force)?;
    let mut sink = DirSink {
        dir,
        current: None,
        sync: opts.sync,
    };
    let report = rebuild(&delta, &base, &mut sink, progress)?;
    sink.close_current()?;
    sink.dir.commit()?;
    Ok(report)
}

/// Rebuilds the fine-tune in memory, chunk by chunk, checking every fingerprint; with
/// `finetuned`, also compares every rebuilt byte with that checkpoint's files.
pub fn verify(base: &Path, delta: &Path, finetuned: Option<&Path>, progress: &dyn Progress) -> Result<RebuildReport> {
    let delta = Delta::open(delta)?;
    let base = Checkpoint::open(base)?;
    let ft = finetuned.map(Checkpoint::open).transpose()?;
    let mut sink = CompareSink {
        ft: ft.as_ref(),
        base: &base,
        seen_files: BTreeSet::new(),
        current: None,
        aux: None,
        sums: Vec::new(),
    };
    let mut report = rebuild(&delta, &base, &mut sink, progress)?;
    sink.finish(&delta)?;
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

/// Rebuilds one tensor's bytes (random access into a delta).
pub fn rebuild_tensor(delta: &Delta, base: &Checkpoint, name: &str) -> Result<Vec<u8>> {
    let idx =
        delta.index.tensors().position(|t| t.name == name).ok_or_else(|| {
            Error::InvalidArgument(format!("the delta {} has no tensor '{name}'", delta.path.display()))
        })?;
    let ctx = Ctx::new(delta, base)?;
    let jobs = ctx.jobs_of(idx);
    let parts = jobs.par_iter().map(|j| ctx.decode(j)).collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(ctx.tensors[idx].0.len() as usize);
    let (mut th, mut sh) = (Vec::new(), Vec::new());
    for (j, d) in jobs.iter().zip(parts) {
        out.extend_from_slice(&d.bytes);
        if !j.range.is_empty() {
            th.push(d.target_hash);
        }
        sh.extend(d.source_hashes);
    }
    ctx.check_tensor(idx, &th, &sh)?;
    Ok(out)
}

/// A tensor's lossy codec and `sign-axis` scales, its parameter blob checked against its checksum.
pub(crate) fn tensor_plan(delta: &Delta, t: &TensorEntry) -> Result<TensorPlan> {
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
                axis: crate::tune::axis_scales(c, bytes),
            })
        }
        (codec, _) => Ok(TensorPlan {
            codec: codec.clone(),
            axis: None,
        }),
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
        self.begin_files_through(self.file_of[job.tensor])?;
        self.sink.data(ctx.tensors[job.tensor].0, job.range.start, &d.bytes)?;
        if !job.range.is_empty() {
            self.th.push(d.target_hash);
        }
        self.sh.extend(d.source_hashes);
        ctx.release(job);
        progress.advance(job.range.len() as u64);
        if job.last {
            ctx.check_tensor(job.tensor, &self.th, &self.sh)?;
            self.th.clear();
            self.sh.clear();
        }
        Ok(())
    }
}

/// Where rebuilt bytes go.
trait Sink: Send {
    fn begin_file(&mut self, f: &WeightFile, header: &[u8]) -> Result<()>;
    fn data(&mut self, t: &TensorEntry, offset: usize, bytes: &[u8]) -> Result<()>;
    fn begin_aux(&mut self, a: &AuxEntry) -> Result<()>;
    fn aux_data(&mut self, bytes: &[u8]) -> Result<()>;
    fn end_aux(&mut self) -> Result<()>;
}

struct Decoded {
    bytes: Vec<u8>,
    target_hash: Digest,
    source_hashes: Vec<Digest>,
}

struct Ctx<'a> {
    delta: &'a Delta,
    base: &'a Checkpoint,
    /// Every tensor of the delta, file by file, with its base source.
    tensors: Vec<(&'a TensorEntry, Option<&'a TensorRef>)>,
    chunk_bytes: usize,
    /// Each tensor's lossy codec and `sign-axis` scales (few and small: two vectors each).
    plans: Vec<TensorPlan>,
}

impl<'a> Ctx<'a> {
    /// Resolves every source tensor in the base, failing early on a missing or misshapen one.
    fn new(delta: &'a Delta, base: &'a Checkpoint) -> Result<Self> {
        let mut tensors = Vec::new();
        for t in delta.index.tensors() {
            let src = match &t.source {
                None => None,
                Some(s) => {
                    let wrong = |reason: String| Error::WrongBase {
                        path: base.root.clone(),
                        tensor: s.name.clone(),
                        reason,
                        base_id: delta.index.base.id.clone(),
                    };
                    let b = base.tensor(&s.name).ok_or_else(|| wrong("is missing".into()))?;
                    let shape: Vec<u64> = b.shape.iter().map(|&d| d as u64).collect();
                    if dtype::name(b.dtype) != s.dtype || shape != s.shape {
                        return Err(wrong(format!(
                            "is {} {:?}, the delta expects {} {:?}",
                            dtype::name(b.dtype),
                            shape,
                            s.dtype,
                            s.shape
                        )));
                    }
                    Some(b)
                }
            };
            tensors.push((t, src));
        }
        let plans = tensors
            .iter()
            .map(|(t, _)| tensor_plan(delta, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Ctx {
            delta,
            base,
            tensors,
            chunk_bytes: delta.index.chunk_bytes as usize,
            plans,
        })
    }

    fn jobs_of(&self, i: usize) -> Vec<Job> {
        let (t, s) = self.tensors[i];
        schedule::jobs(i, t.len() as usize, s.map_or(0, |s| s.len()), self.chunk_bytes)
    }

    fn corrupt(&self, t: &TensorEntry, reason: String) -> Error {
        Error::CorruptDelta {
            path: self.delta.path.clone(),
            tensor: Some(t.name.clone()),
            reason,
        }
    }

    fn decode(&self, job: &Job) -> Result<Decoded> {
        let (t, s) = self.tensors[job.tensor];
        let tdt = dtype::parse(&t.dtype).expect("validated dtype");
        let (sdt, src): (_, &[u8]) = match s {
            Some(s) => (s.dtype, self.base.bytes(s)),
            None => (tdt, &[]),
        };
        let source_hashes = job.hash_source(src, self.chunk_bytes);
        let mut bytes = vec![0u8; job.range.len()];
        if !job.range.is_empty() {
            let chunk = &t.chunks[job.chunk];
            let mut buf = Vec::new();
            let pred = pair::predict(t.relation, sdt, tdt, src, job.range.clone(), &mut buf);
            match chunk.codec {
                ChunkCodec::Same => bytes.copy_from_slice(pred),
                ChunkCodec::Lossy => {
                    let payload = self.delta.chunk_payload(&t.name, chunk)?;
                    let first = (job.range.start / (tdt.bitsize() / 8)) as u64;
                    let params = self.plans[job.tensor]
                        .chunk_params(first)
                        .expect("validated: lossy chunks have a codec");
                    if let Err(e) = lossy::decode(tdt, &params, pred, payload, &mut bytes) {
                        self.check_source(job.tensor)?;
                        return Err(self.corrupt(t, format!("chunk {} does not decode: {}", job.chunk, e.0)));
                    }
                }
                ChunkCodec::Exact => {
                    let payload = self.delta.chunk_payload(&t.name, chunk)?;
                    if let Err(e) = exact::decode(dtype::layout(tdt), pred, payload, &mut bytes) {
                        // A wrong base predicts wrong contexts and fails to decode just like a
                        // corrupt payload does; tell the two apart before blaming the delta.
                        self.check_source(job.tensor)?;
                        return Err(self.corrupt(t, format!("chunk {} does not decode: {}", job.chunk, e.0)));
                    }
                }
            }
        }
        Ok(Decoded {
            target_hash: hash::chunk(&bytes),
            bytes,
            source_hashes,
        })
    }

    fn release(&self, job: &Job) {
        let (t, s) = self.tensors[job.tensor];
        if let Some(c) = t.chunks.get(job.chunk) {
            self.delta.release(c.offset, c.len);
        }
        if let Some(s) = s {
            let td = dtype::parse(&t.dtype).expect("validated dtype");
            let read = pair::source_range(t.relation, s.dtype, td, job.range.clone(), s.len());
            self.base.release(s, job.source_span(self.chunk_bytes, s.len(), read));
        }
    }

    /// Hashes a tensor's whole source and fails with [`Error::WrongBase`] if it is not the recorded one.
    fn check_source(&self, i: usize) -> Result<()> {
        let Some(src) = self.tensors[i].1 else {
            return Ok(());
        };
        let cb = self.chunk_bytes;
        let bytes = self.base.bytes(src);
        let hashes: Vec<Digest> = bytes.chunks(cb).map(hash::chunk).collect();
        self.check_source_hashes(i, &hashes)
    }

    fn check_source_hashes(&self, i: usize, source_hashes: &[Digest]) -> Result<()> {
        let (t, s) = self.tensors[i];
        let (Some(src), Some(rec)) = (s, &t.source) else {
            return Ok(());
        };
        let got = hash::hex(&hash::tensor(src.len() as u64, self.chunk_bytes as u64, source_hashes));
        if got != rec.hash {
            return Err(Error::WrongBase {
                path: self.base.root.clone(),
                tensor: src.name.clone(),
                reason: "has different values (fingerprint mismatch)".into(),
                base_id: self.delta.index.base.id.clone(),
            });
        }
        Ok(())
    }

    fn check_tensor(&self, i: usize, target_hashes: &[Digest], source_hashes: &[Digest]) -> Result<()> {
        let (t, _) = self.tensors[i];
        let cb = self.chunk_bytes as u64;
        self.check_source_hashes(i, source_hashes)?;
        if hash::hex(&hash::tensor(t.len(), cb, target_hashes)) != t.hash {
            return Err(self.corrupt(t, "rebuilt tensor does not match its fingerprint".into()));
        }
        Ok(())
    }
}

fn rebuild(delta: &Delta, base: &Checkpoint, sink: &mut dyn Sink, progress: &dyn Progress) -> Result<RebuildReport> {
    let ctx = Ctx::new(delta, base)?;
    let files = &delta.index.files;
    let headers = files
        .iter()
        .map(|f| header_bytes(delta, base, f))
        .collect::<Result<Vec<_>>>()?;
    let file_of: Vec<usize> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| std::iter::repeat_n(i, f.tensors.len()))
        .collect();
    let jobs: Vec<Job> = (0..ctx.tensors.len()).flat_map(|i| ctx.jobs_of(i)).collect();
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
    schedule::ordered(&jobs, |j| ctx.decode(j), |j, d| state.consume(&ctx, j, d?, progress))?;
    state.finish_files()?;
    progress.finish();
    for a in &delta.index.aux {
        sink.begin_aux(a)?;
        stream_aux(delta, base, a, &mut |b| sink.aux_data(b))?;
        sink.end_aux()?;
    }
    Ok(RebuildReport {
        weight_files: files.len(),
        aux_files: delta.index.aux.len(),
        tensors: ctx.tensors.len(),
        bytes: delta.index.finetuned_bytes(),
        compared_with_finetuned: false,
        measured: Vec::new(),
        measured_error: 0.0,
    })
}

fn wrong_base(delta: &Delta, base: &Checkpoint, what: &str, reason: String) -> Error {
    Error::WrongBase {
        path: base.root.clone(),
        tensor: what.to_string(),
        reason,
        base_id: delta.index.base.id.clone(),
    }
}

/// The header bytes of a weight file, from the base or decompressed, checked against the index.
fn header_bytes(delta: &Delta, base: &Checkpoint, f: &WeightFile) -> Result<Vec<u8>> {
    let shard_header = |p: &str| {
        base.shards
            .iter()
            .find(|s| s.rel == p)
            .map(|s| s.header_bytes().to_vec())
            .ok_or_else(|| wrong_base(delta, base, p, "(a shard header) is missing".into()))
    };
    let bytes = blob_bytes(delta, base, &f.header, f.header_len, shard_header)?;
    if hash::hex(&hash::bytes(&bytes)) != f.header_hash {
        return Err(match f.header {
            Blob::SameAsBase { .. } => wrong_base(delta, base, &f.path, "has a different header".into()),
            Blob::Zstd { .. } => Error::corrupt(
                &delta.path,
                format!("header of {} does not match its fingerprint", f.path),
            ),
        });
    }
    let h = crate::checkpoint::header::parse(&bytes, Some(f.size))
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
    Ok(bytes)
}

/// Streams an auxiliary file's contents to `out` in pieces, then checks its size and
/// fingerprint (an error then still discards everything written).
fn stream_aux(delta: &Delta, base: &Checkpoint, a: &AuxEntry, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let base_path = |p: &str| {
        if !base.root.is_dir() {
            let why = "is needed from the base directory, but the base is a single file (or make the delta with --self-contained)";
            return Err(wrong_base(delta, base, p, why.into()));
        }
        Ok(base.root.join(p))
    };
    let read_base = |p: &str| {
        let path = base_path(p)?;
        std::fs::read(&path).map_err(|e| wrong_base(delta, base, p, format!("cannot be read from the base: {e}")))
    };
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut emit = |piece: &[u8]| -> Result<()> {
        hasher.update(piece);
        size += piece.len() as u64;
        out(piece)
    };
    match &a.blob {
        Blob::SameAsBase { path } => {
            let p = base_path(path)?;
            let f = std::fs::File::open(&p)
                .map_err(|e| wrong_base(delta, base, path, format!("cannot be read from the base: {e}")))?;
            copy_pieces(f.take(a.size.saturating_add(1)), &mut emit, |e| {
                Error::io("reading", &p, e)
            })?;
        }
        Blob::Zstd {
            offset,
            len,
            dict,
            dict_hash,
        } => {
            let dict = load_dict(delta, base, dict, dict_hash, read_base)?;
            unzstd(
                delta,
                delta.range(*offset, *len),
                dict.as_deref(),
                a.size,
                &a.path,
                &mut emit,
            )?;
        }
    }
    if size != a.size || hash::hex(hasher.finalize().as_bytes()) != a.hash {
        return Err(match a.blob {
            Blob::SameAsBase { .. } => wrong_base(
                delta,
                base,
                &a.path,
                "differs from the base file the delta expects".into(),
            ),
            Blob::Zstd { .. } => Error::corrupt(&delta.path, format!("file {} does not match its fingerprint", a.path)),
        });
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

/// The zstd dictionary a blob was compressed with, checked against its recorded fingerprint.
fn load_dict(
    delta: &Delta,
    base: &Checkpoint,
    dict: &Option<String>,
    dict_hash: &Option<String>,
    from_base: impl Fn(&str) -> Result<Vec<u8>>,
) -> Result<Option<Vec<u8>>> {
    let (Some(p), Some(h)) = (dict, dict_hash) else {
        return Ok(None);
    };
    let d = from_base(p)?;
    if &hash::hex(&hash::bytes(&d)) != h {
        return Err(wrong_base(
            delta,
            base,
            p,
            "differs from the file the delta was made with".into(),
        ));
    }
    Ok(Some(d))
}

fn blob_bytes(
    delta: &Delta,
    base: &Checkpoint,
    blob: &Blob,
    size: u64,
    from_base: impl Fn(&str) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    match blob {
        Blob::SameAsBase { path } => from_base(path),
        Blob::Zstd {
            offset,
            len,
            dict,
            dict_hash,
        } => {
            let dict = load_dict(delta, base, dict, dict_hash, &from_base)?;
            let mut out = Vec::new();
            unzstd(
                delta,
                delta.range(*offset, *len),
                dict.as_deref(),
                size,
                "a shard header",
                &mut |b| {
                    out.extend_from_slice(b);
                    Ok(())
                },
            )?;
            Ok(out)
        }
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

    fn data(&mut self, _t: &TensorEntry, _offset: usize, bytes: &[u8]) -> Result<()> {
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
    /// The base, to measure lossy tensors' changes.
    base: &'a Checkpoint,
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
        t: &TensorEntry,
        range: std::ops::Range<usize>,
        bytes: &[u8],
    ) -> Result<()> {
        let shard = &ft.shards[theirs.shard].rel;
        let dt = dtype::parse(&t.dtype).expect("validated dtype");
        let src = t.source.as_ref().and_then(|s| self.base.tensor(&s.name));
        let (Some(target), Some(src)) = (ft.bytes(theirs).get(range.clone()), src) else {
            return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has another size"));
        };
        if theirs.dtype != dt {
            return Err(Self::mismatch(ft, shard, Some(&t.name), "tensor has another dtype"));
        }
        let q = QualitySums::chunk(dt, &self.base.bytes(src)[range.clone()], target, bytes);
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

    fn data(&mut self, t: &TensorEntry, offset: usize, bytes: &[u8]) -> Result<()> {
        let Some(ft) = self.ft else { return Ok(()) };
        let shard = self.current.expect("file begun");
        let theirs = ft.tensor(&t.name).filter(|x| x.shard == shard);
        let theirs =
            theirs.ok_or_else(|| Self::mismatch(ft, &ft.shards[shard].rel, Some(&t.name), "tensor missing"))?;
        let ours = offset..offset + bytes.len();
        if t.codec.is_some() {
            return self.measure(ft, theirs, t, ours, bytes);
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
