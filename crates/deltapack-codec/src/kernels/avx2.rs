//! An AVX2 decoder for 16-bit float chunks (BF16, F16): the sixteen interleaved rANS states
//! of the exact codec run as four independent vectors of four lanes.
//!
//! It reads the same format as the scalar decoder in `exact` and must give the same output
//! and the same verdict on every payload, hostile ones included; a property test holds both
//! to that. Per group of four elements, the contexts, the table lookups (one gather), the
//! state updates, the renormalisation (a shuffle routes the next words to the lanes that
//! need them) and the reconstruction are vector operations; only the token expansion and
//! the raw bits stay scalar.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::tables::{
    next_state, with_tables, Contexts, PackedTables, Parts, BIAS_MASK, BIAS_SHIFT, FREQ_SHIFT, SYMBOL_MASK,
};
use crate::bits::{BitReader, BitWriter};
use crate::error::{verdict, DecodeError};
use crate::rans::{EncoderTables, INTERLEAVE as STATES, SCALE_BITS};

const SCALE: usize = 1 << SCALE_BITS;
const RANS_L: u32 = 1 << 16;

/// True if this CPU can run [`decode16`].
pub fn available() -> bool {
    std::is_x86_feature_detected!("avx2")
}

/// Decodes a chunk of 16-bit floats, with the scalar decoder's verdict on every payload.
/// `pred` and `out` have the same even length.
pub fn decode16(parts: &Parts, pred: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    assert!(available(), "decode16 needs AVX2");
    assert_eq!(pred.len(), out.len());
    assert!(parts.contexts.hi >= parts.contexts.lo && ((parts.contexts.hi - parts.contexts.lo) as usize) < 64);
    assert_eq!(STATES, 16, "the vector decoder runs four quads of four states");
    assert_eq!(
        parts.model.freqs.len(),
        (parts.contexts.hi - parts.contexts.lo) as usize + 1
    );
    // SAFETY: AVX2 is available (checked above), and `decode16_avx2` only reads and writes
    // within the slices it is given (see the comments at each raw access), with tables filled
    // for `parts.model`.
    with_tables(parts.model, |t| unsafe { decode16_avx2(parts, t, pred, out) })
}

/// Shuffle controls for the renormalisation: for each mask of lanes that need a word, lane
/// `j` receives the `k`-th next word (bytes `2k, 2k + 1`, zero-extended) where `k` counts
/// the needing lanes before `j`; other lanes receive zero.
const fn renorm_shuffles() -> [[u8; 16]; 16] {
    let mut t = [[0x80u8; 16]; 16];
    let mut m = 0;
    while m < 16 {
        let mut k = 0u8;
        let mut j = 0;
        while j < 4 {
            if m & (1 << j) != 0 {
                t[m][4 * j] = 2 * k;
                t[m][4 * j + 1] = 2 * k + 1;
                k += 1;
            }
            j += 1;
        }
        m += 1;
    }
    t
}

const SHUFFLES: [[u8; 16]; 16] = renorm_shuffles();

