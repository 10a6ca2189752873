//! Hot swap: a base model held in memory, switched between its fine-tunes in place.
//!
//! [`Resident::load`] reads a base checkpoint once into one buffer per tensor and takes its
//! fingerprints. [`Resident::switch_to`] turns it into a fine-tune by decoding the fine-tune's
//! delta into those very buffers, chunk by chunk on all cores, touching only the chunks the
//! delta changes and reading only the delta; `switch_to(None)` turns it back into the base, bit
//! for bit, without reading the base again. Going from one fine-tune to another reverts the
//! first, then applies the second. [`Resident::switch_to_chain`] holds the model a chain of
//! deltas rebuilds (see [`crate::chain`]): the links it shares with the chain held are kept,
//! so going from a model to a child of it (the next checkpoint of a training run, or a
//! fine-tune coded against another with `make --parent`) applies one link, and going back
//! reverts one. A serving loop reads the weights with [`Resident::tensor`].
//!
//! ```no_run
//! use deltapack::hotswap::Resident;
//! use std::path::Path;
//!
//! let mut model = Resident::load(Path::new("base/"))?;
//! model.switch_to(Some(Path::new("ft-a.dpk")))?; // the weights are now fine-tune A's
//! let w = model.tensor("model.embed_tokens.weight").expect("a tensor of A");
//! println!("{} {:?} {:?}: {} bytes", w.name, w.dtype, w.shape, w.bytes.len());
//! model.switch_to(Some(Path::new("ft-b.dpk")))?; // reverts A, applies B
//! model.switch_to(None)?; // the base again, bit for bit
//! # Ok::<(), deltapack::Error>(())
//! ```
//!
//! # Checks
//!
//! A delta applies only to the base it was made from: every base tensor it reads must match the
//! fingerprint it records, compared with the BLAKE3 fingerprints the model takes of its base
//! (at load, or at a delta's first use for another chunk size). Every payload is checked
//! against its checksum, and every chunk of a tensor a switch rebuilds against the xxh3 hash
//! of its rebuilt bytes that the delta records (format 1.3; a tensor of an older delta is
//! checked against its BLAKE3 fingerprint). A revert is checked against xxh3 hashes of the
//! chunks it restores: the base's, taken with its fingerprints, or those a link below
//! recorded. These are checks against bugs and corruption, at a fifth of BLAKE3's cost, which
//! was a sixth of a switch's time; deltas and chains are matched to the BLAKE3 fingerprints. A failure
//! never leaves the model half-switched: errors found before any tensor changes (an unreadable
//! or corrupt index, a wrong base) leave it as it was; an error while decoding undoes what was
//! switched so far and re-applies the fine-tune held before (re-read from its delta; should
//! that fail too, the model is left at its base: [`Resident::active`] tells).
//!
//! # Chains
//!
//! Every link is checked as `apply` checks a chain: it must record the fingerprint of the
//! model before it, and every tensor it reads must have the fingerprint of the tensor the
//! links below rebuilt (as they record it, each chunk checked when rebuilt). A link after the first may
//! rewrite base tensors in place, in their dtype, resizing at most their first dimension, and
//! keeps every other tensor as the model before it has it (whatever the first link did to
//! it); a link that adds, removes or converts a tensor, or is coded at another chunk size than
//! the first, is refused when it is reached, and the model goes back to the chain it held.
//! Each link keeps what reverting it needs, as a single delta does, and the xxh3 hash of each
//! chunk of the tensors it rewrote (8 bytes a chunk); reverting a later link checks the
//! restored chunks against those of the link below, the first link against the base's.
//!
//! # Reverting, and what it costs
//!
//! The exact codec takes each element's context from the base value, so a delta cannot be
//! decoded backwards from the fine-tune's values alone. But the context is only the base
//! value's exponent field, and a fine-tune rarely moves a value to another binade. So for each
//! exact chunk it rewrites, the model keeps the base exponent of every value whose exponent
//! changed, and keeps the delta file open. To revert, the fine-tune's values with those
//! exponents patched in give the very contexts of the forward decode; the chunk's payload, read
//! again from the delta, then decodes to the same differences, and the base is the fine-tune
//! minus them. Reverting costs one decode, as switching does, and nothing needs encoding.
//!
//! The delta file must therefore stay as it was while its fine-tune is active: deleting it or
//! renaming another file over it is safe (the model holds the open file), rewriting it in place
//! is not. Every payload is checked against its checksum before a revert changes anything, so
//! a rewritten file is refused with the model still at its fine-tune.
//!
//! Lossy chunks cannot be replayed so (the rebuilt value does not determine the base), nor can
//! tensors whose dtype changed: for those the model keeps the base's values exactly coded
//! against the fine-tune's (a reverse delta, about the size of an exact delta of that tensor,
//! encoded while switching).
//!
//! Memory held to revert ([`Resident::undo_bytes`]): for exact deltas, about one byte for each
//! value whose exponent changed, as the payloads are read again from the delta to revert; for
//! lossy tensors and dtype changes, the reverse delta. The delta's pages are not held as such:
//! those of a delta up to 64 MiB ([`Resident::set_keep_mapped`]) stay mapped while its
//! fine-tune is active, clean page cache that the kernel reclaims under memory pressure; a
//! larger delta's are dropped chunk by chunk. Beyond that, a switch holds a few chunks per
//! thread, and each thread keeps its scratch buffers between switches (about a chunk, the
//! decode tables of up to a MiB, and 13 bytes per changed value of the largest `changes` chunk
//! it decoded). A tensor only the fine-tune has takes its own size (the base's tensor of the
//! same name, if any, stays in memory, hidden; so do base tensors the fine-tune lacks). A
//! tensor whose first dimension grows is grown in place; one that shrinks keeps the rows it
//! dropped aside until reverted (counted in [`Resident::undo_bytes`]); one whose dtype changes
//! is held in both dtypes while it converts. Only weights are swapped: the fine-tune's config and
//! tokenizer files are not read.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::apply::plan_of;
use crate::checkpoint::Checkpoint;
use crate::codec;
use crate::codec::plan::TensorPlan;
use crate::codec::replay::{self, FixWriter};
use crate::codec::{changes, exact};
use crate::container::index::{Chunk, ChunkCodec, SourceTensor, TensorEntry};
use crate::container::Delta;
use crate::dtype::{self, ElementLayout};
use crate::hash::{self, Digest};
use crate::pair::{self, Relation};
use crate::{BasePart, Error, ExpectedBase, Result};
use xxhash_rust::xxh3::xxh3_64;

/// A model held in memory: a base checkpoint, switchable in place to any fine-tune delta of it.
pub struct Resident {
    root: PathBuf,
    /// The base's tensors, in checkpoint order; while a fine-tune is active, some hold its bytes.
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    /// Chunk fingerprints of the base, by chunk size, slot and chunk.
    prints: BTreeMap<usize, Vec<Vec<ChunkPrint>>>,
    /// The links applied, from the delta made against the base to the last child; empty at
    /// the base.
    active: Vec<Active>,
    /// Deltas up to this size stay mapped while active (see [`Resident::set_keep_mapped`]).
    keep_mapped: u64,
}

/// One tensor of a [`Resident`] model, as a serving loop reads it.
#[derive(Debug, Clone, Copy)]
pub struct ResidentTensor<'a> {
    /// Name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// The values, little-endian as in safetensors. The buffer's alignment is the allocator's.
    pub bytes: &'a [u8],
}

