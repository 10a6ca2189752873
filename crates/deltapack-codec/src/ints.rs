//! An entropy coder for streams of unsigned integers under a few contexts.
//!
//! The lossy codecs produce integers (quantization codes, gaps between kept positions,
//! signs, exact differences of kept values) rather than element pairs; this codes them with
//! the exact codec's machinery: hybrid tokens (the value below 16, else its bit length and
//! two more bits) rANS-coded per context, plus raw low bits. A stream is self-delimiting,
//! so several can follow one another in one chunk payload.
//!
//! Stream layout: `n_words: varint, n_raw: varint, model (n_ctx contexts), words, raw bits`.
//! The caller knows the number of values and of contexts; an empty stream is one byte pair.

use super::bits::{BitReader, BitWriter};
use super::exact::{max_token, tokenize, DecodeError, TokenTable};
use super::rans::{self, DecoderTables, EncoderTables, Model};
use crate::kernels::{self, Kernel};

/// Most contexts one stream may use.
pub const MAX_CONTEXTS: usize = 64;

/// Appends the stream coding `values[i]` under context `contexts[i]` (`contexts` empty: all 0).
///
/// Every context must be `< n_ctx`.
pub fn encode(values: &[u64], contexts: &[u8], n_ctx: usize, out: &mut Vec<u8>) {
    assert!(
        contexts.is_empty() || contexts.len() == values.len(),
        "one context per value"
    );
    assert!((1..=MAX_CONTEXTS).contains(&n_ctx), "context count");
    if values.is_empty() {
        rans::put_varint(out, 0);
        rans::put_varint(out, 0);
        return;
    }
    if values.iter().all(|&v| v < 16) {
        // Small alphabets (most codes): every token is the value, no raw bits.
        let symbols: Vec<u8> = values.iter().map(|&v| v as u8).collect();
        return encode_small(&symbols, contexts, n_ctx, out);
    }
    let all_ctx: Vec<u8>;
    let ctxs = if contexts.is_empty() {
        all_ctx = vec![0; values.len()];
        &all_ctx[..]
    } else {
        contexts
    };
    // Four sets of counts, by position mod 4: consecutive equal symbols then increment
    // different counters instead of waiting on one another's stores.
    let mut counts4 = vec![[0u32; 256]; 4 * n_ctx];
    let mut symbols = Vec::with_capacity(values.len());
    let mut bits = BitWriter::default();
    // Tokens and raw-bit counts of the values below 64, looked up: a few raw bits at most.
    let below64: [(u8, u32); 64] = std::array::from_fn(|v| {
        let (tok, nb, _) = tokenize(v as u64);
        (tok, nb)
    });
    // Runs of values below 16 (most quantization codes, even when a few are not) are their
    // own tokens with no raw bits: writing no bits is the same as writing zero of them.
    for (v16, c16) in values.chunks(16).zip(ctxs.chunks(16)) {
        // A run's symbols are gathered apart and appended at once: a push per value keeps
        // the vector's length in memory, a store and a load every value.
        let mut run = [0u8; 16];
        let max = v16.iter().fold(0, |a, &v| a | v);
        if (16..64).contains(&max) {
            // At most 3 raw bits a value: the run's 48 fit one write.
            let (mut acc, mut used) = (0u64, 0u32);
            for (j, ((&v, &c), r)) in v16.iter().zip(c16).zip(&mut run).enumerate() {
                let (tok, nb) = below64[v as usize & 63];
                counts4[4 * c as usize + (j & 3)][tok as usize] += 1;
                *r = tok;
                acc |= (v & ((1 << nb) - 1)) << used;
                used += nb;
            }
            bits.put(acc, used);
            symbols.extend_from_slice(&run[..v16.len()]);
            continue;
        }
        if max < 16 {
            for (j, ((&v, &c), r)) in v16.iter().zip(c16).zip(&mut run).enumerate() {
                counts4[4 * c as usize + (j & 3)][v as usize] += 1;
                *r = v as u8;
            }
            symbols.extend_from_slice(&run[..v16.len()]);
            continue;
        }
        // The run's raw bits are gathered in a word and written together: a handful of
        // small values' bits fit in one write, instead of a write per value.
        let (mut acc, mut used) = (0u64, 0u32);
        for (j, ((&v, &c), r)) in v16.iter().zip(c16).zip(&mut run).enumerate() {
            let (tok, nb, raw) = tokenize(v);
            counts4[4 * c as usize + (j & 3)][tok as usize] += 1;
            *r = tok;
            if used + nb > 56 {
                bits.put(acc, used);
                (acc, used) = (0, 0);
            }
            acc |= raw << used;
            used += nb;
        }
        bits.put(acc, used);
        symbols.extend_from_slice(&run[..v16.len()]);
    }
    finish(&symbols, ctxs, &merge_counts(&counts4), &bits.finish(), out);
}

