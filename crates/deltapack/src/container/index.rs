//! The container's index: what the delta holds and where, validated field by field on read.

use std::collections::{BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{is_safe_rel_path, Skipped};
use crate::codec::float::lossy_capable;
use crate::codec::lossy::TensorCodec;
use crate::codec::plan::Quality;
/// How a chunk is stored: defined with the codecs, whose dispatch reads it.
pub use crate::codec::ChunkCodec;
use crate::dtype;
use crate::hash;
use crate::pair;
/// How a tensor relates to the base tensor that predicts it (recorded per tensor).
pub use crate::pair::Relation;
use crate::ExpectedBase;

/// Top-level index of a delta file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Always `"deltapack"`.
    pub format: String,
    /// Major format version; equals the file header's.
    pub version: u16,
    /// Program that wrote the file.
    pub created_by: String,
    /// Bytes of target tensor per chunk (a power of two); also the fingerprint chunk size.
    pub chunk_bytes: u64,
    /// What the delta must be applied to.
    pub base: BaseInfo,
    /// The fine-tune's safetensors files, in the order they are written.
    pub files: Vec<WeightFile>,
    /// The fine-tune's other files (config, tokenizer, ...).
    pub aux: Vec<AuxEntry>,
    /// Base tensors the fine-tune does not have.
    pub removed: Vec<RemovedTensor>,
    /// Fine-tune files that were not stored, and why.
    pub skipped: Vec<Skipped>,
    /// The delta this one continues, for a link of a chain (absent: made against the base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentLink>,
}

/// What a chained delta was made against: the model another delta rebuilds.
///
/// The delta's `base` then describes that parent model (its tensors are the sources), and
/// applying it needs the whole chain from the base, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParentLink {
    /// [`Index::model_fingerprint`] of the parent delta.
    pub fingerprint: String,
    /// Number of deltas from the base to the parent, inclusive, when this one was made (1:
    /// the parent is made against the base); informational, since re-coding an ancestor
    /// against its own parent shortens a chain without changing any link.
    pub depth: u32,
    /// File name of the parent delta when this one was made, for people.
    pub file: Option<String>,
}

/// Identity of the base a delta was made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BaseInfo {
    /// Where the base comes from, e.g. `Qwen/Qwen2.5-0.5B@<revision>`, if the maker said.
    pub id: Option<String>,
    /// BLAKE3 over the sorted (name, fingerprint) of every base tensor the delta reads.
    pub fingerprint: String,
    /// Number of tensors in the base.
    pub tensors: u64,
    /// Size of the base's safetensors files in bytes.
    pub bytes: u64,
}

impl BaseInfo {
    /// What an error says of this base when another one is given ([`crate::Error::WrongBase`]).
    pub fn expected(&self) -> Box<ExpectedBase> {
        Box::new(ExpectedBase {
            id: self.id.clone(),
            fingerprint: Some(self.fingerprint.clone()),
            swapped: false,
        })
    }
}

/// Where a stored byte string lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "storage", rename_all = "snake_case", deny_unknown_fields)]
pub enum Blob {
    /// Identical to the base file at `path` (or that base shard's header, for headers).
    SameAsBase {
        /// Path relative to the base directory.
        path: String,
    },
    /// zstd-compressed in the payload, optionally with a base file as dictionary.
    Zstd {
        /// Offset of the compressed bytes in the delta file.
        offset: u64,
        /// Length of the compressed bytes.
        len: u64,
        /// Base file (relative path) whose contents served as the zstd dictionary.
        dict: Option<String>,
        /// BLAKE3 of that base file, checked before it is used.
        dict_hash: Option<String>,
    },
    /// Kept outside the delta, by content: a store holds it under its BLAKE3 (the entry's
    /// `hash`). Applying such a delta needs that store.
    External,
}

