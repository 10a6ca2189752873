//! Making a delta: pair, encode chunk by chunk in bounded windows, write the container.

use std::cell::RefCell;
use std::path::Path;

use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

use crate::checkpoint::{AuxFile, Checkpoint, TensorRef};
use crate::codec::changes::count_changed;
use crate::codec::plan::{QualitySums, TensorPlan};
use crate::codec::{encode_exact_chunk, exact, lossy};
use crate::container::index::{
    self, AuxEntry, BaseInfo, Blob, Chunk, ChunkCodec, Index, Payload, RemovedTensor, SourceTensor, TensorEntry,
    WeightFile,
};
use crate::container::{ContainerWriter, VERSION_MAJOR};
use crate::hash::{self, Digest};
use crate::pair::{self, Pairing, Plan, Relation};
use crate::progress::Progress;
use crate::schedule::{self, Job};
use crate::tune::{self, CodecPolicy, TensorView};
use crate::{dtype, Error, Result};

/// Largest base file used as a compression dictionary for the fine-tune's file of the same name.
const MAX_DICT_BYTES: u64 = 64 << 20;

/// Least saving for which an auxiliary file is coded against the base's file of the same
/// name. The dictionary ties the delta to that file: applying then needs it in the base's
/// directory, which a base given as a single file, or fetched without its configs, lacks. A
/// tokenizer with a few added tokens costs 168 bytes instead of 150 KB that way, which is
/// worth the tie; a small config, a few hundred bytes either way, is not.
const MIN_DICT_GAIN: u64 = 1024;

/// zstd level of the estimate of an auxiliary file's size compressed alone (see [`store_aux`]).
const ESTIMATE_LEVEL: i32 = 3;

/// Options of [`make`].
#[derive(Debug, Clone)]
pub struct MakeOptions {
    /// Where the base comes from (`ORG/NAME@REVISION`), recorded for whoever applies the delta.
    pub base_id: Option<String>,
    /// Bytes of tensor per chunk (a power of two, 4 KiB to 1 GiB).
    pub chunk_bytes: usize,
    /// Overwrite an existing output.
    pub force: bool,
    /// fsync the output before renaming it into place.
    pub sync: bool,
    /// Store non-weight files whole (compressed), never as references to or deltas against
    /// the base's files, so that applying needs only the base's tensors, even from a single
    /// file. Costs the size of the compressed tokenizer and configs. (Shard headers never
    /// depend on the base's, so that any delta applies to the base in any shard layout.)
    pub self_contained: bool,
    /// Which codec each tensor gets (default: every tensor exact).
    pub codecs: CodecPolicy,
    /// Keep auxiliary files out of the delta as [`Blob::External`] references by content
    /// (a store keeps them once for all its entries).
    pub external_aux: bool,
    /// Set when `base` is the reconstruction of another delta (see [`crate::make_child`]).
    pub parent: Option<index::ParentLink>,
}

impl Default for MakeOptions {
    fn default() -> Self {
        MakeOptions {
            base_id: None,
            chunk_bytes: 1 << 21,
            force: false,
            sync: false,
            self_contained: false,
            codecs: CodecPolicy::default(),
            external_aux: false,
            parent: None,
        }
    }
}

