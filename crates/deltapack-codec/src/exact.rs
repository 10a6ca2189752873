//! The exact (lossless) codec for one chunk of a tensor.
//!
//! Each element is coded as the difference between the fine-tune's bit pattern and its
//! prediction (the base value), both first mapped to integers that preserve float order, so
//! that a small change of a negative weight is as small a number as that of a positive one.
//! The wrapping difference is zigzag-mapped and split into a token (the value itself below
//! 16, otherwise its bit length and the two bits after the leading one) and raw low bits.
//! Tokens are rANS-coded under a context: the base value's exponent, which sets how many
//! units in the last place a given change spans. Every chunk carries its own model, so
//! chunks encode and decode independently and the output never depends on thread count.
//!
//! Payload layout: `ctx_lo: u16, ctx_hi: u16, model, n_words: varint, words: u16 LE x n,
//! raw bits (rest)`.

use super::bits::{BitReader, BitWriter};
use super::rans::{self, DecoderTables, EncoderTables, Model};
use crate::error::verdict;
use crate::kernels::{self, Kernel};
use crate::layout::{Element, ElementLayout};

/// Most exponent contexts one chunk may use; rarer exponents share the edge contexts.
pub(super) const MAX_CONTEXTS: usize = 40;
/// Values below this are tokens by themselves.
const DIRECT: u64 = 16;

pub use crate::error::DecodeError;

/// Reusable buffers for encoding, one set per worker thread.
#[derive(Default)]
pub struct Scratch {
    symbols: Vec<u8>,
    contexts: Vec<u8>,
    /// Histogram bins (`context * stride + token`), for the AVX-512 front end.
    bins: Vec<u16>,
    words: Vec<u16>,
    bits: Vec<u8>,
}

