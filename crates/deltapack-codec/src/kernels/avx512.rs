//! AVX-512 code paths of the codecs, for CPUs with AVX-512F and VBMI: the exact codec's
//! decoder and encoder for 16-bit float chunks (BF16, F16), the decoder of `ints` streams,
//! and three helpers (contexts at scattered positions and differences added at them, for
//! `changes`; exponent comparisons, for hot swap).
//!
//! The sixteen interleaved rANS states are the sixteen lanes of one vector, so a group of
//! sixteen elements is coded without a scalar step. Every path reads and writes the same
//! bytes as the scalar code in `exact`, `rans` and `ints` and the AVX2 code in `avx2`, and
//! gives the same verdict on every payload, hostile ones included; property tests hold them
//! to that. What AVX2 could not do in vectors, the decoder does:
//! - the renormalisation hands the next words to the lanes that need them with one expand
//!   (`vpexpandd`), in lane order, as the scalar decoder reads them;
//! - tokens expand to (value, raw bit count) by arithmetic;
//! - the raw bits of all sixteen elements are read at once: an exclusive prefix sum of the
//!   bit counts gives each lane its bit offset, and one byte permute (`vpermb`, AVX-512VBMI)
//!   of the group's next 64 bytes gives each lane the 32-bit window at its offset (a value of
//!   16 bits has at most 13 raw bits, so a window always holds them).
//!
//! What remains is the table gather: on AMD's Zen 4 it takes 1.4 of the decoder's 1.8 ns an
//! element (measured by replacing it with arithmetic). Decoding two chunks interleaved, to
//! overlap two chains of gathers, gained nothing.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::tables::{
    next_state, with_tables, Contexts, PackedTables, Parts, BIAS_MASK, BIAS_SHIFT, FREQ_SHIFT, SYMBOL_MASK,
};
use crate::bits::BitWriter;
use crate::error::{verdict, DecodeError};
use crate::rans::{EncoderTables, Model, INTERLEAVE as STATES, SCALE_BITS};

const SCALE: usize = 1 << SCALE_BITS;
const RANS_L: u32 = 1 << 16;
/// Bytes of word stream one group may read: sixteen words, as many as sixteen lanes can need.
const WORD_WINDOW: usize = 2 * STATES;
/// Bytes of raw bits loaded for one group: fifteen lanes of at most 13 bits plus 7 bits of
/// offset put the last lane's window at bytes 25..29, inside one vector load.
const BIT_WINDOW: usize = 64;
/// Raw bits per element at most, for 16-bit values (the largest token a 16-bit value makes).
const MAX_RAW_BITS: u32 = 13;

/// True if this CPU can run [`decode16`] and [`decode_values`].
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vbmi")
        && std::is_x86_feature_detected!("popcnt")
}

/// Largest token whose value fits 16 bits: its raw bits then fit the lanes' 32-bit windows.
const MAX_TOKEN: usize = 16 + (MAX_RAW_BITS as usize - 2) * 4 + 3;

/// True if every token `model` can decode carries at most [`MAX_RAW_BITS`] raw bits, as the
/// vector decoders need.
pub fn model_fits(model: &Model) -> bool {
    model.freqs.iter().all(|f| f.len() <= MAX_TOKEN + 1)
}

/// Decodes a chunk of 16-bit floats, with the scalar decoder's verdict on every payload.
/// `pred` and `out` have the same even length; `parts.model`'s tokens fit 16-bit values.
pub fn decode16(parts: &Parts, pred: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    assert!(available(), "decode16 needs AVX-512F and AVX-512VBMI");
    assert_eq!(pred.len(), out.len());
    check_parts(parts);
    // SAFETY: AVX-512F and VBMI are available (checked above), and `decode16_avx512` only
    // reads and writes within the slices it is given (see the comments at each raw access).
    with_tables(parts.model, |t| unsafe { decode16_avx512(parts, t, Some(pred), out) })
}

/// The invariants the 16-bit decoders rely on.
fn check_parts(parts: &Parts) {
    assert!(parts.contexts.hi >= parts.contexts.lo && ((parts.contexts.hi - parts.contexts.lo) as usize) < 64);
    assert_eq!(
        parts.model.freqs.len(),
        (parts.contexts.hi - parts.contexts.lo) as usize + 1
    );
    assert!(model_fits(parts.model));
}

/// Decodes the values of an `ints` stream (tokens under `contexts[i]`, or context 0 for all
/// when `contexts` is empty) into `out`, with the scalar decoder's verdict. Every context
/// must have a table in `model` (possibly empty) and the model must [`model_fits`].
pub fn decode_values(
    model: &Model,
    contexts: &[u8],
    words: &[u8],
    bits: &[u8],
    out: &mut [u64],
) -> Result<(), DecodeError> {
    assert!(available(), "decode_values needs AVX-512F and AVX-512VBMI");
    assert!(contexts.is_empty() || contexts.len() == out.len());
    assert!(model.freqs.len() <= 64 && contexts.iter().all(|&c| (c as usize) < model.freqs.len()));
    assert!(model_fits(model));
    // SAFETY: as for `decode16`; contexts index the tables (checked above).
    with_tables(model, |t| unsafe {
        decode_values_avx512(t, contexts, words, bits, out)
    })
}

/// Byte indices that gather the low `width` bytes of each 32-bit lane, packed at the bottom.
const fn pick_low(width: usize) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 16 * width {
        t[i] = (i / width * 4 + i % width) as u8;
        i += 1;
    }
    t
}

const LOW_WORDS: [u8; 64] = pick_low(2);
const LOW_BYTES: [u8; 64] = pick_low(1);

/// The bytes of `v` that `pick` names, packed. A byte permute rather than `vpmovdw` or
/// `vpmovdb`: stored straight to memory (as the compiler folds them), those are microcoded
/// on AMD's Zen 4 and stall the loads behind them.
#[target_feature(enable = "avx512f,avx512vbmi")]
#[inline]
fn pack(v: __m512i, pick: &[u8; 64]) -> __m512i {
    // SAFETY: `pick` holds 64 bytes, one vector.
    _mm512_permutexvar_epi8(unsafe { _mm512_loadu_si512(pick.as_ptr() as *const __m512i) }, v)
}

/// The low 16 bits of each lane, packed.
#[target_feature(enable = "avx512f,avx512vbmi")]
#[inline]
fn low_words(v: __m512i) -> __m256i {
    _mm512_castsi512_si256(pack(v, &LOW_WORDS))
}

