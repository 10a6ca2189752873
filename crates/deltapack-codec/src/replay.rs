//! Hot swap's exponent-fix replay: reverting a chunk from the fine-tune's bytes to the base's
//! with its forward payload, instead of keeping a reverse delta.
//!
//! An exact payload decodes only under the contexts of its prediction (the base's exponents).
//! When a chunk is applied in place, [`FixWriter`] records the base exponent of every element
//! whose exponent field changed; [`replay`] patches them back into the fine-tune's values,
//! decodes the forward payload over that, and subtracts the differences. The fixes are made
//! in memory and never stored.

use crate::bits::{get_varint, write_varint};
use crate::changes::Changes;
use crate::dispatch::decode_exact;
use crate::ints::{unzigzag, zigzag};
use crate::kernels;
use crate::layout::{Element, ElementLayout, FloatLayout};
use crate::ChunkCodec;

/// Turns the fine-tune's bytes `cur` of a chunk back into the base's, from the chunk's forward
/// `payload` (of `codec`, `exact` or `changes`) and the base exponents `fixes` (written by
/// [`FixWriter`]); false if the payload does not decode, `cur` then left as it was. `saved`
/// and `changes` are scratch; `out` is scratch of `cur`'s length.
#[allow(clippy::too_many_arguments)]
pub fn replay(
    layout: ElementLayout,
    codec: ChunkCodec,
    payload: &[u8],
    fixes: &[u8],
    cur: &mut [u8],
    saved: &mut Vec<(usize, u64)>,
    changes: &mut Changes,
    out: &mut [u8],
) -> bool {
    // The prediction is the fine-tune's values under the base's exponents: patched into
    // `cur` itself, the values they replace kept aside, rather than copying the chunk.
    saved.clear();
    if let Some(f) = layout.float {
        patch_exponents(layout.width, f, fixes, cur, saved);
    }
    if codec == ChunkCodec::Changes {
        let ok = changes.decode(layout, cur, payload).is_ok();
        restore_saved(layout.width, saved, cur);
        if ok {
            // Only the changed elements need the differences taken off.
            changes.subtract_from(layout, cur);
        }
        return ok;
    }
    if decode_exact(codec, layout, cur, payload, out).is_err() {
        restore_saved(layout.width, saved, cur);
        return false;
    }
    subtract_differences(layout, cur, out, saved);
    true
}

macro_rules! by_width {
    ($w:expr, $f:ident($($arg:expr),*)) => {
        match $w {
            1 => $f::<u8>($($arg),*),
            2 => $f::<u16>($($arg),*),
            4 => $f::<u32>($($arg),*),
            _ => $f::<u64>($($arg),*),
        }
    };
}

#[inline(always)]
fn exponent_of(f: FloatLayout, bits: u64) -> u64 {
    (bits >> f.mantissa_bits) & f.exponent_mask as u64
}