#[inline(always)]
pub(super) fn mask(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Maps a float bit pattern to an integer with the same order as the float values.
#[inline(always)]
pub(super) fn to_ordered(x: u64, bits: u32, float: bool) -> u64 {
    if !float {
        return x;
    }
    let sign = 1u64 << (bits - 1);
    if x & sign != 0 {
        !x & mask(bits)
    } else {
        x | sign
    }
}

#[inline(always)]
pub(super) fn from_ordered(o: u64, bits: u32, float: bool) -> u64 {
    if !float {
        return o;
    }
    let sign = 1u64 << (bits - 1);
    if o & sign != 0 {
        o & !sign
    } else {
        !o & mask(bits)
    }
}

#[inline(always)]
pub(super) fn zigzag(d: u64, bits: u32) -> u64 {
    let s = ((d << (64 - bits)) as i64) >> (64 - bits);
    ((s << 1) ^ (s >> 63)) as u64 & mask(bits)
}

#[inline(always)]
pub(super) fn unzigzag(z: u64, bits: u32) -> u64 {
    ((z >> 1) ^ (z & 1).wrapping_neg()) & mask(bits)
}

/// Splits `v` into (token, raw bit count, raw bits), without branches: which case applies
/// depends on the data and would be mispredicted often.
#[inline(always)]
pub(super) fn tokenize(v: u64) -> (u8, u32, u64) {
    let small = v < DIRECT;
    let n = (63 - (v | DIRECT).leading_zeros()).max(4); // >= 4
    let m = (v >> (n - 2)) & 3;
    let big_token = DIRECT as u32 + (n - 4) * 4 + m as u32;
    let token = if small { v as u32 } else { big_token };
    let nb = if small { 0 } else { n - 2 };
    // nb <= 61, so the shift cannot overflow.
    (token as u8, nb, v & ((1u64 << nb) - 1))
}

/// Largest token a value of `bits` bits can produce.
pub(super) fn max_token(bits: u32) -> usize {
    DIRECT as usize + (bits as usize - 1 - 4) * 4 + 3
}

/// Largest exponent field of any supported float (F64: 11 bits).
const MAX_EXPONENTS: usize = 2048;

/// Context lookup for a chunk: exponent -> context index.
pub(super) struct ContextMap {
    lo: u16,
    hi: u16,
    lut: Box<[u8; MAX_EXPONENTS]>,
    shift: u32,
    exp_mask: u64,
}

impl ContextMap {
    pub(super) fn new(layout: ElementLayout, lo: u16, hi: u16) -> Self {
        let (shift, exp_mask) = match layout.float {
            Some(f) => (f.mantissa_bits, f.exponent_mask as u64),
            None => (0, 0),
        };
        let mut lut = Box::new([0u8; MAX_EXPONENTS]);
        for (e, c) in lut.iter_mut().enumerate() {
            *c = ((e as u16).clamp(lo, hi) - lo) as u8;
        }
        ContextMap {
            lo,
            hi,
            lut,
            shift,
            exp_mask,
        }
    }

    pub(super) fn count(&self) -> usize {
        (self.hi - self.lo) as usize + 1
    }

    /// The same mapping, for the vector code paths.
    pub(crate) fn vector_params(&self) -> kernels::Contexts {
        kernels::Contexts {
            lo: self.lo,
            hi: self.hi,
            mantissa_bits: self.shift,
            exp_mask: self.exp_mask as u32,
        }
    }

    #[inline(always)]
    pub(super) fn of(&self, pred_bits: u64) -> u8 {
        // Masking to the table size lets the compiler drop the bounds check.
        self.lut[((pred_bits >> self.shift) & self.exp_mask) as usize & (MAX_EXPONENTS - 1)]
    }
}

/// Chooses the exponent range that gets its own contexts: rare exponents at either end
/// would cost more in table bytes than they save, so they join the nearest kept one.
pub(super) fn choose_context_range<W: Element>(layout: ElementLayout, pred: &[u8]) -> (u16, u16) {
    let Some(f) = layout.float else { return (0, 0) };
    let w = layout.width;
    let mut hist = vec![0u64; f.exponent_mask as usize + 1];
    let emask = f.exponent_mask as u64;
    // A 1-in-16 sample places the edges well enough, at a sixteenth of the cost of a full pass.
    for e in pred.chunks_exact(w).step_by(16) {
        // The mask keeps the index below hist.len().
        hist[((W::load(e) >> f.mantissa_bits) & emask) as usize] += 1;
    }
    let n = (pred.len() / w).div_ceil(16) as u64;
    let min = (n / 256).max(2);
    let mut lo = 0;
    let mut acc = 0;
    for (e, &c) in hist.iter().enumerate() {
        acc += c;
        lo = e;
        if acc >= min {
            break;
        }
    }
    let mut hi = hist.len() - 1;
    acc = 0;
    for (e, &c) in hist.iter().enumerate().rev() {
        acc += c;
        hi = e;
        if acc >= min {
            break;
        }
    }
    if hi < lo {
        hi = lo;
    }
    if hi - lo + 1 > MAX_CONTEXTS {
        lo = hi + 1 - MAX_CONTEXTS;
    }
    (lo as u16, hi as u16)
}

/// Calls `$f::<Element, FLOAT>(args)` monomorphised for the layout's width and float-ness.
macro_rules! dispatch {
    ($layout:expr, $f:ident($($arg:expr),*)) => {
        match ($layout.width, $layout.float.is_some()) {
            (1, false) => $f::<u8, false>($($arg),*),
            (1, true) => $f::<u8, true>($($arg),*),
            (2, false) => $f::<u16, false>($($arg),*),
            (2, true) => $f::<u16, true>($($arg),*),
            (4, false) => $f::<u32, false>($($arg),*),
            (4, true) => $f::<u32, true>($($arg),*),
            (8, false) => $f::<u64, false>($($arg),*),
            _ => $f::<u64, true>($($arg),*),
        }
    };
}
pub(super) use dispatch;

/// Encodes `target` against the prediction `pred` (same length, whole elements).
pub fn encode(layout: ElementLayout, pred: &[u8], target: &[u8], scratch: &mut Scratch) -> Vec<u8> {
    encode_counting(layout, pred, target, scratch).0
}

/// [`encode`], also returning how many elements differ from the prediction: the symbol
/// histogram counts the zero differences anyway (token 0 is exactly a zero difference).
pub fn encode_counting(layout: ElementLayout, pred: &[u8], target: &[u8], scratch: &mut Scratch) -> (Vec<u8>, u64) {
    assert_eq!(pred.len(), target.len(), "prediction and target lengths differ");
    assert_eq!(target.len() % layout.width, 0, "partial element");
    dispatch!(layout, encode_impl(layout, pred, target, scratch, Kernel::WIDEST))
}

/// [`encode`] without CPU-specific code paths; its output is identical.
pub fn encode_portable(layout: ElementLayout, pred: &[u8], target: &[u8], scratch: &mut Scratch) -> Vec<u8> {
    encode_with(Kernel::Portable, layout, pred, target, scratch)
}

/// [`encode`] with the vector code paths of `kernel` at most; every kernel writes the same
/// bytes.
pub fn encode_with(
    kernel: Kernel,
    layout: ElementLayout,
    pred: &[u8],
    target: &[u8],
    scratch: &mut Scratch,
) -> Vec<u8> {
    assert_eq!(pred.len(), target.len(), "prediction and target lengths differ");
    assert_eq!(target.len() % layout.width, 0, "partial element");
    dispatch!(layout, encode_impl(layout, pred, target, scratch, kernel)).0
}

fn encode_impl<W: Element, const FLOAT: bool>(
    layout: ElementLayout,
    pred: &[u8],
    target: &[u8],
    scratch: &mut Scratch,
    kernel: Kernel,
) -> (Vec<u8>, u64) {
    let w = layout.width;
    let n = target.len() / w;
    let (lo, hi) = choose_context_range::<W>(layout, pred);
    let cmap = ContextMap::new(layout, lo, hi);
    // Four sub-histograms: consecutive increments of one bin would otherwise wait on each other.
    let nctx = cmap.count();
    // Rows as long as this width's alphabet (64 tokens for 16-bit values) keep them in L1.
    let stride = max_token(W::BITS) + 1;
    let mut sub = vec![0u32; 4 * nctx * stride];
    scratch.symbols.resize(n, 0);
    scratch.contexts.resize(n, 0);
    let mut bits = BitWriter::with_buffer(std::mem::take(&mut scratch.bits), n * 3 / 2);
    let (syms, ctxs) = (&mut scratch.symbols[..], &mut scratch.contexts[..]);
    let mut done = 0;
    if FLOAT && W::BITS == 16 {
        let contexts = cmap.vector_params();
        done = kernels::exact_front16(
            kernel,
            &contexts,
            pred,
            target,
            syms,
            ctxs,
            &mut scratch.bins,
            &mut sub,
            nctx,
            stride,
            &mut bits,
        );
    }
    // One element: token, context and raw bits; `lane` picks the sub-histogram.
    let mut element = |lane: usize, p: &[u8], t: &[u8], sym: &mut u8, ctx: &mut u8| -> (u64, u32) {
        let p = W::load(p);
        let d = to_ordered(W::load(t), W::BITS, FLOAT).wrapping_sub(to_ordered(p, W::BITS, FLOAT));
        let (tok, nb, raw) = tokenize(zigzag(d & mask(W::BITS), W::BITS));
        let c = cmap.of(p);
        sub[(lane * nctx + c as usize) * stride + tok as usize] += 1;
        *sym = tok;
        *ctx = c;
        (raw, nb)
    };
    if W::BITS <= 16 {
        // Values of up to 16 bits carry at most 13 raw bits: four fit one 56-bit put, which
        // shortens the writer's loop-carried chain (the decoder refills once per four too).
        let groups = pred[done * w..]
            .chunks_exact(4 * w)
            .zip(target[done * w..].chunks_exact(4 * w));
        for (k, (p4, t4)) in groups.enumerate() {
            let g = done / 4 + k;
            let (s4, c4) = (&mut syms[4 * g..4 * g + 4], &mut ctxs[4 * g..4 * g + 4]);
            let (mut acc, mut nbits) = (0u64, 0u32);
            for j in 0..4 {
                let (raw, nb) = element(
                    j,
                    &p4[j * w..(j + 1) * w],
                    &t4[j * w..(j + 1) * w],
                    &mut s4[j],
                    &mut c4[j],
                );
                acc |= raw << nbits;
                nbits += nb;
            }
            bits.put(acc, nbits);
        }
        done = n / 4 * 4;
    }
    for i in done..n {
        let (raw, nb) = element(
            i & 3,
            &pred[i * w..(i + 1) * w],
            &target[i * w..(i + 1) * w],
            &mut syms[i],
            &mut ctxs[i],
        );
        bits.put(raw, nb);
    }
    let mut counts = vec![[0u32; 256]; nctx];
    for (k, x) in sub.iter().enumerate() {
        counts[(k / stride) % nctx][k % stride] += x;
    }
    let unchanged: u64 = counts.iter().map(|c| c[0] as u64).sum();
    let model = Model::from_counts(&counts);
    let tables = EncoderTables::new(&model);
    let (states, len) = rans::encode(
        &tables,
        &scratch.symbols,
        &scratch.contexts,
        &mut scratch.words,
        kernels::rans_groups(kernel),
    );
    let raw = bits.finish();
    let mut out = Vec::with_capacity(16 + 2 * rans::stream_words(len) + raw.len() + 4 * 64 * cmap.count());
    out.extend_from_slice(&lo.to_le_bytes());
    out.extend_from_slice(&hi.to_le_bytes());
    model.write(&mut out);
    rans::put_varint(&mut out, rans::stream_words(len) as u64);
    rans::write_stream(states, &scratch.words[..len], &mut out);
    out.extend_from_slice(&raw);
    scratch.bits = raw;
    (out, n as u64 - unchanged)
}

/// Decodes a payload made by [`encode`] into `out`, given the same prediction.
///
/// `out.len()` must equal `pred.len()`; the payload is untrusted and any inconsistency is
/// an error, never a panic. Uses the AVX2 decoder for 16-bit floats where the CPU has it.
pub fn decode(layout: ElementLayout, pred: &[u8], payload: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    decode_with(Kernel::WIDEST, layout, pred, payload, out)
}

/// [`decode`] over the prediction itself: `buf` holds the prediction and ends as the output
/// (on error, its contents are unspecified). In place for 16-bit floats where the CPU has
/// AVX-512; elsewhere it decodes from a copy of the prediction.
pub fn decode_in_place(layout: ElementLayout, payload: &[u8], buf: &mut [u8]) -> Result<(), DecodeError> {
    assert_eq!(buf.len() % layout.width, 0, "partial element");
    if layout.width == 2 && layout.float.is_some() && kernels::exact_decode16_in_place_available() {
        let parsed = parse(layout, 16, payload)?;
        return kernels::exact_decode16_in_place(&parsed.parts(&TokenTable::new()), buf);
    }
    let pred = buf.to_vec();
    decode(layout, &pred, payload, buf)
}

/// [`decode`] without CPU-specific code paths: the reference the vector decoders are held to.
pub fn decode_portable(layout: ElementLayout, pred: &[u8], payload: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    decode_with(Kernel::Portable, layout, pred, payload, out)
}

/// [`decode`] with the vector decoders of `kernel` at most (for 16-bit float chunks: four
/// quads of four lanes with AVX2, one vector of sixteen with AVX-512); every kernel gives the
/// same output and verdict.
pub fn decode_with(
    kernel: Kernel,
    layout: ElementLayout,
    pred: &[u8],
    payload: &[u8],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    assert_eq!(pred.len(), out.len(), "prediction and output lengths differ");
    assert_eq!(out.len() % layout.width, 0, "partial element");
    dispatch!(layout, decode_impl(layout, pred, payload, out, kernel))
}

/// The parts of an exact payload, validated: what every decoder reads.
struct Payload<'p> {
    cmap: ContextMap,
    model: Model,
    words: &'p [u8],
    bits: &'p [u8],
}