/// The low byte of each lane, packed.
#[target_feature(enable = "avx512f,avx512vbmi")]
#[inline]
fn low_bytes(v: __m512i) -> __m128i {
    _mm512_castsi512_si128(pack(v, &LOW_BYTES))
}

/// Bytes `at..at + N` of `data`, or what of them exists followed by zeros: reads past the
/// end of a stream yield zeros, as in the scalar readers (and are caught by the verdict).
#[inline(always)]
fn window<const N: usize>(data: &[u8], at: usize) -> [u8; N] {
    let mut w = [0u8; N];
    if let Some(rest) = data.get(at..) {
        let k = rest.len().min(N);
        w[..k].copy_from_slice(&rest[..k]);
    }
    w
}

/// The context of each lane's 16-bit value, as `exact::ContextMap` gives it.
#[target_feature(enable = "avx512f")]
#[inline]
fn contexts_of(c: &Contexts, v: __m512i) -> __m512i {
    let e = _mm512_and_si512(
        _mm512_srl_epi32(v, _mm_cvtsi32_si128(c.mantissa_bits as i32)),
        _mm512_set1_epi32(c.exp_mask as i32),
    );
    let lo = _mm512_set1_epi32(c.lo as i32);
    _mm512_sub_epi32(
        _mm512_min_epu32(_mm512_max_epu32(e, lo), _mm512_set1_epi32(c.hi as i32)),
        lo,
    )
}

/// [`contexts_of`] for one value, for the scalar tails.
fn context_of(c: &Contexts, v: u32) -> u32 {
    ((v >> c.mantissa_bits) & c.exp_mask).clamp(c.lo as u32, c.hi as u32) - c.lo as u32
}

/// One interleaved rANS stream with its raw bits, decoded sixteen tokens at a time.
struct Lanes<'a> {
    tables: &'a PackedTables,
    words: &'a [u8],
    bits: &'a [u8],
    /// The sixteen states, lane `j` = state `j`.
    x: __m512i,
    /// Words consumed.
    wpos: usize,
    /// Raw bits consumed.
    bitpos: u64,
    /// Bit 0 of a lane set when it used a context without a table.
    bad: __m512i,
}

impl<'a> Lanes<'a> {
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    fn new(tables: &'a PackedTables, words: &'a [u8], bits: &'a [u8]) -> Self {
        // The initial states, as the scalar WordReader reads them.
        let head = window::<{ 4 * STATES }>(words, 0);
        Lanes {
            tables,
            words,
            bits,
            // SAFETY: `head` holds 64 bytes, one vector.
            x: unsafe { _mm512_loadu_si512(head.as_ptr() as *const __m512i) },
            wpos: 2 * STATES,
            bitpos: 0,
            bad: _mm512_setzero_si512(),
        }
    }

    /// True if the next group's word and bit windows lie inside the streams, so that
    /// [`Lanes::group`] may load them in place (`ROOMY`).
    fn roomy(&self) -> bool {
        2 * self.wpos + WORD_WINDOW <= self.words.len() && (self.bitpos >> 3) as usize + BIT_WINDOW <= self.bits.len()
    }

