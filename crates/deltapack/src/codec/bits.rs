//! Little-endian bit packing for the raw low bits that follow each token.

/// Appends bit fields LSB-first to a byte vector.
#[derive(Default)]
pub struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Appends the low `n` bits of `v` (`n <= 64`).
    #[inline(always)]
    pub fn put(&mut self, v: u64, n: u32) {
        if n > 32 {
            self.put32(v & 0xFFFF_FFFF, 32);
            self.put32(v >> 32, n - 32);
        } else {
            self.put32(v, n);
        }
    }

    #[inline(always)]
    fn put32(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        if self.n >= 32 {
            self.out.extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.n -= 32;
        }
    }

    /// Flushes the partial byte and returns the packed bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let bytes = self.n.div_ceil(8) as usize;
        self.out.extend_from_slice(&self.acc.to_le_bytes()[..bytes]);
        self.out
    }
}

/// Reads bit fields written by [`BitWriter`]; reading past the end yields zeros and is reported by [`BitReader::finish`].
pub struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
    consumed: u64,
}

impl<'a> BitReader<'a> {
    /// Starts reading at the first bit of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            acc: 0,
            n: 0,
            consumed: 0,
        }
    }

    /// Reads `n` bits (`n <= 64`).
    #[inline(always)]
    pub fn get(&mut self, n: u32) -> u64 {
        if n > 32 {
            let lo = self.get32(32);
            lo | (self.get32(n - 32) << 32)
        } else {
            self.get32(n)
        }
    }

    #[inline(always)]
    fn get32(&mut self, n: u32) -> u64 {
        if self.n < n {
            let mut w = [0u8; 4];
            if let Some(rest) = self.data.get(self.pos..) {
                let avail = rest.len().min(4);
                w[..avail].copy_from_slice(&rest[..avail]);
            }
            self.pos = self.pos.saturating_add(4);
            self.acc |= (u32::from_le_bytes(w) as u64) << self.n;
            self.n += 32;
        }
        let v = self.acc & ((1u64 << n) - 1);
        self.acc >>= n;
        self.n -= n;
        self.consumed += n as u64;
        v
    }

    /// True if exactly the written bits were consumed (up to the final partial byte).
    pub fn finish(&self) -> bool {
        let total = self.data.len() as u64 * 8;
        self.consumed <= total && total - self.consumed < 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fields_round_trip(fields in proptest::collection::vec((any::<u64>(), 0u32..=64), 0..300)) {
            let mut w = BitWriter::default();
            for &(v, n) in &fields {
                w.put(if n == 64 { v } else { v & ((1u64 << n) - 1) }, n);
            }
            let bytes = w.finish();
            let mut r = BitReader::new(&bytes);
            for &(v, n) in &fields {
                let want = if n == 64 { v } else { v & ((1u64 << n) - 1) };
                prop_assert_eq!(r.get(n), want);
            }
            prop_assert!(r.finish());
        }
    }
}