#[target_feature(enable = "avx2")]
unsafe fn decode16_avx2(parts: &Parts, tables: &PackedTables, pred: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    let words = parts.words;
    let mut bits = BitReader::new(parts.bits);
    let n = pred.len() / 2;
    let word_at = |p: usize| {
        words
            .get(2 * p..2 * p + 2)
            .map_or(0u32, |b| u16::from_le_bytes([b[0], b[1]]) as u32)
    };
    // The initial states, as the scalar WordReader reads them.
    let mut pos = 0usize; // words consumed
    let mut st = [0u32; STATES];
    for s in st.iter_mut() {
        *s = word_at(pos) | (word_at(pos + 1) << 16);
        pos += 2;
    }
    // Four independent chains of four lanes: state 4q + j is lane j of quad q.
    let [mut x0, mut x1, mut x2, mut x3] = load_quads(&st);
    let lo = _mm_set1_epi32(parts.contexts.lo as i32);
    let hi = _mm_set1_epi32(parts.contexts.hi as i32);
    let emask = _mm_set1_epi32(parts.contexts.exp_mask as i32);
    let shift = _mm_cvtsi32_si128(parts.contexts.mantissa_bits as i32);
    let slot_mask = _mm_set1_epi32(SCALE as i32 - 1);
    let ffff = _mm_set1_epi32(0xFFFF);
    let sign16 = _mm_set1_epi32(0x8000);
    let low15 = _mm_set1_epi32(0x7FFF);
    let mut bad = 0u64;
    let groups = n / STATES;
    // One quad: four lanes, four states, four elements. A macro rather than a loop keeps
    // the four quads' states in registers, so their chains overlap.
    macro_rules! quad {
        ($x:ident, $q:expr, $g:ident) => {{
            let at = 8 * (STATES / 4 * $g + $q);
            // SAFETY: g < n / 16 and q < 4, so bytes at..at + 8 lie inside `pred` (length 2n).
            let p16 = _mm_loadl_epi64(pred.as_ptr().add(at) as *const __m128i);
            let p = _mm_cvtepu16_epi32(p16);
            let e = _mm_and_si128(_mm_srl_epi32(p, shift), emask);
            let ctx = _mm_sub_epi32(_mm_min_epu32(_mm_max_epu32(e, lo), hi), lo);
            let slot = _mm_and_si128($x, slot_mask);
            let idx = _mm_or_si128(_mm_slli_epi32(ctx, SCALE_BITS as i32), slot);
            // SAFETY: ctx <= hi - lo < number of contexts and slot < SCALE, so every index is
            // below tables.slots.len() = contexts * SCALE.
            let entry = _mm_i32gather_epi32(tables.slots.as_ptr() as *const i32, idx, 4);
            let freq = _mm_srli_epi32(entry, FREQ_SHIFT as i32);
            let bias = _mm_and_si128(
                _mm_srli_epi32(entry, BIAS_SHIFT as i32),
                _mm_set1_epi32(BIAS_MASK as i32),
            );
            $x = _mm_add_epi32(_mm_mullo_epi32(freq, _mm_srli_epi32($x, SCALE_BITS as i32)), bias);
            // Renormalise the lanes whose state fell below 2^16 with the next words, in lane order.
            let need = _mm_cmpeq_epi32(_mm_srli_epi32($x, 16), _mm_setzero_si128());
            let m = _mm_movemask_ps(_mm_castsi128_ps(need)) as usize;
            let mut next = [0u8; 8];
            match words.get(2 * pos..2 * pos + 8) {
                Some(b) => next.copy_from_slice(b),
                None => {
                    for (k, v) in next.chunks_exact_mut(2).enumerate() {
                        v.copy_from_slice(&(word_at(pos + k) as u16).to_le_bytes());
                    }
                }
            }
            // SAFETY: `next` holds 8 bytes; m < 16 indexes SHUFFLES, whose rows are 16 bytes.
            let w = _mm_shuffle_epi8(
                _mm_loadl_epi64(next.as_ptr() as *const __m128i),
                _mm_loadu_si128(SHUFFLES[m].as_ptr() as *const __m128i),
            );
            $x = _mm_blendv_epi8($x, _mm_or_si128(_mm_slli_epi32($x, 16), w), need);
            pos += m.count_ones() as usize;
            // Tokens and raw bits, in element order.
            let mut syms = [0u32; 4];
            let mut ctxs = [0u32; 4];
            _mm_storeu_si128(syms.as_mut_ptr() as *mut __m128i, entry);
            _mm_storeu_si128(ctxs.as_mut_ptr() as *mut __m128i, ctx);
            bits.refill();
            let mut z = [0u32; 4];
            for j in 0..4 {
                bad |= (tables.unused >> (ctxs[j] & 63)) & 1;
                let (base, nb) = parts.expand[(syms[j] & SYMBOL_MASK) as usize];
                z[j] = (base | bits.take(nb)) as u32;
            }
            // value = unordered(ordered(pred) + unzigzag(z)), all modulo 2^16.
            let z = _mm_loadu_si128(z.as_ptr() as *const __m128i);
            let one = _mm_set1_epi32(1);
            let d = _mm_xor_si128(
                _mm_srli_epi32(z, 1),
                _mm_sub_epi32(_mm_setzero_si128(), _mm_and_si128(z, one)),
            );
            let psign = _mm_srai_epi32(_mm_slli_epi32(p, 16), 31);
            let ord = _mm_xor_si128(p, _mm_or_si128(_mm_and_si128(psign, ffff), sign16));
            let o = _mm_and_si128(_mm_add_epi32(ord, d), ffff);
            let osign = _mm_srai_epi32(_mm_slli_epi32(o, 16), 31);
            let v = _mm_xor_si128(o, _mm_xor_si128(ffff, _mm_and_si128(osign, low15)));
            // SAFETY: as for the load: bytes at..at + 8 lie inside `out`, as long as `pred`.
            _mm_storel_epi64(out.as_mut_ptr().add(at) as *mut __m128i, _mm_packus_epi32(v, v));
        }};
    }
    for g in 0..groups {
        quad!(x0, 0, g);
        quad!(x1, 1, g);
        quad!(x2, 2, g);
        quad!(x3, 3, g);
    }
    // The last n % 16 elements one at a time, element i on state i % 16, as in the scalar decoder.
    store_quads([x0, x1, x2, x3], &mut st);
    for i in groups * STATES..n {
        if i % 4 == 0 {
            bits.refill();
        }
        let k = i % STATES;
        let p = u16::from_le_bytes([pred[2 * i], pred[2 * i + 1]]) as u32;
        let e = (p >> parts.contexts.mantissa_bits) & parts.contexts.exp_mask;
        let c = e.clamp(parts.contexts.lo as u32, parts.contexts.hi as u32) - parts.contexts.lo as u32;
        bad |= (tables.unused >> (c & 63)) & 1;
        let entry = tables.slots[c as usize * SCALE + (st[k] as usize & (SCALE - 1))];
        st[k] = next_state(entry, st[k]);
        if st[k] < RANS_L {
            st[k] = (st[k] << 16) | word_at(pos);
            pos += 1;
        }
        let (base, nb) = parts.expand[(entry & SYMBOL_MASK) as usize];
        let z = (base | bits.take(nb)) as u32;
        let d = (z >> 1) ^ (z & 1).wrapping_neg();
        let ord = if p & 0x8000 != 0 { !p & 0xFFFF } else { p | 0x8000 };
        let o = ord.wrapping_add(d) & 0xFFFF;
        let v = if o & 0x8000 != 0 { o & 0x7FFF } else { !o & 0xFFFF };
        out[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_le_bytes());
    }
    verdict(
        bad != 0,
        2 * pos == words.len() && st.iter().all(|&s| s == RANS_L) && bits.finish(),
    )
}