    /// Decodes the next sixteen tokens, lane `j` under context `ctx[j]` (below the number of
    /// contexts), and returns their values (token value with its raw bits).
    ///
    /// Without `UNUSED`, the caller has checked that every context has a table (no bit of
    /// `tables.unused` is set), so no lane needs flagging.
    ///
    /// With `ROOMY`, the caller has checked [`Lanes::roomy`]. That version has no path that
    /// copies a window near the end of a stream: the copy is a call, and a call in the loop
    /// made the compiler keep the gathered entries on the stack, a store and a reload in the
    /// chain that carries the states from group to group.
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    #[inline]
    fn group<const ROOMY: bool, const UNUSED: bool>(&mut self, ctx: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        let one = _mm512_set1_epi32(1);
        let sixteen = _mm512_set1_epi32(16);
        if UNUSED {
            // Unused contexts as two 32-bit masks: a shift by 32 or more yields zero, so each
            // lane tests its context against the half it falls in.
            let unused_lo = _mm512_set1_epi32(self.tables.unused as u32 as i32);
            let unused_hi = _mm512_set1_epi32((self.tables.unused >> 32) as i32);
            let flags = _mm512_or_si512(
                _mm512_srlv_epi32(unused_lo, ctx),
                _mm512_srlv_epi32(unused_hi, _mm512_sub_epi32(ctx, _mm512_set1_epi32(32))),
            );
            self.bad = _mm512_or_si512(self.bad, flags);
        } else {
            debug_assert_eq!(self.tables.unused, 0);
        }
        let slot = _mm512_and_si512(self.x, _mm512_set1_epi32(SCALE as i32 - 1));
        let idx = _mm512_or_si512(_mm512_slli_epi32::<{ SCALE_BITS }>(ctx), slot);
        // SAFETY: ctx < number of contexts and slot < SCALE, so every index is below
        // tables.slots.len() = contexts * SCALE (the tables are filled for this stream's
        // model by `with_tables`, which every entry point calls).
        let entry = unsafe { _mm512_i32gather_epi32::<4>(idx, self.tables.slots.as_ptr() as *const i32) };
        let freq = _mm512_srli_epi32::<{ FREQ_SHIFT }>(entry);
        let bias = _mm512_and_si512(
            _mm512_srli_epi32::<{ BIAS_SHIFT }>(entry),
            _mm512_set1_epi32(BIAS_MASK as i32),
        );
        let x = _mm512_add_epi32(
            _mm512_mullo_epi32(freq, _mm512_srli_epi32::<{ SCALE_BITS }>(self.x)),
            bias,
        );
        // Renormalise the lanes whose state fell below 2^16 with the next words, in lane order.
        let need = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(RANS_L as i32));
        let next = if ROOMY {
            // SAFETY: the caller checked `roomy`: bytes 2 wpos..2 wpos + 32 lie inside `words`.
            unsafe { _mm256_loadu_si256(self.words.as_ptr().add(2 * self.wpos) as *const __m256i) }
        } else {
            let w = window::<WORD_WINDOW>(self.words, 2 * self.wpos);
            // SAFETY: `w` holds 32 bytes.
            unsafe { _mm256_loadu_si256(w.as_ptr() as *const __m256i) }
        };
        let fresh = _mm512_maskz_expand_epi32(need, _mm512_cvtepu16_epi32(next));
        self.x = _mm512_mask_mov_epi32(x, need, _mm512_or_si512(_mm512_slli_epi32::<16>(x), fresh));
        self.wpos += need.count_ones() as usize;
        // Tokens: below 16 the value itself; above, 2 + (t - 16) / 4 raw bits under the
        // leading bits 1mm, mm = (t - 16) % 4 (as `exact::TokenTable`).
        let sym = _mm512_and_si512(entry, _mm512_set1_epi32(SYMBOL_MASK as i32));
        let big = _mm512_cmpge_epu32_mask(sym, sixteen);
        let k = _mm512_sub_epi32(sym, sixteen);
        let nb = _mm512_maskz_mov_epi32(big, _mm512_add_epi32(_mm512_srli_epi32::<2>(k), _mm512_set1_epi32(2)));
        let lead = _mm512_add_epi32(_mm512_and_si512(k, _mm512_set1_epi32(3)), _mm512_set1_epi32(4));
        let base = _mm512_mask_blend_epi32(big, sym, _mm512_sllv_epi32(lead, nb));
        // Exclusive prefix sum of the bit counts: each lane's offset from the group's first bit.
        let mut incl = nb;
        incl = _mm512_add_epi32(incl, _mm512_alignr_epi32::<15>(incl, zero));
        incl = _mm512_add_epi32(incl, _mm512_alignr_epi32::<14>(incl, zero));
        incl = _mm512_add_epi32(incl, _mm512_alignr_epi32::<12>(incl, zero));
        incl = _mm512_add_epi32(incl, _mm512_alignr_epi32::<8>(incl, zero));
        let offs = _mm512_add_epi32(_mm512_sub_epi32(incl, nb), _mm512_set1_epi32((self.bitpos & 7) as i32));
        // Each lane's 32-bit window is bytes b..b + 4 of the group's first 64 bytes: one
        // byte permute puts them in place (a gather is several times slower).
        let take = _mm512_add_epi32(
            _mm512_mullo_epi32(_mm512_srli_epi32::<3>(offs), _mm512_set1_epi32(0x0101_0101)),
            _mm512_set1_epi32(0x0302_0100),
        );
        let byte = (self.bitpos >> 3) as usize;
        let chunk = if ROOMY {
            // SAFETY: the caller checked `roomy`: bytes byte..byte + 64 lie inside `bits`.
            unsafe { _mm512_loadu_si512(self.bits.as_ptr().add(byte) as *const __m512i) }
        } else {
            let w = window::<BIT_WINDOW>(self.bits, byte);
            // SAFETY: `w` holds 64 bytes.
            unsafe { _mm512_loadu_si512(w.as_ptr() as *const __m512i) }
        };
        let raw = _mm512_and_si512(
            _mm512_srlv_epi32(
                _mm512_permutexvar_epi8(take, chunk),
                _mm512_and_si512(offs, _mm512_set1_epi32(7)),
            ),
            _mm512_sub_epi32(_mm512_sllv_epi32(one, nb), one),
        );
        self.bitpos += _mm_extract_epi32::<3>(_mm512_extracti32x4_epi32::<3>(incl)) as u32 as u64;
        _mm512_or_si512(base, raw)
    }

    /// The sixteen states, for the scalar tail.
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    fn states(&self) -> [u32; STATES] {
        let mut st = [0u32; STATES];
        // SAFETY: writes 64 bytes, the sixteen states.
        unsafe { _mm512_storeu_si512(st.as_mut_ptr() as *mut __m512i, self.x) };
        st
    }

    /// True if some token so far used a context without a table.
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    fn any_bad(&self) -> bool {
        _mm512_test_epi32_mask(self.bad, _mm512_set1_epi32(1)) != 0
    }

    /// Decodes token `i` of the stream on state `st[i % 16]` under context `c` (below the
    /// number of contexts), one at a time as the scalar decoder does; returns its value.
    fn scalar(&mut self, st: &mut [u32; STATES], i: usize, c: u32, bad: &mut bool) -> u32 {
        let k = i % STATES;
        *bad |= (self.tables.unused >> (c & 63)) & 1 != 0;
        let entry = self.tables.slots[c as usize * SCALE + (st[k] as usize & (SCALE - 1))];
        st[k] = next_state(entry, st[k]);
        if st[k] < RANS_L {
            st[k] = (st[k] << 16) | u16::from_le_bytes(window::<2>(self.words, 2 * self.wpos)) as u32;
            self.wpos += 1;
        }
        let sym = entry & SYMBOL_MASK;
        let (base, nb) = if sym < 16 {
            (sym, 0)
        } else {
            let nb = (sym - 16) / 4 + 2;
            ((4 | ((sym - 16) & 3)) << nb, nb)
        };
        let w = u32::from_le_bytes(window::<4>(self.bits, (self.bitpos >> 3) as usize));
        let raw = (w >> (self.bitpos & 7)) & ((1u32 << nb) - 1);
        self.bitpos += nb as u64;
        base | raw
    }

    /// The end-of-stream verdict, shared with the scalar decoders.
    fn verdict(&self, bad: bool, st: &[u32; STATES]) -> Result<(), DecodeError> {
        let total = self.bits.len() as u64 * 8;
        verdict(
            bad,
            2 * self.wpos == self.words.len()
                && st.iter().all(|&s| s == RANS_L)
                && self.bitpos <= total
                && total - self.bitpos < 8,
        )
    }
}

/// One 16-bit float chunk being decoded, group by group: from `pred` into `out`, or (no
/// `pred`) from the prediction in `out` over itself, each group read before it is written.
struct Dense16<'a> {
    lanes: Lanes<'a>,
    contexts: &'a Contexts,
    pred: Option<&'a [u8]>,
    out: &'a mut [u8],
}

impl<'a> Dense16<'a> {
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    fn new(parts: &'a Parts, tables: &'a PackedTables, pred: Option<&'a [u8]>, out: &'a mut [u8]) -> Self {
        assert!(
            pred.is_none_or(|p| p.len() == out.len()),
            "prediction and output differ in length"
        );
        Dense16 {
            lanes: Lanes::new(tables, parts.words, parts.bits),
            contexts: &parts.contexts,
            pred,
            out,
        }
    }

