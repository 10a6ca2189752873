//! What the vector kernels share, in plain Rust: the packed rANS decode tables both vector
//! decoders gather from, and how a chunk's parsed payload and context map are handed to
//! them. No intrinsics here, so it compiles on every target.

use std::cell::RefCell;

use crate::rans::{Model, SCALE_BITS};

const SCALE: usize = 1 << SCALE_BITS;

/// One `u32` per context and slot: `freq << 19 | bias << 6 | symbol`, where `bias` is the
/// slot's offset from its symbol's start (see [`entry`]). Unused contexts decode every slot
/// as symbol 0 with frequency 1, and are flagged.
#[derive(Default)]
pub(crate) struct PackedTables {
    pub(crate) slots: Vec<u32>,
    pub(crate) unused: u64,
}

thread_local! {
    /// The decode tables, rebuilt for each stream in one buffer per thread: up to a MiB, and
    /// a fresh allocation per chunk (page faults, zeroing) cost more than small chunks' decode.
    static TABLES: RefCell<PackedTables> = RefCell::new(PackedTables::default());
}

/// Runs `f` with this thread's decode tables filled for `model`; `f` must not decode another
/// stream itself.
pub(crate) fn with_tables<R>(model: &Model, f: impl FnOnce(&PackedTables) -> R) -> R {
    TABLES.with_borrow_mut(|t| {
        t.fill(model);
        f(t)
    })
}

/// Where a table entry's frequency starts: one shift gives it, the decoders' chain from
/// state to state being `x = freq * (x >> 12) + bias`.
pub(crate) const FREQ_SHIFT: u32 = 19;
/// Where a table entry's bias starts (12 bits).
pub(crate) const BIAS_SHIFT: u32 = 6;
/// A table entry's symbol: the 16-bit decoders' tokens are below 64.
pub(crate) const SYMBOL_MASK: u32 = 0x3F;

/// A table entry's bias, after shifting it down.
pub(crate) const BIAS_MASK: u32 = 0xFFF;

/// A table entry: `freq` up to 4096, `bias` below it, `symbol` below 64.
const fn entry(symbol: u32, freq: u32, bias: u32) -> u32 {
    freq << FREQ_SHIFT | bias << BIAS_SHIFT | symbol
}

/// The state after decoding the symbol of `entry` from state `x` (before renormalising), as
/// the scalar tails of the vector decoders step one lane.
#[inline(always)]
pub(crate) fn next_state(entry: u32, x: u32) -> u32 {
    (entry >> FREQ_SHIFT)
        .wrapping_mul(x >> SCALE_BITS)
        .wrapping_add((entry >> BIAS_SHIFT) & BIAS_MASK)
}

impl PackedTables {
    /// Rebuilds the tables for `model` in place, keeping the buffer's capacity. Every
    /// context of `model` has at most 64 symbols (the vector decoders check `model_fits`).
    pub(crate) fn fill(&mut self, model: &Model) {
        self.slots.resize(model.freqs.len() * SCALE, 0);
        self.unused = 0;
        for (c, f) in model.freqs.iter().enumerate() {
            assert!(
                f.len() <= SYMBOL_MASK as usize + 1,
                "a packed table's symbols fit six bits"
            );
            let table = &mut self.slots[c * SCALE..(c + 1) * SCALE];
            if f.is_empty() {
                self.unused |= 1 << c;
                table.fill(entry(0, 1, 0));
            }
            // A validated model's frequencies of a used context sum to SCALE: every slot is set.
            let mut start = 0usize;
            for (s, &x) in f.iter().enumerate() {
                let x = x as usize;
                for (k, e) in table[start..start + x].iter_mut().enumerate() {
                    *e = entry(s as u32, x as u32, k as u32);
                }
                start += x;
            }
            // A stale entry of the previous model would survive in a slot not set here.
            debug_assert!(
                f.is_empty() || start == SCALE,
                "a used context's frequencies sum to SCALE"
            );
        }
    }
}

/// Where the parsed parts of a chunk payload are.
pub struct Parts<'a> {
    /// How exponents map to contexts.
    pub contexts: Contexts,
    /// The validated model (one context per exponent in `lo..=hi`).
    pub model: &'a Model,
    /// The rANS word stream, little-endian 16-bit words.
    pub words: &'a [u8],
    /// The raw bits.
    pub bits: &'a [u8],
    /// Token -> (value without its raw bits, raw bit count).
    pub expand: &'a [(u64, u32); 256],
}

/// How a chunk maps exponents to contexts: `clamp((bits >> mantissa_bits) & exp_mask, lo, hi) - lo`.
pub struct Contexts {
    /// First exponent with its own context.
    pub lo: u16,
    /// Last exponent with its own context.
    pub hi: u16,
    /// Mantissa bits of the dtype.
    pub mantissa_bits: u32,
    /// Exponent mask of the dtype.
    pub exp_mask: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tables refilled for a smaller model, after a larger one with other frequencies, are
    /// those a fresh buffer gets: no entry of the first survives.
    #[test]
    fn refilled_tables_equal_fresh_ones() {
        let histogram = |seed: u32, used: bool| {
            let mut h = [0u32; 256];
            if used {
                for (s, c) in h.iter_mut().take(60).enumerate() {
                    *c = (s as u32 * 7919 + seed) % 97;
                }
            }
            h
        };
        let big = Model::from_counts(&[histogram(1, true), histogram(2, true), histogram(3, true)]);
        let small = Model::from_counts(&[histogram(4, true), histogram(0, false)]);
        let mut reused = PackedTables::default();
        reused.fill(&big);
        reused.fill(&small);
        let mut fresh = PackedTables::default();
        fresh.fill(&small);
        assert_eq!(reused.slots, fresh.slots);
        assert_eq!((reused.unused, fresh.unused), (0b10, 0b10));
    }
}
