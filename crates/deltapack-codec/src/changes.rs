//! The exact codec for chunks where few elements changed: the positions and exact
//! differences of the changed elements only.
//!
//! Decoding copies the prediction and patches the changed elements, so it costs in
//! proportion to the changes rather than to the elements. Consecutive checkpoints of a
//! training run change a fifth to a third of their bf16 values from one to the next, so a
//! chain of such deltas rebuilds several times faster than with the dense [`super::exact`]
//! coder, which spends a symbol on every element, changed or not.
//!
//! Payload: `n_changed: varint`, gaps (an [`ints`] stream, one context: the number of
//! unchanged elements before each changed one), `ctx_lo: u16, ctx_hi: u16`, differences
//! (an [`ints`] stream: the zigzagged difference of the order-preserving integers, under the
//! exponent context of the predicted value, as in [`super::exact`]). Nothing may follow.

use super::exact::{
    choose_context_range, dispatch, from_ordered, mask, to_ordered, unzigzag, zigzag, ContextMap, DecodeError,
};
use super::{ints, rans};
use crate::kernels::{self, Kernel};
use crate::layout::{Element, ElementLayout};

/// Chunks with at most this share of changed elements (in percent) use this codec.
pub const MAX_CHANGED_PERCENT: usize = 30;

/// How many elements of `target` differ from `pred`, when few enough do for this codec
/// (`None` otherwise, found without counting them all; and for an empty chunk).
pub fn few_changed(layout: ElementLayout, pred: &[u8], target: &[u8]) -> Option<u64> {
    dispatch!(layout, few_changed_impl(layout, pred, target))
}

fn few_changed_impl<W: Element, const FLOAT: bool>(layout: ElementLayout, pred: &[u8], target: &[u8]) -> Option<u64> {
    let w = layout.width;
    let n = target.len() / w;
    let limit = n * MAX_CHANGED_PERCENT / 100;
    let mut changed = 0;
    for (p, t) in pred.chunks(BLOCK * w).zip(target.chunks(BLOCK * w)) {
        changed += changed_in::<W>(w, p, t);
        if changed > limit {
            return None;
        }
    }
    (n > 0).then_some(changed as u64)
}

/// Elements counted per block. Counted in blocks, compared as integers of the element's
/// width: a slice comparison per element is a call to memcmp, and stopping at every element
/// keeps the loop scalar.
const BLOCK: usize = 256;

fn changed_in<W: Element>(w: usize, p: &[u8], t: &[u8]) -> usize {
    p.chunks_exact(w)
        .zip(t.chunks_exact(w))
        .filter(|(a, b)| W::load(a) != W::load(b))
        .count()
}

/// Number of elements of `target` that differ from `pred` (same length, whole elements):
/// what a delta records as a tensor's changed values.
pub fn count_changed(layout: ElementLayout, pred: &[u8], target: &[u8]) -> u64 {
    dispatch!(layout, count_changed_impl(layout, pred, target))
}

fn count_changed_impl<W: Element, const FLOAT: bool>(layout: ElementLayout, pred: &[u8], target: &[u8]) -> u64 {
    let w = layout.width;
    pred.chunks(BLOCK * w)
        .zip(target.chunks(BLOCK * w))
        .map(|(p, t)| changed_in::<W>(w, p, t) as u64)
        .sum()
}

/// Encodes `target` against `pred` (same length, whole elements).
pub fn encode(layout: ElementLayout, pred: &[u8], target: &[u8]) -> Vec<u8> {
    assert_eq!(pred.len(), target.len(), "prediction and target lengths differ");
    assert_eq!(target.len() % layout.width, 0, "partial element");
    dispatch!(layout, encode_impl(layout, pred, target))
}