/// One fine-tune safetensors file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightFile {
    /// Path relative to the model directory.
    pub path: String,
    /// Size of the whole file in bytes.
    pub size: u64,
    /// The file's header bytes (8-byte length and JSON), stored verbatim.
    pub header: Blob,
    /// Length of those header bytes.
    pub header_len: u64,
    /// BLAKE3 of those header bytes.
    pub header_hash: String,
    /// Its tensors, in data-offset order.
    pub tensors: Vec<TensorEntry>,
}

/// One fine-tune tensor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// Name.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Byte range in the file's data section.
    pub data_offsets: [u64; 2],
    /// How it is predicted from the base.
    pub relation: Relation,
    /// The base tensor that predicts it (absent for `new`).
    pub source: Option<SourceTensor>,
    /// Fingerprint of the reconstructed tensor.
    pub hash: String,
    /// Coded chunks, `ceil(bytes / chunk_bytes)` of them.
    pub chunks: Vec<Chunk>,
    /// The lossy codec of its `lossy` chunks; absent for exact tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<TensorCodec>,
    /// The codec's tensor-wide parameters (`sign-axis` scales), if it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Payload>,
    /// Size and error of the stored tensor, recorded by lossy runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<Quality>,
    /// (1.4) How many of its elements differ from their prediction (what was a change from
    /// the base); absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<u64>,
}

/// A byte range of the payload with its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    /// Offset in the delta file.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// xxh3-64 of the bytes, hex.
    pub checksum: String,
}

impl TensorEntry {
    /// The tensor's dtype, parsed from its recorded name (`None` for a name safetensors does
    /// not know, which validation rejects on read).
    pub fn element_dtype(&self) -> Option<safetensors::Dtype> {
        crate::dtype::parse(&self.dtype)
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.data_offsets[1] - self.data_offsets[0]
    }

    /// True for a tensor without elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when every chunk equals the base's bytes.
    pub fn unchanged(&self) -> bool {
        self.relation == Relation::Direct && self.chunks.iter().all(|c| c.codec == ChunkCodec::Same)
    }

    /// Compressed payload bytes (chunks and parameters).
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len).sum::<u64>() + self.params.as_ref().map_or(0, |p| p.len)
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The base tensor a fine-tune tensor is coded against.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceTensor {
    /// Name in the base.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Fingerprint, checked when the delta is applied.
    pub hash: String,
}

/// One coded chunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Chunk {
    /// Codec.
    #[serde(rename = "c")]
    pub codec: ChunkCodec,
    /// Offset of the payload in the delta file.
    #[serde(rename = "o")]
    pub offset: u64,
    /// Payload length (0 for `same`).
    #[serde(rename = "n")]
    pub len: u64,
    /// xxh3-64 of the payload, hex.
    #[serde(rename = "x")]
    pub checksum: String,
    /// (1.3) xxh3-64 of the chunk's rebuilt bytes, hex; absent in older files. Hot swap checks
    /// what it rebuilds in memory against it: a check against bugs, at a fifth of the cost of
    /// the BLAKE3 fingerprints (see `docs/FORMAT.md`).
    #[serde(rename = "q", default, skip_serializing_if = "Option::is_none")]
    pub rebuilt: Option<String>,
}

impl Chunk {
    /// The [`Chunk::rebuilt`] hash as a number, when recorded (validated when read).
    pub fn rebuilt_hash(&self) -> Option<u64> {
        self.rebuilt.as_deref().and_then(|q| u64::from_str_radix(q, 16).ok())
    }
}

/// One auxiliary file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuxEntry {
    /// Path relative to the model directory.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the contents.
    pub hash: String,
    /// Where the contents are.
    pub blob: Blob,
}

/// A base tensor that the fine-tune does not have.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RemovedTensor {
    /// Name.
    pub name: String,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
}

/// xxh3-64 checksum of a payload, as stored in [`Chunk::checksum`].
pub fn checksum(payload: &[u8]) -> String {
    quick_hex(xxhash_rust::xxh3::xxh3_64(payload))
}

/// An xxh3-64 hash as stored in the index: 16 lower-case hex digits.
pub fn quick_hex(h: u64) -> String {
    format!("{h:016x}")
}