/// The encoder's per-element work for 16-bit floats, eight at a time: for each element, its
/// token, context, raw bits and raw bit count, exactly as `exact::tokenize` and the context
/// map give them. `pred` and `target` hold `8k` elements; every output holds at least `8k`.
pub fn tokens16(
    contexts: &Contexts,
    pred: &[u8],
    target: &[u8],
    tok: &mut [u8],
    ctx: &mut [u8],
    raw: &mut [u16],
    nbits: &mut [u8],
) {
    assert!(available(), "tokens16 needs AVX2");
    let n = pred.len() / 2;
    assert!(pred.len() == target.len() && pred.len().is_multiple_of(16));
    assert!(tok.len() >= n && ctx.len() >= n && raw.len() >= n && nbits.len() >= n);
    // SAFETY: AVX2 is available (checked above) and the lengths were checked: every raw
    // access below stays inside the slices.
    unsafe { tokens16_avx2(contexts, pred, target, tok, ctx, raw, nbits) }
}

#[target_feature(enable = "avx2")]
unsafe fn tokens16_avx2(
    contexts: &Contexts,
    pred: &[u8],
    target: &[u8],
    tok: &mut [u8],
    ctx: &mut [u8],
    raw: &mut [u16],
    nbits: &mut [u8],
) {
    let lo = _mm256_set1_epi32(contexts.lo as i32);
    let hi = _mm256_set1_epi32(contexts.hi as i32);
    let emask = _mm256_set1_epi32(contexts.exp_mask as i32);
    let shift = _mm_cvtsi32_si128(contexts.mantissa_bits as i32);
    let ffff = _mm256_set1_epi32(0xFFFF);
    let sign16 = _mm256_set1_epi32(0x8000);
    let one = _mm256_set1_epi32(1);
    let sixteen = _mm256_set1_epi32(16);
    let ordered = |x: __m256i| {
        let sign = _mm256_srai_epi32(_mm256_slli_epi32(x, 16), 31);
        _mm256_xor_si256(x, _mm256_or_si256(_mm256_and_si256(sign, ffff), sign16))
    };
    for g in 0..pred.len() / 16 {
        // SAFETY: g < len / 16, so bytes 16g..16g + 16 lie inside `pred` and `target`.
        let p = _mm256_cvtepu16_epi32(_mm_loadu_si128(pred.as_ptr().add(16 * g) as *const __m128i));
        let t = _mm256_cvtepu16_epi32(_mm_loadu_si128(target.as_ptr().add(16 * g) as *const __m128i));
        let d = _mm256_and_si256(_mm256_sub_epi32(ordered(t), ordered(p)), ffff);
        let s = _mm256_srai_epi32(_mm256_slli_epi32(d, 16), 16);
        let z = _mm256_and_si256(
            _mm256_xor_si256(_mm256_slli_epi32(s, 1), _mm256_srai_epi32(s, 31)),
            ffff,
        );
        // floor(log2(z | 16)) from the exponent of its (exact) f32 conversion.
        let f = _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_or_si256(z, sixteen)));
        let n = _mm256_sub_epi32(_mm256_srli_epi32(f, 23), _mm256_set1_epi32(127));
        let nb = _mm256_sub_epi32(n, _mm256_set1_epi32(2));
        let m = _mm256_and_si256(_mm256_srlv_epi32(z, nb), _mm256_set1_epi32(3));
        let small = _mm256_cmpgt_epi32(sixteen, z);
        let token = _mm256_blendv_epi8(_mm256_add_epi32(_mm256_slli_epi32(n, 2), m), z, small);
        let nb = _mm256_andnot_si256(small, nb);
        let r = _mm256_and_si256(z, _mm256_sub_epi32(_mm256_sllv_epi32(one, nb), one));
        let e = _mm256_and_si256(_mm256_srl_epi32(p, shift), emask);
        let c = _mm256_sub_epi32(_mm256_min_epu32(_mm256_max_epu32(e, lo), hi), lo);
        // Narrow to bytes and 16-bit words: pack within 128-bit halves, then put halves in order.
        let tn = _mm256_permute4x64_epi64(_mm256_packus_epi32(token, nb), 0b11_01_10_00);
        let tn8 = _mm256_packus_epi16(tn, tn);
        let rc = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, c), 0b11_01_10_00);
        let c8 = _mm256_packus_epi16(rc, rc);
        // SAFETY: element offsets 8g..8g + 8 lie inside every output (checked by the caller).
        _mm_storel_epi64(tok.as_mut_ptr().add(8 * g) as *mut __m128i, _mm256_castsi256_si128(tn8));
        _mm_storel_epi64(
            nbits.as_mut_ptr().add(8 * g) as *mut __m128i,
            _mm256_extracti128_si256(tn8, 1),
        );
        _mm_storeu_si128(raw.as_mut_ptr().add(8 * g) as *mut __m128i, _mm256_castsi256_si128(rc));
        _mm_storel_epi64(
            ctx.as_mut_ptr().add(8 * g) as *mut __m128i,
            _mm256_extracti128_si256(c8, 1),
        );
    }
}