fn encode_impl<W: Element, const FLOAT: bool>(layout: ElementLayout, pred: &[u8], target: &[u8]) -> Vec<u8> {
    let w = layout.width;
    let (lo, hi) = choose_context_range::<W>(layout, pred);
    let cmap = ContextMap::new(layout, lo, hi);
    let (mut gaps, mut diffs, mut ctxs) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = 0usize;
    for (i, (p, t)) in pred.chunks_exact(w).zip(target.chunks_exact(w)).enumerate() {
        if p == t {
            continue;
        }
        let (p, t) = (W::load(p), W::load(t));
        let d = to_ordered(t, W::BITS, FLOAT).wrapping_sub(to_ordered(p, W::BITS, FLOAT));
        gaps.push((i - last) as u64);
        diffs.push(zigzag(d & mask(W::BITS), W::BITS));
        ctxs.push(cmap.of(p));
        last = i + 1;
    }
    let mut out = Vec::with_capacity(gaps.len() * 2 + 64);
    rans::put_varint(&mut out, gaps.len() as u64);
    ints::encode(&gaps, &[], 1, &mut out);
    out.extend_from_slice(&lo.to_le_bytes());
    out.extend_from_slice(&hi.to_le_bytes());
    ints::encode(&diffs, &ctxs, cmap.count(), &mut out);
    out
}

/// Decodes a payload made by [`encode`] against `pred` into `out` (same length as `pred`).
///
/// The payload is untrusted: any inconsistency is an error, never a panic.
pub fn decode(layout: ElementLayout, pred: &[u8], payload: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    decode_with(Kernel::WIDEST, layout, pred, payload, out)
}

/// [`decode`] with the vector code paths of `kernel` at most; every kernel gives the same
/// output and verdict.
pub fn decode_with(
    kernel: Kernel,
    layout: ElementLayout,
    pred: &[u8],
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    if pred.len() != out.len() {
        return Err(DecodeError("prediction and output lengths differ"));
    }
    let mut changes = Changes::default();
    changes.decode_with(kernel, layout, pred, payload)?;
    out.copy_from_slice(pred);
    dispatch!(
        layout,
        shift_impl(kernel, layout, &changes, out, false, 0, |_, _, _| {})
    );
    Ok(())
}

/// [`decode`] over the prediction itself: `buf` holds the prediction and ends as the
/// output (on error, it is unchanged).
pub fn decode_in_place(layout: ElementLayout, payload: &[u8], buf: &mut [u8]) -> Result<(), DecodeError> {
    differences(layout, buf, payload)?.add_to(layout, buf);
    Ok(())
}

/// The changed elements of a chunk: their positions, increasing, and their differences
/// (zigzagged, of the order-preserving integers, as the codec codes them).
#[derive(Default)]
pub struct Changes {
    /// Element indices.
    pub positions: Vec<u32>,
    /// One difference per position.
    pub diffs: Vec<u64>,
    /// Scratch of [`Changes::decode`]: the contexts at the positions.
    contexts: Vec<u8>,
}

impl Changes {
    /// [`differences`] into `self`, reusing its buffers: a caller decoding chunk after chunk
    /// allocates once. On error, the contents are unspecified.
    pub fn decode(&mut self, layout: ElementLayout, pred: &[u8], payload: &[u8]) -> Result<(), DecodeError> {
        self.decode_with(Kernel::WIDEST, layout, pred, payload)
    }

    fn decode_with(
        &mut self,
        kernel: Kernel,
        layout: ElementLayout,
        pred: &[u8],
        payload: &[u8],
    ) -> Result<(), DecodeError> {
        if !pred.len().is_multiple_of(layout.width) {
            return Err(DecodeError("partial element"));
        }
        dispatch!(layout, differences_impl(kernel, layout, pred, payload, self))
    }

    /// Adds the differences to the elements of `buf` (the prediction) at their positions.
    pub fn add_to(&self, layout: ElementLayout, buf: &mut [u8]) {
        self.add_to_watching(layout, buf, 0, |_, _, _| {})
    }

    /// [`Changes::add_to`], calling `seen(position, old, new)`, in position order, with the
    /// bits before and after of each changed element whose bits in `field` changed: what a
    /// caller needs of the old values without copying them first.
    pub fn add_to_watching(
        &self,
        layout: ElementLayout,
        buf: &mut [u8],
        field: u64,
        seen: impl FnMut(usize, u64, u64),
    ) {
        dispatch!(
            layout,
            shift_impl(Kernel::WIDEST, layout, self, buf, false, field, seen)
        )
    }

