//! Static, context-switched rANS over byte-sized symbols, sixteen interleaved states.
//!
//! Written by hand because no maintained crate exposes an encoder with per-symbol context
//! tables and a serialisable model (constriction has no table serialisation, zstd's FSE and
//! huff0 are not exposed). The construction is ryg's `rans_word`: 32-bit states, 16-bit
//! renormalisation, 12-bit probabilities. Sixteen independent states hide the latency of
//! each symbol's table lookups; the AVX2 decoder (`kernels`) runs them as four vectors.
//!
//! The decoder treats its input as hostile: tables are validated when read, reads past the
//! end of the word stream yield zeros and are reported by [`WordReader::finish`], and no
//! index can go out of bounds.

/// Probability resolution: frequencies of one context sum to `1 << SCALE_BITS`.
pub const SCALE_BITS: u32 = 12;
const SCALE: u32 = 1 << SCALE_BITS;
/// Lower bound of the normalised state interval.
const RANS_L: u32 = 1 << 16;
/// Interleaved states: enough independent chains to hide the latency of table lookups,
/// and four lanes of four for the vector decoder.
const STATES: usize = 16;

/// Frequencies of every context, each summing to `1 << SCALE_BITS` (or empty for an unused context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// `freqs[ctx][symbol]`; a context with no symbols has an empty vector.
    pub freqs: Vec<Vec<u16>>,
}

impl Model {
    /// Builds a model from raw counts, one histogram of 256 symbols per context.
    pub fn from_counts(counts: &[[u32; 256]]) -> Model {
        Model {
            freqs: counts.iter().map(normalize).collect(),
        }
    }

    /// Appends the serialised model: per context a varint symbol count, then that many varint frequencies.
    pub fn write(&self, out: &mut Vec<u8>) {
        for f in &self.freqs {
            put_varint(out, f.len() as u64);
            for &x in f {
                put_varint(out, x as u64);
            }
        }
    }

    /// Reads a model of `contexts` contexts, validating that each used context sums to the scale.
    pub fn read(input: &mut &[u8], contexts: usize) -> Option<Model> {
        let mut freqs = Vec::with_capacity(contexts);
        for _ in 0..contexts {
            let n = get_varint(input)?;
            if n > 256 {
                return None;
            }
            let mut f = Vec::with_capacity(n as usize);
            let mut sum = 0u64;
            for _ in 0..n {
                let x = get_varint(input)?;
                if x > SCALE as u64 {
                    return None;
                }
                sum += x;
                f.push(x as u16);
            }
            if n > 0 && sum != SCALE as u64 {
                return None;
            }
            freqs.push(f);
        }
        Some(Model { freqs })
    }
}

/// Scales a histogram to frequencies summing to `1 << SCALE_BITS`, every present symbol at least 1.
///
/// Deterministic (integer arithmetic only), so encoder output never depends on the machine.
fn normalize(counts: &[u32; 256]) -> Vec<u16> {
    let total: u64 = counts.iter().map(|&c| c as u64).sum();
    if total == 0 {
        return Vec::new();
    }
    let used = counts.iter().rposition(|&c| c > 0).map_or(0, |p| p + 1);
    let mut f: Vec<u32> = counts[..used]
        .iter()
        .map(|&c| {
            if c == 0 {
                0
            } else {
                ((c as u64 * SCALE as u64 + total / 2) / total).max(1) as u32
            }
        })
        .collect();
    let mut sum: i64 = f.iter().map(|&x| x as i64).sum();
    // Fix the rounding error on the largest entries, which lose the least by it.
    while sum != SCALE as i64 {
        let mut order: Vec<usize> = (0..used).filter(|&i| f[i] > 0).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(f[i]), i));
        for &i in &order {
            if sum > SCALE as i64 && f[i] > 1 {
                f[i] -= 1;
                sum -= 1;
            } else if sum < SCALE as i64 {
                f[i] += 1;
                sum += 1;
            }
            if sum == SCALE as i64 {
                break;
            }
        }
    }
    f.into_iter().map(|x| x as u16).collect()
}

