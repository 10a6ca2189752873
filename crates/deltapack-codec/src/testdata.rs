//! Synthetic tensors for unit tests.

/// A bf16 tensor of `rows x cols`: weights ~ N(0, 0.02)-ish and a fine-tune that adds
/// `scale(i, j)` times a Gaussian-ish draw (a sum of 12 uniforms), from a xorshift stream.
pub(crate) fn bf16_pair(
    rows: usize,
    cols: usize,
    seed: u64,
    scale: impl Fn(usize, usize) -> f32,
) -> (Vec<u8>, Vec<u8>) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f32 / (1u64 << 53) as f32
    };
    let mut normal = || (0..12).map(|_| uniform()).sum::<f32>() - 6.0;
    let (mut b, mut t) = (Vec::new(), Vec::new());
    for i in 0..rows {
        for j in 0..cols {
            let w = 0.02 * normal();
            let d = scale(i, j) * normal();
            b.extend_from_slice(&half::bf16::from_f32(w).to_bits().to_le_bytes());
            t.extend_from_slice(&half::bf16::from_f32(w + d).to_bits().to_le_bytes());
        }
    }
    (b, t)
}