    /// Subtracts the differences from the elements of `buf` at their positions: undoes
    /// [`Changes::add_to`].
    pub fn subtract_from(&self, layout: ElementLayout, buf: &mut [u8]) {
        dispatch!(
            layout,
            shift_impl(Kernel::WIDEST, layout, self, buf, true, 0, |_, _, _| {})
        )
    }
}

fn shift_impl<W: Element, const FLOAT: bool>(
    kernel: Kernel,
    layout: ElementLayout,
    c: &Changes,
    buf: &mut [u8],
    back: bool,
    field: u64,
    mut seen: impl FnMut(usize, u64, u64),
) {
    let w = layout.width;
    let mut done = 0;
    if FLOAT && w == 2 {
        done = kernels::changes_shift16(kernel, &c.positions, &c.diffs, buf, back, field as u16, &mut seen);
    }
    for (&pos, &z) in c.positions[done..].iter().zip(&c.diffs[done..]) {
        let at = pos as usize * w;
        let e = &mut buf[at..at + w];
        let d = unzigzag(z, W::BITS);
        let d = if back { d.wrapping_neg() } else { d };
        let old = W::load(e);
        let new = from_ordered(
            to_ordered(old, W::BITS, FLOAT).wrapping_add(d) & mask(W::BITS),
            W::BITS,
            FLOAT,
        );
        W::store(new, e);
        if (old ^ new) & field != 0 {
            seen(pos as usize, old, new);
        }
    }
}

/// The context of the element of `pred` at each of `positions` (all inside it), into `out`.
fn contexts_at<W: Element, const FLOAT: bool>(
    kernel: Kernel,
    cmap: &ContextMap,
    pred: &[u8],
    positions: &[u32],
    out: &mut Vec<u8>,
) {
    let w = W::BITS as usize / 8;
    out.clear();
    if FLOAT
        && w == 2
        && pred.len() >= 4
        && kernels::changes_contexts16(kernel, &cmap.vector_params(), pred, positions, out)
    {
        return;
    }
    out.extend(
        positions
            .iter()
            .map(|&p| cmap.of(W::load(&pred[p as usize * w..(p as usize + 1) * w]))),
    );
}

/// Decodes the positions and differences of a payload made by [`encode`], under the
/// contexts of `pred`. Positions are checked to lie inside `pred`.
///
/// The payload is untrusted: any inconsistency is an error, never a panic.
pub fn differences(layout: ElementLayout, pred: &[u8], payload: &[u8]) -> Result<Changes, DecodeError> {
    let mut c = Changes::default();
    c.decode(layout, pred, payload)?;
    Ok(c)
}

