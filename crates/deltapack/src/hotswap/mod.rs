//! Hot swap: a base model held in memory, switched between its fine-tunes in place.
//!
//! [`Resident::load`] reads a base checkpoint once into one buffer per tensor and takes its
//! fingerprints. [`Resident::switch_to`] turns it into a fine-tune by decoding the fine-tune's
//! delta into those very buffers, chunk by chunk on all cores, touching only the chunks the
//! delta changes and reading only the delta; `switch_to(None)` turns it back into the base, bit
//! for bit, without reading the base again. Going from one fine-tune to another reverts the
//! first, then applies the second. [`Resident::switch_to_chain`] holds the model a chain of
//! deltas rebuilds (see [`Chain`](crate::Chain) and [`make_child`](crate::make_child)): the links it shares with the chain held are kept,
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
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::checkpoint::Checkpoint;
use crate::codec::plan::TensorPlan;
use crate::codec::{changes, exact};
use crate::container::index::{Chunk, TensorEntry};
use crate::container::Delta;
use crate::hash::{self, Digest};
use crate::Result;
use xxhash_rust::xxh3::xxh3_64;

mod chunks;
mod plan;
mod switch;

use chunks::*;

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
    /// With [`Resident::keep_replaced_buffers`]: the buffers a switch replaced or dropped,
    /// until [`Resident::take_replaced_buffers`].
    replaced: Option<Vec<Vec<u8>>>,
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
            replaced: None,
        })
    }

    /// Keeps every tensor buffer a switch would free or move (a tensor grown past its
    /// buffer's capacity, converted to another dtype and back, or only a reverted fine-tune
    /// had) until [`Resident::take_replaced_buffers`], instead of freeing it.
    ///
    /// For callers that hand out views of [`Resident::tensor`]'s bytes which outlive a
    /// switch (Python tensors sharing memory with the model): a view then never points to
    /// freed memory, and the caller frees each buffer once no view of it is left. Buffers
    /// keep their capacity while this is on (a shrunk tensor is not reallocated).
    pub fn keep_replaced_buffers(&mut self) {
        self.replaced.get_or_insert_with(Vec::new);
    }

    /// The buffers kept since the last call (see [`Resident::keep_replaced_buffers`]).
    pub fn take_replaced_buffers(&mut self) -> Vec<Vec<u8>> {
        self.replaced.as_mut().map(std::mem::take).unwrap_or_default()
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
    /// The delta must have been made from this base ([`Error::WrongBase`](crate::Error::WrongBase) otherwise); a delta
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
    /// ([`Error::WrongParent`](crate::Error::WrongParent)). A link after the first may only rewrite, in place and in
    /// the same dtype (its first dimension may be resized), tensors the model before it
    /// holds as base tensors of that dtype, at the same chunk size as the first, and keeps
    /// every tensor ([`Error::InvalidArgument`](crate::Error::InvalidArgument) otherwise, found when that link is reached).
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
}