/// What [`make`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MakeReport {
    /// Size of the delta file.
    pub delta_bytes: u64,
    /// BLAKE3 of the delta file as written, hex (so a store records it without reading the
    /// file back, which for an uploaded delta would mean downloading it).
    pub delta_hash: String,
    /// Size of all the fine-tune's files (weights and others).
    pub finetuned_bytes: u64,
    /// `finetuned_bytes / delta_bytes`.
    pub ratio: f64,
    /// Tensors bit-identical to the base.
    pub same: usize,
    /// Tensors coded as a delta of the same shape.
    pub changed: usize,
    /// Tensors whose first dimension changed.
    pub resized: usize,
    /// Tensors coded against a base tensor of another dtype.
    pub converted: usize,
    /// Tensors coded against the embedding the base ties them to.
    pub tied: usize,
    /// Tensors with no base counterpart.
    pub new: usize,
    /// Base tensors absent from the fine-tune.
    pub removed: usize,
    /// Bytes of tensor data stored (coded payload).
    pub tensor_payload_bytes: u64,
    /// Auxiliary files stored, and how many of them were identical to the base's.
    pub aux_files: usize,
    /// Auxiliary files identical to the base's (not stored).
    pub aux_same_as_base: usize,
    /// Files skipped (pickles).
    pub skipped: Vec<String>,
    /// Tensors coded lossily.
    pub lossy: usize,
    /// The model's relative RMS error of the delta (0 for exact deltas).
    pub error: f64,
    /// 8 x delta size / number of fine-tune values.
    pub bits_per_param: f64,
    /// Codec, setting and quality of every tensor, in lossy runs (empty for exact ones).
    pub tensors: Vec<TensorReport>,
    /// Things that worked but are probably not what the caller meant, for people.
    pub warnings: Vec<String>,
}

/// One tensor's codec and quality, as `make` reports them.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Tensor name.
    pub name: String,
    /// Codec name (`exact`, `quant`, ...).
    pub codec: String,
    /// The codec's settings.
    pub setting: String,
    /// Size and error.
    #[serde(flatten)]
    pub quality: tune::Quality,
}

impl TensorReport {
    /// The report of an index entry that recorded its quality.
    pub fn of(t: &TensorEntry) -> Option<TensorReport> {
        let q = t.quality?;
        Some(TensorReport {
            name: t.name.clone(),
            codec: t.codec.as_ref().map_or("exact", |c| c.name()).to_string(),
            setting: t.codec.as_ref().map(|c| c.setting()).unwrap_or_default(),
            quality: q,
        })
    }
}

thread_local! {
    static SCRATCH: RefCell<(exact::Scratch, Vec<u8>)> = RefCell::new(Default::default());
}

struct Encoded {
    payload: Option<Vec<u8>>,
    /// How `payload` is coded.
    codec: ChunkCodec,
    target_hash: Digest,
    /// xxh3-64 of the rebuilt chunk, recorded for hot swap's check ([`Chunk::rebuilt`]).
    rebuilt_hash: u64,
    source_hashes: Vec<Digest>,
    /// Error sums of the chunk, in lossy runs.
    quality: Option<QualitySums>,
    /// Elements whose rebuilt value differs from the prediction.
    changed: u64,
}

/// How many elements of `target` differ from `pred`, for the index's `changed` count.
///
/// Elements are compared whole: a complex element is one element although the codecs see its
/// two halves. Dtypes that pack several elements a byte count the bytes that differ.
fn changed_elements(dt: crate::Dtype, pred: &[u8], target: &[u8]) -> u64 {
    let layout = dtype::layout(dt);
    let w = dt.bitsize() / 8;
    if w == layout.width {
        return count_changed(layout, pred, target);
    }
    let w = w.max(1);
    pred.chunks(w).zip(target.chunks(w)).filter(|(a, b)| a != b).count() as u64
}

/// Makes a delta of `finetuned` against `base` and writes it to `out`.
pub fn make(
    base: &Path,
    finetuned: &Path,
    out: &Path,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    check_chunk_bytes(opts.chunk_bytes)?;
    crate::checkpoint::check_output_disjoint(out, &[("base", base), ("fine-tune", finetuned)])?;
    let base_ck = Checkpoint::open(base)?;
    let ft_ck = Checkpoint::open(finetuned)?;
    make_from(&base_ck, &ft_ck, out, opts, progress)
}

fn check_chunk_bytes(chunk_bytes: usize) -> Result<()> {
    if !chunk_bytes.is_power_of_two() || !(1 << 12..=1 << 30).contains(&chunk_bytes) {
        return Err(Error::InvalidArgument(format!(
            "chunk size {chunk_bytes} is not a power of two in 4 KiB..1 GiB"
        )));
    }
    Ok(())
}