/// One symbol's encoder constants: a reciprocal replaces the division per symbol.
///
/// States reach 2^32 - 1 here (16-bit renormalisation), beyond the 2^31 for which ryg's
/// 32-bit reciprocal is exact, so this uses Granlund and Montgomery's form: with
/// `l = ceil(log2(freq))` and `m = ceil(2^(32 + l) / freq)`, `x / freq == (x * m) >> (32 + l)`
/// for every `x < 2^32`. As `2^32 <= m < 2^33`, it is computed as
/// `(x + ((x * (m - 2^32)) >> 32)) >> l` in 64-bit arithmetic.
/// The layout is fixed (`repr(C)`) because the vector encoder gathers its two 32-bit words:
/// `rcp_low`, then `freq | start << 13 | shift << 25` (`cmpl_freq = SCALE - freq` is derived).
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
pub(super) struct EncSymbol {
    rcp_low: u32,
    packed: u32,
}

impl EncSymbol {
    fn new(start: u32, freq: u32) -> Self {
        debug_assert!((1..=SCALE).contains(&freq));
        let l = 32 - (freq - 1).leading_zeros(); // ceil(log2(freq)); 0 for freq == 1
        let m = (1u64 << (32 + l)).div_ceil(freq as u64);
        EncSymbol {
            rcp_low: (m - (1 << 32)) as u32,
            packed: freq | start << 13 | l << 25,
        }
    }

    #[inline(always)]
    fn freq(&self) -> u32 {
        self.packed & 0x1FFF
    }

    #[inline(always)]
    fn start(&self) -> u32 {
        (self.packed >> 13) & 0xFFF
    }

    #[inline(always)]
    fn shift(&self) -> u32 {
        self.packed >> 25
    }

    /// `x / freq`, exactly, for any 32-bit `x`.
    #[inline(always)]
    fn quotient(&self, x: u32) -> u32 {
        let x = x as u64;
        ((x + ((x * self.rcp_low as u64) >> 32)) >> self.shift()) as u32
    }

    /// Encodes into state `x`, pushing a word into `out` when renormalising (branch-free).
    #[inline(always)]
    fn put(&self, x: &mut u32, out: &mut [u16], len: &mut usize) {
        // x_max = ((L >> scale_bits) << 16) * freq keeps the state below 2^32 after the step.
        let big = *x as u64 >= (((RANS_L >> SCALE_BITS) as u64) << 16) * self.freq() as u64;
        out[*len] = *x as u16;
        *len += big as usize;
        let v = if big { *x >> 16 } else { *x };
        // x = (x / freq) * SCALE + x % freq + start, rearranged to use only the quotient.
        *x = v
            .wrapping_add(self.start())
            .wrapping_add(self.quotient(v).wrapping_mul(SCALE - self.freq()));
    }
}

/// Encoder tables for one model, indexed `[ctx * stride + symbol]`, where `stride` is the
/// longest alphabet of any context (64 for 16-bit values): small enough to stay in L1.
pub struct EncoderTables {
    pub(super) entries: Vec<EncSymbol>,
    pub(super) stride: usize,
}

impl EncoderTables {
    /// Prepares the encoder's lookup tables.
    pub fn new(model: &Model) -> Self {
        let stride = model.freqs.iter().map(|f| f.len()).max().unwrap_or(0).max(1);
        let mut entries = vec![EncSymbol::default(); model.freqs.len() * stride];
        for (c, f) in model.freqs.iter().enumerate() {
            let mut start = 0u32;
            for (s, &x) in f.iter().enumerate() {
                if x > 0 {
                    entries[c * stride + s] = EncSymbol::new(start, x as u32);
                }
                start += x as u32;
            }
        }
        EncoderTables { entries, stride }
    }
}