/// What a [`Resident::switch_to`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SwitchReport {
    /// Chunks of the previous fine-tune restored to the base's bytes first.
    pub reverted_chunks: usize,
    /// Tensors of the new fine-tune rewritten or added (the others are the base's, untouched).
    pub tensors: usize,
    /// Chunks decoded from the delta.
    pub chunks: usize,
    /// Bytes of tensor data rewritten (reverted and decoded).
    pub bytes: u64,
    /// Memory held to revert after the switch, as [`Resident::undo_bytes`] reports it.
    pub undo_bytes: u64,
}

/// What the model knows of one chunk of a base tensor.
#[derive(Clone, Copy)]
struct ChunkPrint {
    /// Its BLAKE3 hash, as deltas record the base's fingerprints.
    digest: Digest,
    /// Its xxh3-64 hash, to check a revert restored it: an internal check against bugs, not
    /// tampering, where BLAKE3 took a sixth of a switch's time.
    quick: u64,
}

/// The hashes of a chunk a switch rebuilt: xxh3, checked against the hash the delta records
/// (format 1.3) and kept to check reverts; BLAKE3 too for a tensor of an older delta, which
/// records nothing else to check it against (its fingerprint is over BLAKE3 chunk hashes).
#[derive(Clone, Copy)]
struct Rebuilt {
    quick: u64,
    digest: Option<Digest>,
}

impl Rebuilt {
    fn of(bytes: &[u8], legacy: bool) -> Rebuilt {
        Rebuilt {
            quick: xxh3_64(bytes),
            digest: legacy.then(|| hash::chunk(bytes)),
        }
    }
}

/// A base tensor as a link left it.
struct Rewritten {
    /// Its fingerprint as the link records it (each rebuilt chunk was checked): what the
    /// next link's source must match.
    print: String,
    /// The xxh3-64 hash of each chunk: what reverting the next link must restore.
    quick: Vec<u64>,
}

impl ChunkPrint {
    fn of(bytes: &[u8]) -> ChunkPrint {
        ChunkPrint {
            digest: hash::chunk(bytes),
            quick: xxh3_64(bytes),
        }
    }
}

struct Slot {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte length of the base tensor.
    len: usize,
    /// The base's bytes, or the active fine-tune's in their place (longer when it grew the
    /// first dimension; of another dtype when it converted the tensor).
    bytes: Vec<u8>,
}

/// One link of the chain a [`Resident`] holds, and how to go back to the model before it.
struct Active {
    /// The [`Index::model_fingerprint`](crate::container::index::Index::model_fingerprint)
    /// of what it rebuilds: links equal to the held ones are kept by a switch.
    print: String,
    /// Its delta, kept open (mapped; see [`Resident::set_keep_mapped`] for its pages): reverting reads the
    /// payloads of exact chunks again rather than holding copies.
    delta: Arc<Mapped>,
    /// The fine-tune's tensors, in the delta's order.
    view: Vec<ViewEntry>,
    by_name: HashMap<String, usize>,
    /// Tensors that are not rewritten base tensors.
    fresh: Vec<Vec<u8>>,
    /// Their fingerprints, as the link records them, for a next link's sources.
    fresh_prints: Vec<String>,
    /// One record per base tensor rewritten in place.
    undo: Vec<SlotUndo>,
    /// The slots it rewrote, as they are after it.
    rewritten: HashMap<usize, Rewritten>,
}

impl Active {
    fn chunk_bytes(&self) -> usize {
        self.delta.index.chunk_bytes as usize
    }

    /// Checks every payload a revert will read again against its checksum, in parallel.
    fn check_payloads(&self, slots: &[Slot]) -> Result<()> {
        let d = &self.delta;
        self.undo
            .par_iter()
            .flat_map(|u| u.chunks.par_iter().map(move |c| (u.slot, c)))
            .try_for_each(|(slot, c)| {
                let ChunkUndo::Replay { chunk, .. } = c else {
                    return Ok(());
                };
                let checked = d.chunk_payload(&slots[slot].name, chunk).map(drop);
                d.done_with(chunk);
                checked
            })
    }
}

#[derive(Clone)]
struct ViewEntry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
    place: Place,
}

#[derive(Clone, Copy)]
enum Place {
    Base(usize),
    /// A buffer of the link at this depth: its `fresh[j]`.
    Fresh {
        link: usize,
        j: usize,
    },
}

struct SlotUndo {
    slot: usize,
    /// The slot's byte length before the link, to which a revert truncates it.
    len_before: usize,
    /// Dtype of the bytes now in the slot (the base's unless the fine-tune converted it).
    dtype: Dtype,
    chunks: Vec<ChunkUndo>,
    /// The bytes beyond the tensor's new length when the link shrank its first dimension,
    /// split off the slot (whose length is always the tensor's as the model holds it) and
    /// put back by a revert.
    tail: Vec<u8>,
}

enum ChunkUndo {
    /// An exact chunk at `start..start + len` of the slot: where its forward payload is in
    /// the active delta (read again, and checked, to revert), and the base exponents that
    /// differ from the fine-tune's (see [`FixWriter`]).
    Replay {
        chunk: Chunk,
        start: usize,
        len: usize,
        fixes: Vec<u8>,
    },
    /// Base bytes `old` exactly coded against a prediction from the fine-tune's bytes `new`.
    Reverse {
        new: Range<usize>,
        old: Range<usize>,
        payload: Vec<u8>,
    },
}

impl ChunkUndo {
    fn bytes(&self) -> usize {
        match self {
            ChunkUndo::Replay { fixes, .. } => fixes.len(),
            ChunkUndo::Reverse { payload, .. } => payload.len(),
        }
    }

    /// The bytes of the slot that reverting this chunk rewrites, before any truncation.
    fn range(&self) -> Range<usize> {
        match self {
            ChunkUndo::Replay { start, len, .. } => *start..start + len,
            ChunkUndo::Reverse { old, .. } => old.clone(),
        }
    }
}

/// How one delta tensor is rebuilt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Over its own base tensor, in place (same name and dtype).
    InPlace(usize),
    /// From its own base tensor of another dtype, into a new buffer that then replaces it.
    Convert(usize),
    /// Into a buffer of its own (a new tensor, or one predicted from another base tensor).
    Fresh,
}

struct Planned<'d> {
    t: &'d TensorEntry,
    /// Whether its rebuilt chunks are checked with BLAKE3 (see [`Rebuilt`]).
    legacy: bool,
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
    source: Option<usize>,
    kind: Kind,
    plan: TensorPlan,
}