/// [`make`] of opened checkpoints, each on disk or held in memory
/// ([`Checkpoint::from_memory`]); the delta is the same either way for the same tensors,
/// headers and files.
pub fn make_from(
    base_ck: &Checkpoint,
    ft_ck: &Checkpoint,
    out: &Path,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<MakeReport> {
    check_chunk_bytes(opts.chunk_bytes)?;
    crate::checkpoint::check_output_disjoint(out, &[("base", &base_ck.root), ("fine-tune", &ft_ck.root)])?;
    let finetuned = ft_ck.root.as_path();
    let plan = pair::plan(base_ck, ft_ck);
    let mut w = ContainerWriter::create(out, opts.force)?;
    let mut files = Vec::new();
    // A link of a chain is made against its parent's model, whose files (and so shard layout)
    // the parent delta fixes: its headers may refer to the parent's. A base's layout is not
    // fixed: the same tensors come re-sharded, converted or saved with another shard size.
    let below = (opts.parent.is_some() && !opts.self_contained).then_some(base_ck);
    for shard in &ft_ck.shards {
        let (header, header_hash) = store_header(&mut w, below, &shard.rel, shard.header_bytes())?;
        files.push(WeightFile {
            path: shard.rel.clone(),
            size: 0,
            header,
            header_len: shard.prefix_len as u64,
            header_hash: hash::hex(&header_hash),
            tensors: Vec::new(),
        });
    }
    let tensors = encode_tensors(&mut w, base_ck, ft_ck, &plan, opts, progress)?;
    for (entry, p) in tensors.into_iter().zip(&plan.pairings) {
        let t = &ft_ck.tensors[p.target];
        let f = &mut files[t.shard];
        f.size = f.header_len + entry.data_offsets[1];
        f.tensors.push(entry);
    }
    // The parent of a chain's link is always at hand: any gain is worth its dictionary.
    let min_dict_gain = if opts.parent.is_some() { 0 } else { MIN_DICT_GAIN };
    let aux = ft_ck
        .aux
        .iter()
        .map(|a| match opts.external_aux {
            true => external_aux(a),
            false => store_aux(&mut w, (!opts.self_contained).then_some(base_ck), a, min_dict_gain),
        })
        .collect::<Result<Vec<_>>>()?;
    let index = Index {
        format: "deltapack".into(),
        version: VERSION_MAJOR,
        created_by: format!("deltapack {}", env!("CARGO_PKG_VERSION")),
        chunk_bytes: opts.chunk_bytes as u64,
        base: BaseInfo {
            id: opts.base_id.clone(),
            fingerprint: base_fingerprint(files.iter().flat_map(|f| f.tensors.iter())),
            tensors: base_ck.tensors.len() as u64,
            bytes: base_ck.weight_bytes(),
        },
        files,
        aux,
        removed: plan.removed.iter().map(|&i| removed(&base_ck.tensors[i])).collect(),
        skipped: ft_ck.skipped.clone(),
        parent: opts.parent.clone(),
    };
    let report_base = report(&index);
    let (delta_bytes, digest) = w.finish(&index, opts.sync)?;
    let numel: u64 = index.tensors().map(|t| t.numel()).sum();
    Ok(MakeReport {
        delta_bytes,
        delta_hash: hash::hex(&digest),
        ratio: index.finetuned_bytes() as f64 / delta_bytes as f64,
        bits_per_param: 8.0 * delta_bytes as f64 / numel.max(1) as f64,
        warnings: dropped_tensors_warning(finetuned, base_ck.tensors.len(), report_base.removed)
            .into_iter()
            .collect(),
        ..report_base
    })
}

/// BLAKE3 over the sorted `(name, fingerprint)` pairs of every base tensor a delta reads.
pub fn base_fingerprint<'a>(tensors: impl Iterator<Item = &'a TensorEntry>) -> String {
    let mut pairs: Vec<(&str, &str)> = tensors
        .filter_map(|t| t.source.as_ref())
        .map(|s| (s.name.as_str(), s.hash.as_str()))
        .collect();
    pairs.sort();
    pairs.dedup();
    let mut h = blake3::Hasher::new();
    for (n, d) in pairs {
        h.update(n.as_bytes());
        h.update(b"\0");
        h.update(d.as_bytes());
        h.update(b"\n");
    }
    hash::hex(h.finalize().as_bytes())
}