impl Payload<'_> {
    /// The same parts, as the vector decoders take them.
    fn parts<'s>(&'s self, expand: &'s TokenTable) -> kernels::Parts<'s> {
        kernels::Parts {
            contexts: self.cmap.vector_params(),
            model: &self.model,
            words: self.words,
            bits: self.bits,
            expand: &expand.0,
        }
    }
}

fn parse(layout: ElementLayout, bits_per_value: u32, payload: &[u8]) -> Result<Payload<'_>, DecodeError> {
    let mut input = payload;
    let lo = read_u16(&mut input)?;
    let hi = read_u16(&mut input)?;
    let exp_limit = layout.float.map_or(0, |f| f.exponent_mask as u16);
    if lo > hi || hi > exp_limit || (hi - lo) as usize >= MAX_CONTEXTS {
        return Err(DecodeError("context range out of bounds"));
    }
    let cmap = ContextMap::new(layout, lo, hi);
    let model = Model::read(&mut input, cmap.count()).ok_or(DecodeError("bad frequency table"))?;
    if model.freqs.iter().any(|f| f.len() > max_token(bits_per_value) + 1) {
        return Err(DecodeError("token out of range for the dtype"));
    }
    let n_words = rans::get_varint(&mut input).ok_or(DecodeError("bad word count"))?;
    let word_bytes = n_words
        .checked_mul(2)
        .filter(|&b| b <= input.len() as u64)
        .ok_or(DecodeError("word stream past end of payload"))? as usize;
    let (words, bits) = input.split_at(word_bytes);
    Ok(Payload {
        cmap,
        model,
        words,
        bits,
    })
}