/// Encodes `symbols[i]` under context `contexts[i]`.
///
/// Returns the final states; the renormalisation words are left in `words[..len]` in
/// encoding order (the stream stores them reversed, after the states: see [`write_stream`]).
/// `words` is scratch space, reused across calls so that no chunk pays for a fresh buffer.
/// Every (context, symbol) pair must have a nonzero frequency in the model the tables came
/// from; that holds when the model was built from these very symbols.
///
/// `groups` is a vector encoder of whole groups of sixteen (`kernels::rans_groups`): given
/// the tables, the symbols and contexts of the groups, the words, their length and the
/// states, it codes them as the scalar loop would and returns true, or touches nothing and
/// returns false (then the scalar loop runs). Passed in, so that `rans` needs nothing of the
/// kernels that need its tables.
pub fn encode(
    tables: &EncoderTables,
    symbols: &[u8],
    contexts: &[u8],
    words: &mut Vec<u16>,
    groups: impl FnOnce(&EncoderTables, &[u8], &[u8], &mut [u16], &mut usize, &mut [u32; STATES]) -> bool,
) -> ([u32; STATES], usize) {
    assert_eq!(symbols.len(), contexts.len());
    let n = symbols.len();
    // At most one word per symbol, plus slack for the branch-free (and 32-byte vector) stores.
    if words.len() < n + 16 {
        words.resize(n + 16, 0);
    }
    let mut len = 0usize;
    let mut st = [RANS_L; STATES];
    // Symbols are coded last to first; symbol i uses state i % STATES. The last n % STATES
    // symbols go first, then whole groups, with vectors where the CPU has them.
    let full = n - n % STATES;
    for i in (full..n).rev() {
        let e = &tables.entries[contexts[i] as usize * tables.stride + symbols[i] as usize];
        e.put(&mut st[i % STATES], words, &mut len);
    }
    if groups(tables, &symbols[..full], &contexts[..full], words, &mut len, &mut st) {
        return (st, len);
    }
    for i in (0..full).rev() {
        let e = &tables.entries[contexts[i] as usize * tables.stride + symbols[i] as usize];
        e.put(&mut st[i % STATES], words, &mut len);
    }
    (st, len)
}

/// Appends the word stream in decoding order, as little-endian bytes: the states as
/// low/high word pairs, then the renormalisation words last-written first.
pub fn write_stream(states: [u32; STATES], words: &[u16], out: &mut Vec<u8>) {
    for x in states {
        out.extend_from_slice(&(x as u16).to_le_bytes());
        out.extend_from_slice(&((x >> 16) as u16).to_le_bytes());
    }
    out.extend(words.iter().rev().flat_map(|w| w.to_le_bytes()));
}

/// Number of 16-bit words [`write_stream`] writes.
pub fn stream_words(renorm_words: usize) -> usize {
    2 * STATES + renorm_words
}

/// Decoder tables, two levels to stay cache-resident: per context a 4 KiB slot -> symbol
/// map and a symbol -> `(freq - 1) | start << 12` table. Fixed-size rows let the compiler
/// see that masked indices are in bounds, leaving one check per symbol (the context).
pub struct DecoderTables {
    rows: Vec<DecoderRow>,
}

struct DecoderRow {
    slot_symbol: [u8; SCALE as usize],
    symbol_info: [u32; 256],
    /// 1 if the context has no table (any use of it is an error), else 0.
    unused: u8,
}

impl DecoderTables {
    /// Prepares the decoder's lookup tables; slots of unused contexts decode to symbol 0.
    pub fn new(model: &Model) -> Self {
        let rows = model
            .freqs
            .iter()
            .map(|f| {
                let mut row = DecoderRow {
                    slot_symbol: [0; SCALE as usize],
                    symbol_info: [0; 256],
                    unused: f.is_empty() as u8,
                };
                let mut start = 0u32;
                for (s, &x) in f.iter().enumerate() {
                    let x = x as u32;
                    row.slot_symbol[start as usize..(start + x) as usize].fill(s as u8);
                    row.symbol_info[s] = x.saturating_sub(1) | (start << 12);
                    start += x;
                }
                row
            })
            .collect();
        DecoderTables { rows }
    }

    /// Number of contexts these tables serve.
    pub fn contexts(&self) -> usize {
        self.rows.len()
    }