fn report(index: &Index) -> MakeReport {
    let count = |r: Relation| index.tensors().filter(|t| t.relation == r).count();
    let same = index.tensors().filter(|t| t.unchanged()).count();
    MakeReport {
        delta_bytes: 0,
        delta_hash: String::new(),
        finetuned_bytes: index.finetuned_bytes(),
        ratio: 0.0,
        same,
        changed: count(Relation::Direct) - same,
        resized: count(Relation::Resized),
        converted: count(Relation::Converted),
        tied: count(Relation::Tied),
        new: count(Relation::New),
        removed: index.removed.len(),
        tensor_payload_bytes: index.tensors().map(|t| t.stored_bytes()).sum(),
        aux_files: index.aux.len(),
        aux_same_as_base: index
            .aux
            .iter()
            .filter(|a| matches!(a.blob, Blob::SameAsBase { .. }))
            .count(),
        skipped: index.skipped.iter().map(|s| s.path.clone()).collect(),
        lossy: index.tensors().filter(|t| t.codec.is_some()).count(),
        error: index.model_error(),
        bits_per_param: 0.0,
        tensors: index.tensors().filter_map(TensorReport::of).collect(),
        warnings: Vec::new(),
    }
}

/// A warning when the fine-tune lacks most of the base's tensors: usually one shard of a
/// sharded model given instead of its directory, which makes a valid delta that removes the
/// other shards' tensors.
fn dropped_tensors_warning(finetuned: &Path, base_tensors: usize, removed: usize) -> Option<String> {
    if removed == 0 || removed * 2 <= base_tensors {
        return None;
    }
    let mut w = format!(
        "the fine-tune {} lacks {removed} of the base's {base_tensors} tensors; the delta records them as removed, and the model it rebuilds lacks them",
        finetuned.display()
    );
    let dir = finetuned.parent().filter(|_| finetuned.is_file());
    let index = dir.and_then(|d| {
        std::fs::read_dir(d)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.ends_with(".safetensors.index.json"))
    });
    let name = finetuned
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match (dir, index) {
        (Some(d), Some(i)) => w.push_str(&format!(
            "; it is one shard of a sharded model ({i} lies beside it): give the model directory {} to include every shard",
            d.display()
        )),
        (Some(d), None) if name.contains("-of-") => w.push_str(&format!(
            "; it looks like one shard of a sharded model: give the model directory {} to include every shard",
            d.display()
        )),
        _ => {}
    }
    Some(w)
}

fn removed(t: &TensorRef) -> RemovedTensor {
    RemovedTensor {
        name: t.name.clone(),
        dtype: dtype::name(t.dtype),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
    }
}

/// Stores a shard header. Against a base (`below` is None), compressed alone, even when a
/// base shard has the very same header: a header that refers to a base shard's ties the
/// delta to the base's shard layout, and fails on the same tensors in another (deltas of
/// earlier writers do; readers still accept them). Alone, a header costs about a tenth of
/// its size: all-MiniLM-L6-v2's 11.4 KB header takes 1,137 bytes, where a reference took
/// none. A fine-tune's first header as dictionary of its others would save 89 of the 1,487
/// bytes of a three-shard fine-tune's headers (ft-b-bf16-sharded): not worth a blob that
/// refers to the delta's own files, which the format does not have.
///
/// Against a parent's model (a link of a chain), a reference if some parent shard has the
/// very same bytes, else compressed against the parent shard of the same name (or the first
/// one).
fn store_header(
    w: &mut ContainerWriter,
    below: Option<&Checkpoint>,
    rel: &str,
    bytes: &[u8],
) -> Result<(Blob, Digest)> {
    let digest = hash::bytes(bytes);
    let shards = below.map_or(&[][..], |b| &b.shards[..]);
    if let Some(s) = shards.iter().find(|s| s.header_bytes() == bytes) {
        return Ok((Blob::SameAsBase { path: s.rel.clone() }, digest));
    }
    let dict = shards.iter().find(|s| s.rel == rel).or(shards.first());
    let (offset, len) = w.append_zstd(bytes, dict.map(|s| s.header_bytes()))?;
    let blob = Blob::Zstd {
        offset,
        len,
        dict: dict.map(|s| s.rel.clone()),
        dict_hash: dict.map(|s| hash::hex(&hash::bytes(s.header_bytes()))),
    };
    Ok((blob, digest))
}