fn fixes_impl<L: Element>(fix: &mut FixWriter, first: usize, old: &[u8], new: &[u8], out: &mut Vec<u8>) {
    let f = fix.f;
    let lane_bits = 8 * L::WIDTH;
    let lanes = 8 / L::WIDTH;
    // Masks replicated over the lanes of a 64-bit word: the exponent field, and each lane's top bit.
    let replicate = |v: u64| (0..lanes).fold(0u64, |acc, k| acc | v << (k * lane_bits));
    let field = replicate(f.exponent_field());
    let top = replicate(1 << (lane_bits - 1));
    // Multiplying the lanes' bits (at multiples of lane_bits) by this moves lane k's to bit
    // 64 - lanes + k; no two partial products meet, so nothing carries.
    let high = 64 - lanes;
    let gather = (0..lanes).fold(0u64, |acc, j| acc | 1 << (high - (lane_bits - 1) * j));
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    // At most 64 fixes of at most 1 + 10 + 10 bytes each, gathered here before one copy (only
    // the bytes written are read, so the buffer is set once, not per block).
    let mut buf = [0u8; 64 * 21];
    let vector = L::WIDTH == 2 && kernels::differing16_available();
    // Which elements of a block of 64 differ in their exponent fields: bit j for element j.
    // One compare of 64 lanes where the CPU has AVX-512BW for 16-bit floats; else eight bytes
    // at a time without branches: lanes whose fields differ get their top bit set (a nonzero
    // low part carries into it), gathered into the mask. Its bits are then visited: one
    // mispredicted branch per 64 elements, not per hit.
    let differing = |ob: &[u8], nb: &[u8]| -> u64 {
        if vector && ob.len() == 128 {
            return kernels::differing16(ob, nb, field as u16);
        }
        let mut m = 0u64;
        for (k, (a, b)) in ob.chunks_exact(8).zip(nb.chunks_exact(8)).enumerate() {
            let d = (word(a) ^ word(b)) & field;
            let hits = ((d & !top).wrapping_add(!top) | d) & top;
            m |= ((hits >> (lane_bits - 1)).wrapping_mul(gather) >> high) << (k * lanes);
        }
        // The elements of a last partial word, one by one.
        for j in ob.len() / 8 * lanes..ob.len() / L::WIDTH {
            let at = j * L::WIDTH..(j + 1) * L::WIDTH;
            m |= u64::from((L::get(&ob[at.clone()]).bits() ^ L::get(&nb[at]).bits()) & field != 0) << j;
        }
        m
    };
    for (blk, (ob, nb)) in old.chunks(64 * L::WIDTH).zip(new.chunks(64 * L::WIDTH)).enumerate() {
        let mut m = differing(ob, nb);
        let mut len = 0;
        while m != 0 {
            let j = m.trailing_zeros() as usize;
            m &= m - 1;
            let at = j * L::WIDTH..(j + 1) * L::WIDTH;
            let (o, n) = (L::get(&ob[at.clone()]).bits(), L::get(&nb[at]).bits());
            len += fix.put(first + blk * 64 + j, o, n, &mut buf[len..]);
        }
        out.extend_from_slice(&buf[..len]);
    }
}

/// Writes the undo record's exponent fixes of a chunk: the position and base exponent of
/// every element whose exponent field differs between the prediction it was decoded from
/// (`old`) and what it decoded to (`new`), all the exact codec's contexts need beyond the new
/// values. Fed elements in increasing position, whole pieces of the chunk ([`FixWriter::scan`])
/// or changed elements one by one ([`FixWriter::element`]), it writes the same bytes.
///
/// Each fix is one byte when the gap to the previous one is below 16 and the exponent moved by
/// at most 3: bits 0-2 the zigzagged exponent change (7: a varint of the rest follows), bits
/// 3-6 the gap's low bits, bit 7 set when a varint of the gap's higher bits follows (first,
/// before the exponent's).
pub struct FixWriter {
    f: FloatLayout,
    /// The position after the last fix written.
    next: usize,
}

impl FixWriter {
    /// A writer for a chunk of floats of layout `f`, from its first element.
    pub fn new(f: FloatLayout) -> FixWriter {
        FixWriter { f, next: 0 }
    }

    /// Compares the piece of a chunk starting at element `first` (elements of `width` bytes)
    /// and appends its fixes to `out`.
    pub fn scan(&mut self, width: usize, first: usize, old: &[u8], new: &[u8], out: &mut Vec<u8>) {
        by_width!(width, fixes_impl(self, first, old, new, out))
    }

    /// Element `i` changed from the bits `old` to `new`; `i` is above every earlier one.
    #[inline(always)]
    pub fn element(&mut self, i: usize, old: u64, new: u64, out: &mut Vec<u8>) {
        let mut buf = [0u8; 21];
        let len = self.put(i, old, new, &mut buf);
        out.extend_from_slice(&buf[..len]);
    }

    /// Writes element `i`'s fix, if its exponent changed, at the start of `out` (room for 21
    /// bytes); returns its length.
    #[inline(always)]
    fn put(&mut self, i: usize, old: u64, new: u64, out: &mut [u8]) -> usize {
        let (eo, en) = (exponent_of(self.f, old), exponent_of(self.f, new));
        if eo == en {
            return 0;
        }
        let len = put_fix(out, i - self.next, zigzag(eo as i64 - en as i64));
        self.next = i + 1;
        len
    }
}