    /// Whole groups of sixteen elements.
    fn groups(&self) -> usize {
        self.out.len() / 2 / STATES
    }

    /// The prediction.
    fn source(&self) -> &[u8] {
        self.pred.unwrap_or(self.out)
    }

    /// Decodes group `g` (below [`Dense16::groups`]); `ROOMY` and `UNUSED` as for
    /// [`Lanes::group`].
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    #[inline]
    fn step<const ROOMY: bool, const UNUSED: bool>(&mut self, g: usize) {
        let c = self.contexts;
        let ffff = _mm512_set1_epi32(0xFFFF);
        let one = _mm512_set1_epi32(1);
        debug_assert!(g < self.groups());
        // SAFETY: g < groups, so bytes 32g..32g + 32 lie inside the prediction, which is as
        // long as `out` (`Dense16::new` checks).
        let p =
            _mm512_cvtepu16_epi32(unsafe { _mm256_loadu_si256(self.source().as_ptr().add(32 * g) as *const __m256i) });
        let z = self.lanes.group::<ROOMY, UNUSED>(contexts_of(c, p));
        // value = unordered(ordered(pred) + unzigzag(z)), all modulo 2^16.
        let d = _mm512_xor_si512(
            _mm512_srli_epi32::<1>(z),
            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_and_si512(z, one)),
        );
        let psign = _mm512_srai_epi32::<31>(_mm512_slli_epi32::<16>(p));
        let ord = _mm512_xor_si512(
            p,
            _mm512_or_si512(_mm512_and_si512(psign, ffff), _mm512_set1_epi32(0x8000)),
        );
        let o = _mm512_and_si512(_mm512_add_epi32(ord, d), ffff);
        let osign = _mm512_srai_epi32::<31>(_mm512_slli_epi32::<16>(o));
        let v = _mm512_xor_si512(
            o,
            _mm512_xor_si512(ffff, _mm512_and_si512(osign, _mm512_set1_epi32(0x7FFF))),
        );
        // SAFETY: as for the load: bytes 32g..32g + 32 lie inside `out`, as long as `pred`.
        unsafe { _mm256_storeu_si256(self.out.as_mut_ptr().add(32 * g) as *mut __m256i, low_words(v)) };
    }

    /// Decodes every whole group; `UNUSED` as for [`Lanes::group`].
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    #[inline]
    fn run<const UNUSED: bool>(&mut self) {
        let groups = self.groups();
        let mut g = 0;
        while g < groups && self.lanes.roomy() {
            self.step::<true, UNUSED>(g);
            g += 1;
        }
        for g in g..groups {
            self.step::<false, UNUSED>(g);
        }
    }

    /// Decodes the last `n % 16` elements one at a time, element `i` on state `i % 16` as in
    /// the scalar decoder, and gives the verdict.
    #[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
    fn finish(mut self) -> Result<(), DecodeError> {
        let c = self.contexts;
        let n = self.out.len() / 2;
        let mut st = self.lanes.states();
        let mut bad = self.lanes.any_bad();
        for i in self.groups() * STATES..n {
            let src = self.source();
            let p = u16::from_le_bytes([src[2 * i], src[2 * i + 1]]) as u32;
            let z = self.lanes.scalar(&mut st, i, context_of(c, p), &mut bad);
            let d = (z >> 1) ^ (z & 1).wrapping_neg();
            let ord = if p & 0x8000 != 0 { !p & 0xFFFF } else { p | 0x8000 };
            let o = ord.wrapping_add(d) & 0xFFFF;
            let v = if o & 0x8000 != 0 { o & 0x7FFF } else { !o & 0xFFFF };
            self.out[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_le_bytes());
        }
        self.lanes.verdict(bad, &st)
    }
}

#[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
fn decode16_avx512(
    parts: &Parts,
    tables: &PackedTables,
    pred: Option<&[u8]>,
    out: &mut [u8],
) -> Result<(), DecodeError> {
    let mut d = Dense16::new(parts, tables, pred, out);
    // Most chunks' models have a table for every context: their loop checks none.
    if tables.unused == 0 {
        d.run::<false>();
    } else {
        d.run::<true>();
    }
    d.finish()
}

/// [`decode16`] over the prediction itself: `buf` holds the prediction and ends as the
/// output (on error, its contents are unspecified).
pub fn decode16_in_place(parts: &Parts, buf: &mut [u8]) -> Result<(), DecodeError> {
    assert!(available(), "decode16_in_place needs AVX-512F and AVX-512VBMI");
    assert!(buf.len().is_multiple_of(2));
    check_parts(parts);
    // SAFETY: as for `decode16`.
    with_tables(parts.model, |t| unsafe { decode16_avx512(parts, t, None, buf) })
}

/// Decodes values `16g..16g + 16` of a `decode_values` stream into `out` (g < n / 16);
/// `ROOMY` as for [`Lanes::group`].
#[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
#[inline]
fn values_group<const ROOMY: bool>(lanes: &mut Lanes, contexts: &[u8], out: &mut [u64], g: usize) {
    debug_assert!(16 * g + 16 <= out.len() && (contexts.is_empty() || contexts.len() == out.len()));
    let ctx = match contexts {
        [] => _mm512_setzero_si512(),
        // SAFETY: contexts.len() == out.len() >= 16g + 16.
        c => _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(c.as_ptr().add(16 * g) as *const __m128i) }),
    };
    let z = lanes.group::<ROOMY, true>(ctx);
    // SAFETY: g < n / 16, so elements 16g..16g + 16 lie inside `out`.
    unsafe {
        let o = out.as_mut_ptr().add(16 * g) as *mut __m512i;
        _mm512_storeu_si512(o, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(z)));
        _mm512_storeu_si512(o.add(1), _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64::<1>(z)));
    }
}

#[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
fn decode_values_avx512(
    tables: &PackedTables,
    contexts: &[u8],
    words: &[u8],
    bits: &[u8],
    out: &mut [u64],
) -> Result<(), DecodeError> {
    let mut lanes = Lanes::new(tables, words, bits);
    let n = out.len();
    let groups = n / STATES;
    let mut g = 0;
    while g < groups && lanes.roomy() {
        values_group::<true>(&mut lanes, contexts, out, g);
        g += 1;
    }
    for g in g..groups {
        values_group::<false>(&mut lanes, contexts, out, g);
    }
    let mut st = lanes.states();
    let mut bad = lanes.any_bad();
    for (i, o) in out.iter_mut().enumerate().skip(groups * STATES) {
        let c = contexts.get(i).map_or(0, |&c| c as u32);
        *o = lanes.scalar(&mut st, i, c, &mut bad) as u64;
    }
    lanes.verdict(bad, &st)
}