/// Records an auxiliary file kept outside the delta, by its content's fingerprint.
fn external_aux(a: &AuxFile) -> Result<AuxEntry> {
    let (size, digest) = hash::file(&a.path).map_err(|e| Error::io("reading", &a.path, e))?;
    Ok(AuxEntry {
        path: a.rel.clone(),
        size,
        hash: hash::hex(&digest),
        blob: Blob::External,
    })
}

/// Stores an auxiliary file: a reference if the base has an identical one, else compressed,
/// with the base's file of the same name as dictionary where that saves `min_dict_gain` bytes
/// or more (configs and tokenizers of a fine-tune usually differ from the base's in a few
/// bytes). Without a base (self-contained deltas), compressed alone.
///
/// The reference stays although it ties the delta to the base's file just as a dictionary
/// does: a fine-tune keeps the base's config or tokenizer as a rule, a reference costs
/// nothing where storing it costs its compressed size (150 KB for a tokenizer), and the base
/// is normally at hand as the directory it was published as. Applying to a base without the
/// file names it as missing, and a self-contained delta needs none.
fn store_aux(w: &mut ContainerWriter, base: Option<&Checkpoint>, a: &AuxFile, min_dict_gain: u64) -> Result<AuxEntry> {
    let (size, digest) = hash::file(&a.path).map_err(|e| Error::io("reading", &a.path, e))?;
    let base_file = base.and_then(|b| b.aux.iter().find(|x| x.rel == a.rel));
    // A fine-tune's file far larger than any dictionary is not the base's with a few changes:
    // it is streamed alone rather than held in memory to compare codings.
    let dict = match base_file {
        Some(b) if b.size <= MAX_DICT_BYTES && size <= MAX_DICT_BYTES => {
            Some(std::fs::read(&b.path).map_err(|e| Error::io("reading", &b.path, e))?)
        }
        _ => None,
    };
    let entry = |blob| AuxEntry {
        path: a.rel.clone(),
        size,
        hash: hash::hex(&digest),
        blob,
    };
    let changed = || Error::bad_checkpoint(&a.path, "file changed while deltapack was reading it");
    let Some(d) = dict else {
        let (offset, len, stored_size, stored_digest) = w.append_zstd_file(&a.path, None)?;
        if stored_size != size || stored_digest != digest {
            return Err(changed());
        }
        return Ok(entry(Blob::Zstd {
            offset,
            len,
            dict: None,
            dict_hash: None,
        }));
    };
    if d.len() as u64 == size && hash::bytes(&d) == digest {
        return Ok(entry(Blob::SameAsBase { path: a.rel.clone() }));
    }
    // Both codings are tried in memory: the file is at most MAX_DICT_BYTES, like the base's.
    let data = std::fs::read(&a.path).map_err(|e| Error::io("reading", &a.path, e))?;
    if data.len() as u64 != size || hash::bytes(&data) != digest {
        return Err(changed());
    }
    let io = |e| Error::io("compressing", &a.path, e);
    let with_dict = ContainerWriter::compress(&data, Some(&d)).map_err(io)?;
    // The size alone is estimated at a fast level (a few ms for a 700 KB tokenizer, where
    // the stored level takes 300): a little larger than it would be stored, which only leans
    // towards the dictionary in close cases.
    let estimate = zstd::bulk::compress(&data, ESTIMATE_LEVEL).map_err(io)?;
    let use_dict = (with_dict.len() as u64).saturating_add(min_dict_gain) <= estimate.len() as u64;
    let stored = match use_dict {
        true => with_dict,
        false => ContainerWriter::compress(&data, None).map_err(io)?,
    };
    let offset = w.append(&stored)?;
    Ok(entry(Blob::Zstd {
        offset,
        len: stored.len() as u64,
        dict: use_dict.then(|| a.rel.clone()),
        dict_hash: use_dict.then(|| hash::hex(&hash::bytes(&d))),
    }))
}