impl Index {
    /// The relative RMS error of the whole model's delta, `||D'-D|| / ||D||`, from the
    /// tensors' recorded quality (0 for an exact delta).
    pub fn model_error(&self) -> f64 {
        let (mut err, mut norm) = (0.0, 0.0);
        for q in self.tensors().filter_map(|t| t.quality) {
            err += (q.error * q.delta_norm).powi(2);
            norm += q.delta_norm.powi(2);
        }
        if norm > 0.0 {
            (err / norm).sqrt()
        } else {
            0.0
        }
    }

    /// Total size of the fine-tune's files (weights and auxiliary files).
    pub fn finetuned_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum::<u64>() + self.aux.iter().map(|a| a.size).sum::<u64>()
    }

    /// Fingerprint of the model this delta rebuilds: BLAKE3 over every file's path and
    /// header fingerprint, every tensor's name and fingerprint, and every auxiliary file's
    /// path and fingerprint, in index order. A child delta records its parent's.
    pub fn model_fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"deltapack.model.v1\n");
        for f in &self.files {
            for s in ["file", &f.path, &f.header_hash] {
                h.update(s.as_bytes());
                h.update(b"\0");
            }
            for t in &f.tensors {
                for s in ["tensor", &t.name, &t.hash] {
                    h.update(s.as_bytes());
                    h.update(b"\0");
                }
            }
        }
        for a in &self.aux {
            for s in ["aux", &a.path, &a.hash] {
                h.update(s.as_bytes());
                h.update(b"\0");
            }
        }
        hash::hex(h.finalize().as_bytes())
    }

    /// All tensors, file by file.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.files.iter().flat_map(|f| f.tensors.iter())
    }

    /// Whether this delta rebuilds a tensor `name` of fingerprint `fingerprint`: a base whose
    /// tensor does is likely the fine-tune, given in the base's place.
    pub fn rebuilds(&self, name: &str, fingerprint: &str) -> bool {
        self.tensors().any(|t| t.name == name && t.hash == fingerprint)
    }

    /// Checks every field; `payload` is the byte range chunks and blobs may occupy.
    pub fn validate(&self, payload: std::ops::Range<u64>) -> Result<(), String> {
        if self.format != "deltapack" {
            return Err(format!("format is '{}', not 'deltapack'", self.format));
        }
        if self.version != super::VERSION_MAJOR {
            return Err(format!("index version {} differs from the file's", self.version));
        }
        if !self.chunk_bytes.is_power_of_two() || !(1 << 12..=1 << 30).contains(&self.chunk_bytes) {
            return Err(format!(
                "chunk size {} is not a power of two in 4 KiB..1 GiB",
                self.chunk_bytes
            ));
        }
        check_hash(&self.base.fingerprint, "base fingerprint")?;
        if let Some(p) = &self.parent {
            check_hash(&p.fingerprint, "parent fingerprint")?;
            if p.depth == 0 {
                return Err("parent depth is 0".into());
            }
        }
        let mut ranges = Vec::new();
        let mut paths = BTreeSet::new();
        let mut names = HashSet::new();
        for f in &self.files {
            check_path(&f.path, &mut paths)?;
            self.validate_file(f, &mut ranges, &mut names)?;
        }
        for a in &self.aux {
            check_path(&a.path, &mut paths)?;
            check_hash(&a.hash, &a.path)?;
            check_blob(&a.blob, &a.path, &mut ranges)?;
        }
        for p in &paths {
            let mut prefix = p.as_str();
            while let Some((parent, _)) = prefix.rsplit_once('/') {
                if paths.contains(parent) {
                    return Err(format!("'{parent}' is both a file and the directory of '{p}'"));
                }
                prefix = parent;
            }
        }
        for r in &self.removed {
            dtype::parse(&r.dtype).ok_or_else(|| format!("removed tensor '{}' has unknown dtype", r.name))?;
        }
        check_ranges(ranges, payload)
    }

    fn validate_file<'a>(
        &'a self,
        f: &'a WeightFile,
        ranges: &mut Vec<(u64, u64, String)>,
        names: &mut HashSet<&'a str>,
    ) -> Result<(), String> {
        check_hash(&f.header_hash, &f.path)?;
        if f.header == Blob::External {
            return Err(format!("{}: a shard header cannot be kept outside the delta", f.path));
        }
        check_blob(&f.header, &f.path, ranges)?;
        if f.header_len < 8 || f.header_len > 8 + crate::checkpoint::header::MAX_HEADER_LEN {
            return Err(format!("{}: header length {} out of range", f.path, f.header_len));
        }
        let mut end = 0u64;
        for t in &f.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(format!("tensor '{}' appears twice", t.name));
            }
            let ctx = |m: &str| format!("tensor '{}': {m}", t.name);
            let dt = dtype::parse(&t.dtype).ok_or_else(|| ctx("unknown dtype"))?;
            let shape = to_usize(&t.shape).ok_or_else(|| ctx("shape too large"))?;
            let len = dtype::byte_len(dt, &shape).ok_or_else(|| ctx("shape overflows"))? as u64;
            if t.data_offsets[0] != end || t.data_offsets[1] < t.data_offsets[0] || t.len() != len {
                return Err(ctx("data offsets do not tile the file"));
            }
            end = t.data_offsets[1];
            check_hash(&t.hash, &t.name)?;
            self.validate_source(t, dt, &shape)?;
            if t.chunks.len() as u64 != hash::chunk_count(len, self.chunk_bytes) {
                return Err(ctx("wrong number of chunks"));
            }
            self.validate_codec(t, dt, ranges)?;
            if t.changed.is_some_and(|n| n > t.numel()) {
                return Err(ctx("more changed elements than elements"));
            }
            for c in &t.chunks {
                check_checksum(&c.checksum).map_err(&ctx)?;
                if let Some(q) = &c.rebuilt {
                    check_checksum(q).map_err(&ctx)?;
                }
                match c.codec {
                    ChunkCodec::Same if c.len != 0 => return Err(ctx("'same' chunk with a payload")),
                    ChunkCodec::Same if t.relation == Relation::New => return Err(ctx("'same' chunk without a base")),
                    ChunkCodec::Same => {}
                    ChunkCodec::Lossy if t.codec.is_none() => return Err(ctx("'lossy' chunk without a codec")),
                    ChunkCodec::Exact | ChunkCodec::Changes | ChunkCodec::Lossy => {
                        ranges.push((c.offset, c.len, t.name.clone()))
                    }
                }
            }
        }
        let expected = f.header_len.checked_add(end).ok_or("file size overflows")?;
        if f.size != expected {
            return Err(format!(
                "{}: size {} does not match its header and tensors",
                f.path, f.size
            ));
        }
        Ok(())
    }

    /// A lossy codec needs a float tensor of the base's dtype and shape, valid settings, the
    /// parameter blob it requires, and only lossy chunks.
    fn validate_codec(
        &self,
        t: &TensorEntry,
        dt: safetensors::Dtype,
        ranges: &mut Vec<(u64, u64, String)>,
    ) -> Result<(), String> {
        let ctx = |m: &str| format!("tensor '{}': {m}", t.name);
        if let Some(q) = &t.quality {
            let ok = [q.bits_per_param, q.error, q.max_abs_error, q.delta_norm]
                .iter()
                .all(|x| x.is_finite() && *x >= 0.0);
            if !ok {
                return Err(ctx("quality figures are not finite and non-negative"));
            }
        }
        let Some(codec) = &t.codec else {
            return match t.params {
                None => Ok(()),
                Some(_) => Err(ctx("parameters without a lossy codec")),
            };
        };
        if !lossy_capable(dt) || t.relation != Relation::Direct {
            return Err(ctx("lossy codec on a tensor that is not a float of the base's shape"));
        }
        if t.chunks.iter().any(|c| c.codec != ChunkCodec::Lossy) {
            return Err(ctx("a lossy tensor with non-lossy chunks"));
        }
        let need = codec.validate(t.numel()).map_err(|m| ctx(&m))?;
        match (&t.params, need) {
            (None, 0) => Ok(()),
            (Some(p), n) if n > 0 && p.len == n => {
                check_checksum(&p.checksum).map_err(&ctx)?;
                ranges.push((p.offset, p.len, t.name.clone()));
                Ok(())
            }
            _ => Err(ctx("codec parameters missing or of the wrong size")),
        }
    }

    fn validate_source(&self, t: &TensorEntry, dt: safetensors::Dtype, shape: &[usize]) -> Result<(), String> {
        let ctx = |m: &str| format!("tensor '{}': {m}", t.name);
        let Some(s) = &t.source else {
            return if t.relation == Relation::New {
                Ok(())
            } else {
                Err(ctx("no source tensor"))
            };
        };
        if t.relation == Relation::New {
            return Err(ctx("'new' tensor with a source"));
        }
        check_hash(&s.hash, &s.name)?;
        let sdt = dtype::parse(&s.dtype).ok_or_else(|| ctx("unknown source dtype"))?;
        let sshape = to_usize(&s.shape).ok_or_else(|| ctx("source shape too large"))?;
        dtype::byte_len(sdt, &sshape).ok_or_else(|| ctx("source shape overflows"))?;
        let rel = pair::relation(sdt, &sshape, dt, shape);
        let ok = match t.relation {
            Relation::Tied => matches!(rel, Some(Relation::Direct | Relation::Resized)),
            r => rel == Some(r),
        };
        if !ok {
            return Err(ctx("source does not fit the recorded relation"));
        }
        Ok(())
    }
}