    /// Decodes one symbol from state `x` under context `ctx` and renormalises from `words`.
    ///
    /// `ctx` must be `< self.contexts()` (checked by the slice index). ORs 1 into `unused`
    /// if the context has no table.
    #[inline(always)]
    pub fn step(&self, ctx: usize, x: &mut u32, words: &mut WordReader, unused: &mut u8) -> u8 {
        let row = &self.rows[ctx];
        *unused |= row.unused;
        let slot = *x & (SCALE - 1);
        let sym = row.slot_symbol[slot as usize];
        let info = row.symbol_info[sym as usize];
        let freq = (info & 0xFFF) + 1;
        *x = freq
            .wrapping_mul(*x >> SCALE_BITS)
            .wrapping_add(slot.wrapping_sub(info >> 12));
        // Branch-free renormalisation: whether it happens is data-dependent and unpredictable.
        let need = *x < RANS_L;
        let w = words.peek();
        *x = if need { (*x << 16) | w } else { *x };
        words.pos += need as usize;
        sym
    }
}

/// Reads the 16-bit little-endian words of an encoded stream straight from the payload;
/// past the end it yields zeros.
pub struct WordReader<'a> {
    bytes: &'a [u8],
    /// Words consumed so far.
    pos: usize,
}

impl<'a> WordReader<'a> {
    /// Starts reading `bytes` (an even number of them); returns the reader and the initial states.
    pub fn new(bytes: &'a [u8]) -> (Self, [u32; STATES]) {
        let mut r = WordReader { bytes, pos: 0 };
        let mut st = [0u32; STATES];
        for x in st.iter_mut() {
            let lo = r.peek();
            r.pos += 1;
            *x = lo | (r.peek() << 16);
            r.pos += 1;
        }
        (r, st)
    }

    #[inline(always)]
    fn peek(&self) -> u32 {
        match self.bytes.get(2 * self.pos..2 * self.pos + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]) as u32,
            None => 0,
        }
    }

    /// True if the stream was consumed exactly and every state is back at its start.
    pub fn finish(&self, states: [u32; STATES]) -> bool {
        2 * self.pos == self.bytes.len() && states.iter().all(|&x| x == RANS_L)
    }
}

/// Number of interleaved states: symbol `i` uses state `i % STATES`.
pub const INTERLEAVE: usize = STATES;