struct Ctx<'a> {
    base: &'a Checkpoint,
    ft: &'a Checkpoint,
    pairings: &'a [Pairing],
    chunk_bytes: usize,
    /// Each tensor's codec decision.
    plans: Vec<TensorPlan>,
    /// Whether chunks record their error (any tensor may be lossy).
    measure: bool,
    /// The plans decided elsewhere, whose chunks are checked as they are written.
    fixed: &'a std::collections::HashMap<String, tune::FixedPlan>,
}

impl Ctx<'_> {
    fn target(&self, tensor: usize) -> &TensorRef {
        &self.ft.tensors[self.pairings[tensor].target]
    }

    fn source(&self, tensor: usize) -> Option<&TensorRef> {
        self.pairings[tensor].source.map(|i| &self.base.tensors[i])
    }

    fn encode(&self, job: &Job) -> Encoded {
        let p = &self.pairings[job.tensor];
        let t = self.target(job.tensor);
        let target = &self.ft.bytes(t)[job.range.clone()];
        let (sdt, src): (_, &[u8]) = match self.source(job.tensor) {
            Some(s) => (s.dtype, self.base.bytes(s)),
            None => (t.dtype, &[]),
        };
        let source_hashes = job.hash_source(src, self.chunk_bytes);
        // Only float tensors of whole bytes per element are ever lossy.
        let first = (job.range.start / (t.dtype.bitsize() / 8).max(1)) as u64;
        if let Some(cp) = self.plans[job.tensor].chunk_params(first) {
            // Lossy: the fingerprint and error are those of what `apply` will rebuild.
            let pred = &src[job.range.clone()];
            let mut recon = vec![0u8; target.len()];
            let payload = lossy::encode(t.dtype, &cp, pred, target, &mut recon);
            return Encoded {
                changed: changed_elements(t.dtype, pred, &recon),
                payload: Some(payload),
                codec: ChunkCodec::Lossy,
                target_hash: hash::chunk(&recon),
                rebuilt_hash: xxh3_64(&recon),
                source_hashes,
                quality: Some(QualitySums::chunk(t.dtype, pred, target, &recon)),
            };
        }
        let (payload, codec, quality, changed) = SCRATCH.with(|s| {
            let (scratch, buf) = &mut *s.borrow_mut();
            let pred = pair::predict(p.relation, sdt, t.dtype, src, job.range.clone(), buf);
            let quality =
                (self.measure && p.relation == Relation::Direct && crate::codec::float::lossy_capable(t.dtype))
                    .then(|| QualitySums::chunk(t.dtype, pred, target, target));
            let same = p.relation != Relation::New;
            let layout = dtype::layout(t.dtype);
            let (codec, payload, counted) = encode_exact_chunk(layout, pred, target, same, scratch);
            // The coders count elements of their layout's width: the dtype's, but for complex
            // dtypes (coded as two floats) and sub-byte ones (coded as bytes).
            let changed = match codec {
                ChunkCodec::Same => 0,
                _ if layout.width == t.dtype.bitsize() / 8 => counted,
                _ => changed_elements(t.dtype, pred, target),
            };
            (payload, codec, quality, changed)
        });
        Encoded {
            changed,
            rebuilt_hash: xxh3_64(target),
            payload,
            codec,
            // Lossy chunks return above with the fingerprint of their reconstruction.
            target_hash: hash::chunk(target),
            source_hashes,
            quality,
        }
    }

    fn release(&self, job: &Job) {
        let t = self.target(job.tensor);
        self.ft.release(t, job.range.clone());
        if let Some(s) = self.source(job.tensor) {
            let read = pair::source_range(
                self.pairings[job.tensor].relation,
                s.dtype,
                t.dtype,
                job.range.clone(),
                s.len(),
            );
            self.base.release(s, job.source_span(self.chunk_bytes, s.len(), read));
        }
    }
}