/// Writes one fix at the start of `out`, returning its length.
#[inline(always)]
fn put_fix(out: &mut [u8], gap: usize, zz: u64) -> usize {
    if gap < 16 && zz < 7 {
        out[0] = zz as u8 | (gap as u8) << 3;
        return 1;
    }
    put_long_fix(out, gap as u64, zz)
}

#[cold]
fn put_long_fix(out: &mut [u8], gap: u64, zz: u64) -> usize {
    let more = gap >= 16;
    out[0] = (zz.min(7) as u8) | ((gap as u8 & 15) << 3) | (u8::from(more) << 7);
    let mut len = 1;
    if more {
        len += write_varint(&mut out[len..], gap >> 4);
    }
    if zz >= 7 {
        len += write_varint(&mut out[len..], zz - 7);
    }
    len
}

/// Writes the base exponents recorded by [`FixWriter`] into `pred`, which holds the
/// fine-tune's values of the chunk, appending each patched element's position and former
/// bits to `saved`.
pub fn patch_exponents(width: usize, f: FloatLayout, fixes: &[u8], pred: &mut [u8], saved: &mut Vec<(usize, u64)>) {
    by_width!(width, patch_impl(f, fixes, pred, saved))
}

/// Puts back the elements [`patch_exponents`] saved.
pub fn restore_saved(width: usize, saved: &[(usize, u64)], buf: &mut [u8]) {
    by_width!(width, restore_impl(saved, buf))
}

fn restore_impl<L: Element>(saved: &[(usize, u64)], buf: &mut [u8]) {
    for &(i, bits) in saved {
        L::of_bits(bits).put(&mut buf[i * L::WIDTH..(i + 1) * L::WIDTH]);
    }
}

fn patch_impl<L: Element>(f: FloatLayout, fixes: &[u8], pred: &mut [u8], saved: &mut Vec<(usize, u64)>) {
    let field = f.exponent_field();
    let (mut rest, mut next) = (fixes, 0usize);
    // Fixes are made in memory by `FixWriter`, never read from a file: a bad one is a bug.
    let varint = |rest: &mut &[u8]| get_varint(rest).expect("fixes written by FixWriter");
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        let mut gap = u64::from((b >> 3) & 15);
        if b & 0x80 != 0 {
            gap |= varint(&mut rest) << 4;
        }
        let mut zz = u64::from(b & 7);
        if zz == 7 {
            zz += varint(&mut rest);
        }
        let i = next + gap as usize;
        next = i + 1;
        let e = &mut pred[i * L::WIDTH..(i + 1) * L::WIDTH];
        let v = L::get(e).bits();
        saved.push((i, v));
        let exp = (exponent_of(f, v) as i64 + unzigzag(zz)) as u64;
        L::of_bits((v & !field) | ((exp << f.mantissa_bits) & field)).put(e);
    }
}

/// Turns a chunk back into the base's values. `cur` holds the prediction its forward payload
/// decoded from: the fine-tune's values under the base's exponents, which differ from the
/// fine-tune's own only at the positions in `saved`, which holds their fine-tune bits. `out`
/// is what the payload decoded to. The differences `out - prediction` are the forward ones, so
/// the base is the fine-tune minus them, in the codec's ordered integers: `2 * cur - out`
/// where nothing was patched. On return `saved` holds the base's bits at its positions.
pub fn subtract_differences(layout: ElementLayout, cur: &mut [u8], out: &[u8], saved: &mut [(usize, u64)]) {
    if layout.float.is_some() {
        by_width!(
            layout.width,
            subtract_impl(cur, out, saved, Element::ordered, Element::unordered)
        )
    } else {
        by_width!(layout.width, subtract_impl(cur, out, saved, |x| x, |x| x))
    }
}

