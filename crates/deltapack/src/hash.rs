//! Fingerprints of tensors, headers and files.
//!
//! A tensor's fingerprint is a BLAKE3 hash over the BLAKE3 hashes of its fixed-size chunks,
//! so that chunks can be hashed in parallel, as they stream by, in any thread order:
//! `blake3("deltapack.tensor.v1" || len: u64 LE || chunk_bytes: u64 LE || h(chunk 0) || h(chunk 1) || ...)`.
//! It depends only on the tensor's bytes (and the chunk size recorded in the delta), never on
//! which shard holds the tensor.

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// Hash of one chunk of tensor bytes.
pub fn chunk(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}

/// [`chunk`] of bytes fed piece by piece (same digest): hashing each piece while it is in
/// cache.
#[derive(Default)]
pub struct ChunkHasher(blake3::Hasher);

impl ChunkHasher {
    /// Feeds the next piece.
    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The digest of everything fed so far.
    pub fn digest(&self) -> Digest {
        *self.0.finalize().as_bytes()
    }
}

/// Combines the chunk hashes of a tensor of `len` bytes into its fingerprint.
pub fn tensor<'a>(len: u64, chunk_bytes: u64, chunks: impl IntoIterator<Item = &'a Digest>) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"deltapack.tensor.v1");
    h.update(&len.to_le_bytes());
    h.update(&chunk_bytes.to_le_bytes());
    for c in chunks {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

/// Hash of a whole small byte string (headers, auxiliary files).
pub fn bytes(data: &[u8]) -> Digest {
    *blake3::hash(data).as_bytes()
}

/// Lower-case hex of a digest.
pub fn hex(d: &Digest) -> String {
    // One allocation, not one per byte: a switch compares hundreds of fingerprints.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in d {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Parses 64 hex digits.
pub fn parse_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

/// Number of chunks a tensor of `len` bytes is cut into.
pub fn chunk_count(len: u64, chunk_bytes: u64) -> u64 {
    len.div_ceil(chunk_bytes)
}

/// Hashes a file by streaming it, returning (size, digest).
pub fn file(path: &std::path::Path) -> std::io::Result<(u64, Digest)> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path)?;
    let n = std::io::copy(&mut f, &mut h)?;
    Ok((n, *h.finalize().as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        let d = bytes(b"x");
        assert_eq!(parse_hex(&hex(&d)), Some(d));
        assert_eq!(parse_hex("zz"), None);
        assert_eq!(parse_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn tensor_hash_depends_on_every_chunk() {
        let a = tensor(10, 4, &[chunk(b"abcd"), chunk(b"efgh"), chunk(b"ij")]);
        let b = tensor(10, 4, &[chunk(b"abcd"), chunk(b"efgX"), chunk(b"ij")]);
        assert_ne!(a, b);
        let data: Vec<u8> = (0..300_000u32).map(|i| ((i * 7) >> 3) as u8).collect();
        let mut h = ChunkHasher::default();
        data.chunks(65536).for_each(|p| h.update(p));
        assert_eq!(h.digest(), chunk(&data));
        assert_eq!(chunk_count(10, 4), 3);
        assert_eq!(chunk_count(0, 4), 0);
    }
}