/// Decides every tensor's codec (exact unless the policy says otherwise), writing
/// tensor-wide parameters to the container.
fn plan_codecs(
    w: &mut ContainerWriter,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<Vec<(TensorPlan, Option<Payload>)>> {
    let exact = || (TensorPlan::EXACT, None);
    if opts.codecs.is_exact() {
        return Ok(plan.pairings.iter().map(|_| exact()).collect());
    }
    progress.begin("analyse", ft.tensors.iter().map(|t| t.len() as u64).sum());
    let mut out = Vec::with_capacity(plan.pairings.len());
    for p in &plan.pairings {
        let t = &ft.tensors[p.target];
        let src = p.source.map(|i| &base.tensors[i]);
        let decided = match src {
            Some(s) if p.relation == Relation::Direct && s.dtype == t.dtype => {
                let release = |r: std::ops::Range<usize>| {
                    base.release(s, r.clone());
                    ft.release(t, r);
                };
                let view = TensorView {
                    name: &t.name,
                    dtype: t.dtype,
                    shape: &t.shape,
                    base: base.bytes(s),
                    target: ft.bytes(t),
                    chunk_bytes: opts.chunk_bytes,
                    release: &release,
                };
                let tp = tune::plan(&opts.codecs, &view, &t.name)?;
                base.release(s, 0..s.len());
                ft.release(t, 0..t.len());
                let payload = match tp.params() {
                    Some(b) => Some(Payload {
                        offset: w.append(&b)?,
                        len: b.len() as u64,
                        checksum: index::checksum(&b),
                    }),
                    None => None,
                };
                (tp, payload)
            }
            _ => exact(),
        };
        progress.advance(t.len() as u64);
        if progress.cancelled() {
            return Err(Error::Interrupted);
        }
        out.push(decided);
    }
    progress.finish();
    Ok(out)
}

fn encode_tensors(
    w: &mut ContainerWriter,
    base: &Checkpoint,
    ft: &Checkpoint,
    plan: &Plan,
    opts: &MakeOptions,
    progress: &dyn Progress,
) -> Result<Vec<TensorEntry>> {
    let chunk_bytes = opts.chunk_bytes;
    let decided = plan_codecs(w, base, ft, plan, opts, progress)?;
    let mut params = Vec::with_capacity(decided.len());
    let mut plans = Vec::with_capacity(decided.len());
    for (tp, payload) in decided {
        plans.push(tp);
        params.push(payload);
    }
    let ctx = Ctx {
        base,
        ft,
        pairings: &plan.pairings,
        chunk_bytes,
        plans,
        measure: !opts.codecs.is_exact(),
        fixed: &opts.codecs.fixed,
    };
    let jobs: Vec<Job> = plan
        .pairings
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            let src_len = ctx.source(i).map_or(0, |s| s.len());
            schedule::jobs(i, ft.tensors[p.target].len(), src_len, chunk_bytes)
        })
        .collect();
    progress.begin("make", ft.tensors.iter().map(|t| t.len() as u64).sum());
    let mut sink = Collector {
        w,
        entries: Vec::with_capacity(plan.pairings.len()),
        chunks: Vec::new(),
        target_hashes: Vec::new(),
        source_hashes: Vec::new(),
        quality: None,
        changed: 0,
        params,
    };
    // Workers encode chunks while this thread writes them in order.
    schedule::ordered(&jobs, |j| ctx.encode(j), |j, e| sink.consume(&ctx, j, e, progress))?;
    progress.finish();
    Ok(sink.entries)
}