/// [`encode`] of values below 16 given as bytes (signs, ternary symbols): the same stream,
/// without building tokens or raw bits.
pub fn encode_small(values: &[u8], contexts: &[u8], n_ctx: usize, out: &mut Vec<u8>) {
    assert!(
        contexts.is_empty() || contexts.len() == values.len(),
        "one context per value"
    );
    assert!((1..=MAX_CONTEXTS).contains(&n_ctx), "context count");
    assert!(values.iter().all(|&v| v < 16), "small values only");
    if values.is_empty() {
        rans::put_varint(out, 0);
        rans::put_varint(out, 0);
        return;
    }
    // Four sets of counts, by position mod 4 (see `encode`).
    let mut counts4 = vec![[0u32; 256]; 4 * n_ctx];
    let all_ctx: Vec<u8>;
    let ctxs = if contexts.is_empty() {
        let (v4, tail) = values.as_chunks::<4>();
        for q in v4 {
            for k in 0..4 {
                counts4[k][q[k] as usize] += 1;
            }
        }
        for &v in tail {
            counts4[0][v as usize] += 1;
        }
        all_ctx = vec![0; values.len()];
        &all_ctx[..]
    } else {
        for (j, (&v, &c)) in values.iter().zip(contexts).enumerate() {
            counts4[4 * c as usize + (j & 3)][v as usize] += 1;
        }
        contexts
    };
    finish(values, ctxs, &merge_counts(&counts4), &[], out);
}

/// The counts per context from four sets per context (context `c`'s at `4c..4c + 4`).
fn merge_counts(counts4: &[[u32; 256]]) -> Vec<[u32; 256]> {
    counts4
        .chunks_exact(4)
        .map(|sets| std::array::from_fn(|t| sets.iter().map(|s| s[t]).sum()))
        .collect()
}

/// Writes the model, the rANS words of `symbols` and the raw bits.
fn finish(symbols: &[u8], ctxs: &[u8], counts: &[[u32; 256]], raw: &[u8], out: &mut Vec<u8>) {
    let model = Model::from_counts(counts);
    let tables = EncoderTables::new(&model);
    let mut words = Vec::new();
    let (states, len) = rans::encode(&tables, symbols, ctxs, &mut words, kernels::rans_groups(Kernel::WIDEST));
    rans::put_varint(out, rans::stream_words(len) as u64);
    rans::put_varint(out, raw.len() as u64);
    model.write(out);
    rans::write_stream(states, &words[..len], out);
    out.extend_from_slice(raw);
}

/// Decodes a stream made by [`encode`] from the front of `input` into `out` (whose length
/// is the number of values), value `i` under context `contexts[i]` (each `< n_ctx`; empty:
/// all 0, else one per value).
///
/// The input is untrusted: any inconsistency is an error, never a panic. Values wider
/// than `max_bits` bits are rejected.
pub fn decode(
    input: &mut &[u8],
    n_ctx: usize,
    max_bits: u32,
    contexts: &[u8],
    out: &mut [u64],
) -> Result<(), DecodeError> {
    decode_with(Kernel::WIDEST, input, n_ctx, max_bits, contexts, out)
}