/// Encodes whole groups of sixteen symbols (`symbols.len()` is a multiple of 16) into the
/// sixteen states, as the scalar loop in `rans::encode` would: same states, same words.
/// `words` must have room for `symbols.len() + 16` words past `len`.
pub fn encode_groups(
    tables: &EncoderTables,
    symbols: &[u8],
    contexts: &[u8],
    words: &mut [u16],
    len: &mut usize,
    st: &mut [u32; STATES],
) {
    assert!(available(), "encode_groups needs AVX-512F and AVX-512VBMI");
    assert!(symbols.len() == contexts.len() && symbols.len().is_multiple_of(STATES));
    assert!(words.len() >= *len + symbols.len() + 16);
    assert!(!tables.entries.is_empty() && tables.entries.len() < 1 << 30);
    // SAFETY: AVX-512F is available; every table index is clamped below entries.len(), and
    // every word store stays below len + symbols.len() + 16 <= words.len() (checked above).
    unsafe { encode_groups_avx512(tables, symbols, contexts, words, len, st) }
}

#[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
fn encode_groups_avx512(
    tables: &EncoderTables,
    symbols: &[u8],
    contexts: &[u8],
    words: &mut [u16],
    len: &mut usize,
    st: &mut [u32; STATES],
) {
    let base = tables.entries.as_ptr() as *const i64;
    let stride = _mm512_set1_epi32(tables.stride as i32);
    // Valid symbols always index inside the tables; the clamp makes that a guarantee for the
    // gathers whatever the input (a bad one only yields a wrong, never an unsafe, encoding).
    let last = _mm512_set1_epi32(tables.entries.len() as i32 - 1);
    let one = _mm512_set1_epi32(1);
    // The states are held in reverse lane order (lane j is state 15 - j): the scalar encoder
    // walks symbols backwards, so within a group state 15 emits its word first, and a
    // compress of the lanes that emit then puts the words in stream order.
    let reverse = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    // The even and the odd 32-bit words of two vectors of 64-bit entries.
    let evens = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    let odds = _mm512_add_epi32(evens, one);
    // SAFETY: reads the 64 bytes of the sixteen states.
    let mut x = _mm512_permutexvar_epi32(reverse, unsafe { _mm512_loadu_si512(st.as_ptr() as *const __m512i) });
    for g in (0..symbols.len() / STATES).rev() {
        let at = STATES * g;
        // SAFETY: at + 16 <= symbols.len() == contexts.len().
        let (s, c) = unsafe {
            (
                _mm512_cvtepu8_epi32(_mm_loadu_si128(symbols.as_ptr().add(at) as *const __m128i)),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(contexts.as_ptr().add(at) as *const __m128i)),
            )
        };
        let entry = _mm512_min_epu32(_mm512_add_epi32(_mm512_mullo_epi32(c, stride), s), last);
        let entry = _mm512_permutexvar_epi32(reverse, entry);
        // Whole 8-byte entries, eight at a time: half the elements of two 32-bit gathers.
        // SAFETY: entry <= entries.len() - 1, so every gathered entry lies inside the tables.
        let (lo, hi) = unsafe {
            (
                _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(entry), base),
                _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(entry), base),
            )
        };
        let rcp = _mm512_permutex2var_epi32(lo, evens, hi);
        let packed = _mm512_permutex2var_epi32(lo, odds, hi);
        let freq = _mm512_and_si512(packed, _mm512_set1_epi32(0x1FFF));
        let start = _mm512_and_si512(_mm512_srli_epi32::<13>(packed), _mm512_set1_epi32(0xFFF));
        let cmpl = _mm512_sub_epi32(_mm512_set1_epi32(SCALE as i32), freq);
        let l = _mm512_srli_epi32::<25>(packed);
        // Renormalise: x >= freq << 20 (compared as x >> 20 >= freq, which cannot overflow).
        let big = _mm512_cmpge_epu32_mask(_mm512_srli_epi32::<20>(x), freq);
        let out = _mm512_maskz_compress_epi32(big, x);
        // SAFETY: *len + 16 <= words.len() (checked by the caller); 32 bytes are written.
        unsafe { _mm256_storeu_si256(words.as_mut_ptr().add(*len) as *mut __m256i, low_words(out)) };
        *len += big.count_ones() as usize;
        let v = _mm512_mask_blend_epi32(big, x, _mm512_srli_epi32::<16>(x));
        // q = v / freq = (v + t) >> l with t = (v * rcp_low) >> 32, computed as
        // (((v - t) >> 1) + t) >> (l - 1) to stay within 32 bits; q = v when l == 0.
        let p02 = _mm512_mul_epu32(v, rcp);
        let p13 = _mm512_mul_epu32(_mm512_srli_epi64::<32>(v), _mm512_srli_epi64::<32>(rcp));
        let t = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64::<32>(p02), p13);
        let half = _mm512_add_epi32(_mm512_srli_epi32::<1>(_mm512_sub_epi32(v, t)), t);
        let lm1 = _mm512_max_epi32(_mm512_sub_epi32(l, one), _mm512_setzero_si512());
        let zero_shift = _mm512_cmpeq_epi32_mask(l, _mm512_setzero_si512());
        let q = _mm512_mask_blend_epi32(zero_shift, _mm512_srlv_epi32(half, lm1), v);
        x = _mm512_add_epi32(_mm512_add_epi32(v, start), _mm512_mullo_epi32(q, cmpl));
    }
    let x = _mm512_permutexvar_epi32(reverse, x);
    // SAFETY: writes the 64 bytes of the sixteen states.
    unsafe { _mm512_storeu_si512(st.as_mut_ptr() as *mut __m512i, x) };
}