#[inline(always)]
fn subtract_impl<L: Element>(
    cur: &mut [u8],
    out: &[u8],
    saved: &mut [(usize, u64)],
    ord: fn(L) -> L,
    unord: fn(L) -> L,
) {
    let at = |i: usize| i * L::WIDTH..(i + 1) * L::WIDTH;
    // The patched elements first, while `cur` still holds their prediction.
    for (i, bits) in saved.iter_mut() {
        let fine = ord(L::of_bits(*bits));
        let v = fine
            .wrapping_sub(ord(L::get(&out[at(*i)])))
            .wrapping_add(ord(L::get(&cur[at(*i)])));
        *bits = unord(v).bits();
    }
    for (c, o) in cur.chunks_exact_mut(L::WIDTH).zip(out.chunks_exact(L::WIDTH)) {
        let p = ord(L::get(c));
        unord(p.wrapping_add(p).wrapping_sub(ord(L::get(o)))).put(c);
    }
    for &(i, bits) in saved.iter() {
        L::of_bits(bits).put(&mut cur[at(i)]);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use safetensors::Dtype;

    use super::*;
    use crate::changes;
    use crate::exact::{self, Scratch};
    use crate::layout::layout;

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

    /// [`replay`] with fresh scratch.
    fn replay_fresh(layout: ElementLayout, codec: ChunkCodec, payload: &[u8], fixes: &[u8], cur: &mut [u8]) -> bool {
        let mut out = vec![0u8; cur.len()];
        replay(
            layout,
            codec,
            payload,
            fixes,
            cur,
            &mut Vec::new(),
            &mut Changes::default(),
            &mut out,
        )
    }

    /// Codes `new` against `old` forwards with both exact chunk codecs, then reverts it from
    /// `new` alone with the payload and the exponent fixes, as [`replay`] does; returns
    /// the base each revert gives (the same, or it panics).
    fn revert(dt: Dtype, old: &[u8], new: &[u8]) -> Vec<u8> {
        let layout = layout(dt);
        let mut fixes = Vec::new();
        exponent_fixes(layout, old, new, &mut fixes);
        let revert = |codec, payload: Vec<u8>| {
            let mut cur = new.to_vec();
            assert!(replay_fresh(layout, codec, &payload, &fixes, &mut cur));
            cur
        };
        let dense = revert(
            ChunkCodec::Exact,
            exact::encode(layout, old, new, &mut Scratch::default()),
        );
        let sparse = revert(ChunkCodec::Changes, changes::encode(layout, old, new));
        assert_eq!(dense, sparse, "the changes codec reverts as the exact one does");
        dense
    }

    /// A payload that no longer decodes leaves the chunk as it was, the fine-tune's values,
    /// for both codecs: the exponents patched in for the attempt are put back.
    #[test]
    fn a_failed_replay_leaves_the_chunk_unchanged() {
        let layout = layout(Dtype::BF16);
        let old: Vec<u8> = (0..4096u32)
            .flat_map(|i| ((i * 37 % 1500) as u16 + 0x3c00).to_le_bytes())
            .collect();
        let new: Vec<u8> = old
            .chunks_exact(2)
            .enumerate()
            .flat_map(|(i, e)| {
                let v = u16::from_le_bytes([e[0], e[1]]);
                // Every 5th value moves up a binade, so there are exponents to patch.
                (if i % 5 == 0 { v + 0x80 } else { v }).to_le_bytes()
            })
            .collect();
        let mut fixes = Vec::new();
        exponent_fixes(layout, &old, &new, &mut fixes);
        assert!(!fixes.is_empty());
        let dense = exact::encode(layout, &old, &new, &mut Scratch::default());
        let sparse = changes::encode(layout, &old, &new);
        for (codec, payload) in [(ChunkCodec::Exact, dense), (ChunkCodec::Changes, sparse)] {
            let mut cur = new.clone();
            assert!(!replay_fresh(
                layout,
                codec,
                &payload[..payload.len() - 3],
                &fixes,
                &mut cur
            ));
            assert_eq!(cur, new, "{codec:?}");
            assert!(replay_fresh(layout, codec, &payload, &fixes, &mut cur));
            assert_eq!(cur, old, "{codec:?}");
        }
    }

    #[test]
    fn replay_reverts_float_specials_and_sign_flips() {
        let vals: [f32; 10] = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e-40,
            f32::INFINITY,
            f32::NAN,
            3.0e38,
            -2.0e-3,
            65504.0,
        ];
        let old: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let new: Vec<u8> = vals.iter().rev().flat_map(|v| (-v * 1.5).to_le_bytes()).collect();
        assert_eq!(revert(Dtype::F32, &old, &new), old);
    }

    #[test]
    fn fixes_use_one_byte_for_near_changes_and_varints_for_far_ones() {
        let f = layout(Dtype::BF16).float.unwrap();
        let mut out = Vec::new();
        let elems = |v: &[u16]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // Element 1 moves up one binade; element 40 loses 200 binades (a sign flip to a tiny value).
        let mut old = vec![0x3f80u16; 41];
        let mut new = old.clone();
        new[1] = 0x4000;
        old[40] = 0x3f80;
        new[40] = 0x8001;
        FixWriter::new(f).scan(2, 0, &elems(&old), &elems(&new), &mut out);
        assert_eq!(out[0], 1 | (1 << 3), "gap 1, exponent one lower in the base");
        assert_eq!(
            out.len(),
            1 + 4,
            "gap 38 needs a varint byte, the exponent change 254 two"
        );
        let mut pred = elems(&new);
        let mut saved = Vec::new();
        patch_impl::<u16>(f, &out, &mut pred, &mut saved);
        let exps: Vec<u64> = pred.chunks(2).map(|e| exponent_of(f, u64::from(u16::get(e)))).collect();
        let want: Vec<u64> = elems(&old)
            .chunks(2)
            .map(|e| exponent_of(f, u64::from(u16::get(e))))
            .collect();
        assert_eq!(exps, want);
        assert_eq!(saved, [(1, 0x4000), (40, 0x8001)], "the patched elements' own bits");
        restore_impl::<u16>(&saved, &mut pred);
        assert_eq!(pred, elems(&new));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any bit patterns of any dtype, changed by small steps or arbitrarily, revert exactly.
        #[test]
        fn replay_reverts_every_dtype(
            dt in prop::sample::select(vec![Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64,
                Dtype::F8_E4M3, Dtype::F8_E5M2, Dtype::I32, Dtype::U8, Dtype::I64]),
            seed in any::<u64>(),
            n in 0usize..3000,
            wild in any::<bool>(),
        ) {
            let w = layout(dt).width;
            let mut x = seed | 1;
            let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let old: Vec<u8> = (0..n * w).map(|_| next() as u8).collect();
            let mut new = old.clone();
            for e in new.chunks_exact_mut(w) {
                let r = next();
                if wild {
                    e.copy_from_slice(&r.to_le_bytes()[..w]);
                } else if r % 3 == 0 {
                    e[0] = e[0].wrapping_add((r >> 8) as u8 % 5).wrapping_sub(2);
                }
            }
            prop_assert_eq!(revert(dt, &old, &new), old);
        }

        /// The fixes of a `changes` chunk, taken at its changed positions only while they are
        /// patched, are the same bytes as those of a whole-chunk comparison.
        #[test]
        fn fixes_at_changed_positions_equal_a_full_scan(
            dt in prop::sample::select(vec![Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64, Dtype::F8_E5M2]),
            seed in any::<u64>(),
            n in 0usize..3000,
            every in 1usize..40,
        ) {
            let layout = layout(dt);
            let w = layout.width;
            let (old, new) = old_and_new(w, seed, n, every);
            let payload = changes::encode(layout, &old, &new);
            let diff = changes::differences(layout, &old, &payload).unwrap();
            let (mut full, mut at) = (Vec::new(), Vec::new());
            exponent_fixes(layout, &old, &new, &mut full);
            let mut fix = FixWriter::new(layout.float.unwrap());
            let mut patched = old.clone();
            let field = layout.float.unwrap().exponent_field();
            diff.add_to_watching(layout, &mut patched, field, |i, o, n| fix.element(i, o, n, &mut at));
            prop_assert_eq!(patched, new);
            prop_assert_eq!(full, at);
        }
    }
}
