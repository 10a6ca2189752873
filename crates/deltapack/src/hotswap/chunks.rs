//! One chunk at a time: decoding, rewriting in place with its undo record, converting,
//! restoring, and the delta file a switch holds open.

use std::ops::Range;

use safetensors::Dtype;

use crate::codec;
use crate::codec::exact;
use crate::codec::replay::{self, FixWriter};
use crate::container::index::{Chunk, ChunkCodec, TensorEntry};
use crate::container::{Delta, DeltaBytes};
use crate::dtype::{self, ElementLayout};
use crate::hash::{self, Digest};
use crate::pair::{self, Relation};
use crate::{Error, Result};

use super::*;

/// The default of [`Resident::set_keep_mapped`]: deltas up to this size stay mapped while
/// their fine-tune is active, their pages dropped once, when a revert has read them again.
/// Dropping a chunk's pages costs a TLB shootdown on every core the switch runs on; kept, the
/// pages are clean file pages, which the kernel reclaims under memory pressure like any page
/// cache.
pub(super) const KEEP_MAPPED: u64 = 64 << 20;

/// A delta opened by a switch, and whether its pages are dropped chunk by chunk.
pub(super) struct Mapped {
    pub(super) delta: Delta,
    pub(super) release_each: bool,
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
    pub(super) fn done_with(&self, c: &Chunk) {
        if self.release_each {
            self.release(c.offset, c.len);
        }
    }

    /// Drops every page left mapped by [`Mapped::done_with`].
    pub(super) fn done_with_all(&self) {
        if !self.release_each {
            self.release(0, self.size);
        }
    }
}

pub(super) fn corrupt(d: &Delta, t: &TensorEntry, reason: String) -> Error {
    Error::CorruptDelta {
        path: d.path.clone(),
        tensor: Some(t.name.clone()),
        reason,
    }
}

/// Extends `buf` with zeros to `len` bytes, or fails naming the tensor: a delta declares its
/// tensors' sizes (rows predicted as zeros cost it nothing), and one declaring more than the
/// allocator can give must be an error, not an abort.
pub(super) fn zeros_to(buf: &mut Vec<u8>, len: usize, d: &Delta, t: &TensorEntry) -> Result<()> {
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
pub(super) fn legacy(t: &TensorEntry) -> bool {
    t.chunks.iter().any(|c| c.rebuilt_hash().is_none())
}

/// Checks a rebuilt tensor, given the hashes of every chunk as the model now holds it
/// (`same` ones included, whose bytes are the prediction): against the xxh3 hash each chunk
/// records, or a legacy tensor (see [`legacy`]) against its fingerprint; returns what the
/// model keeps of it.
pub(super) fn finish(d: &Delta, p: &Planned, cb: usize, chunks: &[Rebuilt]) -> Result<Rewritten> {
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
pub(super) fn decode_chunk(d: &Delta, p: &Planned, k: usize, cb: usize, pred: &[u8], out: &mut [u8]) -> Result<()> {
    let c = &p.t.chunks[k];
    let payload = match c.codec {
        ChunkCodec::Same => DeltaBytes::Mapped(&[]),
        _ => d.chunk_payload(&p.t.name, c)?,
    };
    // Only float tensors of whole bytes per element are ever lossy (F4 packs two a byte).
    let first = (k * cb / (p.dtype.bitsize() / 8).max(1)) as u64;
    let decoded = codec::decode_chunk(c.codec, p.dtype, &p.plan, first, pred, &payload, out);
    decoded.map_err(|e| corrupt(d, p.t, format!("chunk {k} does not decode: {}", e.0)))
}

/// Rewrites chunk `k` of a base tensor in place (`cur` holds the prediction: the base's bytes,
/// or zeros where the tensor grew); returns its hashes (unchecked) and, if it changed and
/// `keep`, its undo record.
pub(super) fn in_place_chunk(
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
pub(super) fn replace_exact(
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
pub(super) fn patch_chunk(
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
            .decode(layout, cur, &payload)
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
pub(super) fn reverse_record(layout: ElementLayout, start: usize, old: &[u8], s: &mut Scratch) -> ChunkUndo {
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
pub(super) fn convert_chunk(
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
pub(super) fn restore_chunk(d: &Mapped, layout: ElementLayout, c: &ChunkUndo, cur: &mut [u8]) -> bool {
    match c {
        ChunkUndo::Replay { chunk, fixes, .. } => {
            // Checked before the revert began; a payload that decoded forwards decodes again
            // under the same contexts, unless the file was rewritten since.
            let ok = d
                .range(chunk.offset, chunk.len)
                .is_ok_and(|payload| replay(layout, chunk.codec, &payload, fixes, cur));
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
pub(super) fn replay(layout: ElementLayout, codec: ChunkCodec, payload: &[u8], fixes: &[u8], cur: &mut [u8]) -> bool {
    with_scratch(|s| {
        room(&mut s.out, cur.len());
        let out = &mut s.out[..cur.len()];
        replay::replay(layout, codec, payload, fixes, cur, &mut s.saved, &mut s.changes, out)
    })
}

/// Restores the base's bytes of one chunk of a converted tensor (`new_bytes` in dtype `now`)
/// into `out`, in the base's dtype `base`.
pub(super) fn unconvert_chunk(now: Dtype, base: Dtype, new_bytes: &[u8], c: &ChunkUndo, out: &mut [u8]) {
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
pub(super) fn carve(buf: &mut [u8], ranges: impl Iterator<Item = Range<usize>>) -> Vec<&mut [u8]> {
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