/// [`decode`], with the vector decoder where `kernel`, the CPU and the stream allow it (with
/// [`Kernel::Portable`]: never, the reference it is held to).
pub fn decode_with(
    kernel: Kernel,
    input: &mut &[u8],
    n_ctx: usize,
    max_bits: u32,
    contexts: &[u8],
    out: &mut [u64],
) -> Result<(), DecodeError> {
    assert!(
        contexts.is_empty() || contexts.len() == out.len(),
        "one context per value"
    );
    let n_words = rans::get_varint(input).ok_or(DecodeError("bad word count"))?;
    let n_raw = rans::get_varint(input).ok_or(DecodeError("bad raw-bit length"))?;
    if out.is_empty() {
        return match (n_words, n_raw) {
            (0, 0) => Ok(()),
            _ => Err(DecodeError("empty stream with content")),
        };
    }
    let model = Model::read(input, n_ctx).ok_or(DecodeError("bad frequency table"))?;
    if model.freqs.iter().any(|f| f.len() > max_token(max_bits) + 1) {
        return Err(DecodeError("token out of range"));
    }
    let word_bytes = take_len(input, n_words.checked_mul(2))?;
    let raw_bytes = take_len(&mut &input[word_bytes..], Some(n_raw))?;
    let (words, rest) = input.split_at(word_bytes);
    let (raw, rest) = rest.split_at(raw_bytes);
    *input = rest;
    if contexts.iter().any(|&c| c as usize >= n_ctx) {
        return Err(DecodeError("context out of range"));
    }
    if let Some(done) = kernels::ints_decode_values(kernel, &model, contexts, words, raw, out) {
        return done;
    }
    let tables = DecoderTables::new(&model);
    let expand = TokenTable::new();
    let mut bits = BitReader::new(raw);
    let (mut reader, mut st) = rans::WordReader::new(words);
    let mut bad = 0u8;
    for (i, o) in out.iter_mut().enumerate() {
        let c = contexts.get(i).map_or(0, |&c| c as usize);
        let (base, nbits) = expand.get(tables.step(c, &mut st[i % rans::INTERLEAVE], &mut reader, &mut bad));
        *o = base | bits.get(nbits);
    }
    crate::error::verdict(bad != 0, reader.finish(st) && bits.finish())
}

/// Decodes a stream of `count` gaps (the elements skipped before each position) into the
/// increasing positions they code, each checked to be below `n` (chunks hold at most 2^30
/// bytes, so positions fit a `u32`).
pub fn decode_positions(input: &mut &[u8], count: usize, n: usize) -> Result<Vec<u32>, DecodeError> {
    let mut positions = Vec::new();
    decode_positions_into(input, count, n, &mut Vec::new(), &mut positions)?;
    Ok(positions)
}

/// [`decode_positions`] into `positions`, with `gaps` as scratch; both keep their capacity,
/// so that a caller decoding chunk after chunk allocates once.
pub fn decode_positions_into(
    input: &mut &[u8],
    count: usize,
    n: usize,
    gaps: &mut Vec<u64>,
    positions: &mut Vec<u32>,
) -> Result<(), DecodeError> {
    if count > n {
        return Err(DecodeError("more positions than elements"));
    }
    // `decode` overwrites every value: only growth needs zeroing (`resize` keeps the rest).
    gaps.resize(count, 0);
    decode(input, 1, 64, &[], gaps)?;
    // `next` is the lowest position the next gap can give, never past `n`: no sum can wrap.
    let mut next = 0u64;
    positions.clear();
    positions.reserve(count);
    for &g in gaps.iter() {
        if g >= n as u64 - next {
            return Err(DecodeError("position past the chunk"));
        }
        positions.push((next + g) as u32);
        next += g + 1;
    }
    Ok(())
}