fn decode_impl<W: Element, const FLOAT: bool>(
    layout: ElementLayout,
    pred: &[u8],
    payload: &[u8],
    out: &mut [u8],
    kernel: Kernel,
) -> Result<(), DecodeError> {
    let w = layout.width;
    let parsed = parse(layout, W::BITS, payload)?;
    let expand = TokenTable::new();
    if FLOAT && W::BITS == 16 && kernels::exact_decode16_available(kernel) {
        return kernels::exact_decode16(kernel, &parsed.parts(&expand), pred, out);
    }
    let Payload {
        cmap,
        model,
        words,
        bits: raw,
    } = parsed;
    let mut bits = BitReader::new(raw);
    let tables = DecoderTables::new(&model);
    // Contexts without a table decode garbage: they are flagged without a branch, and fail at the end.
    let mut bad = 0u8;
    let (mut reader, mut st) = rans::WordReader::new(words);
    let elems = pred.chunks_exact(w).zip(out.chunks_exact_mut(w));
    for (i, (p, o)) in elems.enumerate() {
        // Values of up to 16 bits carry at most 13 raw bits: one refill per four elements
        // suffices. Wider values refill per element, or (64-bit) as needed.
        if W::BITS <= 16 && i % 4 == 0 {
            bits.refill();
        }
        let p = W::load(p);
        let c = cmap.of(p) as usize;
        let (base, nbits) = expand.get(tables.step(c, &mut st[i % rans::INTERLEAVE], &mut reader, &mut bad));
        let raw = match W::BITS {
            8 | 16 => bits.take(nbits),
            32 => {
                bits.refill();
                bits.take(nbits)
            }
            _ => bits.get(nbits),
        };
        let v = to_ordered(p, W::BITS, FLOAT).wrapping_add(unzigzag(base | raw, W::BITS)) & mask(W::BITS);
        W::store(from_ordered(v, W::BITS, FLOAT), o);
    }
    verdict(bad != 0, reader.finish(st) && bits.finish())
}