/// The exact encoder's front end for 16-bit floats, sixteen elements at a time, for the
/// first `16k` elements of `pred` and `target`: each element's token and context into `tok`
/// and `ctx`, its histogram bin `ctx * stride + token` into `bins`, and its raw bits appended
/// to `bits`, exactly as `exact::tokenize`, the context map and the scalar loop give them.
///
/// The counting is left to the caller: sixteen increments in a row here, each a load and a
/// store through an address computed late, stalled the loop (at 15 cycles an element).
#[allow(clippy::too_many_arguments)]
pub fn front16(
    contexts: &Contexts,
    pred: &[u8],
    target: &[u8],
    tok: &mut [u8],
    ctx: &mut [u8],
    bins: &mut [u16],
    stride: usize,
    bits: &mut BitWriter,
) {
    assert!(available(), "front16 needs AVX-512F and AVX-512VBMI");
    let n = pred.len() / 2 / STATES * STATES;
    assert!(pred.len() == target.len() && tok.len() >= n && ctx.len() >= n && bins.len() >= n);
    assert!(contexts.hi >= contexts.lo && (contexts.hi - contexts.lo) < 64);
    assert!(stride > MAX_TOKEN && 64 * stride < 1 << 16);
    // SAFETY: AVX-512F and VBMI are available and the lengths were checked: every raw access
    // below stays inside the slices.
    unsafe { front16_avx512(contexts, &pred[..2 * n], &target[..2 * n], tok, ctx, bins, stride, bits) }
}

#[target_feature(enable = "avx512f,avx512vbmi,popcnt")]
#[allow(clippy::too_many_arguments)]
fn front16_avx512(
    contexts: &Contexts,
    pred: &[u8],
    target: &[u8],
    tok: &mut [u8],
    ctx: &mut [u8],
    bins: &mut [u16],
    stride: usize,
    bits: &mut BitWriter,
) {
    let ffff = _mm512_set1_epi32(0xFFFF);
    let sign16 = _mm512_set1_epi32(0x8000);
    let one = _mm512_set1_epi32(1);
    let sixteen = _mm512_set1_epi32(16);
    let stride = _mm512_set1_epi32(stride as i32);
    let low32 = _mm512_set1_epi64(0xFFFF_FFFF);
    let pairs_a = _mm512_set_epi64(7, 7, 7, 7, 6, 4, 2, 0);
    let pairs_b = _mm512_set_epi64(7, 7, 7, 7, 7, 5, 3, 1);
    let ordered = |x: __m512i| {
        let sign = _mm512_srai_epi32::<31>(_mm512_slli_epi32::<16>(x));
        _mm512_xor_si512(x, _mm512_or_si512(_mm512_and_si512(sign, ffff), sign16))
    };
    for g in 0..pred.len() / 32 {
        // SAFETY: g < len / 32, so bytes 32g..32g + 32 lie inside `pred` and `target`.
        let (p, t) = unsafe {
            (
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(pred.as_ptr().add(32 * g) as *const __m256i)),
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(target.as_ptr().add(32 * g) as *const __m256i)),
            )
        };
        let d = _mm512_and_si512(_mm512_sub_epi32(ordered(t), ordered(p)), ffff);
        let sd = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(d));
        let z = _mm512_and_si512(
            _mm512_xor_si512(_mm512_slli_epi32::<1>(sd), _mm512_srai_epi32::<31>(sd)),
            ffff,
        );
        // floor(log2(z | 16)) from the exponent of its (exact) f32 conversion.
        let f = _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_or_si512(z, sixteen)));
        let lg = _mm512_sub_epi32(_mm512_srli_epi32::<23>(f), _mm512_set1_epi32(127));
        let small = _mm512_cmplt_epu32_mask(z, sixteen);
        let nb = _mm512_maskz_sub_epi32(!small, lg, _mm512_set1_epi32(2));
        let m = _mm512_and_si512(_mm512_srlv_epi32(z, nb), _mm512_set1_epi32(3));
        let token = _mm512_mask_blend_epi32(small, _mm512_add_epi32(_mm512_slli_epi32::<2>(lg), m), z);
        let raw = _mm512_and_si512(z, _mm512_sub_epi32(_mm512_sllv_epi32(one, nb), one));
        let c = contexts_of(contexts, p);
        // SAFETY: elements 16g..16g + 16 lie inside `tok` and `ctx` (checked by the caller).
        unsafe {
            _mm_storeu_si128(tok.as_mut_ptr().add(16 * g) as *mut __m128i, low_bytes(token));
            _mm_storeu_si128(ctx.as_mut_ptr().add(16 * g) as *mut __m128i, low_bytes(c));
        }
        let bin = _mm512_add_epi32(_mm512_mullo_epi32(c, stride), token);
        // SAFETY: elements 16g..16g + 16 lie inside `bins` (checked by the caller).
        unsafe { _mm256_storeu_si256(bins.as_mut_ptr().add(16 * g) as *mut __m256i, low_words(bin)) };
        // Raw bits: neighbours joined into 64-bit lanes of up to 26 bits, then pairs of those
        // into four of up to 52, each one write.
        let v1 = _mm512_or_si512(
            _mm512_and_si512(raw, low32),
            _mm512_sllv_epi64(_mm512_srli_epi64::<32>(raw), _mm512_and_si512(nb, low32)),
        );
        let n1 = _mm512_add_epi64(_mm512_and_si512(nb, low32), _mm512_srli_epi64::<32>(nb));
        let (a, b) = (
            _mm512_permutexvar_epi64(pairs_a, v1),
            _mm512_permutexvar_epi64(pairs_b, v1),
        );
        let (na, nbb) = (
            _mm512_permutexvar_epi64(pairs_a, n1),
            _mm512_permutexvar_epi64(pairs_b, n1),
        );
        // Each of the four as one word: the bits below, their count in the top byte. Moved to
        // scalar registers by extracts: a vector store read back by narrower loads waits on
        // store forwarding, which cost more than all the arithmetic.
        let v2 = _mm512_or_si512(
            _mm512_or_si512(a, _mm512_sllv_epi64(b, na)),
            _mm512_slli_epi64::<56>(_mm512_add_epi64(na, nbb)),
        );
        let (q01, q23) = (_mm512_castsi512_si128(v2), _mm512_extracti32x4_epi32::<1>(v2));
        for w in [
            _mm_cvtsi128_si64(q01),
            _mm_extract_epi64::<1>(q01),
            _mm_cvtsi128_si64(q23),
            _mm_extract_epi64::<1>(q23),
        ] {
            let w = w as u64;
            bits.put(w & ((1 << 56) - 1), (w >> 56) as u32);
        }
    }
}