fn differences_impl<W: Element, const FLOAT: bool>(
    kernel: Kernel,
    layout: ElementLayout,
    pred: &[u8],
    mut input: &[u8],
    c: &mut Changes,
) -> Result<(), DecodeError> {
    let w = layout.width;
    let n = pred.len() / w;
    let k = rans::get_varint(&mut input).ok_or(DecodeError("bad change count"))?;
    if k > n as u64 {
        return Err(DecodeError("more changes than elements"));
    }
    // The gaps are decoded into `diffs`, which the differences overwrite once the positions
    // are known: one buffer of 8 bytes a change fewer.
    ints::decode_positions_into(&mut input, k as usize, n, &mut c.diffs, &mut c.positions)?;
    let (lo, hi) = match input {
        [a, b, c, d, rest @ ..] => {
            input = rest;
            (u16::from_le_bytes([*a, *b]), u16::from_le_bytes([*c, *d]))
        }
        _ => return Err(DecodeError("truncated context range")),
    };
    let exponents = layout.float.map_or(1, |f| f.exponent_mask as usize + 1);
    if lo > hi || hi as usize >= exponents || (hi - lo) as usize >= super::exact::MAX_CONTEXTS {
        return Err(DecodeError("bad context range"));
    }
    let cmap = ContextMap::new(layout, lo, hi);
    contexts_at::<W, FLOAT>(kernel, &cmap, pred, &c.positions, &mut c.contexts);
    debug_assert_eq!(
        c.diffs.len(),
        c.positions.len(),
        "one gap, now one difference, a position"
    );
    ints::decode_with(kernel, &mut input, cmap.count(), W::BITS, &c.contexts, &mut c.diffs)?;
    if !input.is_empty() {
        return Err(DecodeError("bytes after the payload"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout as dtype;
    use proptest::prelude::*;

    fn round_trip(dt: safetensors::Dtype, pred: &[u8], target: &[u8]) {
        let layout = dtype::layout(dt);
        let payload = encode(layout, pred, target);
        let mut out = vec![0u8; target.len()];
        decode(layout, pred, &payload, &mut out).unwrap();
        assert_eq!(out, target);
        let mut buf = pred.to_vec();
        decode_in_place(layout, &payload, &mut buf).unwrap();
        assert_eq!(buf, target);
    }

    proptest! {
        #[test]
        fn sparse_changes_round_trip_in_every_width(
            seed in any::<u64>(),
            n in 1usize..3000,
            every in 1usize..20,
        ) {
            for (dt, w) in [(safetensors::Dtype::BF16, 2), (safetensors::Dtype::F32, 4), (safetensors::Dtype::I64, 8), (safetensors::Dtype::U8, 1), (safetensors::Dtype::F16, 2)] {
                let pred: Vec<u8> = (0..n * w).map(|i| (seed.wrapping_mul(i as u64 + 7) >> 13) as u8).collect();
                let mut target = pred.clone();
                for i in (0..n).step_by(every) {
                    // Any bit pattern: NaNs, infinities and sign flips included.
                    target[i * w] ^= (seed as u8) | 1;
                    target[i * w + w - 1] ^= (seed >> 8) as u8;
                }
                round_trip(dt, &pred, &target);
                let naive = pred.chunks(w).zip(target.chunks(w)).filter(|(a, b)| a != b).count() as u64;
                prop_assert_eq!(count_changed(dtype::layout(dt), &pred, &target), naive);
            }
        }

        /// One `Changes` decoding chunk after chunk, hostile payloads in between, gives what
        /// a fresh one does: no buffer keeps anything from an earlier payload.
        #[test]
        fn reused_changes_decode_as_fresh_ones(junk in proptest::collection::vec(any::<u8>(), 0..200), seed in any::<u64>()) {
            let l = dtype::layout(safetensors::Dtype::BF16);
            let pred: Vec<u8> = (0..4000u64).map(|i| (seed.wrapping_mul(i + 3) >> 11) as u8).collect();
            let many: Vec<u8> = pred.iter().map(|b| b ^ 1).collect();
            let mut few = pred.clone();
            few[100] ^= 0x40;
            let mut reused = Changes::default();
            for (target, garbage) in [(&many, None), (&few, Some(&junk)), (&many, Some(&junk)), (&few, None)] {
                if let Some(g) = garbage {
                    let _ = reused.decode(l, &pred, g);
                }
                let payload = encode(l, &pred, target);
                reused.decode(l, &pred, &payload).unwrap();
                let fresh = differences(l, &pred, &payload).unwrap();
                prop_assert_eq!(&reused.positions, &fresh.positions);
                prop_assert_eq!(&reused.diffs, &fresh.diffs);
                let mut out = pred.clone();
                reused.add_to(l, &mut out);
                prop_assert_eq!(&out, target);
            }
        }

        #[test]
        fn hostile_payloads_are_errors_not_panics(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let pred = vec![0x3fu8; 512];
            let mut out = vec![0u8; 512];
            let l = dtype::layout(safetensors::Dtype::BF16);
            let r = decode(l, &pred, &payload, &mut out);
            let mut buf = pred.clone();
            prop_assert_eq!(decode_in_place(l, &payload, &mut buf), r.clone());
            if r.is_ok() {
                prop_assert_eq!(buf, out);
            }
        }
    }

    /// [`Changes::add_to_watching`] and [`Changes::subtract_from`] one element after another,
    /// as the vector path must match.
    fn shifted_one_by_one(
        dt: safetensors::Dtype,
        c: &Changes,
        buf: &mut [u8],
        back: bool,
        field: u64,
    ) -> Vec<(usize, u64, u64)> {
        let l = dtype::layout(dt);
        let mut seen = Vec::new();
        for (&p, &z) in c.positions.iter().zip(&c.diffs) {
            let e = &mut buf[2 * p as usize..2 * p as usize + 2];
            let old = u16::from_le_bytes([e[0], e[1]]) as u64;
            let d = unzigzag(z, 16);
            let d = if back { d.wrapping_neg() } else { d };
            let new = from_ordered(
                to_ordered(old, 16, l.float.is_some()).wrapping_add(d) & 0xFFFF,
                16,
                true,
            );
            e.copy_from_slice(&(new as u16).to_le_bytes());
            if (old ^ new) & field != 0 {
                seen.push((p as usize, old, new));
            }
        }
        seen
    }

    proptest! {
        /// Sixteen changes at a time or one by one, the same bytes and the same calls, in order:
        /// positions first and last in the chunk, dense runs, any bit patterns and differences,
        /// and positions out of order (from a caller filling `Changes` itself), which the vector
        /// path leaves to the scalar one from the first group they break.
        #[test]
        fn shifting_sixteen_at_a_time_matches_one_by_one(
            seed in any::<u64>(),
            n in 2usize..600,
            gaps in proptest::collection::vec(1u32..6, 0..200),
            swap in proptest::option::of(0usize..200),
            back in any::<bool>(),
        ) {
            let mut positions: Vec<u32> = gaps
                .iter()
                .scan(0u32, |at, g| { let p = *at; *at += g; Some(p) })
                .take_while(|&p| (p as usize) < n)
                .collect();
            if let Some(k) = swap.filter(|&k| k + 1 < positions.len()) {
                positions.swap(k, k + 1);
            }
            let diffs: Vec<u64> = (0..positions.len()).map(|i| seed.rotate_left(i as u32 * 7) & 0xFFFF).collect();
            let c = Changes { positions, diffs, contexts: Vec::new() };
            let base: Vec<u8> = (0..2 * n).map(|i| (seed.wrapping_mul(i as u64 * 2 + 1) >> 17) as u8).collect();
            for dt in [safetensors::Dtype::BF16, safetensors::Dtype::F16] {
                let l = dtype::layout(dt);
                let field = l.float.expect("a float").exponent_field();
                let (mut want, mut got) = (base.clone(), base.clone());
                let expected = shifted_one_by_one(dt, &c, &mut want, back, field);
                let mut calls = Vec::new();
                if back {
                    c.subtract_from(l, &mut got);
                } else {
                    c.add_to_watching(l, &mut got, field, |p, o, n| calls.push((p, o, n)));
                    prop_assert_eq!(&calls, &expected);
                }
                prop_assert_eq!(&got, &want);
            }
        }
    }

    #[test]
    fn every_element_changed_first_and_last_included() {
        // Contexts are read at every position, the first and last elements and a partial
        // group of sixteen at the end included.
        for n in [1usize, 2, 3, 16, 17, 37] {
            for dt in [safetensors::Dtype::BF16, safetensors::Dtype::F16] {
                let pred: Vec<u8> = (0..2 * n).map(|i| (i * 37 + 11) as u8).collect();
                let target: Vec<u8> = pred
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ (1 + (i % 2) as u8 * 0x40))
                    .collect();
                round_trip(dt, &pred, &target);
            }
        }
    }

    #[test]
    fn a_chunk_qualifies_only_with_few_changes() {
        let l = dtype::layout(safetensors::Dtype::BF16);
        let pred = vec![1u8; 200];
        let mut t = pred.clone();
        for i in 0..30 {
            t[2 * i] = 9;
        }
        assert_eq!(few_changed(l, &pred, &t), Some(30));
        t[2 * 31] = 9;
        assert_eq!(few_changed(l, &pred, &t), None);
        assert_eq!(few_changed(l, &[], &[]), None);
        // Unchanged chunks round trip to nothing but the header.
        round_trip(safetensors::Dtype::BF16, &pred, &pred);
        let mut wrong = encode(l, &pred, &t);
        wrong.push(0);
        assert!(decode(l, &pred, &wrong, &mut [0u8; 200]).is_err());
    }
}