fn to_usize(shape: &[u64]) -> Option<Vec<usize>> {
    shape.iter().map(|&d| usize::try_from(d).ok()).collect()
}

fn check_hash(h: &str, what: &str) -> Result<(), String> {
    hash::parse_hex(h)
        .map(|_| ())
        .ok_or_else(|| format!("{what}: bad fingerprint"))
}

fn check_checksum(c: &str) -> Result<(), &'static str> {
    if c.len() != 16 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("bad checksum");
    }
    Ok(())
}

fn check_path(p: &str, seen: &mut BTreeSet<String>) -> Result<(), String> {
    if !is_safe_rel_path(p) {
        return Err(format!(
            "file path '{p}' is absolute, contains '..' or would escape the output directory"
        ));
    }
    if !seen.insert(p.to_string()) {
        return Err(format!("file path '{p}' appears twice"));
    }
    Ok(())
}

fn check_blob(b: &Blob, what: &str, ranges: &mut Vec<(u64, u64, String)>) -> Result<(), String> {
    match b {
        Blob::SameAsBase { path } if is_safe_rel_path(path) => Ok(()),
        Blob::SameAsBase { .. } => Err(format!("{what}: unsafe base path")),
        Blob::External => Ok(()),
        Blob::Zstd {
            offset,
            len,
            dict,
            dict_hash,
        } => {
            match (dict, dict_hash) {
                (None, None) => {}
                (Some(p), Some(h)) if is_safe_rel_path(p) => check_hash(h, what)?,
                _ => return Err(format!("{what}: bad dictionary reference")),
            }
            ranges.push((*offset, *len, what.to_string()));
            Ok(())
        }
    }
}

fn check_ranges(mut ranges: Vec<(u64, u64, String)>, payload: std::ops::Range<u64>) -> Result<(), String> {
    ranges.sort();
    let mut prev_end = payload.start;
    for (offset, len, what) in ranges {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("{what}: payload range overflows"))?;
        if offset < prev_end || end > payload.end {
            return Err(format!(
                "{what}: payload range {offset}+{len} overlaps another or lies outside the payload"
            ));
        }
        prev_end = end;
    }
    Ok(())
}
