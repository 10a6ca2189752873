//! Little-endian bit packing for the raw low bits that follow each token, and the one varint
//! (unsigned LEB128) of every stream and record the codecs write.

/// Appends bit fields LSB-first to a byte vector, without data-dependent branches.
#[derive(Default)]
pub struct BitWriter {
    out: Vec<u8>,
    /// Bytes of `out` that are final.
    len: usize,
    acc: u64,
    /// Valid bits in `acc` (< 8 between calls).
    n: u32,
}

impl BitWriter {
    /// A writer that reuses `buffer`'s allocation, with room for about `bytes` bytes before it must grow.
    pub fn with_buffer(mut buffer: Vec<u8>, bytes: usize) -> Self {
        if buffer.len() < bytes + 8 {
            buffer.resize(bytes + 8, 0);
        }
        BitWriter {
            out: buffer,
            ..Default::default()
        }
    }

    /// Appends the low `n` bits of `v` (`n <= 64`; higher bits of `v` must be zero).
    #[inline(always)]
    pub fn put(&mut self, v: u64, n: u32) {
        if n > 56 {
            self.put56(v & 0xFFFF_FFFF, 32);
            self.put56(v >> 32, n - 32);
        } else {
            self.put56(v, n);
        }
    }

    #[inline(always)]
    fn put56(&mut self, v: u64, n: u32) {
        self.acc |= v << self.n;
        self.n += n;
        if self.out.len() < self.len + 8 {
            self.out.resize((self.len + 8).max(self.out.len() * 2), 0);
        }
        self.out[self.len..self.len + 8].copy_from_slice(&self.acc.to_le_bytes());
        let bytes = self.n >> 3;
        self.len += bytes as usize;
        // bytes <= 7, so the shift stays below 64.
        self.acc >>= bytes * 8;
        self.n &= 7;
    }

    /// Flushes the partial byte and returns the packed bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let total = self.len + self.n.div_ceil(8) as usize;
        self.out.resize(self.len + 8, 0);
        self.out[self.len..self.len + 8].copy_from_slice(&self.acc.to_le_bytes());
        self.out.truncate(total);
        self.out
    }
}

/// Reads bit fields written by [`BitWriter`]; reading past the end yields zeros and is reported by [`BitReader::finish`].
///
/// `acc` holds `n` valid bits at the bottom; bits above them are either zero or the true
/// next bits of the stream, which is what lets [`BitReader::refill`] run without branches.
pub struct BitReader<'a> {
    data: &'a [u8],
    /// Bytes loaded into `acc` so far.
    pos: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitReader<'a> {
    /// Starts reading at the first bit of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }

    #[inline(always)]
    fn load8(&self) -> u64 {
        match self.data.get(self.pos..self.pos.saturating_add(8)) {
            Some(b) => u64::from_le_bytes(b.try_into().expect("8 bytes")),
            None => {
                let mut b = [0u8; 8];
                if let Some(rest) = self.data.get(self.pos..) {
                    b[..rest.len()].copy_from_slice(rest);
                }
                u64::from_le_bytes(b)
            }
        }
    }

    /// Makes at least 56 bits available for [`BitReader::take`].
    #[inline(always)]
    pub fn refill(&mut self) {
        self.acc |= self.load8() << self.n;
        self.pos = self.pos.saturating_add(((63 - self.n) >> 3) as usize);
        self.n |= 56;
    }

    /// Takes `n` bits, which must be available (after [`BitReader::refill`], up to 56).
    #[inline(always)]
    pub fn take(&mut self, n: u32) -> u64 {
        debug_assert!(n <= self.n);
        let v = self.acc & ((1u64 << n) - 1);
        self.acc >>= n;
        self.n -= n;
        v
    }

    /// Reads `n` bits (`n <= 64`), refilling as needed.
    #[inline(always)]
    pub fn get(&mut self, n: u32) -> u64 {
        if n > 32 {
            return self.get_wide(n);
        }
        if self.n < n {
            self.refill();
        }
        self.take(n)
    }

    /// [`BitReader::get`] of more than 32 bits, in two parts; out of line (and not recursive)
    /// so that the common case inlines into decoding loops.
    #[cold]
    #[inline(never)]
    fn get_wide(&mut self, n: u32) -> u64 {
        self.refill();
        let lo = self.take(32);
        self.refill();
        lo | (self.take(n - 32) << 32)
    }

    /// True if exactly the written bits were consumed (up to the final partial byte).
    pub fn finish(&self) -> bool {
        let total = self.data.len() as u64 * 8;
        let consumed = (self.pos as u64 * 8).saturating_sub(self.n as u64);
        self.pos as u64 * 8 >= self.n as u64 && consumed <= total && total - consumed < 8
    }
}

/// Appends an unsigned LEB128 varint.
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint, rejecting overlong or truncated encodings.
#[inline]
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

/// Writes `v` as an unsigned LEB128 varint at the start of `out` (room for 10 bytes),
/// returning its length: [`put_varint`] into a fixed buffer, for writers that gather bytes on
/// the stack.
#[inline]
pub fn write_varint(out: &mut [u8], mut v: u64) -> usize {
    let mut len = 0;
    while v >= 0x80 {
        out[len] = v as u8 | 0x80;
        v >>= 7;
        len += 1;
    }
    out[len] = v as u8;
    len + 1
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