/// The exact codec's context of the 16-bit float at each of `positions` in `pred` (each
/// below `pred.len() / 2`), appended to `out`: as `exact::ContextMap` gives them, sixteen at a
/// time.
pub fn contexts16(contexts: &Contexts, pred: &[u8], positions: &[u32], out: &mut Vec<u8>) {
    assert!(available(), "contexts16 needs AVX-512F and AVX-512VBMI");
    assert!(contexts.hi >= contexts.lo && pred.len() >= 4 && pred.len().is_multiple_of(2));
    assert!(positions.iter().all(|&p| (p as usize) < pred.len() / 2));
    // SAFETY: AVX-512F and VBMI are available, and every position lies inside `pred`
    // (checked above; the gathers' reads are placed inside it, see there).
    unsafe { contexts16_avx512(contexts, pred, positions, out) }
}

/// The 16-bit elements of `data` at the sixteen positions `pos`, one to a 32-bit lane.
///
/// # Safety
/// AVX-512F must be available, `data.len() >= 4`, and every position below `data.len() / 2`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn gather16(pos: __m512i, data: &[u8]) -> __m512i {
    // Element p is read as the high half of the 4 bytes from 2p - 2, inside `data` for p >= 1
    // (the gather reads whole 32-bit words); element 0 as the low half of the first 4 bytes.
    let first = _mm512_cmpeq_epi32_mask(pos, _mm512_setzero_si512());
    let at = _mm512_mask_blend_epi32(
        first,
        _mm512_slli_epi32::<1>(_mm512_sub_epi32(pos, _mm512_set1_epi32(1))),
        pos,
    );
    // SAFETY: at = 2p - 2 (p >= 1) or 0, so at + 4 <= 2p + 2 <= data.len(), or 4 <=
    // data.len() (the caller's promise).
    let w = unsafe { _mm512_i32gather_epi32::<1>(at, data.as_ptr() as *const i32) };
    _mm512_mask_blend_epi32(
        first,
        _mm512_srli_epi32::<16>(w),
        _mm512_and_si512(w, _mm512_set1_epi32(0xFFFF)),
    )
}

/// How far ahead, in groups of sixteen positions, [`contexts16`] prefetches.
const PREFETCH_GROUPS: usize = 8;

#[target_feature(enable = "avx512f,avx512vbmi")]
fn contexts16_avx512(c: &Contexts, pred: &[u8], positions: &[u32], out: &mut Vec<u8>) {
    let (groups, tail) = positions.as_chunks::<16>();
    out.reserve(positions.len());
    for (k, g) in groups.iter().enumerate() {
        // The gathers walk the chunk, whose lines are rarely in cache yet (a resident model's
        // chunk was last touched a switch ago), and do not train the hardware prefetcher as
        // loads do: ask for the lines eight groups ahead (sixteen positions span about four
        // at the densities `changes` chunks have). A prefetch never faults, past the end
        // included.
        if let Some(ahead) = groups.get(k + PREFETCH_GROUPS) {
            let at = pred.as_ptr().wrapping_add(2 * ahead[0] as usize);
            for line in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(64 * line) as *const i8);
            }
        }
        // SAFETY: `g` holds 64 bytes.
        let pos = unsafe { _mm512_loadu_si512(g.as_ptr() as *const __m512i) };
        // SAFETY: every position is below pred.len() / 2, and pred.len() >= 4 (checked by
        // the caller).
        let v = unsafe { gather16(pos, pred) };
        let ctx = contexts_of(c, v);
        let mut bytes = [0u8; 16];
        // SAFETY: `bytes` holds 16 bytes.
        unsafe { _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, low_bytes(ctx)) };
        out.extend_from_slice(&bytes);
    }
    for &p in tail {
        let v = u16::from_le_bytes([pred[2 * p as usize], pred[2 * p as usize + 1]]) as u32;
        out.push(context_of(c, v) as u8);
    }
}

/// True if this CPU can run [`shift16`].
pub fn f_available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// Adds the zigzagged differences `diffs` (of the order-preserving integers, as `changes`
/// codes them; `back` subtracts them) to the 16-bit floats of `buf` at `positions`, sixteen at
/// a time, calling `seen(position, old, new)` in position order for each element whose bits
/// in `field` changed. Stops before the first group whose positions do not strictly increase
/// or leave `buf`, and at the last whole group: returns how many changes it applied, the rest
/// being the caller's.
pub fn shift16(
    positions: &[u32],
    diffs: &[u64],
    buf: &mut [u8],
    back: bool,
    field: u16,
    seen: impl FnMut(usize, u64, u64),
) -> usize {
    assert!(f_available(), "shift16 needs AVX-512F");
    // Pairs, as the scalar path zips them.
    let k = positions.len().min(diffs.len());
    let (positions, diffs) = (&positions[..k], &diffs[..k]);
    // Positions compare as signed 32-bit lanes: chunks are far below 2^31 elements.
    if buf.len() < 4 || !buf.len().is_multiple_of(2) || buf.len() / 2 > i32::MAX as usize {
        return 0;
    }
    // SAFETY: AVX-512F is available; every gather is placed inside `buf` (see there).
    unsafe { shift16_avx512(positions, diffs, buf, back, field, seen) }
}

