//! Carrying a switch out: decoding a delta's tensors into the resident buffers (fresh,
//! converted or in place), and restoring the model below when a link is reverted.

use std::collections::BTreeSet;

use rayon::prelude::*;
use safetensors::Dtype;

use crate::container::index::ChunkCodec;
use crate::dtype;
use crate::pair;
use crate::{Error, Result};
use xxhash_rust::xxh3::xxh3_64;

use super::*;

impl Resident {
    /// Decodes the tensors that get buffers of their own, all chunks in parallel, from the
    /// base tensors as they are before anything is rewritten.
    pub(super) fn decode_fresh(
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
    pub(super) fn decode_converted(
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
            let old = std::mem::replace(&mut self.slots[i].bytes, buf);
            if let Some(kept) = &mut self.replaced {
                kept.push(old);
            }
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
    pub(super) fn decode_in_place(
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
                // the allocator can, and without spare capacity. Views of the buffer handed
                // out must stay valid: then the old buffer is kept, and a new one made.
                match &mut self.replaced {
                    Some(kept) if slot.bytes.capacity() < p.len => {
                        let mut grown = Vec::new();
                        zeros_to(&mut grown, p.len, d, p.t)?;
                        grown[..slot.bytes.len()].copy_from_slice(&slot.bytes);
                        kept.push(std::mem::replace(&mut slot.bytes, grown));
                    }
                    _ => zeros_to(&mut slot.bytes, p.len, d, p.t)?,
                }
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
    pub(super) fn restore(&mut self, mut active: Active) -> Result<SwitchReport> {
        if let Some(kept) = &mut self.replaced {
            kept.append(&mut active.fresh);
        }
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
            let new = std::mem::replace(&mut slot.bytes, old);
            if let Some(kept) = &mut self.replaced {
                kept.push(new);
            }
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
                if self.replaced.is_none() {
                    slot.bytes.shrink_to_fit();
                }
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
    pub(super) fn check_restored(&self, u: &SlotUndo, cb: usize) -> Result<()> {
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