/// Consumes encoded chunks in job order: writes payloads, gathers fingerprints, finishes entries.
struct Collector<'w> {
    w: &'w mut ContainerWriter,
    entries: Vec<TensorEntry>,
    chunks: Vec<Chunk>,
    target_hashes: Vec<Digest>,
    source_hashes: Vec<Digest>,
    /// Error sums of the current tensor.
    quality: Option<QualitySums>,
    /// Changed elements of the current tensor.
    changed: u64,
    /// Each tensor's parameter blob, taken when its entry is made.
    params: Vec<Option<Payload>>,
}

impl Collector<'_> {
    fn consume(&mut self, ctx: &Ctx, job: &Job, enc: Encoded, progress: &dyn Progress) -> Result<()> {
        if !job.range.is_empty() {
            self.chunks.push(match enc.payload {
                None => Chunk {
                    codec: ChunkCodec::Same,
                    offset: 0,
                    len: 0,
                    checksum: index::checksum(&[]),
                    rebuilt: Some(index::quick_hex(enc.rebuilt_hash)),
                },
                Some(p) => Chunk {
                    codec: enc.codec,
                    offset: self.w.append(&p)?,
                    len: p.len() as u64,
                    checksum: index::checksum(&p),
                    rebuilt: Some(index::quick_hex(enc.rebuilt_hash)),
                },
            });
            self.target_hashes.push(enc.target_hash);
        }
        if let Some(q) = &enc.quality {
            self.quality.get_or_insert_with(QualitySums::default).add(q);
        }
        self.source_hashes.extend(enc.source_hashes);
        self.changed += enc.changed;
        ctx.release(job);
        progress.advance(job.range.len() as u64);
        if progress.cancelled() {
            return Err(Error::Interrupted);
        }
        if job.last {
            let chunks = std::mem::take(&mut self.chunks);
            let mut entry = ctx.entry(job.tensor, chunks, &self.target_hashes, &self.source_hashes);
            entry.codec = ctx.plans[job.tensor].codec.clone();
            entry.params = self.params[job.tensor].take();
            entry.changed = Some(std::mem::take(&mut self.changed));
            if let Some(f) = ctx.fixed.get(&entry.name) {
                check_payloads(&entry, f)?;
            }
            let measured = self.quality.take();
            if ctx.measure {
                let q = measured.unwrap_or_default();
                entry.quality = Some(q.quality(entry.stored_bytes(), entry.numel()));
            }
            self.entries.push(entry);
            self.target_hashes.clear();
            self.source_hashes.clear();
        }
        Ok(())
    }
}

/// Fails when a tensor with a plan decided elsewhere did not come out as that plan's delta
/// did (a re-made 1-bit delta whose signs differ: another fine-tune).
fn check_payloads(entry: &TensorEntry, f: &tune::FixedPlan) -> Result<()> {
    if f.payloads.is_empty() || entry.chunks.iter().map(|c| &c.checksum).eq(f.payloads.iter()) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "tensor '{}' codes differently from the delta its plan came from: the base or the fine-tune is not the one that delta was made from",
        entry.name
    )))
}

impl Ctx<'_> {
    fn entry(
        &self,
        tensor: usize,
        chunks: Vec<Chunk>,
        target_hashes: &[Digest],
        source_hashes: &[Digest],
    ) -> TensorEntry {
        let t = self.target(tensor);
        let cb = self.chunk_bytes as u64;
        let source = self.source(tensor).map(|s| SourceTensor {
            name: s.name.clone(),
            dtype: dtype::name(s.dtype),
            shape: s.shape.iter().map(|&d| d as u64).collect(),
            hash: hash::hex(&hash::tensor(s.len() as u64, cb, source_hashes)),
        });
        TensorEntry {
            name: t.name.clone(),
            dtype: dtype::name(t.dtype),
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            data_offsets: [t.data_offsets.0 as u64, t.data_offsets.1 as u64],
            relation: self.pairings[tensor].relation,
            source,
            hash: hash::hex(&hash::tensor(t.len() as u64, cb, target_hashes)),
            chunks,
            codec: None,
            params: None,
            quality: None,
            changed: None,
        }
    }
}