#[derive(Default)]
struct Scratch {
    /// A decoded chunk, in its first bytes (see [`room`]).
    out: Vec<u8>,
    pred: Vec<u8>,
    buf: Vec<u8>,
    fixes: Vec<u8>,
    /// Elements [`replay::patch_exponents`] replaced: position and former bits.
    saved: Vec<(usize, u64)>,
    exact: exact::Scratch,
    changes: changes::Changes,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// Grows a scratch buffer to at least `len` bytes, never shrinking it: it serves chunks of
/// every size, and shrinking it for a small tensor's chunk would make the next full chunk
/// zero its whole length again. Callers use its first `len` bytes.
fn room(buf: &mut Vec<u8>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

impl Resident {
    /// Loads a base checkpoint (a model directory or a `.safetensors` file) into memory and
    /// fingerprints it; the checkpoint is not read again.
    ///
    /// Memory: the base's tensors, once. Fingerprints are taken at `make`'s default chunk size;
    /// a delta made with another `--chunk-bytes` is fingerprinted from memory when first used.
    pub fn load(base: &Path) -> Result<Resident> {
        let ck = Checkpoint::open(base)?;
        let cb = crate::MakeOptions::default().chunk_bytes;
        let mut slots = Vec::with_capacity(ck.tensors.len());
        let mut prints = Vec::with_capacity(ck.tensors.len());
        for t in &ck.tensors {
            let src = ck.bytes(t);
            let mut bytes = vec![0u8; src.len()];
            let digests = bytes
                .par_chunks_mut(cb)
                .zip(src.par_chunks(cb))
                .map(|(d, s)| {
                    d.copy_from_slice(s);
                    ChunkPrint::of(d)
                })
                .collect();
            ck.release(t, 0..src.len());
            prints.push(digests);
            slots.push(Slot {
                name: t.name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                len: src.len(),
                bytes,
            });
        }
        let by_name = slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Ok(Resident {
            root: ck.root.clone(),
            slots,
            by_name,
            prints: BTreeMap::from([(cb, prints)]),
            active: Vec::new(),
            keep_mapped: KEEP_MAPPED,
        })
    }

    /// Sets the size of the largest delta whose pages stay mapped while its fine-tune is
    /// active (default 64 MiB); a larger one's pages are dropped as each chunk is used, and
    /// read again from the file to revert.
    ///
    /// Kept pages are clean page cache, which the kernel reclaims under memory pressure, but
    /// they count in the process's resident memory. Dropping them chunk by chunk costs a TLB
    /// shootdown on every core per chunk: on a 4.6 MB delta, about 3 % of a switch. Takes
    /// effect from the next switch.
    pub fn set_keep_mapped(&mut self, bytes: u64) {
        self.keep_mapped = bytes;
    }

    /// The base checkpoint's path, as given to [`Resident::load`].
    pub fn base(&self) -> &Path {
        &self.root
    }

    /// The delta whose fine-tune the model holds (the last link of its chain), or `None`
    /// for the base.
    pub fn active(&self) -> Option<&Path> {
        self.active.last().map(|a| a.delta.path.as_path())
    }

    /// The chain of deltas the model holds, from the one made against the base; empty at
    /// the base.
    pub fn active_chain(&self) -> Vec<&Path> {
        self.active.iter().map(|a| a.delta.path.as_path()).collect()
    }

    /// Bytes held to revert the active fine-tune to the base (0 at the base).
    pub fn undo_bytes(&self) -> u64 {
        let undo = self.active.iter().flat_map(|a| &a.undo);
        undo.map(|u| u.tail.len() as u64 + u.chunks.iter().map(|c| c.bytes() as u64).sum::<u64>())
            .sum()
    }

    /// A tensor of the model as it is now (the base's, or the active fine-tune's).
    pub fn tensor(&self, name: &str) -> Option<ResidentTensor<'_>> {
        match self.active.last() {
            None => self.by_name.get(name).map(|&i| self.base_tensor(i)),
            Some(a) => a.by_name.get(name).map(|&v| self.view_tensor(a, v)),
        }
    }

    /// Every tensor of the model as it is now, in checkpoint (or delta) order.
    pub fn tensors(&self) -> impl Iterator<Item = ResidentTensor<'_>> + '_ {
        let n = self.active.last().map_or(self.slots.len(), |a| a.view.len());
        (0..n).map(move |i| match self.active.last() {
            None => self.base_tensor(i),
            Some(a) => self.view_tensor(a, i),
        })
    }

    fn base_tensor(&self, i: usize) -> ResidentTensor<'_> {
        let s = &self.slots[i];
        ResidentTensor {
            name: &s.name,
            dtype: s.dtype,
            shape: &s.shape,
            bytes: &s.bytes[..s.len],
        }
    }

    fn view_tensor<'a>(&'a self, a: &'a Active, v: usize) -> ResidentTensor<'a> {
        let e = &a.view[v];
        let bytes = match e.place {
            Place::Base(i) => &self.slots[i].bytes[..e.len],
            Place::Fresh { link, j } => &self.active[link].fresh[j][..],
        };
        ResidentTensor {
            name: &e.name,
            dtype: e.dtype,
            shape: &e.shape,
            bytes,
        }
    }

    /// Switches the model to the fine-tune of the delta at `delta`, or back to the base with `None`.
    ///
    /// The delta must have been made from this base ([`Error::WrongBase`] otherwise); a delta
    /// made against another delta needs its chain ([`Resident::switch_to_chain`]). On any
    /// error the model is not left half-switched (see the module documentation).
    pub fn switch_to(&mut self, delta: Option<&Path>) -> Result<SwitchReport> {
        self.switch_to_chain(delta.as_slice())
    }