/// Checks that `len` bytes are available at the front of `input` and returns their count.
fn take_len(input: &mut &[u8], len: Option<u64>) -> Result<usize, DecodeError> {
    len.filter(|&b| b <= input.len() as u64)
        .map(|b| b as usize)
        .ok_or(DecodeError("stream past end of payload"))
}

/// Maps a signed integer to an unsigned one, small magnitudes to small values.
#[inline(always)]
pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline(always)]
pub fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(values: &[u64], contexts: &[u8], n_ctx: usize) -> usize {
        let mut out = vec![7u8];
        encode(values, contexts, n_ctx, &mut out);
        out.push(9);
        let mut input = &out[1..];
        let mut got = vec![0u64; values.len()];
        decode(&mut input, n_ctx, 64, contexts, &mut got).expect("decodes");
        assert_eq!(got, values);
        assert_eq!(input, &[9], "the stream delimits itself");
        out.len() - 2
    }

    proptest! {
        #[test]
        fn streams_round_trip(vals in proptest::collection::vec((any::<u64>(), 0u32..64, 0u8..5), 0..2000)) {
            let values: Vec<u64> = vals.iter().map(|&(v, b, _)| v >> b).collect();
            let contexts: Vec<u8> = vals.iter().map(|&(_, _, c)| c).collect();
            round_trip(&values, &contexts, 5);
            round_trip(&values, &[], 1);
        }

        #[test]
        fn zigzag_round_trips(v in any::<i64>()) {
            prop_assert_eq!(unzigzag(zigzag(v)), v);
        }

        #[test]
        fn hostile_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), n in 0usize..300) {
            let mut input = &bytes[..];
            let mut out = vec![0u64; n];
            let contexts: Vec<u8> = (0..n).map(|i| (i % 3) as u8).collect();
            let _ = decode(&mut input, 3, 64, &contexts, &mut out);
        }

        #[test]
        fn vector_and_portable_decoders_agree(
            vals in proptest::collection::vec((any::<u16>(), 0u32..16, 0u8..5), 0..1500),
            damage in 0usize..40,
            at in any::<usize>(),
            bit in 0u8..8,
        ) {
            // Values of up to 16 bits (the vector decoder's case) and contexts with and without tables.
            let values: Vec<u64> = vals.iter().map(|&(v, b, _)| (v >> b) as u64).collect();
            let contexts: Vec<u8> = vals.iter().map(|&(_, _, c)| c).collect();
            let mut stream = Vec::new();
            encode(&values, &contexts, 6, &mut stream);
            if damage < 25 && !stream.is_empty() {
                let i = at % stream.len();
                stream[i] ^= 1 << bit;
            }
            for ctx in [&contexts[..], &[]] {
                let (mut a, mut b) = (vec![0u64; values.len()], vec![0u64; values.len()]);
                let (mut ia, mut ib) = (&stream[..], &stream[..]);
                let ra = decode_with(Kernel::WIDEST, &mut ia, 6, 64, ctx, &mut a);
                let rb = decode_with(Kernel::Portable, &mut ib, 6, 64, ctx, &mut b);
                prop_assert_eq!(&ra, &rb);
                prop_assert_eq!(ia.len(), ib.len());
                if ra.is_ok() {
                    prop_assert_eq!(&a, &b);
                }
                if damage >= 25 && !ctx.is_empty() {
                    prop_assert!(ra.is_ok());
                    prop_assert_eq!(&a, &values);
                }
            }
        }
    }

    #[test]
    fn skewed_binary_streams_cost_their_entropy() {
        // 90 % zeros: about 0.47 bits per value.
        let values: Vec<u64> = (0..100_000u64)
            .map(|i| (i.wrapping_mul(2654435761) % 10 == 0) as u64)
            .collect();
        let bytes = round_trip(&values, &[], 1);
        let bits_per_value = bytes as f64 * 8.0 / values.len() as f64;
        assert!(bits_per_value < 0.5, "{bits_per_value}");
    }
}