/// The exact encoder's per-element work for a chunk of 16-bit floats, in blocks of 256
/// elements (its whole blocks only): tokens into `tok`, contexts into `ctx`, counts into the
/// four sub-histograms of `sub` (`nctx * stride` each, element `i` into sub-histogram `i % 4`)
/// and raw bits into `bits`, as the scalar loop of `exact::encode` does them. Returns the
/// number of elements done.
#[allow(clippy::too_many_arguments)]
pub fn front16(
    contexts: &Contexts,
    pred: &[u8],
    target: &[u8],
    tok: &mut [u8],
    ctx: &mut [u8],
    sub: &mut [u32],
    nctx: usize,
    stride: usize,
    bits: &mut BitWriter,
) -> usize {
    let n = tok.len();
    // Tokens, contexts and raw bits eight at a time, in blocks that stay in L1; the
    // histogram and the bit packing stay scalar.
    const BLOCK: usize = 256;
    let (mut raw, mut nb) = ([0u16; BLOCK], [0u8; BLOCK]);
    let done = n / BLOCK * BLOCK;
    for b in (0..done).step_by(BLOCK) {
        let (s, c) = (&mut tok[b..b + BLOCK], &mut ctx[b..b + BLOCK]);
        tokens16(
            contexts,
            &pred[2 * b..2 * (b + BLOCK)],
            &target[2 * b..2 * (b + BLOCK)],
            s,
            c,
            &mut raw,
            &mut nb,
        );
        for g in 0..BLOCK / 4 {
            let (mut acc, mut nbits) = (0u64, 0u32);
            for j in 0..4 {
                let i = 4 * g + j;
                sub[(j * nctx + c[i] as usize) * stride + s[i] as usize] += 1;
                acc |= (raw[i] as u64) << nbits;
                nbits += nb[i] as u32;
            }
            bits.put(acc, nbits);
        }
    }
    done
}

