//! Static, context-switched rANS over byte-sized symbols, four interleaved states.
//!
//! Written by hand because no maintained crate exposes an encoder with per-symbol context
//! tables and a serialisable model (see CRATES.md: constriction has no table serialisation,
//! zstd's FSE/huff0 are not exposed). The construction is ryg's `rans_word`: 32-bit states,
//! 16-bit renormalisation, 12-bit probabilities. Four states break the dependency chain so
//! the decoder runs at several symbols per cycle-latency.
//!
//! The decoder treats its input as hostile: tables are validated when read, reads past the
//! end of the word stream yield zeros and are reported by [`Decoder::finish`], and no index
//! can go out of bounds.

/// Probability resolution: frequencies of one context sum to `1 << SCALE_BITS`.
pub const SCALE_BITS: u32 = 12;
const SCALE: u32 = 1 << SCALE_BITS;
/// Lower bound of the normalised state interval.
const RANS_L: u32 = 1 << 16;
const STATES: usize = 4;

/// Frequencies of every context, each summing to [`SCALE`] (or empty for an unused context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// `freqs[ctx][symbol]`; a context with no symbols has an empty vector.
    pub freqs: Vec<Vec<u16>>,
}

impl Model {
    /// Builds a model from raw counts, one histogram of 256 symbols per context.
    pub fn from_counts(counts: &[[u32; 256]]) -> Model {
        Model {
            freqs: counts.iter().map(|c| normalize(c)).collect(),
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

/// Scales a histogram to frequencies summing to [`SCALE`], every present symbol at least 1.
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

/// Encoder tables for one model: `(start, freq)` per context and symbol.
pub struct EncoderTables {
    /// Flattened `[ctx * 256 + sym] -> (start, freq)`.
    entries: Vec<(u32, u32)>,
}

impl EncoderTables {
    /// Prepares the encoder's lookup tables.
    pub fn new(model: &Model) -> Self {
        let mut entries = vec![(0u32, 0u32); model.freqs.len() * 256];
        for (c, f) in model.freqs.iter().enumerate() {
            let mut start = 0u32;
            for (s, &x) in f.iter().enumerate() {
                entries[c * 256 + s] = (start, x as u32);
                start += x as u32;
            }
        }
        EncoderTables { entries }
    }
}

/// Encodes `symbols[i]` under context `contexts[i]`, returning the 16-bit word stream.
///
/// Every (context, symbol) pair must have a nonzero frequency in the model the tables came
/// from; that holds when the model was built from these very symbols.
pub fn encode(tables: &EncoderTables, symbols: &[u8], contexts: &[u8]) -> Vec<u16> {
    debug_assert_eq!(symbols.len(), contexts.len());
    let mut words: Vec<u16> = Vec::with_capacity(symbols.len() / 2 + 16);
    let mut st = [RANS_L; STATES];
    for i in (0..symbols.len()).rev() {
        let (start, freq) = tables.entries[contexts[i] as usize * 256 + symbols[i] as usize];
        debug_assert!(freq > 0, "symbol without frequency");
        let x = &mut st[i % STATES];
        // x_max = ((L >> scale_bits) << 16) * freq keeps the state inside [L, 2^32) after the step.
        if (*x as u64) >= ((((RANS_L >> SCALE_BITS) as u64) << 16) * freq as u64) {
            words.push(*x as u16);
            *x >>= 16;
        }
        *x = ((*x / freq) << SCALE_BITS) + (*x % freq) + start;
    }
    words.reverse();
    let mut out = Vec::with_capacity(words.len() + 2 * STATES);
    for x in st {
        out.push(x as u16);
        out.push((x >> 16) as u16);
    }
    out.extend_from_slice(&words);
    out
}

/// Decoder tables: one packed `u32` per context and slot: `sym | (freq - 1) << 8 | bias << 20`.
pub struct DecoderTables {
    slots: Vec<u32>,
}

impl DecoderTables {
    /// Prepares the decoder's lookup tables; unused contexts decode nothing valid and are never indexed by valid streams.
    pub fn new(model: &Model) -> Self {
        let mut slots = vec![0u32; model.freqs.len() * SCALE as usize];
        for (c, f) in model.freqs.iter().enumerate() {
            let base = c * SCALE as usize;
            let mut start = 0u32;
            for (s, &x) in f.iter().enumerate() {
                for k in 0..x as u32 {
                    slots[base + (start + k) as usize] =
                        s as u32 | ((x as u32 - 1) << 8) | (k << 20);
                }
                start += x as u32;
            }
        }
        DecoderTables { slots }
    }

    /// Number of contexts these tables serve.
    pub fn contexts(&self) -> usize {
        self.slots.len() / SCALE as usize
    }
}

/// Streaming rANS decoder over a word stream produced by [`encode`].
pub struct Decoder<'a> {
    words: &'a [u16],
    pos: usize,
    st: [u32; STATES],
    i: usize,
    overrun: bool,
}

impl<'a> Decoder<'a> {
    /// Starts decoding; `words` is the whole stream returned by [`encode`].
    pub fn new(words: &'a [u16]) -> Self {
        let mut d = Decoder {
            words,
            pos: 0,
            st: [0; STATES],
            i: 0,
            overrun: false,
        };
        for k in 0..STATES {
            let lo = d.next_word() as u32;
            let hi = d.next_word() as u32;
            d.st[k] = lo | (hi << 16);
        }
        d
    }

    #[inline(always)]
    fn next_word(&mut self) -> u16 {
        match self.words.get(self.pos) {
            Some(&w) => {
                self.pos += 1;
                w
            }
            None => {
                self.overrun = true;
                0
            }
        }
    }

    /// Decodes the next symbol under context `ctx` (which must be `< tables.contexts()`).
    #[inline(always)]
    pub fn decode(&mut self, tables: &DecoderTables, ctx: usize) -> u8 {
        let k = self.i % STATES;
        self.i += 1;
        let x = self.st[k];
        let slot = (x & (SCALE - 1)) as usize;
        let e = tables.slots[ctx * SCALE as usize + slot];
        let freq = ((e >> 8) & 0xFFF) + 1;
        let mut x = freq.wrapping_mul(x >> SCALE_BITS).wrapping_add(e >> 20);
        if x < RANS_L {
            x = (x << 16) | self.next_word() as u32;
        }
        self.st[k] = x;
        e as u8
    }

    /// Ends decoding: true if the stream was consumed exactly and every state returned to its start.
    pub fn finish(&self) -> bool {
        !self.overrun && self.pos == self.words.len() && self.st.iter().all(|&x| x == RANS_L)
    }
}

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint, rejecting overlong or truncated encodings.
pub fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&b, rest) = input.split_first()?;
        *input = rest;
        if i == 9 && b > 1 {
            return None;
        }
        v |= ((b & 0x7F) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

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

    fn round_trip(symbols: &[u8], contexts: &[u8], n_ctx: usize) {
        let model = model_of(symbols, contexts, n_ctx);
        let mut ser = Vec::new();
        model.write(&mut ser);
        let model2 = Model::read(&mut ser.as_slice(), n_ctx).expect("model reads back");
        assert_eq!(model, model2);
        let words = encode(&EncoderTables::new(&model), symbols, contexts);
        let dt = DecoderTables::new(&model2);
        let mut d = Decoder::new(&words);
        let out: Vec<u8> = contexts
            .iter()
            .map(|&c| d.decode(&dt, c as usize))
            .collect();
        assert_eq!(out, symbols);
        assert!(d.finish());
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
        let words = encode(&EncoderTables::new(&model), &syms, &ctx);
        let dt = DecoderTables::new(&model);
        let mut d = Decoder::new(&words[..words.len() - 3]);
        for _ in 0..syms.len() {
            d.decode(&dt, 0);
        }
        assert!(!d.finish());
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
        fn round_trips_random_streams(data in proptest::collection::vec((0u8..=255, 0u8..4), 0..4000), skew in 0u8..8) {
            let symbols: Vec<u8> = data.iter().map(|&(s, _)| s >> skew).collect();
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