/// Token -> (value without its raw bits, number of raw bits), for all 256 tokens.
pub(super) struct TokenTable(pub(super) [(u64, u32); 256]);

impl TokenTable {
    pub(super) fn new() -> Self {
        let mut t = [(0u64, 0u32); 256];
        for (tok, e) in t.iter_mut().enumerate() {
            let tok = tok as u64;
            *e = if tok < DIRECT {
                (tok, 0)
            } else {
                let nbits = ((tok - DIRECT) / 4 + 4) as u32;
                ((4 | ((tok - DIRECT) & 3)) << (nbits - 2), nbits - 2)
            };
        }
        TokenTable(t)
    }

    #[inline(always)]
    pub(super) fn get(&self, tok: u8) -> (u64, u32) {
        self.0[tok as usize]
    }
}

pub(super) fn read_u16(input: &mut &[u8]) -> Result<u16, DecodeError> {
    if input.len() < 2 {
        return Err(DecodeError("payload truncated"));
    }
    let v = u16::from_le_bytes([input[0], input[1]]);
    *input = &input[2..];
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::layout;
    use proptest::prelude::*;
    use safetensors::Dtype;

    fn round_trip(dtype: Dtype, pred: &[u8], target: &[u8]) -> usize {
        let l = layout(dtype);
        let (payload, changed) = encode_counting(l, pred, target, &mut Scratch::default());
        assert_eq!(
            changed,
            crate::changes::count_changed(l, pred, target),
            "{dtype:?} count"
        );
        let mut out = vec![0u8; target.len()];
        decode(l, pred, &payload, &mut out).expect("decodes");
        assert_eq!(out, target, "{dtype:?} round trip");
        payload.len()
    }

    const DTYPES: [Dtype; 14] = [
        Dtype::BF16,
        Dtype::F16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8_E4M3,
        Dtype::F8_E5M2,
        Dtype::I8,
        Dtype::U8,
        Dtype::BOOL,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::U64,
        Dtype::C64,
    ];

    /// Bit patterns biased towards the float specials: NaN payloads, infinities, -0.0, subnormals.
    fn special_bytes(width: usize) -> impl Strategy<Value = Vec<u8>> {
        let specials: Vec<u64> = match width {
            2 => vec![0x7FC1, 0xFF81, 0x7F80, 0xFF80, 0x8000, 0x0001, 0x807F, 0x7E00, 0xFC01],
            4 => vec![
                0x7FC0_0001,
                0xFF80_0001,
                0x7F80_0000,
                0x8000_0000,
                0x0000_0001,
                0x807F_FFFF,
            ],
            8 => vec![0x7FF8_0000_0000_0001, 0xFFF0_0000_0000_0000, 0x8000_0000_0000_0000, 1],
            _ => vec![0x7F, 0xFF, 0x80, 0x01, 0x78],
        };
        proptest::collection::vec(prop_oneof![any::<u64>(), proptest::sample::select(specials)], 0..600)
            .prop_map(move |v| v.iter().flat_map(|x| x.to_le_bytes()[..width].to_vec()).collect())
    }

    proptest! {
        #[test]
        fn every_dtype_round_trips_random_bits(dt in proptest::sample::select(DTYPES.to_vec()), seed in any::<u64>()) {
            let w = layout(dt).width;
            let mut rng = seed | 1;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let n = (next() % 700) as usize * w;
            let pred: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let mut target = pred.clone();
            for b in target.iter_mut() {
                if next() % 3 == 0 { *b = next() as u8; }
            }
            round_trip(dt, &pred, &target);
        }

        #[test]
        fn float_specials_by_width(d16 in special_bytes(2), d32 in special_bytes(4), d64 in special_bytes(8), d8 in special_bytes(1)) {
            for (dt, d) in [(Dtype::BF16, &d16), (Dtype::F16, &d16), (Dtype::F32, &d32), (Dtype::F64, &d64), (Dtype::F8_E5M2, &d8)] {
                let pred: Vec<u8> = d.iter().map(|b| b.wrapping_add(1)).collect();
                round_trip(dt, &pred, d);
            }
        }
    }

    proptest! {
        #[test]
        fn vector_and_portable_decoders_agree(seed in any::<u64>(), n in 0usize..3000, damage in 0usize..40, f16 in any::<bool>()) {
            let dt = if f16 { Dtype::F16 } else { Dtype::BF16 };
            let l = layout(dt);
            let mut rng = seed | 1;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut pred = Vec::new();
            let mut target = Vec::new();
            for _ in 0..n {
                let b = half::bf16::from_f32((next() % 2001) as f32 / 1000.0 - 1.0).to_bits() >> (next() % 3);
                let t = b.wrapping_add([0u16, 0, 1, 0xFFFF, 7, 300][(next() % 6) as usize]);
                pred.extend_from_slice(&b.to_le_bytes());
                target.extend_from_slice(&t.to_le_bytes());
            }
            let mut payload = encode(l, &pred, &target, &mut Scratch::default());
            prop_assert_eq!(&payload, &encode_portable(l, &pred, &target, &mut Scratch::default()));
            // Damage some payloads: both decoders must still agree (on the error, too).
            if damage < 20 && !payload.is_empty() {
                let i = (next() as usize) % payload.len();
                payload[i] ^= 1 << (next() % 8);
            }
            let (mut a, mut b, mut c) = (vec![0u8; pred.len()], vec![0u8; pred.len()], vec![0u8; pred.len()]);
            let ra = decode(l, &pred, &payload, &mut a);
            let rb = decode_portable(l, &pred, &payload, &mut b);
            let rc = decode_with(Kernel::Avx2, l, &pred, &payload, &mut c);
            let mut d = pred.clone();
            let rd = decode_in_place(l, &payload, &mut d);
            prop_assert_eq!(&ra, &rb);
            prop_assert_eq!(&rc, &rb);
            prop_assert_eq!(&rd, &rb);
            if ra.is_ok() {
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(&c, &b);
                prop_assert_eq!(&d, &b);
            }
            if damage >= 20 {
                prop_assert!(ra.is_ok());
                prop_assert_eq!(&a, &target);
            }
        }
    }

    #[test]
    fn small_changes_code_small() {
        // Values near +-0.02 with +-1 ULP changes: about 1.6 bits of entropy per element.
        let n = 50_000;
        let mut pred = Vec::new();
        let mut target = Vec::new();
        for i in 0..n {
            let b = half::bf16::from_f32(if i % 2 == 0 { 0.02 } else { -0.02 } * (1.0 + (i % 97) as f32 / 100.0));
            let t = half::bf16::from_bits(b.to_bits().wrapping_add([0u16, 0, 1, 0xFFFF][i % 4]));
            pred.extend_from_slice(&b.to_bits().to_le_bytes());
            target.extend_from_slice(&t.to_bits().to_le_bytes());
        }
        let size = round_trip(Dtype::BF16, &pred, &target);
        assert!(size < n * 2 / 8, "{size} bytes for {n} elements");
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let pred = vec![0x3Cu8; 2000];
        let target: Vec<u8> = (0..2000).map(|i| (i * 31 % 251) as u8).collect();
        let l = layout(Dtype::BF16);
        let payload = encode(l, &pred, &target, &mut Scratch::default());
        let mut out = vec![0u8; target.len()];
        for cut in [0, 1, 3, payload.len() / 2, payload.len() - 1] {
            assert!(decode(l, &pred, &payload[..cut], &mut out).is_err(), "cut at {cut}");
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(decode(l, &pred, &longer, &mut out).is_err());
    }
}