/// Shuffle controls for the encoder's renormalisation: for each mask of lanes that emit a
/// word, the low 16 bits of those lanes packed in descending lane order (the order the
/// scalar encoder, which walks symbols backwards, emits them).
const fn emit_shuffles() -> [[u8; 16]; 16] {
    let mut t = [[0x80u8; 16]; 16];
    let mut m = 0;
    while m < 16 {
        let mut k = 0;
        let mut j = 4;
        while j > 0 {
            j -= 1;
            if m & (1 << j) != 0 {
                t[m][2 * k] = 4 * j as u8;
                t[m][2 * k + 1] = 4 * j as u8 + 1;
                k += 1;
            }
        }
        m += 1;
    }
    t
}

const EMIT: [[u8; 16]; 16] = emit_shuffles();

/// Encodes whole groups of sixteen symbols (`symbols.len()` is a multiple of 16) into the
/// sixteen states, as the scalar loop in `rans::encode` would: same states, same words.
/// `words` must have room for `symbols.len() + 8` words past `len`.
pub fn encode_groups(
    tables: &EncoderTables,
    symbols: &[u8],
    contexts: &[u8],
    words: &mut [u16],
    len: &mut usize,
    st: &mut [u32; STATES],
) {
    assert!(available(), "encode_groups needs AVX2");
    assert_eq!(STATES, 16, "the vector encoder runs four quads of four states");
    assert!(symbols.len() == contexts.len() && symbols.len().is_multiple_of(STATES));
    assert!(words.len() >= *len + symbols.len() + 8);
    assert!(!tables.entries.is_empty());
    // SAFETY: AVX2 is available; every table index is clamped below entries.len(), and every
    // word store stays below len + symbols.len() + 8 <= words.len() (checked above).
    unsafe { encode_groups_avx2(tables, symbols, contexts, words, len, st) }
}