/// The varints of the rANS streams are the crate's one LEB128 (see `bits`).
pub use crate::bits::{get_varint, put_varint};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_of(symbols: &[u8], contexts: &[u8], n_ctx: usize) -> Model {
        let mut counts = vec![[0u32; 256]; n_ctx];
        for (&s, &c) in symbols.iter().zip(contexts) {
            counts[c as usize][s as usize] += 1;
        }
        Model::from_counts(&counts)
    }

    fn stream(tables: &EncoderTables, symbols: &[u8], contexts: &[u8]) -> Vec<u8> {
        let mut words = Vec::new();
        let (states, len) = encode(tables, symbols, contexts, &mut words, |_, _, _, _, _, _| false);
        // Every kernel path writes the portable path's states and words.
        for kernel in [crate::kernels::Kernel::Avx2, crate::kernels::Kernel::Avx512] {
            let mut vector = Vec::new();
            assert_eq!(
                encode(
                    tables,
                    symbols,
                    contexts,
                    &mut vector,
                    crate::kernels::rans_groups(kernel)
                ),
                (states, len),
                "{kernel:?}"
            );
            assert_eq!(vector[..len], words[..len], "{kernel:?}");
        }
        let mut out = Vec::new();
        write_stream(states, &words[..len], &mut out);
        assert_eq!(out.len(), 2 * stream_words(len));
        out
    }

    fn decode_all(dt: &DecoderTables, words: &[u8], contexts: &[u8]) -> (Vec<u8>, bool) {
        let (mut r, mut st) = WordReader::new(words);
        let mut unused = 0;
        let out = contexts
            .iter()
            .enumerate()
            .map(|(i, &c)| dt.step(c as usize, &mut st[i % STATES], &mut r, &mut unused));
        let out = out.collect();
        (out, r.finish(st) && unused == 0)
    }

    fn round_trip(symbols: &[u8], contexts: &[u8], n_ctx: usize) {
        let model = model_of(symbols, contexts, n_ctx);
        let mut ser = Vec::new();
        model.write(&mut ser);
        let model2 = Model::read(&mut ser.as_slice(), n_ctx).expect("model reads back");
        assert_eq!(model, model2);
        let words = stream(&EncoderTables::new(&model), symbols, contexts);
        let dt = DecoderTables::new(&model2);
        let (out, ok) = decode_all(&dt, &words, contexts);
        assert_eq!(out, symbols);
        assert!(ok);
    }

    #[test]
    fn normalize_sums_to_scale_and_keeps_rare_symbols() {
        let mut c = [0u32; 256];
        c[0] = 1_000_000;
        for x in c.iter_mut().skip(1) {
            *x = 1;
        }
        let f = normalize(&c);
        assert_eq!(f.iter().map(|&x| x as u32).sum::<u32>(), SCALE);
        assert!(f.iter().all(|&x| x >= 1));
        let mut one = [0u32; 256];
        one[7] = 5;
        assert_eq!(normalize(&one)[7], SCALE as u16);
    }

    #[test]
    fn reciprocal_division_is_exact_for_all_states() {
        let mut x = 0x1234_5678u32;
        for freq in 1..=SCALE {
            let e = EncSymbol::new(0, freq);
            for k in 0..200u32 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                for v in [x, u32::MAX - k, k, (freq << 20).wrapping_sub(1 + k)] {
                    assert_eq!(e.quotient(v), v / freq, "{v} / {freq}");
                }
            }
        }
    }

    #[test]
    fn heavily_skewed_streams_round_trip() {
        // One symbol at 99 %: frequencies near the scale, states near 2^32.
        let syms: Vec<u8> = (0..100_000u32)
            .map(|i| if i % 97 == 0 { (i % 5) as u8 + 1 } else { 0 })
            .collect();
        round_trip(&syms, &vec![0; syms.len()], 1);
        let ctx: Vec<u8> = (0..syms.len()).map(|i| (i % 3) as u8).collect();
        round_trip(&syms, &ctx, 3);
    }

    #[test]
    fn single_symbol_and_empty_streams() {
        round_trip(&[3; 1000], &[0; 1000], 1);
        round_trip(&[], &[], 2);
        round_trip(&[9], &[1], 2);
    }

    #[test]
    fn truncated_stream_is_detected() {
        let syms: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 13) as u8).collect();
        let ctx = vec![0u8; syms.len()];
        let model = model_of(&syms, &ctx, 1);
        let words = stream(&EncoderTables::new(&model), &syms, &ctx);
        let dt = DecoderTables::new(&model);
        assert!(!decode_all(&dt, &words[..words.len() - 6], &ctx).1);
    }

    #[test]
    fn hostile_models_are_rejected() {
        let mut bad = Vec::new();
        put_varint(&mut bad, 2);
        put_varint(&mut bad, 100);
        put_varint(&mut bad, 100);
        assert!(Model::read(&mut bad.as_slice(), 1).is_none());
        let mut big = Vec::new();
        put_varint(&mut big, 300);
        assert!(Model::read(&mut big.as_slice(), 1).is_none());
        assert!(get_varint(&mut [0xFFu8; 11].as_slice()).is_none());
    }

    proptest! {
        #[test]
        fn round_trips_random_streams(data in proptest::collection::vec((0u8..=255, 0u8..4), 0..4000), skew in 0u8..10) {
            // skew 8 and 9 make symbol 0 dominate (about 90 % and 99 %).
            let symbols: Vec<u8> = data.iter().map(|&(s, _)| match skew {
                8 => if s < 230 { 0 } else { s },
                9 => if s < 253 { 0 } else { s },
                k => s >> k,
            }).collect();
            let contexts: Vec<u8> = data.iter().map(|&(_, c)| c).collect();
            round_trip(&symbols, &contexts, 4);
        }

        #[test]
        fn varints_round_trip(v in any::<u64>()) {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            prop_assert_eq!(get_varint(&mut b.as_slice()), Some(v));
        }
    }
}