#[target_feature(enable = "avx512f")]
fn shift16_avx512(
    positions: &[u32],
    diffs: &[u64],
    buf: &mut [u8],
    back: bool,
    field: u16,
    mut seen: impl FnMut(usize, u64, u64),
) -> usize {
    let one = _mm512_set1_epi32(1);
    let low16 = _mm512_set1_epi32(0xFFFF);
    let sign = _mm512_set1_epi32(0x8000);
    let n = _mm512_set1_epi32((buf.len() / 2) as i32);
    let field = _mm512_set1_epi32(field as i32);
    let (groups, _) = positions.as_chunks::<16>();
    let (dgroups, _) = diffs.as_chunks::<16>();
    // The values of group k, if its positions strictly increase from `last` (the previous
    // group's, compared as signed: -1 before the first; positions are below 2^31, as `n` is)
    // and lie inside `buf`.
    let load = |k: usize, last: __m512i, buf: &[u8]| -> Option<(__m512i, __m512i)> {
        let g = groups.get(k)?;
        // SAFETY: `g` holds 64 bytes.
        let pos = unsafe { _mm512_loadu_si512(g.as_ptr() as *const __m512i) };
        // Lane j's predecessor: lane j - 1, or the previous group's last lane for lane 0.
        let before = _mm512_alignr_epi32::<15>(pos, last);
        if _mm512_cmpge_epu32_mask(pos, n) | _mm512_cmple_epi32_mask(pos, before) != 0 {
            return None;
        }
        // SAFETY: every position is below n = buf.len() / 2 (checked above), and buf.len() >=
        // 4 (checked by the caller).
        Some((pos, unsafe { gather16(pos, buf) }))
    };
    let mut next = load(0, _mm512_set1_epi32(-1), buf);
    let mut k = 0;
    while let Some((pos, old)) = next {
        let d = &dgroups[k];
        // SAFETY: `d` holds 128 bytes, two vectors of eight u64.
        let (z0, z1) = unsafe {
            (
                _mm512_loadu_si512(d.as_ptr() as *const __m512i),
                _mm512_loadu_si512(d.as_ptr().add(8) as *const __m512i),
            )
        };
        let z = _mm512_and_si512(
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm512_cvtepi64_epi32(z0)),
                _mm512_cvtepi64_epi32(z1),
            ),
            low16,
        );
        // unzigzag: (z >> 1) ^ -(z & 1), negated to subtract; all modulo 2^16.
        let mut delta = _mm512_xor_si512(
            _mm512_srli_epi32::<1>(z),
            _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_and_si512(z, one)),
        );
        if back {
            delta = _mm512_sub_epi32(_mm512_setzero_si512(), delta);
        }
        // Order-preserving integers: negatives inverted, positives with the sign bit set.
        let negative = _mm512_test_epi32_mask(old, sign);
        let ordered = _mm512_mask_blend_epi32(negative, _mm512_or_si512(old, sign), _mm512_xor_si512(old, low16));
        let sum = _mm512_and_si512(_mm512_add_epi32(ordered, delta), low16);
        let positive = _mm512_test_epi32_mask(sum, sign);
        let new = _mm512_mask_blend_epi32(positive, _mm512_xor_si512(sum, low16), _mm512_andnot_si512(sign, sum));
        // The next group's values are gathered before this group's stores: a gather that
        // overlaps stores still in flight waits for them to retire, which cost more than the
        // rest of the loop. The next group's elements are not among this group's, and the
        // neighbours its windows also cover are not used.
        next = load(k + 1, pos, buf);
        let mut values = [0u32; 16];
        // SAFETY: `values` holds 64 bytes.
        unsafe { _mm512_storeu_si512(values.as_mut_ptr() as *mut __m512i, new) };
        let g = &groups[k];
        for (&p, &v) in g.iter().zip(&values) {
            let at = 2 * p as usize;
            buf[at..at + 2].copy_from_slice(&(v as u16).to_le_bytes());
        }
        let mut moved = _mm512_test_epi32_mask(_mm512_xor_si512(old, new), field);
        if moved != 0 {
            let mut olds = [0u32; 16];
            // SAFETY: `olds` holds 64 bytes.
            unsafe { _mm512_storeu_si512(olds.as_mut_ptr() as *mut __m512i, old) };
            while moved != 0 {
                let j = moved.trailing_zeros() as usize;
                moved &= moved - 1;
                seen(g[j] as usize, olds[j] as u64, values[j] as u64);
            }
        }
        k += 1;
    }
    16 * k
}

/// True if this CPU can run [`differing16`].
#[inline]
pub fn bw_available() -> bool {
    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw")
}

/// Which of 64 16-bit elements differ between `a` and `b` in the bits of `field`: bit `j`
/// of the result for element `j`. Both hold 128 bytes.
#[inline]
pub fn differing16(a: &[u8], b: &[u8], field: u16) -> u64 {
    assert!(bw_available(), "differing16 needs AVX-512BW");
    assert!(a.len() == 128 && b.len() == 128);
    // SAFETY: AVX-512F and BW are available and both slices hold 128 bytes (checked above).
    unsafe { differing16_avx512(a, b, field) }
}

#[target_feature(enable = "avx512f,avx512bw")]
fn differing16_avx512(a: &[u8], b: &[u8], field: u16) -> u64 {
    let f = _mm512_set1_epi16(field as i16);
    let half = |k: usize| {
        // SAFETY: k < 2, so bytes 64k..64k + 64 lie inside both 128-byte slices.
        let (x, y) = unsafe {
            (
                _mm512_loadu_si512(a.as_ptr().add(64 * k) as *const __m512i),
                _mm512_loadu_si512(b.as_ptr().add(64 * k) as *const __m512i),
            )
        };
        _mm512_test_epi16_mask(_mm512_xor_si512(x, y), f) as u64
    };
    half(0) | half(1) << 32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn group_encoder_matches_the_avx2_one(
            counts in proptest::collection::vec(proptest::collection::vec(0u32..50, 1..64), 1..6),
            picks in proptest::collection::vec((any::<u16>(), any::<u16>()), 0..40),
        ) {
            if !available() || !super::super::avx2::available() {
                return Ok(());
            }
            // A model from the counts (every context gets at least one symbol), then symbols
            // each context can code.
            let counts: Vec<[u32; 256]> = counts.iter().map(|c| {
                let mut a = [0u32; 256];
                a[..c.len()].copy_from_slice(c);
                a[0] += 1;
                a
            }).collect();
            let model = Model::from_counts(&counts);
            let tables = EncoderTables::new(&model);
            let n = picks.len() / 16 * 16 * 4;
            let (mut symbols, mut contexts) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for i in 0..n {
                let (a, b) = picks[i % picks.len()];
                let c = (a as usize + i) % counts.len();
                let present: Vec<usize> = (0..256).filter(|&s| counts[c][s] > 0).collect();
                contexts.push(c as u8);
                symbols.push(present[(b as usize + 7 * i) % present.len()] as u8);
            }
            let init: [u32; STATES] = std::array::from_fn(|j| (1 << 16) + 977 * j as u32 * picks.len() as u32);
            let (mut wa, mut wb) = (vec![0u16; n + 16], vec![0u16; n + 16]);
            let (mut la, mut lb) = (0, 0);
            let (mut sa, mut sb) = (init, init);
            encode_groups(&tables, &symbols, &contexts, &mut wa, &mut la, &mut sa);
            super::super::avx2::encode_groups(&tables, &symbols, &contexts, &mut wb, &mut lb, &mut sb);
            prop_assert_eq!(sa, sb);
            prop_assert_eq!(&wa[..la], &wb[..lb]);
        }
    }
}