#[target_feature(enable = "avx2")]
unsafe fn encode_groups_avx2(
    tables: &EncoderTables,
    symbols: &[u8],
    contexts: &[u8],
    words: &mut [u16],
    len: &mut usize,
    st: &mut [u32; STATES],
) {
    let base = tables.entries.as_ptr() as *const i32;
    let stride = _mm_set1_epi32(tables.stride as i32);
    // Valid symbols always index inside the tables; the clamp makes that a guarantee for the
    // gathers whatever the input (a bad one only yields a wrong, never an unsafe, encoding).
    let last = _mm_set1_epi32(tables.entries.len() as i32 - 1);
    let hi32 = _mm_set_epi32(-1, 0, -1, 0);
    let [mut x0, mut x1, mut x2, mut x3] = load_quads(st);
    // One quad: states 4q..4q + 4 take symbols 16g + 4q + j. A macro keeps the states in registers.
    macro_rules! quad {
        ($x:ident, $q:expr, $g:ident) => {{
            let at = STATES * $g + 4 * $q;
            // SAFETY: at + 4 <= symbols.len() == contexts.len().
            let s = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(
                (symbols.as_ptr().add(at) as *const i32).read_unaligned(),
            ));
            let c = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(
                (contexts.as_ptr().add(at) as *const i32).read_unaligned(),
            ));
            // Index in 32-bit words of the entry's first word (entries are 8 bytes).
            let entry = _mm_min_epu32(_mm_add_epi32(_mm_mullo_epi32(c, stride), s), last);
            let idx = _mm_slli_epi32(entry, 1);
            // SAFETY: entry <= entries.len() - 1, so both gathered words lie inside the tables.
            let rcp = _mm_i32gather_epi32(base, idx, 4);
            let packed = _mm_i32gather_epi32(base.add(1), idx, 4);
            let freq = _mm_and_si128(packed, _mm_set1_epi32(0x1FFF));
            let start = _mm_and_si128(_mm_srli_epi32(packed, 13), _mm_set1_epi32(0xFFF));
            let cmpl = _mm_sub_epi32(_mm_set1_epi32(SCALE as i32), freq);
            let l = _mm_srli_epi32(packed, 25);
            // Renormalise: x >= freq << 20 (compared as x >> 20 >= freq, which cannot overflow).
            let big = _mm_cmpgt_epi32(_mm_srli_epi32($x, 20), _mm_sub_epi32(freq, _mm_set1_epi32(1)));
            let m = _mm_movemask_ps(_mm_castsi128_ps(big)) as usize;
            let emitted = _mm_shuffle_epi8($x, _mm_loadu_si128(EMIT[m].as_ptr() as *const __m128i));
            // SAFETY: *len + 4 <= words.len() (checked by the caller); 8 bytes are written.
            _mm_storel_epi64(words.as_mut_ptr().add(*len) as *mut __m128i, emitted);
            *len += m.count_ones() as usize;
            let v = _mm_blendv_epi8($x, _mm_srli_epi32($x, 16), big);
            // q = v / freq = (v + t) >> l with t = (v * rcp_low) >> 32, computed as
            // (((v - t) >> 1) + t) >> (l - 1) to stay within 32 bits; q = v when l == 0.
            let p02 = _mm_mul_epu32(v, rcp);
            let p13 = _mm_mul_epu32(_mm_srli_epi64(v, 32), _mm_srli_epi64(rcp, 32));
            let t = _mm_or_si128(_mm_srli_epi64(p02, 32), _mm_and_si128(p13, hi32));
            let half = _mm_add_epi32(_mm_srli_epi32(_mm_sub_epi32(v, t), 1), t);
            let lm1 = _mm_max_epi32(_mm_sub_epi32(l, _mm_set1_epi32(1)), _mm_setzero_si128());
            let q = _mm_blendv_epi8(_mm_srlv_epi32(half, lm1), v, _mm_cmpeq_epi32(l, _mm_setzero_si128()));
            $x = _mm_add_epi32(_mm_add_epi32(v, start), _mm_mullo_epi32(q, cmpl));
        }};
    }
    for g in (0..symbols.len() / STATES).rev() {
        quad!(x3, 3, g);
        quad!(x2, 2, g);
        quad!(x1, 1, g);
        quad!(x0, 0, g);
    }
    store_quads([x0, x1, x2, x3], st);
}

/// The sixteen states as four vectors of four lanes: state `4q + j` is lane `j` of quad `q`.
fn load_quads(st: &[u32; STATES]) -> [__m128i; 4] {
    // SAFETY: each load reads 16 bytes at element 4q (q < 4) of a 16-element array.
    std::array::from_fn(|q| unsafe { _mm_loadu_si128(st[4 * q..].as_ptr() as *const __m128i) })
}

/// Inverse of [`load_quads`].
fn store_quads(quads: [__m128i; 4], st: &mut [u32; STATES]) {
    for (q, x) in quads.into_iter().enumerate() {
        // SAFETY: writes 16 bytes at element 4q (q < 4) of a 16-element array.
        unsafe { _mm_storeu_si128(st[4 * q..].as_mut_ptr() as *mut __m128i, x) }
    }
}
