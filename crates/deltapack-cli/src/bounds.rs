//! Order-0 entropy bounds of a pair's deltas, to judge a codec against.
//!
//! For every same-shape pair of 16-bit float tensors: the entropy of the order-preserving
//! integer difference of the bit patterns, with one distribution per tensor, and the same
//! conditioned on the base value's exponent. Table costs are not counted, so these are what
//! an ideal static coder with those contexts would reach.

use serde::Serialize;

use deltapack::checkpoint::Checkpoint;

/// Entropy bounds of a pair, as compression ratios of the weight bytes they cover.
#[derive(Debug, Clone, Serialize)]
pub struct Bounds {
    /// Weight bytes covered (16-bit float tensors present in both, same shape and dtype).
    pub bytes: u64,
    /// Fraction of covered values bit-identical to the base's.
    pub unchanged: f64,
    /// Ratio bound of the order-0 entropy of the integer difference.
    pub order0_ratio: f64,
    /// Ratio bound of the same conditioned on the base exponent.
    pub exponent_context_ratio: f64,
}

fn entropy_bits(counts: impl Iterator<Item = u64>, total: u64) -> f64 {
    let t = total as f64;
    counts
        .filter(|&c| c > 0)
        .map(|c| -(c as f64) * (c as f64 / t).log2())
        .sum()
}

/// Computes the bounds over all matching 16-bit float tensors of the two checkpoints.
pub fn bounds(base: &Checkpoint, ft: &Checkpoint) -> Bounds {
    let mut joint = vec![0u32; 1 << 24];
    let mut touched: Vec<u32> = Vec::new();
    let mut marginal = vec![0u64; 1 << 16];
    let (mut bits0, mut bits_ctx, mut bytes, mut same, mut n_all) = (0f64, 0f64, 0u64, 0u64, 0u64);
    for t in &ft.tensors {
        let Some(b) = base.tensor(&t.name) else {
            continue;
        };
        let mant = match t.dtype {
            deltapack::Dtype::BF16 => 7,
            deltapack::Dtype::F16 => 10,
            _ => continue,
        };
        if b.dtype != t.dtype || b.shape != t.shape {
            continue;
        }
        let ord = |x: u16| if x & 0x8000 != 0 { !x } else { x | 0x8000 };
        let mut per_exp = vec![0u64; 256];
        for (pb, pt) in base.bytes(b).chunks_exact(2).zip(ft.bytes(t).chunks_exact(2)) {
            let (x, y) = (u16::from_le_bytes([pb[0], pb[1]]), u16::from_le_bytes([pt[0], pt[1]]));
            let d = ord(y).wrapping_sub(ord(x));
            let e = ((x >> mant) & 0xFF) as u32;
            let key = (e << 16 | d as u32) as usize;
            if joint[key] == 0 {
                touched.push(key as u32);
            }
            joint[key] += 1;
            marginal[d as usize] += 1;
            per_exp[e as usize] += 1;
            same += (d == 0) as u64;
        }
        let n = (t.len() / 2) as u64;
        n_all += n;
        bits0 += entropy_bits(marginal.iter().copied(), n);
        // H(D | E) = H(D, E) - H(E)
        bits_ctx +=
            entropy_bits(touched.iter().map(|&k| joint[k as usize] as u64), n) - entropy_bits(per_exp.into_iter(), n);
        for &k in &touched {
            joint[k as usize] = 0;
        }
        touched.clear();
        marginal.iter_mut().for_each(|c| *c = 0);
        bytes += t.len() as u64;
        base.release(b, 0..b.len());
        ft.release(t, 0..t.len());
    }
    let ratio = |bits: f64| {
        if bits > 0.0 {
            bytes as f64 * 8.0 / bits
        } else {
            f64::INFINITY
        }
    };
    Bounds {
        bytes,
        unchanged: same as f64 / n_all.max(1) as f64,
        order0_ratio: ratio(bits0),
        exponent_context_ratio: ratio(bits_ctx),
    }
}