    /// Switches the model to the fine-tune a chain of deltas rebuilds (in order from the one
    /// made against the base, as `apply` takes them), or back to the base with an empty chain.
    ///
    /// Links the model already holds, from the first on, are kept: a switch from a chain to
    /// its continuation applies only the new links, and one back to a shorter chain only
    /// reverts. Each link is checked against the model it continues, as `apply` checks it
    /// ([`Error::WrongParent`]). A link after the first may only rewrite, in place and in
    /// the same dtype (its first dimension may be resized), tensors the model before it
    /// holds as base tensors of that dtype, at the same chunk size as the first, and keeps
    /// every tensor ([`Error::InvalidArgument`] otherwise, found when that link is reached).
    /// On an error the model is taken back to the links it held before (best effort:
    /// [`Resident::active_chain`] tells where it is).
    ///
    /// ```no_run
    /// # use deltapack::hotswap::Resident;
    /// # use std::path::Path;
    /// let mut model = Resident::load(Path::new("base/"))?;
    /// model.switch_to_chain(&["step-100.dpk"])?; // a delta against the base
    /// model.switch_to_chain(&["step-100.dpk", "step-200.dpk"])?; // one link applied
    /// model.switch_to_chain(&["step-100.dpk"])?; // one link reverted
    /// # Ok::<(), deltapack::Error>(())
    /// ```
    pub fn switch_to_chain<P: AsRef<Path>>(&mut self, chain: &[P]) -> Result<SwitchReport> {
        let deltas = chain
            .iter()
            .map(|p| Delta::open(p.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        crate::chain::check_links(&deltas)?;
        let keep = self
            .active
            .iter()
            .zip(&deltas)
            .take_while(|(a, d)| a.print == d.index.model_fingerprint())
            .count();
        let deltas: Vec<Arc<Mapped>> = deltas
            .into_iter()
            .skip(keep)
            .map(|delta| {
                Arc::new(Mapped {
                    release_each: delta.size > self.keep_mapped,
                    delta,
                })
            })
            .collect();
        // Refuse a wrong base before anything changes, where the fingerprints allow. The plan
        // holds after the revert: it reads only what every switch leaves as the base's (names,
        // dtypes, shapes, fingerprints).
        let mut planned = match deltas.first() {
            Some(d) if keep == 0 && self.prints.contains_key(&(d.index.chunk_bytes as usize)) => Some(self.plan(d)?),
            _ => None,
        };
        let previous: Vec<Arc<Mapped>> = self.active[keep..].iter().map(|a| a.delta.clone()).collect();
        let mut report = match self.revert_to(keep) {
            Ok(r) => r,
            Err(e) => {
                self.reapply(keep, &previous);
                return Err(e);
            }
        };
        for d in &deltas {
            match self.push_link(d, planned.take()) {
                Ok(r) => {
                    report.tensors += r.tensors;
                    report.chunks += r.chunks;
                    report.bytes += r.bytes;
                }
                Err(e) => {
                    // Best effort: should a link no longer revert or apply, the model stays
                    // at the longest chain it reached.
                    if self.revert_to(keep).is_ok() {
                        self.reapply(keep, &previous);
                    }
                    return Err(e);
                }
            }
        }
        report.undo_bytes = self.undo_bytes();
        Ok(report)
    }

    /// Applies again the links of `previous` (those the model held above its first `keep`)
    /// that it no longer holds, while they apply; the model holds the first `keep` links and
    /// a start of `previous`.
    fn reapply(&mut self, keep: usize, previous: &[Arc<Mapped>]) {
        for d in &previous[self.active.len() - keep..] {
            if self.push_link(d, None).is_err() {
                break;
            }
        }
    }

    /// Reverts the links above the first `keep`, the last first.
    ///
    /// The payloads a revert reads again are checked first, so that a delta file changed on
    /// disk since the switch is refused with the model still at that link.
    fn revert_to(&mut self, keep: usize) -> Result<SwitchReport> {
        let mut report = SwitchReport::default();
        while self.active.len() > keep {
            let top = self.active.last().expect("above keep");
            if let Err(e) = top.check_payloads(&self.slots) {
                top.delta.done_with_all();
                return Err(e);
            }
            let top = self.active.pop().expect("above keep");
            let r = self.restore(top)?;
            report.reverted_chunks += r.reverted_chunks;
            report.bytes += r.bytes;
        }
        Ok(report)
    }

    /// Applies one more link: a delta against the base when the model holds the base (with
    /// its plan if already made), else one continuing the last link. Undoes it on error.
    fn push_link<'d>(&mut self, d: &'d Arc<Mapped>, planned: Option<Vec<Planned<'d>>>) -> Result<SwitchReport> {
        let cb = d.index.chunk_bytes as usize;
        let planned = match planned {
            Some(p) => p,
            None if self.active.is_empty() => {
                self.fingerprint(cb);
                self.plan(d)?
            }
            None => self.plan_link(d)?,
        };
        let below = self.active.last();
        let mut active = Active {
            print: d.index.model_fingerprint(),
            delta: d.clone(),
            view: below.map(|b| b.view.clone()).unwrap_or_default(),
            by_name: below.map(|b| b.by_name.clone()).unwrap_or_default(),
            fresh: Vec::new(),
            fresh_prints: Vec::new(),
            undo: Vec::new(),
            rewritten: HashMap::new(),
        };
        let mut report = SwitchReport::default();
        let run = self
            .decode_fresh(d, &planned, &mut active, &mut report)
            .and_then(|()| self.decode_converted(d, &planned, &mut active, &mut report))
            .and_then(|()| self.decode_in_place(d, &planned, &mut active, &mut report));
        if let Err(e) = run {
            self.restore(active)?;
            return Err(e);
        }
        if self.active.is_empty() {
            self.view_of_first_link(&planned, &mut active);
        } else {
            // A later link keeps the view, with the shapes of the tensors it resized.
            for p in &planned {
                let v = &mut active.view[active.by_name[&p.t.name]];
                v.shape.clone_from(&p.shape);
                v.len = p.len;
            }
        }
        self.active.push(active);
        Ok(report)
    }

    /// The tensors of the first link, in delta order (a later link keeps its view).
    fn view_of_first_link(&self, planned: &[Planned], active: &mut Active) {
        // The buffers of fresh tensors were made in delta order.
        let mut fresh = 0;
        for p in planned {
            let place = match p.kind {
                Kind::InPlace(i) | Kind::Convert(i) => Place::Base(i),
                Kind::Fresh => {
                    fresh += 1;
                    Place::Fresh { link: 0, j: fresh - 1 }
                }
            };
            active.by_name.insert(p.t.name.clone(), active.view.len());
            active.view.push(ViewEntry {
                name: p.t.name.clone(),
                dtype: p.dtype,
                shape: p.shape.clone(),
                len: p.len,
                place,
            });
        }
    }

    /// The link that last rewrote slot `i`, as the model holds it now.
    fn rewritten(&self, i: usize) -> Option<&Rewritten> {
        self.active.iter().rev().find_map(|a| a.rewritten.get(&i))
    }

    /// The fingerprint of slot `i` as the model holds it now, at chunk size `cb` (the first
    /// link's, once one is applied).
    fn print_now(&self, i: usize, cb: usize) -> String {
        match self.rewritten(i) {
            Some(r) => r.print.clone(),
            None => {
                let digests = self.prints[&cb][i].iter().map(|p| &p.digest);
                hash::hex(&hash::tensor(self.slots[i].len as u64, cb as u64, digests))
            }
        }
    }

    /// The xxh3-64 hashes of slot `i`'s chunks as the model holds it now.
    fn quick_now(&self, i: usize, cb: usize) -> Vec<u64> {
        match self.rewritten(i) {
            Some(r) => r.quick.clone(),
            None => self.prints[&cb][i].iter().map(|p| p.quick).collect(),
        }
    }

    /// The hashes known of slot `i`'s chunks as the model holds it now, for a link about to
    /// rewrite it: the base's, or those the link that last rewrote it kept; none when that
    /// link's delta is `legacy` and needs BLAKE3 hashes only the base's record (see
    /// [`Rebuilt`]): the chunks it leaves are then hashed as it runs.
    fn known_now(&self, i: usize, cb: usize, legacy: bool) -> Vec<Option<Rebuilt>> {
        match self.rewritten(i) {
            None => (self.prints[&cb][i].iter())
                .map(|p| {
                    Some(Rebuilt {
                        quick: p.quick,
                        digest: Some(p.digest),
                    })
                })
                .collect(),
            Some(r) if legacy => vec![None; r.quick.len()],
            Some(r) => (r.quick.iter())
                .map(|&quick| Some(Rebuilt { quick, digest: None }))
                .collect(),
        }
    }

    /// Matches every tensor of a delta continuing the last link with the tensor of the model
    /// it continues, checking it against the fingerprint the delta records: tensors it
    /// changes are rewritten in place, the others kept as they are.
    fn plan_link<'d>(&self, d: &'d Delta) -> Result<Vec<Planned<'d>>> {
        let top = self.active.last().expect("a link to continue");
        let cb = d.index.chunk_bytes as usize;
        let unsupported = |tensor: &str, what: &str| {
            Error::InvalidArgument(format!(
                "{}: tensor '{tensor}' {what}; hot swap continues a chain only with links that \
                 keep every tensor and rewrite base tensors in place, in their dtype (resizing at \
                 most the first dimension), at the first link's chunk size: rebuild this chain \
                 with `deltapack apply`, or switch to a delta of the fine-tune against the base",
                d.path.display()
            ))
        };
        if cb != top.chunk_bytes() {
            let what = format!(
                "is coded in chunks of {cb} bytes, its chain's first link in chunks of {}",
                top.chunk_bytes()
            );
            return Err(unsupported("*", &what));
        }
        let names: BTreeSet<&str> = d.index.tensors().map(|t| t.name.as_str()).collect();
        if let Some(v) = top.view.iter().find(|v| !names.contains(v.name.as_str())) {
            return Err(unsupported(&v.name, "is not in it (a link that removes tensors)"));
        }
        let mut planned = Vec::new();
        for t in d.index.tensors() {
            let dtype = dtype::parse(&t.dtype).expect("validated dtype");
            let shape: Vec<usize> = t.shape.iter().map(|&x| x as usize).collect();
            let v = top
                .by_name
                .get(&t.name)
                .map(|&v| &top.view[v])
                .ok_or_else(|| unsupported(&t.name, "is new (a link that adds tensors)"))?;
            // In place: the same tensor, or the same with its first dimension resized.
            let fits = match t.relation {
                Relation::Direct => v.shape == shape,
                Relation::Resized => true,
                _ => false,
            };
            let source = t.source.as_ref().filter(|s| {
                let same_shape = s.shape.iter().map(|&x| x as usize).eq(v.shape.iter().copied());
                s.name == t.name && fits && v.dtype == dtype && same_shape
            });
            let Some(s) = source else {
                return Err(unsupported(&t.name, "changes dtype or name"));
            };
            let now = match v.place {
                Place::Base(i) => self.print_now(i, cb),
                Place::Fresh { link, j } => self.active[link].fresh_prints[j].clone(),
            };
            if now != s.hash {
                return Err(Error::WrongParent {
                    path: d.path.clone(),
                    reason: format!(
                        "tensor '{}' of the model it continues has different values (fingerprint mismatch)",
                        t.name
                    ),
                });
            }
            if t.unchanged() {
                continue;
            }
            let i = match v.place {
                Place::Base(i) if self.slots[i].dtype == dtype => i,
                _ => return Err(unsupported(&t.name, "is not a base tensor of its dtype")),
            };
            planned.push(Planned {
                t,
                legacy: legacy(t),
                dtype,
                shape,
                len: t.len() as usize,
                source: Some(i),
                kind: Kind::InPlace(i),
                plan: plan_of(d, t)?,
            });
        }
        Ok(planned)
    }

    /// Takes the base's chunk fingerprints at chunk size `cb` from memory, unless known.
    /// The model must hold the base.
    fn fingerprint(&mut self, cb: usize) {
        if self.prints.contains_key(&cb) {
            return;
        }
        let prints = self
            .slots
            .iter()
            .map(|s| s.bytes[..s.len].par_chunks(cb).map(ChunkPrint::of).collect())
            .collect();
        self.prints.insert(cb, prints);
    }

    /// Matches every tensor of the delta with the base tensor it is predicted from, checking
    /// each against the fingerprint the delta records. Needs fingerprints at its chunk size.
    fn plan<'d>(&self, d: &'d Delta) -> Result<Vec<Planned<'d>>> {
        let cb = d.index.chunk_bytes as usize;
        let prints = &self.prints[&cb];
        d.index
            .tensors()
            .map(|t| {
                let dtype = dtype::parse(&t.dtype).expect("validated dtype");
                let source = t
                    .source
                    .as_ref()
                    .map(|s| self.source_slot(d, s, &prints[..], cb))
                    .transpose()?;
                let kind = match source {
                    Some(i) if self.slots[i].name == t.name && self.slots[i].dtype == dtype => Kind::InPlace(i),
                    Some(i) if self.slots[i].name == t.name => Kind::Convert(i),
                    _ => Kind::Fresh,
                };
                Ok(Planned {
                    t,
                    legacy: legacy(t),
                    dtype,
                    // Validated: every dimension fits a usize, and so does the byte length.
                    shape: t.shape.iter().map(|&x| x as usize).collect(),
                    len: t.len() as usize,
                    source,
                    kind,
                    plan: plan_of(d, t)?,
                })
            })
            .collect()
    }

    fn source_slot(&self, d: &Delta, s: &SourceTensor, prints: &[Vec<ChunkPrint>], cb: usize) -> Result<usize> {
        let wrong_or_swapped = |reason: String, swapped: bool| Error::WrongBase {
            path: self.root.clone(),
            part: BasePart::Tensor(s.name.clone()),
            reason,
            expected: ExpectedBase::of(&d.index.base).swapped(swapped),
        };
        let wrong = |reason: String| wrong_or_swapped(reason, false);
        let i = *self.by_name.get(&s.name).ok_or_else(|| wrong("is missing".into()))?;
        let slot = &self.slots[i];
        let shape: Vec<u64> = slot.shape.iter().map(|&x| x as u64).collect();
        if dtype::name(slot.dtype) != s.dtype || shape != s.shape {
            return Err(wrong(format!(
                "is {} {:?}, the delta expects {} {:?}",
                dtype::name(slot.dtype),
                shape,
                s.dtype,
                s.shape
            )));
        }
        let digests = prints[i].iter().map(|p| &p.digest);
        let got = hash::hex(&hash::tensor(slot.len as u64, cb as u64, digests));
        if got != s.hash {
            let swapped = d.index.rebuilds(&s.name, &got);
            return Err(wrong_or_swapped(
                "has different values (fingerprint mismatch)".into(),
                swapped,
            ));
        }
        Ok(i)
    }

    /// Decodes the tensors that get buffers of their own, all chunks in parallel, from the
    /// base tensors as they are before anything is rewritten.
    fn decode_fresh(
        &self,
        d: &Mapped,
        planned: &[Planned],
        active: &mut Active,
        report: &mut SwitchReport,
    ) -> Result<()> {
        let cb = active.chunk_bytes();
        let fresh: Vec<&Planned> = planned.iter().filter(|p| p.kind == Kind::Fresh).collect();
        let mut bufs = Vec::with_capacity(fresh.len());
        for p in &fresh {
            let mut buf = Vec::new();
            zeros_to(&mut buf, p.len, d, p.t)?;
            bufs.push(buf);
        }
        let jobs: Vec<(&Planned, usize, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .flat_map(|(j, b)| {
                let p = fresh[j];
                b.chunks_mut(cb).enumerate().map(move |(k, out)| (p, k, out))
            })
            .collect();
        let digests = jobs
            .into_par_iter()
            .map(|(p, k, out)| {
                let (sdt, src) = p.source.map_or((p.dtype, &[][..]), |i| {
                    let s = &self.slots[i];
                    (s.dtype, &s.bytes[..s.len])
                });
                let range = k * cb..k * cb + out.len();
                let decoded = with_scratch(|s| {
                    let pred = pair::predict(p.t.relation, sdt, p.dtype, src, range, &mut s.buf);
                    decode_chunk(d, p, k, cb, pred, out)
                });
                if let Some(c) = p.t.chunks.get(k) {
                    d.done_with(c);
                }
                decoded?;
                Ok(Rebuilt::of(out, p.legacy))
            })
            .collect::<Result<Vec<_>>>()?;
        // Results come in job order: each tensor's chunks, one tensor after another.
        let mut rest = &digests[..];
        for p in &fresh {
            let (mine, tail) = rest.split_at(p.len.div_ceil(cb));
            rest = tail;
            active.fresh_prints.push(finish(d, p, cb, mine)?.print);
            report.tensors += 1;
            report.chunks += mine.len();
            report.bytes += p.len as u64;
        }
        active.fresh = bufs;
        Ok(())
    }

    /// Rebuilds the tensors whose dtype changed, one at a time (each is held in both dtypes
    /// while it converts), keeping a reverse delta of the base's values.
    fn decode_converted(
        &mut self,
        d: &Mapped,
        planned: &[Planned],
        active: &mut Active,
        report: &mut SwitchReport,
    ) -> Result<()> {
        let cb = active.chunk_bytes();
        for p in planned {
            let Kind::Convert(i) = p.kind else { continue };
            let slot = &self.slots[i];
            let slot_len = slot.len;
            let mut buf = vec![0u8; p.len];
            let done = buf
                .par_chunks_mut(cb)
                .enumerate()
                .map(|(k, out)| convert_chunk(d, p, slot, k, cb, out))
                .collect::<Result<Vec<_>>>()?;
            let (rebuilt, chunks): (Vec<Rebuilt>, Vec<ChunkUndo>) = done.into_iter().unzip();
            let rewritten = finish(d, p, cb, &rebuilt)?;
            self.slots[i].bytes = buf;
            report.chunks += rebuilt.len();
            active.rewritten.insert(i, rewritten);
            active.undo.push(SlotUndo {
                slot: i,
                len_before: slot_len,
                dtype: p.dtype,
                chunks,
                tail: Vec::new(),
            });
            report.tensors += 1;
            report.bytes += p.len as u64;
        }
        Ok(())
    }

    /// Rewrites the base tensors the delta changes in place: only their changed chunks, all in
    /// parallel, each recorded for reverting as soon as it is written.
    fn decode_in_place(
        &mut self,
        d: &Mapped,
        planned: &[Planned],
        active: &mut Active,
        report: &mut SwitchReport,
    ) -> Result<()> {
        let cb = active.chunk_bytes();
        let mut of_slot = vec![None; self.slots.len()];
        for p in planned {
            if let Kind::InPlace(i) = p.kind {
                of_slot[i] = Some((p, active.undo.len(), self.known_now(i, cb, p.legacy)));
                active.undo.push(SlotUndo {
                    slot: i,
                    len_before: self.slots[i].bytes.len(),
                    dtype: p.dtype,
                    chunks: Vec::new(),
                    tail: Vec::new(),
                });
            }
        }
        // Each rewritten tensor's slot and chunk hashes, in slot order.
        let mut digests: Vec<(usize, usize, &Planned, Vec<Option<Rebuilt>>)> = Vec::new();
        let mut jobs = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some((p, u, prior)) = of_slot[i].take() else {
                continue;
            };
            // The length before this link: the base's, or what the first link grew it to.
            let base_len = slot.bytes.len();
            if p.len > slot.bytes.len() {
                // Rows beyond the base's are predicted as zeros: grow with them, in place if
                // the allocator can, and without spare capacity.
                zeros_to(&mut slot.bytes, p.len, d, p.t)?;
            }
            let mut known = Vec::with_capacity(p.t.chunks.len());
            for (k, cur) in slot.bytes[..p.len].chunks_mut(cb).enumerate() {
                let aligned = (k + 1) * cb <= base_len.min(p.len) || (p.len == base_len);
                let same = p.t.chunks[k].codec == ChunkCodec::Same;
                let prior = prior.get(k).copied().flatten().filter(|_| same && aligned);
                known.push(prior);
                if prior.is_none() {
                    // Rows beyond the base's go with the truncation: nothing to restore there.
                    let keep = k * cb < base_len;
                    jobs.push((u, digests.len(), k, p, cur, keep));
                }
            }
            digests.push((i, u, p, known));
        }
        let results: Vec<_> = jobs
            .into_par_iter()
            .map(|(u, t, k, p, cur, keep)| (u, t, k, in_place_chunk(d, p, k, cb, cur, keep)))
            .collect();
        let mut first_error = None;
        for (u, t, k, r) in results {
            match r {
                Ok((rebuilt, undo)) => {
                    active.undo[u].chunks.extend(undo);
                    let p = digests[t].2;
                    digests[t].3[k] = Some(rebuilt);
                    if p.t.chunks[k].codec != ChunkCodec::Same {
                        report.chunks += 1;
                        report.bytes += (p.len - k * cb).min(cb) as u64;
                    }
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        for (i, u, p, known) in digests {
            // A shrunk tensor: the rows it dropped leave the slot, so that a later link sees
            // the slot's length as the tensor's (its added rows predicted as zeros).
            let slot = &mut self.slots[i];
            if p.len < slot.bytes.len() {
                active.undo[u].tail = slot.bytes.split_off(p.len);
            }
            let known: Vec<Rebuilt> = known.iter().map(|h| h.expect("every chunk hashed")).collect();
            active.rewritten.insert(i, finish(d, p, cb, &known)?);
            report.tensors += usize::from(!p.t.unchanged());
        }
        Ok(())
    }

    /// Restores the bytes every tensor `active` rewrote had before it (the base's, for the
    /// first link), and checks them against the hashes of the model below it.
    fn restore(&mut self, active: Active) -> Result<SwitchReport> {
        let cb = active.chunk_bytes();
        let mut report = SwitchReport::default();
        let mut in_place: Vec<(&mut Slot, &SlotUndo)> = Vec::new();
        let mut converted = Vec::new();
        let mut by_slot: Vec<Option<&SlotUndo>> = vec![None; self.slots.len()];
        for u in &active.undo {
            by_slot[u.slot] = Some(u);
            report.reverted_chunks += u.chunks.len();
            report.bytes += u.chunks.iter().map(|c| c.range().len() as u64).sum::<u64>();
        }
        for (slot, u) in self.slots.iter_mut().zip(by_slot) {
            match u {
                Some(u) if u.dtype != slot.dtype => converted.push((slot, u)),
                Some(u) => in_place.push((slot, u)),
                None => {}
            }
        }
        for (slot, u) in converted {
            let mut old = vec![0u8; slot.len];
            let parts = carve(&mut old, u.chunks.iter().map(ChunkUndo::range));
            parts
                .into_par_iter()
                .zip(&u.chunks)
                .for_each(|(out, c)| unconvert_chunk(u.dtype, slot.dtype, &slot.bytes, c, out));
            slot.bytes = old;
        }
        let jobs: Vec<(Dtype, &mut [u8], &ChunkUndo)> = in_place
            .iter_mut()
            .flat_map(|(slot, u)| {
                let dt = slot.dtype;
                carve(&mut slot.bytes, u.chunks.iter().map(ChunkUndo::range))
                    .into_iter()
                    .zip(&u.chunks)
                    .map(move |(cur, c)| (dt, cur, c))
            })
            .collect();
        let d = &active.delta;
        let restored = jobs
            .into_par_iter()
            .map(|(dt, cur, c)| restore_chunk(d, dtype::layout(dt), c, cur))
            .collect::<Vec<bool>>();
        d.done_with_all();
        for (slot, u) in in_place {
            if slot.bytes.len() > u.len_before {
                slot.bytes.truncate(u.len_before);
                slot.bytes.shrink_to_fit();
            }
            slot.bytes.extend_from_slice(&u.tail);
        }
        if restored.contains(&false) {
            return Err(Error::Mismatch {
                path: d.path.clone(),
                tensor: None,
                reason: "the delta changed on disk while the model was reverted from it: load the base again, and rewrite deltas in use only by renaming a new file over them".into(),
            });
        }
        for u in &active.undo {
            self.check_restored(u, cb)?;
        }
        Ok(report)
    }

    /// The chunks a revert rewrote must hash to what they hashed to before the link (xxh3):
    /// at load for the base, as the link below recorded them for a later one.
    fn check_restored(&self, u: &SlotUndo, cb: usize) -> Result<()> {
        let slot = &self.slots[u.slot];
        let len = u.len_before;
        let chunks: BTreeSet<usize> = u
            .chunks
            .iter()
            .flat_map(|c| {
                let r = c.range();
                r.start / cb..r.end.min(len).div_ceil(cb)
            })
            .collect();
        let bytes = |k: usize| &slot.bytes[k * cb..((k + 1) * cb).min(len)];
        let quick = self.quick_now(u.slot, cb);
        if chunks.into_par_iter().any(|k| xxh3_64(bytes(k)) != quick[k]) {
            return Err(Error::Mismatch {
                path: self.root.clone(),
                tensor: Some(slot.name.clone()),
                reason: "reverting did not restore the bytes of the model before the link (a bug: load the base again)"
                    .into(),
            });
        }
        Ok(())
    }
}

/// The default of [`Resident::set_keep_mapped`]: deltas up to this size stay mapped while
/// their fine-tune is active, their pages dropped once, when a revert has read them again.
/// Dropping a chunk's pages costs a TLB shootdown on every core the switch runs on; kept, the
/// pages are clean file pages, which the kernel reclaims under memory pressure like any page
/// cache.
const KEEP_MAPPED: u64 = 64 << 20;

/// A delta opened by a switch, and whether its pages are dropped chunk by chunk.
struct Mapped {
    delta: Delta,
    release_each: bool,
}

impl std::ops::Deref for Mapped {
    type Target = Delta;

    fn deref(&self) -> &Delta {
        &self.delta
    }
}

impl Mapped {
    /// Drops the pages of chunk `c`'s payload, unless the delta stays mapped until
    /// [`Mapped::done_with_all`].
    fn done_with(&self, c: &Chunk) {
        if self.release_each {
            self.release(c.offset, c.len);
        }
    }

    /// Drops every page left mapped by [`Mapped::done_with`].
    fn done_with_all(&self) {
        if !self.release_each {
            self.release(0, self.size);
        }
    }
}

fn corrupt(d: &Delta, t: &TensorEntry, reason: String) -> Error {
    Error::CorruptDelta {
        path: d.path.clone(),
        tensor: Some(t.name.clone()),
        reason,
    }
}

/// Extends `buf` with zeros to `len` bytes, or fails naming the tensor: a delta declares its
/// tensors' sizes (rows predicted as zeros cost it nothing), and one declaring more than the
/// allocator can give must be an error, not an abort.
fn zeros_to(buf: &mut Vec<u8>, len: usize, d: &Delta, t: &TensorEntry) -> Result<()> {
    if buf.try_reserve_exact(len.saturating_sub(buf.len())).is_err() {
        return Err(Error::InvalidArgument(format!(
            "{}: tensor '{}' needs {len} bytes, more memory than can be allocated",
            d.path.display(),
            t.name
        )));
    }
    buf.resize(len, 0);
    Ok(())
}

/// Whether a tensor is checked against its BLAKE3 fingerprint: one of a delta older than
/// format 1.3, whose chunks record no xxh3 hash of their rebuilt bytes.
fn legacy(t: &TensorEntry) -> bool {
    t.chunks.iter().any(|c| c.rebuilt_hash().is_none())
}

/// Checks a rebuilt tensor, given the hashes of every chunk as the model now holds it
/// (`same` ones included, whose bytes are the prediction): against the xxh3 hash each chunk
/// records, or a legacy tensor (see [`legacy`]) against its fingerprint; returns what the
/// model keeps of it.
fn finish(d: &Delta, p: &Planned, cb: usize, chunks: &[Rebuilt]) -> Result<Rewritten> {
    let t = p.t;
    if p.legacy {
        let digests: Vec<Digest> = chunks.iter().map(|r| r.digest.expect("legacy chunks hashed")).collect();
        if hash::hex(&hash::tensor(t.len(), cb as u64, &digests)) != t.hash {
            return Err(corrupt(d, t, "rebuilt tensor does not match its fingerprint".into()));
        }
    } else if chunks.len() != t.chunks.len() {
        return Err(corrupt(d, t, "rebuilt tensor has the wrong number of chunks".into()));
    } else if let Some(k) = (t.chunks.iter().zip(chunks)).position(|(c, r)| c.rebuilt_hash() != Some(r.quick)) {
        return Err(corrupt(d, t, format!("rebuilt chunk {k} does not match its hash")));
    }
    Ok(Rewritten {
        print: t.hash.clone(),
        quick: chunks.iter().map(|r| r.quick).collect(),
    })
}

/// Decodes chunk `k` of a tensor from its prediction into `out`, its payload checked.
fn decode_chunk(d: &Delta, p: &Planned, k: usize, cb: usize, pred: &[u8], out: &mut [u8]) -> Result<()> {
    let c = &p.t.chunks[k];
    let payload = match c.codec {
        ChunkCodec::Same => &[][..],
        _ => d.chunk_payload(&p.t.name, c)?,
    };
    // Only float tensors of whole bytes per element are ever lossy (F4 packs two a byte).
    let first = (k * cb / (p.dtype.bitsize() / 8).max(1)) as u64;
    let decoded = codec::decode_chunk(c.codec, p.dtype, &p.plan, first, pred, payload, out);
    decoded.map_err(|e| corrupt(d, p.t, format!("chunk {k} does not decode: {}", e.0)))
}

/// Rewrites chunk `k` of a base tensor in place (`cur` holds the prediction: the base's bytes,
/// or zeros where the tensor grew); returns its hashes (unchecked) and, if it changed and
/// `keep`, its undo record.
fn in_place_chunk(
    d: &Mapped,
    p: &Planned,
    k: usize,
    cb: usize,
    cur: &mut [u8],
    keep: bool,
) -> Result<(Rebuilt, Option<ChunkUndo>)> {
    let c = &p.t.chunks[k];
    if c.codec == ChunkCodec::Same {
        return Ok((Rebuilt::of(cur, p.legacy), None));
    }
    if c.codec == ChunkCodec::Changes {
        let done = patch_chunk(d, p, k, cb, cur, keep);
        d.done_with(c);
        return done;
    }
    let done = with_scratch(|s| {
        room(&mut s.out, cur.len());
        decode_chunk(d, p, k, cb, cur, &mut s.out[..cur.len()])?;
        let layout = dtype::layout(p.dtype);
        if keep && c.codec != ChunkCodec::Lossy {
            return Ok(replace_exact(c, layout, k * cb, cur, s, p.legacy));
        }
        let undo = keep.then(|| reverse_record(layout, k * cb, cur, s));
        let rebuilt = Rebuilt::of(&s.out[..cur.len()], p.legacy);
        cur.copy_from_slice(&s.out[..cur.len()]);
        Ok((rebuilt, undo))
    });
    d.done_with(c);
    done
}

/// Moves an exact chunk's decoded bytes `s.out` over its base bytes `cur` (at `start` in the
/// tensor), taking the undo record's exponent fixes and hashing the new bytes on the way (with
/// BLAKE3 too if `legacy`), in blocks small enough to stay in cache between the passes.
fn replace_exact(
    c: &Chunk,
    layout: ElementLayout,
    start: usize,
    cur: &mut [u8],
    s: &mut Scratch,
    legacy: bool,
) -> (Rebuilt, Option<ChunkUndo>) {
    const BLOCK: usize = 64 << 10;
    let mut quick = xxhash_rust::xxh3::Xxh3::new();
    let mut h = legacy.then(hash::ChunkHasher::default);
    let mut fix = layout.float.map(FixWriter::new);
    s.fixes.clear();
    let len = cur.len();
    for (b, (old, new)) in cur.chunks_mut(BLOCK).zip(s.out[..len].chunks(BLOCK)).enumerate() {
        if let Some(fix) = &mut fix {
            fix.scan(layout.width, b * BLOCK / layout.width, old, new, &mut s.fixes);
        }
        quick.update(new);
        if let Some(h) = &mut h {
            h.update(new);
        }
        old.copy_from_slice(new);
    }
    let undo = ChunkUndo::Replay {
        chunk: c.clone(),
        start,
        len: cur.len(),
        fixes: s.fixes.clone(),
    };
    let rebuilt = Rebuilt {
        quick: quick.digest(),
        digest: h.map(|h| h.digest()),
    };
    (rebuilt, Some(undo))
}

/// [`in_place_chunk`] for a chunk of the `changes` codec: only its changed elements are
/// touched, in place, and only they are compared for the undo record's exponent fixes.
fn patch_chunk(
    d: &Mapped,
    p: &Planned,
    k: usize,
    cb: usize,
    cur: &mut [u8],
    keep: bool,
) -> Result<(Rebuilt, Option<ChunkUndo>)> {
    let c = &p.t.chunks[k];
    let layout = dtype::layout(p.dtype);
    let payload = d.chunk_payload(&p.t.name, c)?;
    let fixes = with_scratch(|s| {
        s.changes
            .decode(layout, cur, payload)
            .map_err(|e| corrupt(d, p.t, format!("chunk {k} does not decode: {}", e.0)))?;
        s.fixes.clear();
        match layout.float.filter(|_| keep) {
            Some(f) => {
                let (mut fix, fixes) = (FixWriter::new(f), &mut s.fixes);
                s.changes
                    .add_to_watching(layout, cur, f.exponent_field(), |i, old, new| {
                        fix.element(i, old, new, fixes)
                    });
            }
            None => s.changes.add_to(layout, cur),
        }
        Ok::<_, Error>(s.fixes.clone())
    })?;
    let undo = keep.then(|| ChunkUndo::Replay {
        chunk: c.clone(),
        start: k * cb,
        len: cur.len(),
        fixes,
    });
    Ok((Rebuilt::of(cur, p.legacy), undo))
}

/// What reverting a lossy chunk at `start` needs: its base bytes `old` exactly coded against
/// the fine-tune's bytes in `s.out` (a lossy payload cannot be replayed backwards).
fn reverse_record(layout: ElementLayout, start: usize, old: &[u8], s: &mut Scratch) -> ChunkUndo {
    let mut payload = exact::encode(layout, &s.out[..old.len()], old, &mut s.exact);
    payload.shrink_to_fit();
    let range = start..start + old.len();
    ChunkUndo::Reverse {
        new: range.clone(),
        old: range,
        payload,
    }
}

/// Rebuilds chunk `k` of a tensor whose dtype changed into `out`, from the base tensor in
/// `slot`; returns its hashes (checked) and the base's bytes it covers, reverse-coded.
fn convert_chunk(
    d: &Mapped,
    p: &Planned,
    slot: &Slot,
    k: usize,
    cb: usize,
    out: &mut [u8],
) -> Result<(Rebuilt, ChunkUndo)> {
    let new = k * cb..k * cb + out.len();
    let src = &slot.bytes[..slot.len];
    let old = pair::source_range(Relation::Converted, slot.dtype, p.dtype, new.clone(), slot.len);
    let payload = with_scratch(|s| {
        let pred = pair::predict(Relation::Converted, slot.dtype, p.dtype, src, new.clone(), &mut s.buf);
        decode_chunk(d, p, k, cb, pred, out)?;
        s.pred.clear();
        dtype::convert(p.dtype, slot.dtype, out, &mut s.pred);
        let mut payload = exact::encode(dtype::layout(slot.dtype), &s.pred, &src[old.clone()], &mut s.exact);
        payload.shrink_to_fit();
        Ok::<_, Error>(payload)
    })?;
    if let Some(c) = p.t.chunks.get(k) {
        d.done_with(c);
    }
    Ok((Rebuilt::of(out, p.legacy), ChunkUndo::Reverse { new, old, payload }))
}

/// Restores one chunk of a base tensor in place, from the fine-tune's bytes in `cur` (and,
/// for a replayed chunk, its payload in `d`); false if that payload no longer decodes.
fn restore_chunk(d: &Mapped, layout: ElementLayout, c: &ChunkUndo, cur: &mut [u8]) -> bool {
    match c {
        ChunkUndo::Replay { chunk, fixes, .. } => {
            // Checked before the revert began; a payload that decoded forwards decodes again
            // under the same contexts, unless the file was rewritten since.
            let ok = replay(layout, chunk.codec, d.range(chunk.offset, chunk.len), fixes, cur);
            d.done_with(chunk);
            ok
        }
        ChunkUndo::Reverse { payload, .. } => with_scratch(|s| {
            s.pred.clear();
            s.pred.extend_from_slice(cur);
            exact::decode(layout, &s.pred, payload, cur).expect("a reverse delta made in memory decodes");
            true
        }),
    }
}

/// Turns the fine-tune's bytes `cur` of a chunk back into the base's, from the chunk's forward
/// `payload` (of `codec`, `exact` or `changes`) and the base exponents `fixes`; false if the
/// payload does not decode (see [`replay::replay`]).
fn replay(layout: ElementLayout, codec: ChunkCodec, payload: &[u8], fixes: &[u8], cur: &mut [u8]) -> bool {
    with_scratch(|s| {
        room(&mut s.out, cur.len());
        let out = &mut s.out[..cur.len()];
        replay::replay(layout, codec, payload, fixes, cur, &mut s.saved, &mut s.changes, out)
    })
}

/// Restores the base's bytes of one chunk of a converted tensor (`new_bytes` in dtype `now`)
/// into `out`, in the base's dtype `base`.
fn unconvert_chunk(now: Dtype, base: Dtype, new_bytes: &[u8], c: &ChunkUndo, out: &mut [u8]) {
    let ChunkUndo::Reverse { new, payload, .. } = c else {
        unreachable!("converted tensors keep reverse deltas only")
    };
    with_scratch(|s| {
        s.pred.clear();
        dtype::convert(now, base, &new_bytes[new.clone()], &mut s.pred);
        exact::decode(dtype::layout(base), &s.pred, payload, out).expect("a reverse delta made in memory decodes");
    });
}

/// Splits `buf` into the disjoint, increasing `ranges`.
fn carve(buf: &mut [u8], ranges: impl Iterator<Item = Range<usize>>) -> Vec<&mut [u8]> {
    let mut rest = buf;
    let mut at = 0;
    let mut parts = Vec::new();
    for r in ranges {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
        let (part, tail) = tail.split_at_mut(r.len());
        parts.push(part);
        rest = tail;
        at = r.end;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `n` elements of `w` random bytes from `seed`, and a copy with about one in `every`
    /// replaced by other random bytes.
    fn old_and_new(w: usize, seed: u64, n: usize, every: usize) -> (Vec<u8>, Vec<u8>) {
        let mut x = seed | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let old: Vec<u8> = (0..n * w).map(|_| next() as u8).collect();
        let mut new = old.clone();
        for e in new.chunks_exact_mut(w) {
            if (next() as usize).is_multiple_of(every) {
                e.copy_from_slice(&next().to_le_bytes()[..w]);
            }
        }
        (old, new)
    }

    /// The fixes of a whole chunk, in one piece: what the tests compare against.
    fn exponent_fixes(layout: ElementLayout, old: &[u8], new: &[u8], out: &mut Vec<u8>) {
        if let Some(f) = layout.float {
            FixWriter::new(f).scan(layout.width, 0, old, new, out);
        }
    }

    #[test]
    fn carve_splits_in_order() {
        let mut buf: Vec<u8> = (0..10).collect();
        let parts = carve(&mut buf, [1..3, 3..4, 7..10].into_iter());
        let got: Vec<Vec<u8>> = parts.into_iter().map(|p| p.to_vec()).collect();
        assert_eq!(got, vec![vec![1, 2], vec![3], vec![7, 8, 9]]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// An exact chunk moved over its base in blocks gets the fixes and digest of a
        /// whole-chunk scan, whatever the width and wherever the blocks cut.
        #[test]
        fn blocked_replacement_equals_a_whole_scan(
            dt in prop::sample::select(vec![Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64, Dtype::F8_E5M2]),
            seed in any::<u64>(),
            kib in 1usize..300,
            extra in 0usize..64,
            every in 1usize..40,
        ) {
            let layout = dtype::layout(dt);
            let w = layout.width;
            // Partial words and groups of 64 at the end of a later block too.
            let n = kib * 1024 / w + extra;
            let (old, new) = old_and_new(w, seed, n, every);
            let mut full = Vec::new();
            exponent_fixes(layout, &old, &new, &mut full);
            let chunk = Chunk { codec: ChunkCodec::Exact, offset: 0, len: 0, checksum: String::new(), rebuilt: None };
            let mut s = Scratch { out: new.clone(), ..Scratch::default() };
            let mut cur = old.clone();
            let (rebuilt, undo) = replace_exact(&chunk, layout, 0, &mut cur, &mut s, true);
            prop_assert_eq!(&cur, &new);
            prop_assert_eq!(rebuilt.quick, xxh3_64(&new));
            prop_assert_eq!(rebuilt.digest, Some(hash::chunk(&new)));
            let Some(ChunkUndo::Replay { fixes, len, .. }) = undo else { panic!("a replay record") };
            prop_assert_eq!(len, old.len());
            prop_assert_eq!(fixes, full);
        }

    }
}
